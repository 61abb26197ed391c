"""Which diffusion steps recompute the deep feature: optimal schedules by dynamic programming (CacheQuant, DDT).

A schedule of K recompute steps out of T splits the steps into K consecutive groups; each group starts with a
recompute step s and its other steps i reuse F_s, at cost d(F_i, F_s). With D[s, i] = d(F_i, F_s) (measured on
calibration samples) the schedule's cost is Σ_groups Σ_{i in group} D[start, i], and

    L[n, k] = min_{j < n} L[j, k-1] + C(j, n),   C(j, n) = Σ_{i=j}^{n-1} D[j, i],   L[0, 0] = 0

gives the best K-group split of steps 0..T-1 in O(K·T²). Step 0 always recomputes (there is nothing to reuse).
"""
from __future__ import annotations

import numpy as np

from ..errors import GraphoptError

__all__ = ["dp_schedule", "uniform_schedule", "schedule_cost", "check_budget"]


def check_budget(T: int, K: int) -> None:
    if not isinstance(K, (int, np.integer)) or not 1 <= K <= T:
        raise GraphoptError(f"the number of recompute steps K must be in 1..T={T}, got {K}")


def _as_matrix(D) -> np.ndarray:
    D = np.asarray(D, dtype=np.float64)
    if D.ndim != 2 or D.shape[0] != D.shape[1]:
        raise GraphoptError(f"the distance matrix must be square [T, T], got shape {list(D.shape)}")
    if not np.isfinite(D).all():
        raise GraphoptError("the feature distances contain NaN/inf; check the calibration run")
    return D


def schedule_cost(D, steps: list[int]) -> float:
    """Σ over steps i of D[s(i), i], s(i) the latest recompute step <= i."""
    D = _as_matrix(D)
    T = D.shape[0]
    if not steps or steps[0] != 0 or sorted(set(steps)) != list(steps) or steps[-1] >= T:
        raise GraphoptError(f"a schedule is an increasing list of steps in 0..{T - 1} starting at 0, got {steps}")
    bounds = list(steps) + [T]
    return float(sum(D[s, s:e].sum() for s, e in zip(bounds[:-1], bounds[1:])))


def dp_schedule(D, K: int) -> tuple[list[int], float]:
    """The K recompute steps minimising schedule_cost(D, steps), and that cost."""
    D = _as_matrix(D)
    T = D.shape[0]
    check_budget(T, K)
    # C[j, n] = Σ_{i=j}^{n-1} D[j, i] from row prefix sums.
    prefix = np.concatenate([np.zeros((T, 1)), np.cumsum(D, axis=1)], axis=1)  # prefix[j, n] = Σ_{i<n} D[j, i]
    L = np.full((T + 1, K + 1), np.inf)
    arg = np.zeros((T + 1, K + 1), dtype=np.int64)
    L[0, 0] = 0.0
    for k in range(1, K + 1):
        for n in range(k, T + 1):
            j = np.arange(k - 1, n)
            cand = L[j, k - 1] + prefix[j, n] - prefix[j, j]
            best = int(np.argmin(cand))
            L[n, k], arg[n, k] = cand[best], j[best]
    steps, n = [], T
    for k in range(K, 0, -1):
        j = int(arg[n, k])
        steps.append(j)
        n = j
    return steps[::-1], float(L[T, K])


def uniform_schedule(T: int, K: int) -> list[int]:
    """K recompute steps spread evenly over T (DeepCache's fixed interval when K divides T)."""
    check_budget(T, K)
    return sorted({int(round(i * T / K)) for i in range(K)})
