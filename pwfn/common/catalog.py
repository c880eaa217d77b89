"""The registered model names with one line each, for ``pwfn models``, without importing torch.

``pwfn.model.zoo`` holds the constructors; a test keeps this table and that registry in step.
"""

from __future__ import annotations

MODELS: dict[str, str] = {
    "mlp": "fully connected classifier on flattened inputs (kwargs: in_features, hidden, num_classes, dropout)",
    "lenet5": "LeNet-5: two 5x5 convolutions, then 120-84-classes (kwargs: in_channels, num_classes, input_size)",
    "resnet20": "CIFAR ResNet-20, 16/32/64 channels (kwargs: num_classes, in_channels, shortcut A|B)",
    "resnet32": "CIFAR ResNet-32, 16/32/64 channels (kwargs: num_classes, in_channels, shortcut A|B)",
    "tv_resnet18": "torchvision ResNet-18, random init ('vision' extra)",
    "tv_resnet50": "torchvision ResNet-50, random init ('vision' extra)",
    "deit_tiny": "timm DeiT-Tiny/16 at 224 px, random init ('vision' extra)",
}


def format_models() -> str:
    """``pwfn models``: one line per registered model."""
    width = max(len(n) for n in MODELS)
    return "\n".join(f"{name:<{width}}  {text}" for name, text in sorted(MODELS.items()))
