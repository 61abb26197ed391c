"""Quality measures every pass and benchmark is judged by.

- lm_bits_per_byte: held-out bits per byte of a causal LM on the zoo's code corpus (fast subset mode).
- greedy_agreement: fraction of generated tokens identical to a reference run.
- mse / psnr: diffusion outputs against the uncached full-precision sampler from the same noise.
- classifiable_rate: fraction of digit samples the zoo's classifier labels with confidence >= 0.9 (a stand-in for FID).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

FAST_WINDOWS = 128


def _logits_fn(model) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(model, torch.nn.Module):
        device = next(model.parameters(), torch.empty(0)).device

        def fn(ids):
            out = model(input_ids=ids.to(device))
            return out.logits if hasattr(out, "logits") else out[0]
        return fn
    return model  # an Engine / CompiledModel / callable: input_ids -> logits


@torch.no_grad()
def lm_bits_per_byte(model, *, context: int = 256, fast: bool = False, max_windows: int | None = None,
                     batch: int = 8) -> float:
    """Mean bits per predicted byte over non-overlapping held-out windows of `context` tokens (BOS targets are
    excluded). `fast` uses an evenly spaced subset of 128 windows. `model`: a HF causal LM or a callable returning
    logits for input_ids [B, L] (batches of 1 are used for callables, which may be compiled for batch 1)."""
    from .zoo.code_data import heldout_windows
    if fast and max_windows is None:
        max_windows = FAST_WINDOWS
    fn = _logits_fn(model)
    if not isinstance(model, torch.nn.Module):
        batch = 1
    windows = heldout_windows(context + 1, max_windows)
    nats, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        logits = torch.as_tensor(fn(w[:, :-1])).float().cpu()
        target = w[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        keep = target < 256
        nats += nll[keep].double().sum().item()
        count += int(keep.sum())
    return nats / max(count, 1) / math.log(2)


def greedy_agreement(generated: Sequence[Sequence[int]] | torch.Tensor,
                     reference: Sequence[Sequence[int]] | torch.Tensor) -> float:
    """Fraction of reference positions where `generated` has the same token (per sequence, then pooled).

    Missing or extra tokens count as disagreements, so a run that stops early or runs on is penalised.
    """
    same, total = 0, 0
    for g, r in zip(_rows(generated), _rows(reference), strict=True):
        n = max(len(g), len(r))
        same += sum(1 for a, b in zip(g, r) if a == b)
        total += n
    return same / total if total else 1.0


def _rows(x) -> list[list[int]]:
    if isinstance(x, torch.Tensor):
        x = x.tolist() if x.dim() == 2 else [x.tolist()]
    return [list(map(int, r)) for r in x]


def mse(output: torch.Tensor, reference: torch.Tensor) -> float:
    return torch.mean((output.double() - reference.double()) ** 2).item()


def psnr(output: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB; images in [-1, 1] have data_range 2. Identical inputs give inf."""
    err = mse(output, reference)
    return math.inf if err == 0 else 10 * math.log10(data_range ** 2 / err)


@torch.no_grad()
def classifiable_rate(samples: torch.Tensor, threshold: float = 0.9, classifier=None) -> float:
    """Fraction of samples ([N, 1, 16, 16] in [-1, 1]) classified with max softmax >= threshold."""
    from .zoo import load_classifier
    clf = classifier or load_classifier()
    probs = torch.softmax(clf(samples.clamp(-1, 1).float()), dim=-1)
    return (probs.max(-1).values >= threshold).float().mean().item()
