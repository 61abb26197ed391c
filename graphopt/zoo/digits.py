"""scikit-learn's bundled handwritten digits at 16x16, and the small classifier that judges diffusion samples."""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

SIZE = 16
HELDOUT_EVERY = 10  # every 10th image (by index) is held out: deterministic, balanced enough across classes


@lru_cache(maxsize=1)
def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 1, 16, 16] in [-1, 1], labels [N]): 8x8 digits upsampled bilinearly."""
    from sklearn.datasets import load_digits as sk_digits
    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return x.clamp(0, 1) * 2 - 1, torch.tensor(d.target, dtype=torch.int64)


def split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits()
    idx = torch.arange(len(x))
    mask = (idx % HELDOUT_EVERY == 0) if name == "heldout" else (idx % HELDOUT_EVERY != 0)
    return x[mask], y[mask]


class DigitClassifier(nn.Module):
    """A small CNN on 16x16 digits in [-1, 1]: our stand-in judge for sample quality (instead of FID)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, 10),
        )

    def forward(self, x):
        return self.net(x)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # Shifts of up to 1 pixel and small intensity jitter, so the judge is not fooled by exact training pixels.
    shifts = torch.randint(-1, 2, (2,), generator=g).tolist()
    x = torch.roll(x, shifts=shifts, dims=(2, 3))
    return (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def train_classifier(epochs: int = 30, seed: int = 0) -> tuple[DigitClassifier, dict]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = split("train")
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            b = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(_augment(x[b], g)), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    xh, yh = split("heldout")
    with torch.no_grad():
        acc = (model(xh).argmax(-1) == yh).float().mean().item()
    return model, {"epochs": epochs, "heldout_accuracy": round(acc, 4), "train_images": len(x),
                   "heldout_images": len(xh)}
