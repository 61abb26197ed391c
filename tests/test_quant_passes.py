"""rtn / gptq / decoupleq passes on exported graphs: structure, numerics, lowering, bad input."""
import pytest
import torch
from torch import nn

import graphopt
from graphopt.compiler.capture import capture
from graphopt.compiler.pipeline import PassContext, parse_pipeline, run_pipeline
from graphopt.errors import GraphoptError, PassFailure
from graphopt.kernels.dq_linear import dequantize

torch.set_num_threads(1)
DQ = torch.ops.graphopt.dq_linear.default
aten = torch.ops.aten


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 64)
        self.up = nn.Linear(64, 96)
        self.gate = nn.Linear(64, 96)
        self.down = nn.Linear(96, 64)   # 96 is not a multiple of 64: padded
        self.head = nn.Linear(64, 50)   # output layer: kept in float

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))
        return self.head(h)


def calib(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 50, (2, 16), generator=g),) for _ in range(n)]


def run(spec, model=None, calibration=None):
    model = model or MLP().eval()
    p = capture(model, example_inputs=(torch.randint(0, 50, (2, 16)),))
    ctx = PassContext(calibration=calibration or calib())
    return p, *run_pipeline(p, parse_pipeline(spec), ctx)[:2]


def ops(program):
    return [n.target for n in program.methods["forward"].graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("spec", ["rtn{bits=4,group=32}", "gptq{bits=3,group=64}", "gptq{bits=2,group=32,act_order=true}",
                                  "decoupleq{bits=2,group=64,iters=2}", "decoupleq{bits=8,group=-1,iters=1}",
                                  "decoupleq{bits=3,group=64,iters=1,act_order=false}"])
def test_linears_become_dq_linear_except_the_head(spec):
    p, new, reports = run(spec)
    assert ops(new).count(DQ) == 3 and ops(new).count(aten.linear.default) == 1
    d = reports[0]["details"]
    assert d["quantized_layers"] == 3 and d["skipped"] == {"model.head.weight": "LM head / output layer"}
    if "group=64" in spec:  # 96 input features are padded to 128
        assert set(d["padded"]) == {"model.down.weight"} and aten.constant_pad_nd.default in ops(new)
        assert reports[0]["headline"] == "3 layers quantized, 1 skipped, 1 padded"
    else:
        assert d["padded"] == {} and aten.constant_pad_nd.default not in ops(new)
        assert reports[0]["headline"] == "3 layers quantized, 1 skipped"
    assert reports[0]["param_bytes_after"] < reports[0]["param_bytes_before"]
    x = torch.randint(0, 50, (2, 16))
    ref, out = p.run("forward", x)[0], new.run("forward", x)[0]
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel == pytest.approx(reports[0]["error_metric"], rel=0.5) or rel < reports[0]["tolerance"]


@pytest.mark.parametrize("spec,expected", [("gptq{bits=2,group=32}", False), ("gptq{bits=2,group=32,act_order=true}", True),
                                           ("decoupleq{bits=2,group=32,iters=1}", True),
                                           ("decoupleq{bits=2,group=32,iters=1,act_order=false}", False)])
def test_act_order_reaches_the_solver(monkeypatch, spec, expected):
    from graphopt.compiler import quantize as q
    name = spec.split("{")[0]
    solve, seen = getattr(q, name), []
    monkeypatch.setattr(q, name, lambda *a, **k: seen.append(k["act_order"]) or solve(*a, **k))
    run(spec)
    assert seen and set(seen) == {expected}


def test_more_bits_and_better_methods_give_smaller_error():
    errs = {}
    for spec in ["rtn{bits=2,group=32}", "gptq{bits=2,group=32}", "decoupleq{bits=2,group=32}",
                 "decoupleq{bits=4,group=32}"]:
        errs[spec.split("{")[0] + spec[-12:]] = run(spec)[2][0]["error_metric"]
    e = list(errs.values())
    assert e[2] < e[0] and e[1] < e[0] and e[3] < e[2], errs


def test_packed_weights_equal_the_fake_quant_weights():
    from graphopt.compiler import quantize as q
    _, new, _ = run("decoupleq{bits=3,group=32,iters=1}")
    ep = new.methods["forward"]
    node = next(n for n in ep.graph.nodes if n.target is DQ)
    packed, scale, zero = (ep.constants[s.target] for s in ep.graph_signature.input_specs
                           if s.arg.name in (node.args[1].name, node.args[2].name, node.args[3].name))
    w = dequantize(packed, scale, zero, 3, 32, node.args[7])
    assert torch.isfinite(w).all() and w.shape[1] == node.args[7]
    levels = (w - zero.repeat_interleave(32, 1)) / scale.repeat_interleave(32, 1)
    assert torch.allclose(levels, levels.round(), atol=1e-3) and levels.round().min() >= -4 and levels.round().max() <= 3


@pytest.mark.parametrize("accuracy", [0, 4])
def test_quantized_program_lowers_to_onnxruntime(accuracy, tmp_path):
    m = MLP().eval()
    c = graphopt.compile(m, f"decoupleq{{bits=4,group=32,iters=1,ort_accuracy={accuracy}}}",
                         example_inputs=(torch.randint(0, 50, (2, 16)),), calibration=calib())
    x = torch.randint(0, 50, (2, 16))
    torch_out = c.program.run("forward", x)[0]
    tol = 1e-4 if accuracy == 0 else 5e-2
    assert (c(x) - torch_out).abs().max() / torch_out.abs().max() <= tol
    c.save(tmp_path / "q")
    torch_engine = graphopt.load(tmp_path / "q", backend="torch")  # the .pt2 carries the custom op
    torch.testing.assert_close(torch_engine(x), torch_out)


def test_needs_calibration_and_valid_options():
    with pytest.raises(GraphoptError, match="pass 'decoupleq' needs calibration data"):
        graphopt.compile(MLP().eval(), "decoupleq", example_inputs=(torch.randint(0, 50, (2, 16)),))
    with pytest.raises(GraphoptError, match=r"'5' is not allowed; choose one of 2\|3\|4\|8"):
        parse_pipeline("decoupleq{bits=5}")
    with pytest.raises(GraphoptError, match=r"choose one of -1\|32\|64\|128"):
        parse_pipeline("gptq{group=48}")


def test_nan_weights_and_activations_are_refused():
    m = MLP().eval()
    with torch.no_grad():
        m.up.weight[0, 0] = float("nan")
    with pytest.raises(PassFailure, match="weight 'model.up.weight' contains NaN/inf"):
        run("rtn", model=m)
    m = MLP().eval()
    with torch.no_grad():
        m.emb.weight[3] = float("inf")
    bad = [(torch.full((2, 16), 3),)]
    with pytest.raises(PassFailure, match=r"calibration activations into 'model.(gate|up).weight' contain NaN/inf; check the calibration data and the layers before it; rerun"):
        run("gptq", model=m, calibration=bad)


def test_a_nan_model_fails_the_onnx_check_saying_so():
    """Skipping the refused pass leaves a model that outputs NaN: the ORT check names that, not a mismatch."""
    m = MLP().eval()
    with torch.no_grad():
        m.up.weight[0, 0] = float("nan")
    with pytest.raises(GraphoptError, match=r"method 'forward' outputs NaN/inf on the check inputs"):
        graphopt.compile(m, "rtn", example_inputs=(torch.randint(0, 50, (2, 16)),), on_error="skip")


def test_too_little_calibration_warns(capsys):
    from graphopt.progress import Progress
    p = capture(MLP().eval(), example_inputs=(torch.randint(0, 50, (2, 16)),))
    ctx = PassContext(calibration=calib(1), progress=Progress(enabled=True))
    run_pipeline(p, parse_pipeline("rtn{group=32}"), ctx)
    assert "warning: rtn calibrated on 32 rows for layers with up to 96 input features" in capsys.readouterr().err


def test_the_calibration_item_limit_is_named_when_it_bites(capsys):
    from graphopt.progress import Progress
    p = capture(MLP().eval(), example_inputs=(torch.randint(0, 50, (1, 1)),))
    items = [(torch.tensor([[i % 50]]),) for i in range(70)]
    ctx = PassContext(calibration=items, progress=Progress(enabled=True))
    _, reports = run_pipeline(p, parse_pipeline("rtn{group=32}"), ctx)[:2]
    assert ("calibrated on 64 rows for layers with up to 96 input features; give at least 192 (longer items: only "
            "the first 64 of the 70 calibration items are used)") in capsys.readouterr().err
    assert reports[0]["details"]["calibration_items"] == "64 of 70 (at most 64 are used)"


@pytest.mark.parametrize("exclude", ["*gate*|*down*", "'*gate*|*down*'", '"*gate*|*down*"'])
def test_exclude_patterns_keep_layers_in_float(exclude):
    _, new, reports = run(f"rtn{{bits=4,group=32,exclude={exclude}}}")  # quoted as in a shell's double quotes
    assert ops(new).count(DQ) == 1
    assert reports[0]["details"]["skipped"]["model.gate.weight"] == "excluded by pattern"


def test_an_exclude_pattern_that_matches_nothing_is_refused():
    with pytest.raises(PassFailure, match=r"pattern '\*gaet\*' matches no linear weight.*'model\.down\.weight'"):
        run("rtn{bits=4,group=32,exclude=*up*|*gaet*}")


class Conv1DStyle(nn.Module):
    """GPT-2's Conv1D: addmm with an [in, out] weight, not aten.linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 64)
        self.weight = nn.Parameter(torch.randn(64, 64) * 0.1)
        self.bias = nn.Parameter(torch.zeros(64))
        self.head = nn.Linear(64, 50)

    def forward(self, ids):
        h = self.emb(ids)
        h = torch.addmm(self.bias, h.view(-1, 64), self.weight).view(h.shape)
        return self.head(h)


class SharedProductWeight(Conv1DStyle):
    """The addmm's weight has another use too, so it cannot be stored transposed."""

    def forward(self, ids):
        h = self.emb(ids) + self.weight.sum()
        h = torch.addmm(self.bias, h.view(-1, 64), self.weight).view(h.shape)
        return self.head(h)


def test_no_quantizable_layer_names_the_products_left_alone():
    with pytest.raises(PassFailure, match=r"no linear layer to quantize \(kept in float: model.head.weight "
                                          r"\(LM head / output layer\)\); 1 matrix products with parameter weights "
                                          r"are not linears \(their weight has another use\): model.weight \(addmm\)"):
        run("rtn", model=SharedProductWeight().eval())


def test_conv1d_style_products_are_quantized_as_linears(tmp_path):
    """addmm(b, x, W) with an [in, out] parameter (GPT-2's Conv1D) becomes linear(x, Wᵀ, b), then dq_linear."""
    from graphopt.compiler.weight_quant import linears_from_matmuls
    model = Conv1DStyle().eval()
    p = capture(model, example_inputs=(torch.randint(0, 50, (2, 16)),))
    ep = p.methods["forward"]
    canonical, count = linears_from_matmuls(ep)
    targets = [n.target for n in canonical.graph.nodes if n.op == "call_function"]
    assert count == 1 and aten.addmm.default not in targets and targets.count(aten.linear.default) == 2
    assert canonical.state_dict["model.weight"].shape == (64, 64)
    ids = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(canonical.module()(ids), ep.module()(ids), rtol=1e-5, atol=1e-6)
    c = graphopt.compile(model, "gptq{bits=4,group=32,ort_accuracy=0}", example_inputs=(ids,), calibration=calib())
    assert ops(c.program).count(DQ) == 1 and c.reports[0]["details"]["quantized_layers"] == 1
    reference, torch_out = model(ids), c.program.run("forward", ids)[0]
    assert ((torch_out - reference).norm() / reference.norm()).item() < 0.1
    assert ((c(ids) - torch_out).abs().max() / torch_out.abs().max()).item() <= 1e-5  # ORT = torch program


def onnx_ops(path):
    import onnx
    return [(n.op_type, len(n.input), {a.name: a.i for a in n.attribute if a.name == "K"})
            for n in onnx.load(str(path)).graph.node if n.op_type not in ("Constant", "Reshape")]


def test_quantized_bundle_loads_with_torch_in_a_fresh_process(tmp_path):
    """The .pt2 calls graphopt::dq_linear: graphopt.load must register the op itself (this test module imports it,
    a user's process has not), and plain torch works after the import the README names."""
    import subprocess
    import sys
    c = graphopt.compile(MLP().eval(), "rtn{bits=4,group=32}", example_inputs=(torch.randint(0, 50, (2, 16)),),
                         calibration=calib())
    c.save(tmp_path / "q")
    x = torch.randint(0, 50, (2, 16))
    torch.save({"x": x, "y": c.program.run("forward", x)[0]}, tmp_path / "io.pt")
    script = f"""
import torch
io = torch.load({str(tmp_path / "io.pt")!r})
import graphopt
y = graphopt.load({str(tmp_path / "q")!r}, backend="torch")(io["x"])
torch.testing.assert_close(y, io["y"])
import graphopt.kernels.dq_linear
y = torch.export.load({str(tmp_path / "q" / "forward.pt2")!r}).module()(io["x"])[0]
torch.testing.assert_close(y, io["y"])
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("method", ["decoupleq{bits=4,group=32,iters=1", "rtn{bits=2,group=64", "gptq{bits=3,group=-1"])
def test_integer_zero_points_lower_to_one_matmulnbits_per_linear(method, tmp_path):
    x = torch.randint(0, 50, (2, 16))
    built = {}
    for zero in ("int", "float"):
        c = graphopt.compile(MLP().eval(), f"{method},zero={zero},ort_accuracy=0}}",
                             example_inputs=(torch.randint(0, 50, (2, 16)),), calibration=calib())
        torch_out = c.program.run("forward", x)[0]
        assert ((c(x) - torch_out).abs().max() / torch_out.abs().max()).item() <= 1e-4  # ORT = torch program
        c.save(tmp_path / zero)
        built[zero] = onnx_ops(tmp_path / zero / "forward.onnx")
    nbits = [op for op in built["int"] if op[0] == "MatMulNBits"]
    assert len(nbits) == 3 and all(n_inputs == 4 for _, n_inputs, _ in nbits)  # A, B, scales, zero points
    # nothing else but the model's own ops: no zeros side product, and the padded down projection (96 input
    # features, quantized as 128) reads its input unpadded with K = 96
    kinds = [op[0] for op in built["int"]]
    assert kinds.count("MatMul") == 1 and "ReduceSum" not in kinds and "Pad" not in kinds  # 1: the float head
    assert sorted(k["K"] for _, _, k in nbits) == [64, 64, 96]
    side = [op[0] for op in built["float"] if op[0] in ("MatMul", "ReduceSum")]
    assert len(side) > 1 and all(n_inputs == 3 for op, n_inputs, _ in built["float"] if op == "MatMulNBits")


@pytest.mark.parametrize("zero", ["float", "int"])
def test_two_bit_weights_below_accuracy_4_lower_exactly_on_the_4_bit_layout(zero, tmp_path):
    """ORT's 2-bit MatMulNBits has no fp32 kernel (it dequantizes the whole weight per call), so accuracy levels
    0-3 get the same codes on the 4-bit layout; level 4 keeps 2-bit storage."""
    import onnx
    from onnx import numpy_helper
    x = torch.randint(0, 50, (2, 16))
    sizes = {}
    for accuracy in (0, 4):
        c = graphopt.compile(MLP().eval(), f"decoupleq{{bits=2,group=32,iters=1,zero={zero},ort_accuracy={accuracy}}}",
                             example_inputs=(torch.randint(0, 50, (2, 16)),), calibration=calib())
        torch_out = c.program.run("forward", x)[0]
        rel = ((c(x) - torch_out).abs().max() / torch_out.abs().max()).item()
        assert rel <= (1e-5 if accuracy == 0 else 5e-2)  # level 0 is exact: the same codes and scales
        c.save(tmp_path / str(accuracy))
        model = onnx.load(str(tmp_path / str(accuracy) / "forward.onnx"))
        nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert len(nbits) == 3
        assert {a.i for n in nbits for a in n.attribute if a.name == "bits"} == {4 if accuracy == 0 else 2}
        weights = {n.input[1] for n in nbits}
        sizes[accuracy] = sum(numpy_helper.to_array(t).size for t in model.graph.initializer if t.name in weights)
    assert sizes[4] > 0 and sizes[0] == 2 * sizes[4]  # the 2-bit copy is gone, not kept beside the 4-bit one


class OddWidths(nn.Module):
    """Linears whose in_features (40, 24) are not multiples of 16."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 40)
        self.a = nn.Linear(40, 24)
        self.b = nn.Linear(24, 40)
        self.head = nn.Linear(40, 50)

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(h + self.b(torch.relu(self.a(h))))


@pytest.mark.parametrize("spec", ["rtn{bits=4,group=-1,zero=int", "gptq{bits=3,group=-1", "decoupleq{bits=2,group=-1,iters=1"])
@pytest.mark.parametrize("accuracy", [0, 4])
def test_per_channel_layers_of_any_width_lower_to_matmulnbits(spec, accuracy, tmp_path):
    """Per channel, K need not be a multiple of MatMulNBits' block: the rows are padded to whole blocks and the
    channel's scale repeats over them."""
    c = graphopt.compile(OddWidths().eval(), f"{spec},ort_accuracy={accuracy}}}",
                         example_inputs=(torch.randint(0, 50, (2, 16)),), calibration=calib())
    x = torch.randint(0, 50, (2, 16))
    torch_out = c.program.run("forward", x)[0]
    assert ((c(x) - torch_out).abs().max() / torch_out.abs().max()).item() <= (1e-5 if accuracy == 0 else 5e-2)
    c.save(tmp_path / "q")
    nbits = [op for op in onnx_ops(tmp_path / "q" / "forward.onnx") if op[0] == "MatMulNBits"]
    assert sorted(k["K"] for _, _, k in nbits) == [24, 40]


class OwnPadding(nn.Module):
    """Zero padding of the model's own, one whole block wide, in front of a linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 32)
        self.lin = nn.Linear(64, 64)
        self.head = nn.Linear(64, 50)

    def forward(self, ids):
        return self.head(self.lin(torch.nn.functional.pad(self.emb(ids), (0, 32))))


@pytest.mark.parametrize("accuracy", [0, 4])
def test_a_models_own_padding_wider_than_a_block_stays(accuracy):
    x = torch.randint(0, 50, (2, 16))
    c = graphopt.compile(OwnPadding().eval(), f"rtn{{bits=4,group=32,zero=int,ort_accuracy={accuracy}}}",
                         example_inputs=(x,), calibration=calib())
    torch_out = c.program.run("forward", x)[0]
    assert ((c(x) - torch_out).abs().max() / torch_out.abs().max()).item() <= (1e-4 if accuracy == 0 else 5e-2)


def test_blockwise_stage_keeps_integer_zero_points():
    _, tuned, reports = run("decoupleq{bits=4,group=32,iters=1,zero=int,blockwise=true,blockwise_steps=24}",
                            model=Stack().eval(), calibration=calib(16))
    assert any(b["kept"] for b in reports[0]["details"]["blockwise"]["blocks"].values())
    ep = tuned.methods["forward"]
    for n in ep.graph.nodes:
        if n.target is DQ:
            scale, zero = (next(ep.constants[s.target] for s in ep.graph_signature.input_specs if s.arg.name == a.name)
                           for a in n.args[2:4])
            c = zero.double() / scale.double()
            torch.testing.assert_close(c, c.round(), atol=1e-4, rtol=0)


def test_padding_keeps_dynamic_dims_dynamic():
    p = capture(MLP().eval(), inputs=["ids:2xS:int64:0..50"], dynamic=["S=2..64"])
    new, reports, _ = run_pipeline(p, parse_pipeline("rtn{bits=4,group=64}"), PassContext(calibration=calib()))
    assert reports[0]["details"]["padded"]
    for s in (3, 40):
        x = torch.randint(0, 50, (2, s))
        assert new.run("forward", x)[0].shape == (2, s, 50)


class Stack(nn.Module):
    """Three pre-norm residual blocks under `blocks.N`, as transformer layers are."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(64)
            self.up = nn.Linear(64, 128)
            self.down = nn.Linear(128, 64)

        def forward(self, h):
            return h + self.down(torch.nn.functional.gelu(self.up(self.norm(h))))

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.emb = nn.Embedding(50, 64)
        self.blocks = nn.ModuleList([Stack.Block() for _ in range(3)])
        self.head = nn.Linear(64, 50)

    def forward(self, ids):
        h = self.emb(ids)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def test_block_key_is_the_numbered_module_path():
    from graphopt.compiler.blockwise import block_key
    assert block_key("model.model.layers.3.mlp.up_proj.weight") == "model.model.layers.3"
    assert block_key("transformer.h.11.attn.c_attn.weight") == "transformer.h.11"
    assert block_key("model.head.weight") is None


def test_blockwise_stage_tunes_only_float_parts_per_block():
    p, plain, plain_reports = run("decoupleq{bits=2,group=32,iters=2}", model=Stack().eval(), calibration=calib(16))
    _, tuned, reports = run("decoupleq{bits=2,group=32,iters=2,blockwise=true,blockwise_steps=48}",
                            model=Stack().eval(), calibration=calib(16))
    blocks = reports[0]["details"]["blockwise"]["blocks"]
    assert list(blocks) == ["model.blocks.0", "model.blocks.1", "model.blocks.2"]
    assert all(b["tuned"] == 6 for b in blocks.values())  # 2 linears (scale, zero) + norm weight/bias + 2 biases
    assert any(b["kept"] for b in blocks.values())
    for b in blocks.values():
        assert b["kept"] == (b["heldout_loss_after"] < b["heldout_loss_before"])
    assert ops(tuned).count(DQ) == ops(plain).count(DQ) == 6

    def consts(program):
        ep = program.methods["forward"]
        node_inputs = {}
        for n in ep.graph.nodes:
            if n.target is DQ:
                node_inputs[n.meta["nn_module_stack"][next(reversed(n.meta["nn_module_stack"]))][0]] = [
                    next(ep.constants[s.target] for s in ep.graph_signature.input_specs if s.arg.name == a.name)
                    for a in n.args[1:4]]
        return node_inputs
    a, b = consts(plain), consts(tuned)
    for layer in a:
        assert torch.equal(a[layer][0], b[layer][0])  # integer codes: untouched
        kept = blocks[".".join(layer.split(".")[:3])]["kept"]
        assert torch.equal(a[layer][1], b[layer][1]) != kept  # scales move only where the block was kept
    sd_plain, sd_tuned = plain.methods["forward"].state_dict, tuned.methods["forward"].state_dict
    for i in range(3):
        moved = not torch.equal(sd_plain[f"model.blocks.{i}.norm.weight"], sd_tuned[f"model.blocks.{i}.norm.weight"])
        assert moved == blocks[f"model.blocks.{i}"]["kept"]
    # Numerics: the tuned program still computes the model (the guard's bound) and lowers to ORT like any other.
    x = torch.randint(0, 50, (2, 16))
    ref, out = p.run("forward", x)[0], tuned.run("forward", x)[0]
    assert ((out - ref).norm() / ref.norm()).item() < reports[0]["tolerance"]
    # Here every block's held-out loss fell, and the whole program's error on the guard's inputs with them.
    assert reports[0]["error_metric"] < plain_reports[0]["error_metric"]


class SharedStack(nn.Module):
    """Three linear groups in a row, the first weight used again by the last layer."""
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.emb = nn.Embedding(50, 32)
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32)
        self.head = nn.Linear(32, 50)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + torch.relu(self.a(h))
        h = h + torch.relu(self.b(h))
        h = h + self.a(h)
        return self.head(h)


