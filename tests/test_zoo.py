"""The zoo's data, tokenizer, metrics and committed checkpoints (no test trains for more than seconds)."""
import math
import shutil

import pytest
import torch

from graphopt import metrics, zoo
from graphopt.errors import GraphoptError
from graphopt.zoo import code_data
from graphopt.zoo.tokenizer import BOS_ID, EOS_ID, ByteTokenizer


def test_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo' + x  # ünïcode\n"
    ids = tok.encode(text)
    assert ids[0] == BOS_ID and all(0 <= i < 256 for i in ids[1:])
    assert tok.decode(ids) == text
    assert tok.decode(ids + [EOS_ID]) == text
    assert tok.decode([0xC3]) == "\ufffd"  # a cut UTF-8 sequence decodes, never raises


def test_split_is_deterministic_and_disjoint():
    s = code_data.split_files()
    assert s == code_data.split_files.__wrapped__()  # recomputed from scratch: same split
    assert set(s["train"]).isdisjoint(s["heldout"])
    assert 0.02 < len(s["heldout"]) / (len(s["train"]) + len(s["heldout"])) < 0.09
    assert code_data._is_heldout("json/decoder.py") == code_data._is_heldout("json/decoder.py")


def test_prompts_and_calibration_are_fixed():
    p = zoo.prompts()
    assert len(p) == 64 and len(set(p)) == 64 and all(x.endswith("(") and "def " in x for x in p)
    assert p == code_data.heldout_prompts(64)
    c1, c2 = zoo.lm_calibration(4, 32), zoo.lm_calibration(4, 32)
    assert all(torch.equal(a[0], b[0]) and a[0].shape == (1, 32) for a, b in zip(c1, c2))


def test_lm_loads_and_scores_below_a_uniform_model():
    lm = zoo.load_lm()
    n = sum(p.numel() for p in lm.parameters())
    assert 3e6 <= n <= 10e6 and lm.config.num_hidden_layers >= 8
    bpb = metrics.lm_bits_per_byte(lm, max_windows=4, context=64)
    assert 0 < bpb < 8.0  # uniform over bytes is 8 bits; the real figure is in benchmarks/zoo.py


def test_bits_per_byte_of_a_known_model():
    class Uniform(torch.nn.Module):
        def forward(self, input_ids):
            return (torch.zeros(*input_ids.shape, 259),)
    # Uniform over 259 ids: log2(259) bits per byte exactly.
    assert metrics.lm_bits_per_byte(Uniform(), max_windows=2, context=32) == pytest.approx(math.log2(259))


def test_greedy_agreement_and_image_metrics():
    assert metrics.greedy_agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]]) == 0.75
    assert metrics.greedy_agreement([[1, 2]], [[1, 2, 3, 4]]) == 0.5
    assert metrics.greedy_agreement(torch.tensor([[5, 6]]), torch.tensor([[5, 6]])) == 1.0
    a = torch.zeros(2, 1, 4, 4)
    assert metrics.psnr(a, a) == math.inf and metrics.mse(a, a + 0.5) == 0.25
    assert metrics.psnr(a + 0.2, a) == pytest.approx(10 * math.log10(4 / 0.04))


def test_classifier_and_rate_on_real_digits():
    from graphopt.zoo.digits import split
    x, y = split("heldout")
    clf = zoo.load_classifier()
    assert (clf(x).argmax(-1) == y).float().mean() > 0.95
    assert metrics.classifiable_rate(x) > 0.8
    assert metrics.classifiable_rate(torch.rand(16, 1, 16, 16) * 2 - 1) < 0.5  # noise is not a digit


def test_diffusion_model_and_sampler_shapes():
    from graphopt.runtime.sampler import sample
    unet = zoo.load_unet()
    assert sum(p.numel() for p in unet.parameters()) <= 3e6
    noise = zoo.diffusion_noises(2)
    out = sample(lambda x, t: unet(x, t).sample, noise, zoo.scheduler_config(), steps=3)
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()
    (xt, t), *_ = zoo.diffusion_calibration(2, batch=3)
    assert xt.shape == (3, 1, 16, 16) and t.shape == (3,) and t.dtype == torch.int64


def test_unknown_zoo_name():
    with pytest.raises(GraphoptError, match="unknown zoo model 'nope'; available: tiny-code-lm, tiny-diffusion"):
        zoo.load_source("nope")


def test_missing_and_corrupt_checkpoints(tmp_path, monkeypatch):
    fake = tmp_path / "models"
    shutil.copytree(zoo.MODELS_DIR / "tiny-code-lm", fake / "tiny-code-lm")
    monkeypatch.setattr(zoo, "MODELS_DIR", fake)
    weights = fake / "tiny-code-lm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(GraphoptError, match=r"checkpoint '.*model.safetensors' is corrupt"):
        zoo.load_lm()
    weights.unlink()
    with pytest.raises(GraphoptError, match=r"checkpoint file '.*model.safetensors' is missing"):
        zoo.load_lm()


def test_optimize_zoo_lm_with_no_flags_generates_like_transformers(cli, tmp_path):
    import graphopt
    out = tmp_path / "lm"
    code, _, err = cli("zoo:tiny-code-lm", "-o", out, "--quiet")
    assert code == 0, err
    engine = graphopt.load(out)
    assert engine.plan["kind"] == "causal-lm" and engine.plan["tokenizer"] == "byte"
    tok = ByteTokenizer()
    lm = zoo.load_lm()
    prompts = zoo.prompts(4)
    for p in prompts[:2]:
        ids = torch.tensor([tok.encode(p)])
        ref = lm.generate(ids, max_new_tokens=32, do_sample=False)[:, ids.shape[1]:]
        assert torch.equal(engine.generate(ids, 32), ref)
    # Batch 4, left-padded, prompt lengths from 1 token up.
    rows = [tok.encode(p) for p in prompts[:3]] + [[tok.bos_token_id]]
    S = max(len(r) for r in rows)
    ids = torch.full((4, S), tok.pad_token_id)
    mask = torch.zeros(4, S, dtype=torch.int64)
    for b, r in enumerate(rows):
        ids[b, S - len(r):] = torch.tensor(r)
        mask[b, S - len(r):] = 1
    ref = lm.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                      pad_token_id=tok.pad_token_id)[:, S:]
    assert torch.equal(engine.generate(ids, 24, attention_mask=mask), ref)


def test_optimize_zoo_diffusion_with_no_flags(cli, tmp_path):
    import graphopt
    out = tmp_path / "unet"
    code, _, err = cli("zoo:tiny-diffusion", "-o", out, "--quiet")
    assert code == 0, err
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([900])
    with torch.no_grad():
        ref = zoo.load_unet()(x, t).sample
    torch.testing.assert_close(graphopt.load(out)(x, t), ref, rtol=1e-4, atol=1e-4)
