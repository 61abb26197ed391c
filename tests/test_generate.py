"""causal-lm bundles: greedy generation equals transformers' generate token for token, on both backends."""
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import graphopt
from graphopt.errors import GraphoptError

VOCAB = 128


@pytest.fixture(scope="module", params=["gpt2_dir", "llama_dir"])
def lm(request, tmp_path_factory):
    """(HF model, bundle dir) for a tiny random-init model, compiled through the CLI with no task flag."""
    from transformers import AutoModelForCausalLM

    from graphopt.cli import main
    src = request.getfixturevalue(request.param)
    out = tmp_path_factory.mktemp("lm") / "bundle"
    assert main([str(src), "-o", str(out), "--quiet"]) == 0
    return AutoModelForCausalLM.from_pretrained(src).eval(), out


def left_padded(batch: int, lengths: list[int], seed: int):
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.randint(0, VOCAB, (batch, S), generator=g)
    mask = torch.zeros(batch, S, dtype=torch.int64)
    for b, n in enumerate(lengths):
        mask[b, S - n:] = 1
        ids[b, :S - n] = 0
    return ids, mask


def hf_greedy(model, ids, mask, n):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    return out[:, ids.shape[1]:]


def test_bundle_has_prefill_and_decode(lm):
    _, out = lm
    m = json.loads((out / "manifest.json").read_text())
    assert m["plan"]["kind"] == "causal-lm" and set(m["methods"]) == {"prefill", "decode"}
    dec = m["methods"]["decode"]
    names = [i["name"] for i in dec["inputs"]]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and names[3] == "past_key_0"
    assert dec["outputs"][1]["shape"][2] == "P + 1"
    # Lowering: SDPA becomes one ONNX Attention node per layer, reading grouped key/value heads directly.
    ops = [n.op_type for n in onnx.load(str(out / "decode.onnx"), load_external_data=False).graph.node]
    assert ops.count("Attention") == m["plan"]["num_layers"] == 2
    sdpa = [n for n in torch.export.load(str(out / "decode.pt2")).graph.nodes
            if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    grouped = m["plan"]["kv_heads"][0] < model_heads(lm[0])
    assert len(sdpa) == 2 and all(n.kwargs.get("enable_gqa", False) == grouped for n in sdpa)
    # ... on the projections' [B, S, heads*d] layout, appending to the cache itself (compiler/onnx_attention.py, for
    # rotary models): no Transpose/Concat left around it, the cache goes straight in and the presents come out
    if "RotaryEmbedding" in ops:
        for method in ("prefill", "decode"):
            graph = onnx.load(str(out / f"{method}.onnx"), load_external_data=False).graph
            att = [n for n in graph.node if n.op_type == "Attention"]
            assert all({a.name for a in n.attribute} >= {"q_num_heads", "kv_num_heads"} for n in att)
            assert [n.output[1:] for n in att] == [[f"present_key_{i}", f"present_value_{i}"] for i in range(2)]
            assert "Transpose" not in {n.op_type for n in graph.node}
        assert [n.input[4:] for n in graph.node if n.op_type == "Attention"] == \
            [[f"past_key_{i}", f"past_value_{i}"] for i in range(2)]


def model_heads(model) -> int:
    return model.config.num_attention_heads


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("lengths", [[1], [2], [37], [200], [5, 1, 17, 9], [64, 64, 3, 30]])
def test_greedy_matches_transformers(lm, backend, lengths):
    model, out = lm
    engine = graphopt.load(out, backend=backend)
    ids, mask = left_padded(len(lengths), lengths, seed=sum(lengths))
    n = 24
    ref = hf_greedy(model, ids, mask, n)
    got = engine.generate(ids, n, attention_mask=mask if len(lengths) > 1 else None, eos_token_id=[])
    assert torch.equal(got, ref), (got, ref)


def test_eos_stops_and_pads_finished_rows(lm):
    model, out = lm
    engine = graphopt.load(out)
    ids, mask = left_padded(2, [6, 4], seed=3)
    free = engine.generate(ids, 12, attention_mask=mask, eos_token_id=[])
    stop = int(free[0, 3])  # row 0 emits this at step 3
    got = engine.generate(ids, 12, attention_mask=mask, eos_token_id=stop)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=stop,
                         pad_token_id=stop)[:, ids.shape[1]:]
    assert torch.equal(got, ref)
    row0 = got[0].tolist()
    assert row0.index(stop) <= 3 and all(t == stop for t in row0[row0.index(stop):])


def test_generation_ends_when_every_row_has_finished(lm):
    """Once all rows emitted an end id, generate returns only the steps taken (not max_new_tokens columns)."""
    _, out = lm
    engine = graphopt.load(out)
    ids, mask = left_padded(1, [6], seed=5)
    free = engine.generate(ids, 12, attention_mask=mask, eos_token_id=[])
    stop = int(free[0, 2])
    first = free[0].tolist().index(stop)  # the first step that emits it
    got = engine.generate(ids, 12, attention_mask=mask, eos_token_id=stop)
    assert got.shape == (1, first + 1) and got.dtype == torch.int64
    assert torch.equal(got, free[:, :first + 1])


