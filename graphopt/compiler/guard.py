"""Numeric guard: compare a rewritten program's outputs with the original program's on the same inputs."""
from __future__ import annotations

import math

import torch


def max_rel(ref: torch.Tensor, out: torch.Tensor) -> float:
    """max |out - ref| / max |ref|: the worst element error relative to the output's scale."""
    ref, out = ref.double(), out.double()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    diff = (out - ref).abs().max().item() if ref.numel() else 0.0
    return diff / max(scale, 1e-12)


def rel_l2(ref: torch.Tensor, out: torch.Tensor) -> float:
    """||out - ref|| / ||ref||."""
    ref, out = ref.double(), out.double()
    return (out - ref).norm().item() / max(ref.norm().item(), 1e-12)


def cos_dist(ref: torch.Tensor, out: torch.Tensor) -> float:
    """1 - cosine similarity of the flattened outputs."""
    ref, out = ref.double().flatten(), out.double().flatten()
    return 1.0 - torch.nn.functional.cosine_similarity(ref, out, dim=0).item()


METRICS = {"max_rel": max_rel, "rel_l2": rel_l2, "cos_dist": cos_dist}


def compare(refs, outs, metric: str = "max_rel") -> float:
    """Worst metric over paired output tensors; inf when structure, shape or dtype class differs, or on NaN."""
    fn = METRICS[metric]
    if len(refs) != len(outs):
        return math.inf
    worst = 0.0
    for r, o in zip(refs, outs):
        r, o = torch.as_tensor(r), torch.as_tensor(o)
        if tuple(r.shape) != tuple(o.shape) or r.dtype.is_floating_point != o.dtype.is_floating_point:
            return math.inf
        if not r.dtype.is_floating_point:
            if not torch.equal(r.to(o.dtype), o):
                return math.inf
            continue
        if torch.isnan(o).any() and not torch.isnan(r).any():
            return math.inf
        v = fn(r, o)
        worst = max(worst, v if not math.isnan(v) else math.inf)
    return worst


def guard_inputs(program, calibration, samples: int) -> dict[str, list[tuple]]:
    """Inputs the guard runs per method: the example inputs, plus calibration samples for the entry method."""
    inputs = {m: [tuple(program.example_inputs[m])] for m in program.methods if m in program.example_inputs}
    if calibration:
        method, items = program.calibration_inputs(calibration, samples)
        if method in inputs:
            inputs[method] += items
    return inputs


def reference_outputs(program, inputs: dict[str, list[tuple]], counts: dict[str, int] | None = None
                      ) -> dict[str, list[tuple]]:
    """Each method's outputs on the guard inputs; counts: keep only that many outputs per method (the original
    ones, when a pass has appended some)."""
    return {m: [program.run(m, *_with_added_inputs(program, m, x))[:(counts or {}).get(m)] for x in xs]
            for m, xs in inputs.items()}


def _with_added_inputs(program, method: str, x: tuple) -> tuple:
    # inputs a pass appended (a routing decision) take their example values, which keep the old behaviour
    n_in = len(program.methods[method].graph_signature.user_inputs)
    return tuple(x) + tuple(program.example_inputs[method][len(x):n_in])


def check(program, reference: dict[str, list[tuple]], inputs: dict[str, list[tuple]], metric: str,
          extra_outputs: bool = False) -> float:
    """Worst metric over the original methods; extra_outputs: a pass may append outputs (they are not compared)."""
    worst = 0.0
    for m, xs in inputs.items():
        if m not in program.methods:
            continue
        for x, ref in zip(xs, reference[m]):
            out = program.run(m, *_with_added_inputs(program, m, x))
            worst = max(worst, compare(ref, out[:len(ref)] if extra_outputs else out, metric))
    return worst
