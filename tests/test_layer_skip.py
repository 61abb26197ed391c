"""layer-skip (static): block influence, the chosen blocks cut out of every method, numerics and bad input."""
from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.compiler.capture import capture
from graphopt.compiler.pipeline import PassContext, parse_pipeline, run_pipeline
from graphopt.errors import GraphoptError, PassFailure
from tests.test_blocks import Stack

torch.set_num_threads(1)


def test_least_influential_middle_block_is_cut_and_the_rest_is_the_model_without_it():
    model = Stack().eval()
    with torch.no_grad():  # make block 2 nearly an identity: the one to skip
        model.blocks[2].ff.weight.mul_(1e-3)
        model.blocks[2].ff.bias.zero_()
    p = capture(model, example_inputs=(torch.randn(2, 16),))
    calib = [(torch.randn(2, 16, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    new, reports, _ = run_pipeline(p, parse_pipeline("layer-skip{skip=1}"), PassContext(calibration=calib))
    d = reports[0]["details"]
    assert d["skipped"] == ["model.blocks.2"] and d["blocks"] == 4
    assert reports[0]["headline"] == "1 of 4 blocks skipped"
    by_speedup, reports2, _ = run_pipeline(p, parse_pipeline("layer-skip{speedup=1.5}"), PassContext(calibration=calib))
    assert reports2[0]["details"]["skipped"] == ["model.blocks.2"]  # round(4 · (1 − 1/1.5)) = 1 block
    assert min(d["influence"], key=d["influence"].get) == "model.blocks.2"
    linears = [n for n in new.methods["forward"].graph.nodes if n.target is torch.ops.aten.linear.default]
    assert len(linears) == 3 + 2  # 4 blocks - 1 skipped, + 2 heads
    x = torch.randn(2, 16)
    ref = model.without_block(2, x)
    got = new.run("forward", x)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])


def test_consecutive_skipped_blocks_are_all_cut():
    from graphopt.passes.layer_skip import skip_blocks
    model = Stack().eval()
    p = capture(model, example_inputs=(torch.randn(2, 16),))
    ep = skip_blocks(p.methods["forward"], {"model.blocks.1", "model.blocks.2"})
    linears = [n for n in ep.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert len(linears) == 2 + 2
    x = torch.randn(2, 16)
    with torch.no_grad():
        h = model.blocks[3](model.blocks[0](x))
        h = model.blocks[0].norm(h)
        ref = (model.heads[0](h), model.heads[1](h))
    got = ep.module()(x)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])


