"""Models and generated data of ``device_targets.py``'s Python-made runs (an importable module, so
their recipes record: ``_device_models:SignalNet(...)``).

- :class:`SignalNet`: a keyword-spotting-shaped 1-D CNN (Conv1d + BatchNorm + pooling) on a
  (N, L) signal it unsqueezes itself; the task tells four waveforms apart (two sines, a square
  wave, a chirp) under random phase, amplitude, offset and noise.
- :class:`TinyTransformer`: token embedding + one encoder layer + mean pooling + a linear head;
  the task is which of the tokens 1, 2, 3 occurs most often in a sequence of 12.

Everything is generated from a seed: nothing is downloaded.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pwfn


class SignalNet(pwfn.RecipeMixin, nn.Module):
    def __init__(self, length: int = 128, width: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, width // 2, 7, padding=3), nn.BatchNorm1d(width // 2), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(width // 2, width, 5, padding=2), nn.BatchNorm1d(width), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(width, width, 3, padding=1), nn.BatchNorm1d(width), nn.ReLU(), nn.AvgPool1d(length // 4),
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x.unsqueeze(1)), 1))


class TinyTransformer(pwfn.RecipeMixin, nn.Module):
    def __init__(self, vocab: int = 16, seq: int = 12, dim: int = 32, heads: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(1, seq, dim))
        self.enc = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x) + self.pos).mean(1))


def signals(n: int, length: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    t = torch.linspace(0, 1, length).unsqueeze(0)
    phase = torch.rand(n, 1, generator=g) * 2 * math.pi
    amp = 0.5 + torch.rand(n, 1, generator=g)
    f = (4 + 2 * torch.rand(n, 1, generator=g))
    sine1 = torch.sin(2 * math.pi * f * t + phase)
    sine2 = torch.sin(2 * math.pi * 2.2 * f * t + phase)
    square = torch.sign(torch.sin(2 * math.pi * f * t + phase))
    chirp = torch.sin(2 * math.pi * (f * t + 6 * t * t) + phase)
    waves = torch.stack([sine1, sine2, square, chirp], 1)[torch.arange(n), y]
    x = amp * waves + 0.2 * torch.randn(n, length, generator=g) + 0.3 * torch.randn(n, 1, generator=g)
    return x, y


def tokens(n: int, seq: int = 12, vocab: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, seq), generator=g)
    counts = torch.stack([(x == k).sum(1) for k in (1, 2, 3)], 1).float()
    counts += 1e-3 * torch.arange(3).float()  # ties: the larger token wins
    return x, counts.argmax(1)


def loaders(kind: str, batch: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader, DataLoader]:
    make = signals if kind == "signal" else tokens
    x, y = make(3000, seed=seed)
    parts = [(0, 2000), (2000, 2500), (2500, 3000)]
    out = []
    for i, (a, b) in enumerate(parts):
        ds = TensorDataset(x[a:b], y[a:b])
        out.append(DataLoader(ds, batch_size=batch, shuffle=i == 0,
                              generator=torch.Generator().manual_seed(seed) if i == 0 else None))
    return out[0], out[1], out[2]


def train(model: nn.Module, loader: DataLoader, epochs: int, lr: float = 3e-3) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()