def test_paused_calibration_runs_see_what_fresh_runs_see_and_run_each_node_once():
    from graphopt.compiler.weight_quant import _flat_args, _PausedRuns, find_linears
    ep = capture(SharedStack().eval(), example_inputs=(torch.randint(0, 50, (2, 16)),)).methods["forward"]
    sites, _ = find_linears(ep)
    assert [s.weight for s in sites] == ["model.a.weight", "model.b.weight", "model.a.weight"]
    calibration = calib(3)

    def fresh_input(weights, inputs, stop):  # the whole prefix from the top, as a naive calibration would
        class Capture(torch.fx.Interpreter):
            def run_node(self, n):
                if n.name == stop:
                    raise StopIteration(self.env[n.args[0]])
                return super().run_node(n)
        try:
            Capture(ep.graph_module).run(*_flat_args(ep, weights, inputs))
        except StopIteration as e:
            return e.value

    runs = _PausedRuns(ep, calibration)
    executed = []
    run_node = runs.interpreter.run_node
    runs.interpreter.run_node = lambda n: executed.append(n) or run_node(n)
    weights = {}
    for i, site in enumerate(sites):
        got = list(runs.inputs_of(site.node))
        want = [fresh_input(weights, inputs, site.node) for inputs in calibration]
        assert all(torch.equal(g, w) for g, w in zip(got, want)), site
        changed = {site.weight: ep.state_dict[site.weight] * (0.5 + i) + 0.01}
        weights.update(changed)
        runs.set_weights(changed)
    for run in runs.runs:  # a paused run keeps only values that a node still to run will read
        assert all(n.op == "placeholder" or any(u.op != "output" and runs.position[u] >= run["next"] for u in n.users)
                   for n in run["env"])
    nodes = list(ep.graph.nodes)
    calls_before = lambda name: sum(1 for n in nodes[:[m.name for m in nodes].index(name)] if n.op != "placeholder")
    assert len(executed) == len(calibration) * calls_before(sites[-1].node)  # one pass, not one per group
    # The last change is to a weight the runs already used (in the first layer): they start over from the top.
    head = next(n.name for n in nodes if n.target is aten.linear.default and n.args[1].name.endswith("head_weight"))
    got = list(runs.inputs_of(head))
    assert all(torch.equal(g, fresh_input(weights, inputs, head)) for g, inputs in zip(got, calibration))
    assert len(executed) == len(calibration) * (calls_before(sites[-1].node) + calls_before(head))


