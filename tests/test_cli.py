"""End-to-end through the `optimize` command line, as a user runs it."""
import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

import graphopt


def assert_one_line_error(code, err, *fragments):
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("optimize: error:"), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]


def test_cnn_end_to_end(cli, tmp_path):
    out = tmp_path / "cnn"
    code, _, err = cli("examples.tiny_cnn:build", "-o", out, "--report", tmp_path / "r.json")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["forward.onnx", "forward.pt2", "manifest.json"]
    m = json.loads((out / "manifest.json").read_text())
    assert [p["pass"] for p in m["passes"]] == ["remove-noops", "fold-constants", "dce"]
    assert m["ort_check"]["max_rel"]["forward"] <= 1e-4
    assert json.loads((tmp_path / "r.json").read_text())["passes"][0]["status"] == "ok"
    assert "fold-constants" in err and "total" in err  # progress lines and the summary table

    from examples.tiny_cnn import build
    model, (x,) = build()
    ref = model(x).detach()
    for backend in ("onnxruntime", "torch"):
        got = graphopt.load(out, backend=backend)(x)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # The files stand alone: plain ONNX Runtime and plain torch.export.load.
    sess = ort.InferenceSession(str(out / "forward.onnx"))
    (o,) = sess.run(None, {"image": x.numpy()})
    np.testing.assert_allclose(o, ref.numpy(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.export.load(str(out / "forward.pt2")).module()(x)[0], ref, rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("fixture", ["gpt2_dir", "llama_dir"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_hf_models_static_and_dynamic(fixture, dynamic, request, cli, tmp_path):
    from transformers import AutoModelForCausalLM
    src = request.getfixturevalue(fixture)
    out = tmp_path / "b"
    args = ["--input", "input_ids:1xS:int64", "--dynamic", "S=1..128"] if dynamic else \
        ["--input", "input_ids:1x12:int64"]
    code, _, err = cli(src, "-o", out, "--quiet", "--task", "single", *args)
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["methods"]["forward"]["inputs"][0]["shape"] == ([1, "S"] if dynamic else [1, 12])
    assert m["methods"]["forward"]["outputs"][0] == {"name": "logits", "dtype": "float32",
                                                     "shape": [1, "S", 128] if dynamic else [1, 12, 128]}
    hf = AutoModelForCausalLM.from_pretrained(src).eval()
    ort_engine, torch_engine = graphopt.load(out), graphopt.load(out, backend="torch")
    for n in ((1, 7, 128) if dynamic else (12,)):
        ids = torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(n))
        ref = hf(ids).logits.detach()
        torch.testing.assert_close(ort_engine(ids), ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch_engine(input_ids=ids), ref, rtol=1e-4, atol=1e-5)


def test_list_passes(cli):
    code, out, _ = cli("--list-passes")
    assert code == 0
    for name in ("dce", "fold-constants", "remove-noops", "max_growth=1.0", "default pipeline",
                 "gptq  (lossy: rel_l2 <= 1 at 2 bits, 0.7 at 3 bits, 0.4 at 4 bits, 0.05 at 8 bits; needs calibration)",
                 "rtn  (lossy: rel_l2 <= 1 at 2 bits"):
        assert name in out
    assert "rtn  (lossy: rel_l2 <= 1 at 2 bits, 0.7 at 3 bits, 0.4 at 4 bits, 0.05 at 8 bits)\n" in out  # data-free


def test_rtn_needs_no_calibration_and_a_saved_pt2_requantizes(cli, tmp_path):
    """rtn is data-free; gptq is not. A quantized bundle's .pt2 is itself a valid source (the op is registered)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 64),
                                torch.nn.ReLU(), torch.nn.Linear(64, 10)).eval()
    torch.export.save(torch.export.export(model, (torch.randn(2, 64),)), tmp_path / "mlp.pt2")
    code, out, err = cli(tmp_path / "mlp.pt2", "-o", tmp_path / "q", "--passes", "rtn{bits=4,group=32}")
    assert code == 0, err
    assert "2 layers quantized, 1 skipped" in " ".join((out + err).split())  # the summary table's result column
    m = json.loads((tmp_path / "q" / "manifest.json").read_text())
    details = m["passes"][0]["details"]
    assert m["passes"][0]["status"] == "ok" and details["quantized_layers"] == 2 and details["mean_layer_loss"] is None
    x = torch.randn(2, 64)
    y = ort.InferenceSession(str(tmp_path / "q" / "forward.onnx")).run(None, {"input": x.numpy()})[0]
    assert np.abs(y - model(x).detach().numpy()).max() / np.abs(y).max() < 0.3  # 4 bits, int8 activations
    code, _, err = cli(tmp_path / "mlp.pt2", "-o", tmp_path / "g", "--passes", "gptq", "--quiet")
    assert_one_line_error(code, err, "pass 'gptq' needs calibration data")
    code, _, err = cli(tmp_path / "q" / "forward.pt2", "-o", tmp_path / "q2", "--quiet")
    assert code == 0, err


def test_a_half_precision_checkpoint_compiles_in_float32_and_quantizes(cli, tmp_path):
    """transformers >= 5 loads checkpoints in their saved dtype; graphopt compiles in float32 (the KV cache and
    the CPU runtimes are float32), so an fp16 checkpoint behaves like its float32 upcast."""
    from graphopt.testing import tiny_hf_lm
    src = tiny_hf_lm("llama", tmp_path / "llama16", dtype=torch.float16)
    torch.save([(torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(i)),) for i in range(4)],
               tmp_path / "calib.pt")
    out = tmp_path / "q"
    code, _, err = cli(src, "-o", out, "--quiet", "--passes", "gptq{bits=4,group=32}", "--calib", tmp_path / "calib.pt")
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["plan"]["kind"] == "causal-lm" and m["passes"][0]["status"] == "ok"
    assert m["passes"][0]["details"]["quantized_layers"] == 14  # 2 layers x (q, k, v, o, gate, up, down)


def test_gpt2_conv1d_layers_quantize_and_generate(gpt2_dir, cli, tmp_path):
    """GPT-2's Conv1D layers (addmm with [in, out] weights) quantize like linears, in both LM methods, and the
    block-wise stage tunes their scales/zeros and the layer norms."""
    torch.save([(torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(i)),) for i in range(4)],
               tmp_path / "calib.pt")
    out = tmp_path / "q"
    code, _, err = cli(gpt2_dir, "-o", out, "--quiet", "--passes",
                       "decoupleq{bits=4,group=32,iters=1,blockwise=true,ort_accuracy=0}",
                       "--calib", tmp_path / "calib.pt")
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    details = m["passes"][0]["details"]
    assert details["quantized_layers"] == 8  # 2 layers x (c_attn, attn c_proj, c_fc, mlp c_proj)
    blocks = details["blockwise"]["blocks"]
    assert set(blocks) == {"model.transformer.h.0", "model.transformer.h.1"}
    assert all(b["tuned"] == 12 for b in blocks.values())  # 4 layers x (scales, zeros) + 2 norms x (weight, bias)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    ort_tokens = graphopt.load(out).generate(ids, 8, eos_token_id=[])
    torch_tokens = graphopt.load(out, backend="torch").generate(ids, 8, eos_token_id=[])
    assert ort_tokens.shape == (1, 8) and torch.equal(ort_tokens, torch_tokens)  # 8 new tokens


def test_torch_backend_writes_no_onnx(cli, tmp_path):
    code, _, err = cli("examples.tiny_cnn:build", "-o", tmp_path / "t", "--backend", "torch", "--quiet",
                       "--passes", "dce")
    assert code == 0, err
    assert not (tmp_path / "t" / "forward.onnx").exists()
    with pytest.raises(graphopt.GraphoptError, match="load it with backend='torch'"):
        graphopt.load(tmp_path / "t")
    assert graphopt.load(tmp_path / "t", backend="torch")(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_bfloat16_program_quantizes_and_generates(cli, tmp_path):
    """--dtype bfloat16 (torch backend): the model is converted before export, so the graph, the KV cache and the
    quantized layers' scales (decoupleQ with its block-wise stage) are bfloat16 while the model's own float32 islands (rotary angles) stay float32; its
    logits follow the float32 program's within bf16 rounding, and the .pt2 loads in plain torch."""
    from graphopt.testing import tiny_hf_lm
    src = tiny_hf_lm("llama", tmp_path / "llama")
    torch.save([(torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(i)),) for i in range(4)],
               tmp_path / "calib.pt")
    outs = {}
    for dtype in ("float32", "bfloat16"):
        outs[dtype] = tmp_path / dtype
        code, _, err = cli(src, "-o", outs[dtype], "--quiet", "--backend", "torch", "--dtype", dtype,
                           "--passes", "decoupleq{bits=4,group=32,iters=1,blockwise=true},dce",
                           "--calib", tmp_path / "calib.pt")
        assert code == 0, err
    m = json.loads((outs["bfloat16"] / "manifest.json").read_text())
    assert set(m["passes"][0]["details"]["blockwise"]["blocks"]) == {"model.model.layers.0", "model.model.layers.1"}
    assert m["dtype"] == "bfloat16" and m["passes"][0]["details"]["quantized_layers"] == 14
    decode = m["methods"]["decode"]
    assert {s["dtype"] for s in decode["inputs"][3:]} == {"bfloat16"}  # the KV cache
    assert decode["outputs"][0]["dtype"] == "bfloat16"
    ep = torch.export.load(str(outs["bfloat16"] / "decode.pt2"))
    scales = [v for k, v in ep.constants.items() if "dq_scale" in k]
    assert scales and {s.dtype for s in scales} == {torch.bfloat16}  # (q, k, v and gate, up fused on lowering)
    rotary = [n for n in ep.graph.nodes if n.target == torch.ops.aten.cos.default]
    assert rotary and all(n.meta["val"].dtype == torch.float32 for n in rotary)
    freqs = [v for k, v in {**ep.state_dict, **ep.constants}.items() if k.endswith("inv_freq")]
    assert freqs and all(v.dtype == torch.float32 for v in freqs)  # not rounded to 16 bits

    from graphopt.compiler.causal_lm import prefill_inputs
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(9))
    ref, half = (graphopt.load(outs[d], backend="torch") for d in ("float32", "bfloat16"))
    want, got = ref.method("prefill")(*prefill_inputs(ids))[0], half.method("prefill")(*prefill_inputs(ids))[0]
    assert got.dtype == torch.bfloat16
    err = ((got.float() - want).norm() / want.norm()).item()
    assert err < 0.03, err
    tokens = half.generate(ids[:1, :8], 8, eos_token_id=[])
    assert tokens.shape == (1, 8)


def test_half_precision_conversion_keeps_what_transformers_keeps_in_float32():
    """A transformers model given as a module (or from the zoo) is converted like from_pretrained(dtype=...) loads
    it: the rotary inverse frequencies (a non-persistent buffer) stay float32; the caller's module is not changed;
    a float16 conversion that overflows is refused, naming the parameter."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from graphopt.compiler import capture as cap
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    half = cap._converted(cap.Loaded("module", "llama", model=model), "causal-lm", "bfloat16").model
    assert half.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert half.model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # a copy was converted
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 1e6
    with pytest.raises(graphopt.GraphoptError, match="--dtype float16: 'model.layers.0.mlp.up_proj.weight' .* "
                                                     "beyond float16's range"):
        cap._converted(cap.Loaded("module", "llama", model=model), "causal-lm", "float16")


def test_bfloat16_single_program(cli, tmp_path):
    code, _, err = cli("examples.tiny_cnn:build", "-o", tmp_path / "b", "--backend", "torch", "--dtype", "bfloat16",
                       "--quiet")
    assert code == 0, err
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["methods"]["forward"]["inputs"][0]["dtype"] == "bfloat16"
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    from examples.tiny_cnn import build
    model, _ = build()
    with torch.no_grad():
        want = model.eval()(x)
    got = graphopt.load(tmp_path / "b", backend="torch")(x.bfloat16())
    assert got.dtype == torch.bfloat16
    assert ((got.float() - want).norm() / want.norm()).item() < 0.03
    with pytest.raises(graphopt.GraphoptError, match="has dtype float32, expected bfloat16"):
        graphopt.load(tmp_path / "b", backend="torch")(x)
    # an exported program keeps its own dtype: --dtype needs the model itself
    code, _, err = cli(tmp_path / "b" / "forward.pt2", "-o", tmp_path / "c", "--backend", "torch", "--dtype",
                       "float16")
    assert_one_line_error(code, err, "--dtype float16", "already exported in its own dtype")
    assert not (tmp_path / "c").exists()


# ---- bad input: one line, nonzero exit, no traceback, nothing written ---------------------------------------------
@pytest.mark.parametrize("argv, fragments", [
    (["nowhere/model.pt2"], ["'nowhere/model.pt2' not found", "Hugging Face model directory"]),
    (["examples.tiny_cnn:build", "--passes", "nosuch"], ["unknown pass 'nosuch'", "available: cache-schedule, dce"]),
    (["examples.tiny_cnn:build", "--passes", "dce{x=1}"], ["has no option 'x'"]),
    (["examples.tiny_cnn:build", "--passes", "fold-constants{max_growth=big}"], ["not a valid float"]),
    (["examples.tiny_cnn:build", "--input", "image:1x3"], ["--input 'image:1x3'", "NAME:SHAPE:DTYPE"]),
    (["examples.tiny_cnn:build", "--input", "image:1xSx32x32:float32", "--dynamic", "S=4"],
     ["--dynamic 'S=4'", "NAME=MIN..MAX"]),
    (["examples.tiny_cnn:build", "--calib", "nope.pt"], ["--calib 'nope.pt' not found"]),
    (["examples.tiny_cnn:build", "--report", "nodir/r.json"], ["--report nodir/r.json: its directory does not exist"]),
    (["examples.tiny_cnn:build", "--dtype", "bfloat16"], ["--dtype bfloat16 needs --backend torch"]),
    (["zoo:tiny-code-lm", "--dtype", "float16", "--backend", "torch", "--passes", "layer-skip,dce"],
     ["--dtype float16: pass layer-skip runs on float32 programs only"]),
])
def test_bad_arguments(cli, tmp_path, argv, fragments):
    out = tmp_path / "out"
    code, _, err = cli(*argv, "-o", out)
    assert_one_line_error(code, err, *fragments)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_bad_model_files(cli, tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pt")
    (tmp_path / "bad.pt2").write_bytes(b"PK\x03\x04" + b"\0" * 64)
    for name, fragment in [("notes.txt", "is not a model file"), ("pickled.pt", "--unsafe-load"),
                           ("bad.pt2", "truncated or corrupt")]:
        code, _, err = cli(tmp_path / name, "-o", tmp_path / "out")
        assert_one_line_error(code, err, fragment)
        assert not (tmp_path / "out").exists()


def test_unsafe_load_accepts_a_trusted_pickle(cli, tmp_path):
    torch.save(torch.nn.Linear(4, 2), tmp_path / "lin.pt")
    code, _, err = cli(tmp_path / "lin.pt", "-o", tmp_path / "o", "--unsafe-load", "--input", "x:3x4:float32",
                       "--quiet")
    assert code == 0, err
    assert graphopt.load(tmp_path / "o")(torch.randn(3, 4)).shape == (3, 2)


def test_existing_output_needs_force(cli, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = cli("examples.tiny_cnn:build", "-o", out)
    assert_one_line_error(code, err, "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = cli("examples.tiny_cnn:build", "-o", out, "--force", "--quiet")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "manifest.json").exists()


def test_a_pass_that_raises_writes_nothing(cli, tmp_path, temp_pass):
    from graphopt.passes import Pass

    class Boom(Pass):
        """Test pass that fails half-way through a pipeline."""
        name = "test-boom"

        def run(self, program, ctx):
            raise RuntimeError("kaboom")
    temp_pass(Boom)
    out = tmp_path / "o"
    code, _, err = cli("examples.tiny_cnn:build", "-o", out, "--passes", "remove-noops,test-boom,dce", "--quiet")
    assert_one_line_error(code, err, "pass 'test-boom' raised RuntimeError: kaboom", "--on-error=skip")
    assert list(tmp_path.iterdir()) == []
    code, _, err = cli("examples.tiny_cnn:build", "-o", out, "--passes", "remove-noops,test-boom,dce",
                       "--on-error", "skip", "--quiet")
    assert code == 0, err
    statuses = [p["status"] for p in json.loads((out / "manifest.json").read_text())["passes"]]
    assert statuses == ["ok", "rolled back", "ok"]


def test_calibration_file(cli, tmp_path):
    torch.save([(torch.randn(1, 3, 32, 32),) for _ in range(3)], tmp_path / "calib.pt")
    code, _, err = cli("examples.tiny_cnn:build", "-o", tmp_path / "o", "--calib", tmp_path / "calib.pt",
                       "--quiet")
    assert code == 0, err
    torch.save([(torch.randn(1, 3, 16, 16),)], tmp_path / "wrong.pt")
    code, _, err = cli("examples.tiny_cnn:build", "-o", tmp_path / "o2", "--calib", tmp_path / "wrong.pt",
                       "--quiet")
    assert_one_line_error(code, err, "has shape [1, 3, 16, 16], expected [1, 3, 32, 32]")
    torch.save({"not": "a list"}, tmp_path / "dict.pt")
    code, _, err = cli("examples.tiny_cnn:build", "-o", tmp_path / "o3", "--calib", tmp_path / "dict.pt")
    assert_one_line_error(code, err, "expected a non-empty list of input tuples")


def test_verbose_shows_the_traceback(cli, tmp_path):
    with pytest.raises(graphopt.GraphoptError):
        cli("nowhere.pt2", "-o", tmp_path / "o", "--verbose")


def test_console_script_runs_as_a_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "graphopt.cli", "missing.pt2", "-o", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "not found" in proc.stderr
