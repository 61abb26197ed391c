"""A small image classifier used by the README's quick start and the end-to-end tests.

`optimize examples.tiny_cnn:build -o out/cnn` captures it with its own example input (a 1x3x32x32 image).
"""
import torch
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(32 * 8 * 8, classes)
        # A parameter-only subgraph (scale * 2) that fold-constants evaluates once at compile time.
        self.logit_scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, image):
        x = self.features(image).flatten(1)
        x = self.dropout(x.contiguous())
        return self.head(x) * (self.logit_scale * 2.0).exp()


def build():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    return model, (torch.randn(1, 3, 32, 32),)