def test_layer_progress_reaches_a_log_without_a_terminal(monkeypatch):
    """Without a terminal there is no bar: a long quantization still prints where it is (here: every layer)."""
    import io
    from graphopt.progress import Progress
    log = io.StringIO()
    monkeypatch.setattr(Progress, "PLAIN_EVERY_S", 0.0)
    p = capture(MLP().eval(), example_inputs=(torch.randint(0, 50, (2, 16)),))
    run_pipeline(p, parse_pipeline("gptq{group=32}"), PassContext(calibration=calib(), progress=Progress(stream=log)))
    lines = [line for line in log.getvalue().splitlines() if "gptq: layers" in line]
    # two input groups (gate/up share one), the last one is not announced: the stage's "done" line follows
    assert len(lines) == 1 and lines[0].startswith("[graphopt] gptq: layers 1/2 (")


class InPlaceStack(Stack):
    """Stack with what real models have: an in-place op (kept by export's training IR) and a tensor made with an
    explicit device (a device argument in the graph)."""

    def forward(self, ids):
        h = self.emb(ids) + torch.arange(ids.shape[-1], device=ids.device, dtype=torch.float32)[:, None] * 0.01
        for b in self.blocks:
            h = b(h)
            h.mul_(0.9)
        return self.head(h)


def test_a_device_copy_moves_only_the_copy():
    from graphopt.compiler.weight_quant import program_on
    ep = capture(InPlaceStack().eval(), example_inputs=(torch.randint(0, 50, (2, 16)),)).methods["forward"]
    assert any(n.target is aten.mul_.Tensor for n in ep.graph.nodes)
    state, vals = dict(ep.state_dict), {n.name: n.meta.get("val") for n in ep.graph.nodes}
    devices = {n.name: n.kwargs["device"] for n in ep.graph.nodes if "device" in n.kwargs}
    assert devices  # the arange
    twin = program_on(ep, torch.device("meta"))
    assert all(v.device.type == "meta" for v in twin.state_dict.values())
    assert all(torch.device(n.kwargs["device"]).type == "meta" for n in twin.graph.nodes if "device" in n.kwargs)
    assert all(ep.state_dict[k] is v and v.device.type == "cpu" for k, v in state.items())
    assert all(n.meta.get("val") is vals[n.name] for n in ep.graph.nodes)
    assert {n.name: n.kwargs["device"] for n in ep.graph.nodes if "device" in n.kwargs} == devices


