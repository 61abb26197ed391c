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


# ---- the pass on the zoo UNet ----------------------------------------------------------------------------------------
import torch  # noqa: E402

import graphopt  # noqa: E402
from graphopt.compiler.capture import capture  # noqa: E402
from graphopt.compiler.pipeline import PassContext, parse_pipeline, run_pipeline  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def unet():
    return capture("zoo:tiny-diffusion")


def cached(program, spec):
    new, reports, _ = run_pipeline(program, parse_pipeline(spec), PassContext())
    return new, reports[0]


def test_pass_splits_the_unet_into_full_and_shallow_graphs(unet):
    new, report = cached(unet, "cache-schedule{budget=3,steps=6,samples=2,dec=true}")
    assert set(new.methods) == {"forward", "shallow"}
    d = report["details"]
    assert d["point"] == "up_blocks.2" and d["K"] == 3 and d["schedule"][0] == 0 and len(d["schedule"]) == 3
    assert report["error_metric"] == 0.0  # the full graph's original output is untouched
    assert [s.name for s in new.inputs["shallow"]] == ["sample", "timestep", "cached_feature", "dec_scale",
                                                       "dec_shift"]
    n_full = sum(1 for n in new.methods["forward"].graph.nodes if n.op == "call_function")
    n_shallow = sum(1 for n in new.methods["shallow"].graph.nodes if n.op == "call_function")
    assert n_shallow < n_full / 3
    assert 0 < d["shallow_flops_fraction"] < 0.4
    plan = new.plan["cache"]
    assert plan["schedule"] == d["schedule"] and plan["feature_output"] == 1 and len(plan["dec"]["scale"]) == 6
    # With the feature of the same step and an identity correction, the shallow graph is the full graph.
    x, t = unet.example_inputs["forward"]
    out, feature = new.run("forward", x, t)
    C = feature.shape[1]
    (shallow_out,) = new.run("shallow", x, t, feature, torch.ones(C), torch.zeros(C))
    torch.testing.assert_close(shallow_out, out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, unet.run("forward", x, t)[0])


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_bundle_samples_follow_the_schedule(unet, tmp_path, backend):
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(9))
    every = graphopt.compile("zoo:tiny-diffusion", "cache-schedule{budget=6,steps=6,samples=2}", backend=backend)
    every.save(tmp_path / "every")
    e = graphopt.load(tmp_path / "every", backend=backend)
    full = e.sample(noise=noise, steps=6, cache=False)
    torch.testing.assert_close(e.sample(noise=noise, steps=6), full)  # K = T: every step recomputes
    some = graphopt.compile("zoo:tiny-diffusion", "cache-schedule{budget=3,steps=6,samples=2}", backend=backend)
    some.save(tmp_path / "some")
    e = graphopt.load(tmp_path / "some", backend=backend)
    out = e.sample(noise=noise, steps=6)
    from graphopt.metrics import psnr
    other = e.sample(noise=torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(10)), steps=6)
    # Reuse changes the sample, but it stays the same image (at 6 steps each reuse spans a large change).
    assert not torch.equal(out, full) and psnr(out, full) > max(18.0, psnr(other, full) + 6)
    with pytest.raises(GraphoptError, match="cache schedule is for steps=6"):
        e.sample(noise=noise, steps=10)
    assert e.sample(noise=noise, steps=10, cache=False).shape == noise.shape


def test_bad_options_and_models(unet):
    with pytest.raises(GraphoptError, match=r"K must be in 1..T=6"):
        cached(unet, "cache-schedule{budget=7,steps=6,samples=1}")
    with pytest.raises(GraphoptError, match="budget=2.5: give a fraction below 1 or a whole number"):
        cached(unet, "cache-schedule{budget=2.5,steps=6,samples=1}")
    with pytest.raises(GraphoptError, match=r"point 'mid_block' does not exist; candidates: up_blocks.1, up_blocks.2"):
        cached(unet, "cache-schedule{point=mid_block,steps=6,samples=1}")
    cnn = capture("examples.tiny_cnn:build")
    from graphopt.compiler.pipeline import validate_tasks
    with pytest.raises(GraphoptError, match="pass 'cache-schedule' applies to diffusion programs, not 'single'"):
        validate_tasks(parse_pipeline("cache-schedule"), cnn.plan["kind"])


def test_later_passes_compare_the_original_outputs(unet):
    new, reports, _ = run_pipeline(unet, parse_pipeline("cache-schedule{budget=3,steps=6,samples=1},dce,remove-noops"),
                                   PassContext())
    assert [r["status"] for r in reports] == ["ok", "ok", "ok"] and set(new.methods) == {"forward", "shallow"}


def test_auto_task_makes_only_timestep_models_diffusion_programs():
    from diffusers import AutoencoderKL

    from graphopt.compiler.capture import Loaded, resolve_task
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2)
    assert resolve_task("auto", Loaded("module", "vae", model=vae)) == "single"
    from graphopt import zoo
    assert resolve_task("auto", Loaded("module", "unet", model=zoo.load_unet())) == "diffusion"


def test_transformer_blocks_reuse_the_change_across_the_middle_blocks(tmp_path):
    from diffusers import DiTTransformer2DModel
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                norm_type="ada_norm_zero").eval()
    example = {"hidden_states": torch.randn(1, 4, 8, 8), "timestep": torch.tensor([10]),
               "class_labels": torch.tensor([3])}
    c = graphopt.compile(dit, "cache-schedule{budget=2,steps=4,samples=1,dec=true}", example_inputs=example,
                         backend="torch")
    d = c.reports[-1]["details"]
    assert d["point"] == "transformer_blocks.1-2" and 0 < d["shallow_flops_fraction"] < 1
    assert c.reports[-1]["headline"].startswith("2 of 4 steps run in full, ideal speed-up ")
    p = c.program
    x, t, y = example.values()
    out, delta = p.run("forward", x, t, y)
    C = delta.shape[-1]
    assert delta.shape == (1, 16, 16) and p.plan["cache"]["feature_output"] == 1
    (shallow_out,) = p.run("shallow", x, t, y, delta, torch.ones(C), torch.zeros(C))
    torch.testing.assert_close(shallow_out, out, rtol=1e-4, atol=1e-5)  # fresh change: the same function
    full_nodes = sum(1 for n in p.methods["forward"].graph.nodes if n.op == "call_function")
    assert sum(1 for n in p.methods["shallow"].graph.nodes if n.op == "call_function") < full_nodes
    c.save(tmp_path / "dit")
    e = graphopt.load(tmp_path / "dit", backend="torch")
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    a = e.sample(noise=noise, steps=4, class_labels=y)
    b = e.sample(noise=noise, steps=4, class_labels=y, cache=False)
    assert a.shape == b.shape == noise.shape and torch.isfinite(a).all() and not torch.equal(a, b)