def test_causal_lm_skips_in_prefill_and_decode_and_still_generates(llama_dir, tmp_path):
    calib = [(torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    import shutil
    src = tmp_path / "llama4"
    shutil.copytree(llama_dir, src)
    # 2 layers in the fixture: keep_ends leaves nothing to skip
    with pytest.raises(GraphoptError, match=r"can skip 1..0 of the 2 blocks"):
        graphopt.compile(str(src), "layer-skip{skip=1}", calibration=calib)
    c = graphopt.compile(str(src), "layer-skip{skip=1,keep_ends=false}", calibration=calib)
    d = c.reports[-1]["details"]
    assert len(d["skipped"]) == 1
    for m in ("prefill", "decode"):
        blocks = [n for n in c.program.methods[m].graph.nodes if n.target is torch.ops.aten.linear.default]
        assert len(blocks) < 2 * 7 + 1  # fewer than all the layers' linears + LM head
    c.save(tmp_path / "skipped")
    engine = graphopt.load(tmp_path / "skipped")
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    out = engine.generate(ids, 8, eos_token_id=[])
    torch_out = graphopt.load(tmp_path / "skipped", backend="torch").generate(ids, 8, eos_token_id=[])
    assert out.shape == (1, 8) and torch.equal(out, torch_out)


def test_bad_options():
    p = capture(Stack().eval(), example_inputs=(torch.randn(2, 16),))
    calib = [(torch.randn(2, 16),)]
    for spec, msg in [("layer-skip", "exactly one of skip=N or speedup=X"),
                      ("layer-skip{skip=1,speedup=2}", "exactly one of"),
                      ("layer-skip{skip=3}", r"can skip 1..2 of the 4 blocks"),
                      ("layer-skip{speedup=0.5}", "speedup must be > 1")]:
        with pytest.raises(PassFailure, match=msg):
            run_pipeline(p, parse_pipeline(spec), PassContext(calibration=calib))
    cnn = capture("examples.tiny_cnn:build")
    with pytest.raises(PassFailure, match="found no repeated blocks"):
        run_pipeline(cnn, parse_pipeline("layer-skip{skip=1}"), PassContext(calibration=[cnn.example_inputs["forward"]]))


def test_self_speculative_drafts_with_the_skipped_program_and_stays_lossless(llama_dir, tmp_path):
    calib = [(torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    c = graphopt.compile(str(llama_dir), "layer-skip{skip=1,keep_ends=false,self_speculative=true,draft_length=3,"
                                         "heal=true,heal_steps=10}", calibration=calib)
    p = c.program
    assert set(p.methods) == {"prefill", "decode", "verify", "draft_decode", "draft_verify"}
    skipped = int(c.reports[-1]["details"]["skipped"][0].rsplit(".", 1)[1])
    # the drafter reads only the cache of the layer it runs
    assert [s.name for s in p.inputs["draft_decode"]][3:] == [f"past_{kv}_{1 - skipped}" for kv in ("key", "value")]
    assert p.plan["self_speculative"]["kv_index"] == [2 * (1 - skipped), 2 * (1 - skipped) + 1]
    # the full methods are untouched: same outputs as without the pass
    ref = graphopt.compile(str(llama_dir), "dce", backend="torch").program
    x = p.example_inputs["decode"]
    for a, b in zip(p.run("decode", *x), ref.run("decode", *x)):
        torch.testing.assert_close(a, b)
    # draft_verify = three greedy drafter steps on the shared cache, then verify over root + drafts
    past = list(x[3:])
    kv = [past[j] for j in p.plan["self_speculative"]["kv_index"]]
    root, P = x[0][:1], past[0].shape[2]
    past1 = [t[:1] for t in past]
    fused = p.run("draft_verify", root, torch.ones(1, P + 1, dtype=torch.int64), torch.tensor([[P]]), *past1)
    tokens, kv = [root], [t[:1] for t in kv]
    for i in range(3):
        outs = p.run("draft_decode", tokens[-1], torch.ones(1, P + i + 1, dtype=torch.int64),
                     torch.tensor([[P + i]]), *kv)
        kv = list(outs[1:])
        tokens.append(outs[0][:, -1:].argmax(-1))
    tokens = torch.cat(tokens, 1)
    assert torch.equal(fused[0], tokens)
    chain = torch.cat([torch.ones(1, 1, 4, P, dtype=torch.int64),
                       torch.ones(4, 4, dtype=torch.int64).tril()[None, None]], 3)
    verified = p.run("verify", tokens, chain, torch.arange(P, P + 4)[None], *past1)
    assert torch.equal(fused[1], verified[0].argmax(-1))
    for a, b in zip(fused[2:], verified[1:]):
        torch.testing.assert_close(a, b)
    c.save(tmp_path / "self")
    g = torch.Generator().manual_seed(2)
    for backend in ("onnxruntime", "torch"):
        engine = graphopt.load(tmp_path / "self", backend=backend)
        for n in (1, 6, 17):
            ids = torch.randint(0, 128, (1, n), generator=g)
            plain = engine.generate(ids, 24, eos_token_id=[])
            assert torch.equal(engine.generate(ids, 24, eos_token_id=[], speculative="layer-skip"), plain)
            assert engine.last_stats["mean_accepted_length"] >= 1
            assert engine.last_stats["fused_s"] > 0  # greedy steps ran draft_verify
        a = engine.generate(ids, 12, do_sample=True, seed=4, eos_token_id=[], speculative="layer-skip")
        assert torch.equal(a, engine.generate(ids, 12, do_sample=True, seed=4, eos_token_id=[],
                                              speculative="layer-skip"))
    plain_bundle = tmp_path / "plain"
    graphopt.compile(str(llama_dir), "dce").save(plain_bundle)
    with pytest.raises(GraphoptError, match="no 'verify' method"):
        graphopt.load(plain_bundle).generate(ids, 4, speculative="layer-skip")


def test_loss_search_and_heal_on_a_causal_lm(tmp_path):
    from graphopt.compiler.heal import mean_ce
    from graphopt.passes.layer_skip import skip_blocks
    from graphopt.testing import tiny_hf_lm
    src = tiny_hf_lm("llama", tmp_path / "llama4", layers=4, seed=3)
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randint(0, 128, (1, 32), generator=g),) for _ in range(8)]
    base = graphopt.compile(str(src), "dce", backend="torch").program
    prefill = base.methods["prefill"]
    from graphopt.compiler.blocks import find_blocks
    blocks = find_blocks(prefill)
    seqs = [c[0] for c in calib]
    ce = {i: mean_ce(skip_blocks(prefill, {blocks[i].path}), seqs) for i in (1, 2)}
    c = graphopt.compile(str(src), "layer-skip{skip=1,select=loss,heal=true,heal_steps=60}", calibration=calib,
                         backend="torch")
    d = c.reports[-1]["details"]
    assert d["skipped"] == [blocks[min(ce, key=ce.get)].path]  # the removal that costs least
    assert d["loss_search"][0]["ce"] == pytest.approx(min(ce.values()), abs=1e-4)
    assert d["calib_ce_skipped"] == pytest.approx(min(ce.values()), abs=1e-4) and d["calib_ce_full"] < 10
    h = d["heal"]
    assert h["healed"] and h["heldout_kl_after"] < h["heldout_kl_before"]
    assert d["calib_ce_healed"] < d["calib_ce_skipped"]
    # healing changed 1-D parameters only, in every method alike
    p = c.program
    for name, t in p.methods["decode"].state_dict.items():
        t0 = base.methods["decode"].state_dict[name]
        assert t.dim() == 1 or torch.equal(t, t0)
        assert torch.equal(t, p.methods["prefill"].state_dict[name])
    assert any(not torch.equal(t, base.methods["decode"].state_dict[n])
               for n, t in p.methods["decode"].state_dict.items())
    with pytest.raises(PassFailure, match="need a language model"):
        run_pipeline(capture(Stack().eval(), example_inputs=(torch.randn(2, 16),)),
                     parse_pipeline("layer-skip{skip=1,heal=true}"), PassContext(calibration=[(torch.randn(2, 16),)]))


def test_routers_decide_at_prefill_and_skipped_blocks_are_not_computed(tmp_path):
    import onnx
    from graphopt.compiler.causal_lm import prefill_inputs
    from graphopt.testing import tiny_hf_lm
    src = tiny_hf_lm("llama", tmp_path / "llama4", layers=4, seed=3)
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randint(0, 128, (1, 24), generator=g),) for _ in range(24)]
    outs = {}
    for mode in ("if", "where"):
        c = graphopt.compile(str(src), f"layer-skip{{mode=router,rate=0.25,onnx={mode}}}", calibration=calib)
        d = c.reports[-1]["details"]
        assert d["routed"] == ["model.model.layers.1", "model.model.layers.2"]
        assert c.reports[-1]["headline"] == "routers on 2 blocks"
        assert d["calib_skip_rate_in_graph"] == pytest.approx(0.25, abs=0.05)
        p = c.program
        assert p.output_names["prefill"][-1] == "route" and p.inputs["decode"][-1].name == "route"
        c.save(tmp_path / mode)
        ifs = [n for n in onnx.load(str(tmp_path / mode / "decode.onnx")).graph.node if n.op_type == "If"]
        assert len(ifs) == (2 if mode == "if" else 0)
        for n in ifs:  # the whole block moves into the branch (attention, fused q/k/v, o, gate/up, down), not a tail
            ops = [x.op_type for x in next(a.g for a in n.attribute if a.name == "then_branch").node]
            assert ops.count("Attention") == 1 and ops.count("MatMul") == 4
        outs[mode] = graphopt.load(tmp_path / mode)
    torch_engine = graphopt.load(tmp_path / "if", backend="torch")
    static = {}
    seen = set()
    for ids in [c[0][:, :n] for c, n in zip(calib, (5, 9, 13, 17, 21, 24, 7, 11))]:
        route = outs["if"].method("prefill")(*prefill_inputs(ids))[-1]
        keep = tuple(int(v) for v in route[0])
        seen.add(keep)
        got = outs["if"].generate(ids, 10, eos_token_id=[])
        assert torch.equal(got, outs["where"].generate(ids, 10, eos_token_id=[]))
        assert torch.equal(got, torch_engine.generate(ids, 10, eos_token_id=[]))
        # the same as statically skipping exactly the blocks the router switched off for this prompt
        off = [1 + i for i, k in enumerate(keep) if not k]
        if off:
            key = tuple(off)
            if key not in static:
                from graphopt.passes.layer_skip import skip_blocks
                prog = graphopt.compile(str(src), "dce", backend="torch").program
                paths = {f"model.model.layers.{i}" for i in off}
                prog.methods = {m: skip_blocks(ep, paths) for m, ep in prog.methods.items()}
                static[key] = prog
            prog = static[key]
            logits = prog.run("prefill", *prefill_inputs(ids))[0]
            ref = outs["if"].method("prefill")(*prefill_inputs(ids))[0]
            torch.testing.assert_close(ref, logits, rtol=1e-4, atol=1e-4)
    assert len(seen) >= 2  # input-adaptive: different prompts, different blocks
    with pytest.raises(GraphoptError, match="does not combine with layer-skip routers"):
        outs["if"].generate(calib[0][0], 4, speculative="layer-skip")