def test_calibration_on_a_device_copy_matches_and_leaves_the_program_alone(monkeypatch):
    """device=cuda runs calibration, H and the solves on a copy of the program moved to the GPU. Here the same copy
    is made for the CPU: the results must equal the in-place path's, and the original program must be untouched."""
    from graphopt.compiler import weight_quant
    spec = "decoupleq{bits=2,group=32,iters=1,blockwise=true,blockwise_steps=8}"
    p, plain, _ = run(spec, model=InPlaceStack().eval(), calibration=calib(8))
    state_before = {k: v.clone() for k, v in p.methods["forward"].state_dict.items()}
    original, copies = weight_quant.program_on, []

    def copying(ep, device):
        copies.append(original(ep, device, copy_on_cpu=True))
        assert copies[-1] is not ep and copies[-1].graph_module is not ep.graph_module
        return copies[-1]
    monkeypatch.setattr(weight_quant, "program_on", copying)
    p2, copied, _ = run(spec, model=InPlaceStack().eval(), calibration=calib(8))
    assert len(copies) == 1
    for k, v in p2.methods["forward"].state_dict.items():
        assert torch.equal(v, state_before[k]), k
    ep_plain, ep_copied = plain.methods["forward"], copied.methods["forward"]
    assert set(ep_plain.constants) == set(ep_copied.constants)
    for k in ep_plain.constants:
        assert torch.equal(ep_plain.constants[k], ep_copied.constants[k]), k
    for k in ep_plain.state_dict:
        assert torch.equal(ep_plain.state_dict[k], ep_copied.state_dict[k]), k


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_device_cuda_without_a_gpu_is_a_one_line_error():
    with pytest.raises(GraphoptError, match=r"decoupleq\{device\}: device=cuda but torch sees no CUDA device"):
        run("decoupleq{bits=4,group=32,device=cuda}")


