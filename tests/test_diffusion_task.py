"""--task diffusion: input roles, sampling plan, engine.sample() on both backends against diffusers' sampler."""
from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt import zoo
from graphopt.errors import GraphoptError
from graphopt.runtime.sampler import sample as reference_sample

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def unet_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("diff") / "unet"
    graphopt.compile("zoo:tiny-diffusion").save(out)  # auto task: a diffusers model becomes a diffusion program
    return out


def test_zoo_unet_gets_a_sampling_plan(unet_bundle):
    plan = graphopt.load(unet_bundle).plan
    assert plan["kind"] == "diffusion" and plan["entry"] == "forward"
    assert plan["inputs"] == {"sample": "sample", "timestep": "timestep", "conditioning": []}
    assert plan["sample_shape"] == [1, 1, 16, 16] and plan["sampler"] == "ddim" and plan["steps"] == 50
    assert plan["scheduler_config"]["num_train_timesteps"] == zoo.scheduler_config()["num_train_timesteps"]


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_sample_matches_the_sampler_around_the_original_unet(unet_bundle, backend):
    engine = graphopt.load(unet_bundle, backend=backend)
    got = engine.sample(seed=3, steps=6, batch=2)
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    unet = zoo.load_unet()
    ref = reference_sample(lambda x, t: unet(x, t).sample, noise, zoo.scheduler_config(), 6)
    assert got.shape == (2, 1, 16, 16)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # explicit noise gives the same result; DDPM draws its per-step noise from the seed
    torch.testing.assert_close(engine.sample(noise=noise, steps=6), got)
    a, b = engine.sample(seed=1, steps=4, sampler="ddpm"), engine.sample(seed=1, steps=4, sampler="ddpm")
    assert torch.equal(a, b) and not torch.equal(a, engine.sample(seed=2, steps=4, sampler="ddpm"))


def test_dit_with_class_labels(tmp_path):
    from diffusers import DiTTransformer2DModel
    torch.manual_seed(0)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                              num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                              norm_type="ada_norm_zero").eval()
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.tensor([3])
    c = graphopt.compile(m, example_inputs={"hidden_states": x, "timestep": t, "class_labels": y})
    assert c.program.plan["inputs"] == {"sample": "hidden_states", "timestep": "timestep",
                                        "conditioning": ["class_labels"]}
    c.save(tmp_path / "dit")
    engine = graphopt.load(tmp_path / "dit")
    got = engine.sample(seed=0, steps=3, class_labels=y)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = reference_sample(lambda a, b: m(a, b, y).sample[:, :4], noise, engine.plan["scheduler_config"], 3)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(GraphoptError, match=r"missing \['class_labels'\]"):
        engine.sample(steps=3)


def test_bad_requests(unet_bundle, tmp_path):
    engine = graphopt.load(unet_bundle)
    with pytest.raises(GraphoptError, match=r"steps must be an integer in 1..1000"):
        engine.sample(steps=0)
    with pytest.raises(GraphoptError, match="sampler 'euler': choose one of ddim, ddpm"):
        engine.sample(steps=2, sampler="euler")
    with pytest.raises(GraphoptError, match=r"unknown \['labels'\]"):
        engine.sample(steps=2, labels=torch.tensor([1]))
    with pytest.raises(GraphoptError, match="sample\\(\\) needs a diffusion bundle; this one is 'single'"):
        from examples.tiny_cnn import build
        model, example = build()
        cnn = graphopt.compile(model, example_inputs=example)
        cnn.save(tmp_path / "cnn")
        graphopt.load(tmp_path / "cnn").sample()


def test_task_diffusion_on_a_model_without_a_timestep_names_what_was_looked_for(cli, tmp_path):
    code, _, err = cli("examples.tiny_cnn:build", "-o", tmp_path / "x", "--task", "diffusion")
    assert code != 0 and "Traceback" not in err
    assert "--task diffusion needs a denoiser with a timestep input" in err and "timestep/timesteps/t" in err


def test_run_command_samples_and_saves(unet_bundle, tmp_path, capsys):
    from graphopt.cli import graphopt_main
    assert graphopt_main(["run", str(unet_bundle), "--batch", "2", "--steps", "3", "--save",
                          str(tmp_path / "s.pt")]) == 0
    out = capsys.readouterr().out
    assert "2 samples of [1, 16, 16], 3 steps (no cache)" in out
    saved = torch.load(tmp_path / "s.pt")
    engine = graphopt.load(unet_bundle)
    torch.testing.assert_close(saved, engine.sample(seed=0, steps=3, batch=2))
    assert graphopt_main(["run", str(unet_bundle), "--save", str(tmp_path / "s.txt")]) == 2
    assert "--save" in capsys.readouterr().err
