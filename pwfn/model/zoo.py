"""A small model zoo, registered by name, that needs no torchvision.

``create_model("resnet20", num_classes=10)`` builds a model from its name; configs and
checkpoints store that name plus keyword arguments as the model's construction recipe.
``tv_resnet18``/``tv_resnet50`` and ``deit_tiny`` wrap torchvision/timm and import them only
when asked for (the ``vision`` extra).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..common.hints import install_hint
from ..errors import ConfigError, ModelError, PwfnError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make a model constructor available to ``create_model(name)``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    """Names of the registered models, sorted (``pwfn models`` shows them with a description)."""
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model; unknown names and bad arguments raise ``ConfigError``."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown model {name!r}.{hint} Available: {', '.join(list_models())}")
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad arguments for model {name!r}: {exc}") from exc


def model_factory(name: str) -> Callable[..., nn.Module] | None:
    """The registered constructor of ``name`` (None when no model has that name)."""
    return _REGISTRY.get(name)


def build_from_recipe(recipe: dict) -> nn.Module:
    """The model of a run's recipe (``{"name": ..., "kwargs": {...}}``); every failure on bad
    ``model.kwargs`` is a ``ConfigError`` naming the model and its arguments."""
    try:
        return create_model(recipe["name"], **recipe["kwargs"])
    except PwfnError:
        raise
    except (TypeError, ValueError, RuntimeError, OverflowError, MemoryError) as exc:
        raise ConfigError(f"cannot build model {recipe['name']!r} with model.kwargs {recipe['kwargs']!r}: "
                          f"{type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Fully connected classifier on flattened inputs."""

    def __init__(self, in_features: int = 64, hidden: Sequence[int] = (128, 64), num_classes: int = 10,
                 dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNet5(nn.Module):
    """LeNet-5 (conv 6 -> pool -> conv 16 -> pool -> 120 -> 84 -> classes), for any input size."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2 if input_size < 20 else 0), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        with torch.no_grad():
            n = self.features(torch.zeros(1, in_channels, input_size, input_size)).numel()
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(n, 120), nn.ReLU(inplace=True), nn.Linear(120, 84), nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample and zero-pad channels (no parameters)."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.shortcut = _PadShortcut(planes - in_planes)
            elif shortcut == "B":
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )
            else:
                raise ConfigError(f"shortcut must be 'A' or 'B', got {shortcut!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, §4.2): 3 stages of 16/32/64 channels, 6n+2 layers."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: int = 16,
                 shortcut: str = "A") -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ConfigError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers: list[nn.Module] = []
        in_planes = width
        for stage, planes in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


@register_model("mlp")
def mlp(in_features: int = 64, hidden: Sequence[int] = (128, 64), num_classes: int = 10,
        dropout: float = 0.0, **_: Any) -> nn.Module:
    return MLP(in_features, tuple(hidden), num_classes, dropout)


@register_model("lenet5")
def lenet5(in_channels: int = 1, num_classes: int = 10, input_size: int = 28, **_: Any) -> nn.Module:
    return LeNet5(in_channels, num_classes, input_size)


@register_model("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 3, shortcut: str = "A", **_: Any) -> nn.Module:
    return CifarResNet(20, num_classes, in_channels, shortcut=shortcut)


@register_model("resnet32")
def resnet32(num_classes: int = 10, in_channels: int = 3, shortcut: str = "A", **_: Any) -> nn.Module:
    return CifarResNet(32, num_classes, in_channels, shortcut=shortcut)


def _import_optional(module: str, extra: str = "vision"):
    try:
        return __import__(module, fromlist=["_"])
    except Exception as exc:  # ImportError, or a binary mismatch with the installed torch
        raise ModelError(
            f"this model needs {module!r}, which could not be imported ({exc.__class__.__name__}: {exc}). "
            f"Install the optional extra: {install_hint(extra)}"
        ) from exc


@register_model("tv_resnet18")
def tv_resnet18(num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """torchvision ResNet-18 (random init; load your checkpoint with ``--set model.checkpoint=...``)."""
    models = _import_optional("torchvision.models")
    return models.resnet18(weights=None, num_classes=num_classes, **kwargs)


@register_model("tv_resnet50")
def tv_resnet50(num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    models = _import_optional("torchvision.models")
    return models.resnet50(weights=None, num_classes=num_classes, **kwargs)


@register_model("deit_tiny")
def deit_tiny(num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """timm DeiT-Tiny/16 at 224 px (random init; no download)."""
    timm = _import_optional("timm")
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **kwargs)