def _ort_optimized_ops(path, tmp_path, config=None):
    """Op types of the graph ONNX Runtime actually runs (after its own fusions)."""
    import onnx
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    for k, v in (config or {}).items():
        opts.add_session_config_entry(k, v)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "ort_optimized.onnx")).graph.node]


@pytest.mark.parametrize("spec,zero_points", [("decoupleq{bits=4,group=32,iters=1,zero=int", True),
                                              ("rtn{bits=2,group=64", False), ("gptq{bits=3,group=-1", False),
                                              ("rtn{bits=2,group=32,zero=int", True)])
@pytest.mark.parametrize("accuracy", [0, 4])
def test_standard_ops_lower_to_blocked_dequantize_linear_that_ort_fuses(spec, zero_points, accuracy, tmp_path):
    """onnx_ops=standard: no com.microsoft op in the file; each linear is DequantizeLinear(INT4 [K, N], axis 0,
    blocks) + MatMul, with UINT4 codes and zero points for zero=int; ONNX Runtime fuses each pair back into
    MatMulNBits, at the accuracy level the plan names (a session option, which graphopt.load sets)."""
    import onnx
    from onnx import numpy_helper
    model = OddWidths().eval() if "group=-1" in spec else MLP().eval()
    x = torch.randint(0, 50, (2, 16))
    c = graphopt.compile(model, f"{spec},ort_accuracy={accuracy},onnx_ops=standard}}", example_inputs=(x,),
                         calibration=calib())
    torch_out = c.program.run("forward", x)[0]
    c.save(tmp_path / "q")
    path = tmp_path / "q" / "forward.onnx"
    m = onnx.load(str(path))
    assert {o.domain for o in m.opset_import} <= {"", "ai.onnx"} and {n.domain for n in m.graph.node} <= {"", "ai.onnx"}
    dqs = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    n_linears = 2 if "group=-1" in spec else 3
    assert len(dqs) == n_linears and all(len(n.input) == (3 if zero_points else 2) for n in dqs)
    inits = {t.name: t for t in m.graph.initializer}
    for n in dqs:
        attrs = {a.name: a.i for a in n.attribute}
        assert attrs["axis"] == 0 and attrs["block_size"] in (16, 32, 64)
        w, s = inits[n.input[0]], inits[n.input[1]]
        assert w.data_type == (onnx.TensorProto.UINT4 if zero_points else onnx.TensorProto.INT4)
        assert s.dims[0] == -(-w.dims[0] // attrs["block_size"]) and s.dims[1] == w.dims[1]  # [blocks, N] of [K, N]
        if zero_points:
            assert inits[n.input[2]].data_type == onnx.TensorProto.UINT4
    # 3-bit and 2-bit codes stay on their grid inside the 4-bit type
    if "bits=2" in spec and not zero_points:
        codes = numpy_helper.to_array(inits[dqs[0].input[0]]).astype(int)
        assert codes.min() >= -2 and codes.max() <= 1
    got = c(x)
    rel = ((got - torch_out).abs().max() / torch_out.abs().max()).item()
    assert rel <= (1e-5 if accuracy == 0 else 5e-2)
    fused = _ort_optimized_ops(path, tmp_path, {"session.qdq_matmulnbits_accuracy_level": str(accuracy)})
    assert fused.count("MatMulNBits") == n_linears and "DequantizeLinear" not in fused
    # the same codes as the contrib lowering: same ORT output at level 0
    if accuracy == 0:
        # standard ONNX indeed: the checker accepts it and ONNX's own reference runtime computes the torch result
        from onnx.reference import ReferenceEvaluator
        onnx.checker.check_model(m, full_check=True)
        evaluator = ReferenceEvaluator(m)
        reference = torch.from_numpy(evaluator.run(None, {evaluator.input_names[0]: x.numpy()})[0])
        assert ((reference - torch_out).abs().max() / torch_out.abs().max()).item() <= 1e-5
        contrib = graphopt.compile(model, f"{spec},ort_accuracy=0}}", example_inputs=(x,), calibration=calib())
        torch.testing.assert_close(contrib(x), got, rtol=1e-5, atol=1e-5)


def test_standard_ops_accuracy_level_is_a_session_option_graphopt_load_sets(tmp_path):
    """The file carries no level: plain ORT fuses at its default (4, int8 activations), graphopt.load at the
    plan's (0 here: exact)."""
    import numpy as np
    import onnxruntime as ort
    x = torch.randint(0, 50, (2, 16))
    c = graphopt.compile(MLP().eval(), "rtn{bits=4,group=32,zero=int,ort_accuracy=0,onnx_ops=standard}",
                         example_inputs=(x,), calibration=calib())
    c.save(tmp_path / "q")
    torch_out = c.program.run("forward", x)[0]
    loaded = graphopt.load(tmp_path / "q")(x)
    plain = ort.InferenceSession(str(tmp_path / "q" / "forward.onnx"), providers=["CPUExecutionProvider"])
    plain_out = torch.from_numpy(plain.run(None, {plain.get_inputs()[0].name: x.numpy()})[0])
    err = lambda y: ((y - torch_out).abs().max() / torch_out.abs().max()).item()  # noqa: E731
    assert err(loaded) <= 1e-5 < err(plain_out) <= 5e-2
    assert np.isfinite(plain_out.numpy()).all()


def test_standard_ops_store_two_bit_weights_as_int2_only_from_opset_25_at_level_4(tmp_path):
    """INT2 is ONNX from opset 25; below it 2-bit codes are INT4 tensors (exact, twice the bytes). Below level 4
    they are INT4 at any opset, as on the MatMulNBits path (ORT's 2-bit kernel has no fast fp32 path)."""
    import onnx
    x = torch.randint(0, 50, (2, 16))
    types = {}
    for opset, level in ((23, 4), (25, 4), (25, 0)):
        c = graphopt.compile(MLP().eval(), f"rtn{{bits=2,group=32,zero=int,onnx_ops=standard,ort_accuracy={level}}}",
                             example_inputs=(x,), calibration=calib(), opset=opset)
        torch_out = c.program.run("forward", x)[0]
        assert ((c(x) - torch_out).abs().max() / torch_out.abs().max()).item() <= (5e-2 if level else 1e-5)
        c.save(tmp_path / f"{opset}-{level}")
        m = onnx.load(str(tmp_path / f"{opset}-{level}" / "forward.onnx"))
        inits = {t.name: t.data_type for t in m.graph.initializer}
        types[opset, level] = {inits[n.input[0]] for n in m.graph.node if n.op_type == "DequantizeLinear"}
    assert types == {(23, 4): {onnx.TensorProto.UINT4}, (25, 4): {onnx.TensorProto.UINT2},
                     (25, 0): {onnx.TensorProto.UINT4}}


def test_standard_ops_below_opset_21_is_a_one_line_error():
    x = torch.randint(0, 50, (2, 16))
    with pytest.raises(GraphoptError, match=r"--opset 18: onnx_ops=standard .* opset 21 .*onnx_ops=contrib"):
        graphopt.compile(MLP().eval(), "rtn{bits=4,group=32,onnx_ops=standard}", example_inputs=(x,),
                         calibration=calib(), opset=18)


def test_a_standard_ops_lm_bundle_has_no_contrib_op_and_generates_like_contrib(cli, llama_dir, tmp_path):
    """Through the CLI on a causal LM: with onnx_ops=standard no file of the bundle uses a com.microsoft op (the
    residual-add + RMSNorm fusion is one, so it is skipped too), and greedy generation at level 0 gives the
    contrib bundle's tokens."""
    import onnx
    tokens = {}
    for ops in ("contrib", "standard"):
        out = tmp_path / ops
        code, _, err = cli(llama_dir, "-o", out, "--quiet", "--passes",
                           f"rtn{{bits=4,group=32,zero=int,ort_accuracy=0,onnx_ops={ops}}}")
        assert code == 0, err
        domains = set()
        for f in sorted(out.glob("*.onnx")):
            m = onnx.load(str(f))
            domains |= {n.domain for n in m.graph.node} | {o.domain for o in m.opset_import}
            assert any(n.op_type == ("DequantizeLinear" if ops == "standard" else "MatMulNBits") for n in m.graph.node)
        assert ("com.microsoft" in domains) == (ops == "contrib")
        ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(1))
        tokens[ops] = graphopt.load(out).generate(ids, 8, eos_token_id=[])
    torch.testing.assert_close(tokens["standard"], tokens["contrib"], rtol=0, atol=0)
