"""Cache schedules by dynamic programming: optimality against brute force, and the uniform baseline."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt.compiler.cache_schedule import dp_schedule, schedule_cost, uniform_schedule
from graphopt.errors import GraphoptError


def brute_force(D: np.ndarray, K: int) -> float:
    T = D.shape[0]
    return min(schedule_cost(D, [0, *rest]) for rest in itertools.combinations(range(1, T), K - 1))


def drifting_features(T: int, seed: int) -> np.ndarray:
    """D[s, i] = |F_i - F_s| for features that drift at a varying speed, as deep features across sampler steps."""
    rng = np.random.default_rng(seed)
    F = np.cumsum(rng.exponential(size=(T, 4)) * rng.uniform(0.1, 3.0, size=(T, 1)), axis=0)
    return np.abs(F[None, :, :] - F[:, None, :]).sum(-1)


@pytest.mark.parametrize("T", [1, 2, 5, 9])
def test_dp_matches_brute_force_on_every_budget(T):
    D = drifting_features(T, seed=T)
    for K in range(1, T + 1):
        steps, cost = dp_schedule(D, K)
        assert len(steps) == K and steps[0] == 0 and steps == sorted(set(steps))
        assert cost == pytest.approx(schedule_cost(D, steps))
        assert cost == pytest.approx(brute_force(D, K))


@settings(max_examples=60, deadline=None)
@given(T=st.integers(2, 8), seed=st.integers(0, 10_000), data=st.data())
def test_dp_is_optimal_for_arbitrary_nonnegative_costs(T, seed, data):
    D = np.random.default_rng(seed).uniform(0, 1, size=(T, T))
    K = data.draw(st.integers(1, T))
    steps, cost = dp_schedule(D, K)
    assert cost == pytest.approx(brute_force(D, K))
    assert cost <= schedule_cost(D, uniform_schedule(T, K)) + 1e-12


def test_full_budget_costs_only_the_diagonal_and_dp_beats_uniform_on_uneven_drift():
    D = drifting_features(30, seed=3)
    assert dp_schedule(D, 30) == (list(range(30)), pytest.approx(float(np.trace(D))))
    steps, cost = dp_schedule(D, 10)
    assert cost < schedule_cost(D, uniform_schedule(30, 10))
    assert uniform_schedule(30, 10) == list(range(0, 30, 3)) and uniform_schedule(30, 1) == [0]


@pytest.mark.parametrize("K", [0, 31, 2.5])
def test_budget_out_of_range_is_refused(K):
    with pytest.raises(GraphoptError, match=r"K must be in 1..T=30"):
        dp_schedule(np.zeros((30, 30)), K)


def test_bad_matrices_are_refused():
    with pytest.raises(GraphoptError, match="square"):
        dp_schedule(np.zeros((3, 4)), 1)
    with pytest.raises(GraphoptError, match="NaN/inf"):
        dp_schedule(np.full((3, 3), np.nan), 1)