def test_heal_leaves_the_input_program_untouched(tmp_path):
    from graphopt.testing import tiny_hf_lm
    src = tiny_hf_lm("llama", tmp_path / "llama4", layers=4, seed=3)
    calib = [(torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(i)),) for i in range(8)]
    p = capture(str(src), task="single")  # input_ids 1x16
    before = {n: t.clone() for n, t in p.methods["forward"].state_dict.items()}
    new, reports, _ = run_pipeline(p, parse_pipeline("layer-skip{skip=1,heal=true,heal_steps=20}"),
                                   PassContext(calibration=calib))
    assert reports[0]["details"]["heal"]["healed"]
    for n, t in p.methods["forward"].state_dict.items():
        assert torch.equal(t, before[n]), n  # rollback needs the original weights
    assert any(not torch.equal(t, before[n]) for n, t in new.methods["forward"].state_dict.items())


def _synthetic_costs(n: int, predictable: bool, seed: int = 0):
    """Loss rises [n, K+1] with convex per-sequence curves; the curve's steepness is X[:, 0] (predictable) or
    independent of X."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 6, generator=g, dtype=torch.float64)
    hard = X[:, 0] if predictable else torch.randn(n, generator=g, dtype=torch.float64)
    marginal = torch.tensor([0.02, 0.05, 0.1, 0.2], dtype=torch.float64) * (1 + 0.6 * hard.tanh()).unsqueeze(1)
    return X, torch.nn.functional.pad(marginal.cumsum(1), (1, 0))


def test_depth_routers_adapt_when_the_feature_predicts_the_cost_and_fall_back_to_static_when_not():
    from graphopt.compiler.routing import fit_depth_routers
    n, total = 256, 2 * 256  # two blocks per sequence on average
    X, cost = _synthetic_costs(n, predictable=True)
    routers, rep = fit_depth_routers(X, cost, total, position=[0, 1, 2, 3])
    d = routers.depth(X.float())
    assert abs(int(d.sum()) - total) <= 4 and len(set(d.tolist())) >= 2  # the budget, spread over depths
    routed = float(cost[torch.arange(n), d].mean())
    gap = rep["static_mean_cost"] - rep["oracle_mean_cost"]
    assert gap > 0.005 and routed < rep["static_mean_cost"] - 0.6 * gap  # most of the oracle's gain
    assert rep["routed_mean_cost"] == pytest.approx(routed, abs=1e-4)
    # the same feature on new sequences: still adapts
    X2, cost2 = _synthetic_costs(n, predictable=True, seed=1)
    d2 = routers.depth(X2.float())
    assert float(cost2[torch.arange(n), d2].mean()) < float(cost2[:, 2].mean())
    # a feature that says nothing about the cost: (almost) everyone skips the static number of blocks
    X, cost = _synthetic_costs(n, predictable=False)
    routers, rep = fit_depth_routers(X, cost, total, position=[0, 1, 2, 3])
    assert float((routers.depth(X.float()) == 2).double().mean()) > 0.9
    assert rep["ridge_strength"] >= 1.0


def test_routed_blocks_of_a_standard_ops_quantized_lm_keep_their_weights_in_the_branch(tmp_path):
    """onnx_ops=standard + routers lowered to If: ORT fuses DequantizeLinear + MatMul only with the weights as
    initializers of the branch the DequantizeLinear is in, so they move there; generation equals the Where-gated
    form of the same program."""
    import onnx
    from graphopt.testing import tiny_hf_lm
    src = tiny_hf_lm("llama", tmp_path / "llama4", layers=4, seed=3)
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randint(0, 128, (1, 24), generator=g),) for _ in range(24)]
    engines = {}
    for mode in ("if", "where"):
        c = graphopt.compile(str(src), f"layer-skip{{mode=router,rate=0.25,onnx={mode}}},"
                             "rtn{bits=4,group=32,zero=int,ort_accuracy=0,onnx_ops=standard}", calibration=calib)
        c.save(tmp_path / mode)
        engines[mode] = graphopt.load(tmp_path / mode)
    model = onnx.load(str(tmp_path / "if" / "decode.onnx"))
    ifs = [n for n in model.graph.node if n.op_type == "If"]
    assert len(ifs) == 2
    outer = {t.name for t in model.graph.initializer}
    for n in ifs:
        branch = next(a.g for a in n.attribute if a.name == "then_branch")
        inner = {t.name for t in branch.initializer}
        dqs = [x for x in branch.node if x.op_type == "DequantizeLinear"]
        assert dqs and all(set(x.input) <= inner for x in dqs)
        assert not inner & outer  # moved, not copied
    for n in (5, 13, 24):
        ids = calib[n % len(calib)][0][:, :n]
        assert torch.equal(engines["if"].generate(ids, 8, eos_token_id=[]),
                           engines["where"].generate(ids, 8, eos_token_id=[]))