def test_sampling_is_seeded_and_topk1_is_greedy(lm):
    _, out = lm
    engine = graphopt.load(out)
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
    a = engine.generate(ids, 16, do_sample=True, temperature=0.8, top_p=0.9, seed=7, eos_token_id=[])
    b = engine.generate(ids, 16, do_sample=True, temperature=0.8, top_p=0.9, seed=7, eos_token_id=[])
    c = engine.generate(ids, 16, do_sample=True, temperature=5.0, seed=8, eos_token_id=[])
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = engine.generate(ids, 16, eos_token_id=[])
    assert torch.equal(engine.generate(ids, 16, do_sample=True, top_k=1, seed=1, eos_token_id=[]), greedy)


def test_streamer_receives_prompt_then_each_token(lm):
    _, out = lm
    seen = []

    class Rec:
        def put(self, x):
            seen.append(x.clone())

        def end(self):
            seen.append("end")
    ids = torch.tensor([[1, 2, 3]])
    got = graphopt.load(out).generate(ids, 5, streamer=Rec(), eos_token_id=[])
    assert torch.equal(seen[0], ids) and seen[-1] == "end"
    assert torch.equal(torch.stack(seen[1:-1], 1), got)


@pytest.mark.parametrize("kwargs, msg", [
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.int64), max_new_tokens=4), "prompt is empty"),
    (dict(input_ids=[], max_new_tokens=4), "input_ids is empty"),
    (dict(input_ids=[[1, 2, VOCAB]], max_new_tokens=4), f"token id {VOCAB} is outside the vocabulary"),
    (dict(input_ids=[[1, 2]], max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(input_ids=[[1] * 250], max_new_tokens=10), "exceeds the model's maximum length 256"),
    (dict(input_ids=[[1, 2]], max_new_tokens=4, do_sample=True, temperature=0), "temperature must be > 0"),
    (dict(input_ids=[[1, 2]], max_new_tokens=4, do_sample=True, top_p=1.5), "top_p must be in (0, 1]"),
    (dict(input_ids=[[1, 2]], max_new_tokens=4, do_sample=True, top_k=0), "top_k must be a positive integer"),
    (dict(input_ids=[[1, 2]], max_new_tokens=4, attention_mask=[[1, 0]]), "pad prompts on the left"),
    (dict(input_ids=[[1.5, 2.0]], max_new_tokens=4), "must be integer token ids"),
])
def test_bad_requests(lm, kwargs, msg):
    _, out = lm
    with pytest.raises(GraphoptError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        graphopt.load(out).generate(**kwargs)


def test_onnx_files_run_in_plain_onnxruntime(lm):
    model, out = lm
    m = json.loads((out / "manifest.json").read_text())
    prefill = ort.InferenceSession(str(out / "prefill.onnx"))
    decode = ort.InferenceSession(str(out / "decode.onnx"))
    ids = np.array([[5, 6, 7, 8]], dtype=np.int64)
    outs = prefill.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids),
                              "position_ids": np.arange(4, dtype=np.int64)[None]})
    tokens = [int(outs[0][0, -1].argmax())]
    past = outs[1:]
    names = [i["name"] for i in m["methods"]["decode"]["inputs"]][3:]
    for step in range(5):
        feeds = {"input_ids": np.array([[tokens[-1]]], dtype=np.int64),
                 "attention_mask": np.ones((1, 5 + step), dtype=np.int64),
                 "position_ids": np.array([[4 + step]], dtype=np.int64), **dict(zip(names, past))}
        logits, *past = decode.run(None, feeds)
        tokens.append(int(logits[0, -1].argmax()))
    ref = hf_greedy(model, torch.tensor(ids), torch.ones(1, 4, dtype=torch.int64), 6)
    assert tokens == ref[0].tolist()


def test_run_command_streams_ids(lm, tmp_path):
    _, out = lm
    proc = subprocess.run([sys.executable, "-c", "import sys; from graphopt.cli import graphopt_main; "
                           "sys.exit(graphopt_main(sys.argv[1:]))", "run", str(out), "--prompt-ids", "1,2,3",
                           "--max-new-tokens", "6", "--eos-id", "-1"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().split(",")) == 6
    assert "tokens/s" in proc.stderr
    bad = subprocess.run([sys.executable, "-c", "import sys; from graphopt.cli import graphopt_main; "
                          "sys.exit(graphopt_main(sys.argv[1:]))", "run", str(out), "--prompt", "hi"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no built-in tokenizer" in bad.stderr and "Traceback" not in bad.stderr


def test_torch_backend_on_explicit_device_moves_created_tensors(lm):
    """device= runs torch.export's move pass: tensors the graph creates follow the weights (checked on 'meta')."""
    model, out = lm
    ids, mask = left_padded(2, [5, 3], seed=7)
    got = graphopt.load(out, backend="torch", device="cpu").generate(ids, 6, attention_mask=mask, eos_token_id=[])
    assert torch.equal(got, hf_greedy(model, ids, mask, 6))
    engine = graphopt.load(out, backend="torch", device="meta")
    module = engine.method("prefill")._run.module
    devices = {n.kwargs["device"] for n in module.graph.nodes if n.op == "call_function" and "device" in n.kwargs}
    assert devices and {torch.device(d).type for d in devices} == {"meta"}, devices
    assert all(p.device.type == "meta" for p in module.parameters())
