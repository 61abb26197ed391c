"""Exact lowering rewrites: native_gqa (repeat_kv before SDPA becomes SDPA(enable_gqa=True)) and
fuse_parallel_linears (linears reading one input become one linear + slices); unchanged outputs in torch and ORT."""
import collections

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from graphopt.compiler.attention import native_gqa
from graphopt.compiler.fuse_linears import fuse_parallel_linears
from graphopt.compiler.onnx_lower import DEFAULT_OPSET, export_onnx

aten = torch.ops.aten


def repeat_kv(x, n):  # as in Hugging Face models; their traces can keep a full-range slice after the unsqueeze
    b, h, s, d = x.shape
    return x[:, :, None, :, :][:, :, :, :s].expand(b, h, n, s, d).reshape(b, h * n, s, d)


class GroupedAttention(torch.nn.Module):
    def __init__(self, repeat_value=True):
        super().__init__()
        self.repeat_value = repeat_value

    def forward(self, q, k, v, mask):
        v = repeat_kv(v, 4) if self.repeat_value else v
        return F.scaled_dot_product_attention(q, repeat_kv(k, 4), v, attn_mask=mask, scale=0.3)


def inputs(seed=0, s=7):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 8, s, 16, generator=g)
    k, v = torch.randn(2, 2, s, 16, generator=g), torch.randn(2, 2, s, 16, generator=g)
    mask = torch.ones(2, 1, s, s, dtype=torch.bool).tril()
    mask[1, :, :, :2] = False  # left padding in the second row
    mask[1, :, :2, 0] = True
    return q, k, v, mask


def sdpa_nodes(ep):
    return [n for n in ep.graph.nodes if n.target is aten.scaled_dot_product_attention.default]


@pytest.mark.parametrize("dynamic", [False, True])
def test_repeat_kv_is_removed_and_output_unchanged(dynamic):
    x = inputs()
    seq = torch.export.Dim("seq", min=2, max=64)
    shapes = {"q": {2: seq}, "k": {2: seq}, "v": {2: seq}, "mask": {2: seq, 3: seq}} if dynamic else None
    ep = torch.export.export(GroupedAttention(), x, dynamic_shapes=shapes)
    if dynamic:  # the trace of x[:, :, None] keeps full-range slices before the expand
        assert any(n.target is aten.slice.Tensor for n in ep.graph.nodes)
    new, n = native_gqa(ep)
    assert n == 1
    (node,) = sdpa_nodes(new)
    assert node.kwargs["enable_gqa"] is True
    assert node.args[1].meta["val"].shape[1] == 2 and node.args[2].meta["val"].shape[1] == 2
    assert not any(n.target is aten.expand.default for n in new.graph.nodes)
    assert any(n.target is aten.expand.default for n in ep.graph.nodes)  # the input program is untouched
    for seed in range(3):
        x = inputs(seed, s=9 if dynamic else 7)
        torch.testing.assert_close(new.module()(*x), ep.module()(*x), rtol=0, atol=1e-6)


def test_only_key_repeated_is_left_alone():
    class KeyOnly(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return F.scaled_dot_product_attention(q, repeat_kv(k, 4), v.repeat(1, 4, 1, 1), attn_mask=mask)
    ep = torch.export.export(KeyOnly(), inputs())
    new, n = native_gqa(ep)
    assert n == 0 and new is ep
    ep2 = torch.export.export(GroupedAttention(repeat_value=False), inputs()[:2] + (inputs()[2].repeat(1, 4, 1, 1),
                                                                                   inputs()[3]))
    assert native_gqa(ep2)[1] == 0


@pytest.mark.parametrize("opset", [21, DEFAULT_OPSET])
def test_onnx_of_grouped_attention_matches_torch(tmp_path, opset):
    ep, _ = native_gqa(torch.export.export(GroupedAttention(), inputs()))
    path = export_onnx(ep, tmp_path / "a.onnx", ["q", "k", "v", "mask"], ["y"], opset)
    ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    if opset >= 23:
        assert ops["Attention"] == 1 and ops["Expand"] == 0
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = inputs(5)
    (y,) = sess.run(None, {n: t.numpy() for n, t in zip("q k v mask".split(), x)})
    torch.testing.assert_close(torch.from_numpy(y), GroupedAttention()(*x), rtol=1e-5, atol=1e-5)


class Projections(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = (torch.nn.Linear(16, n, bias=False) for n in (16, 8, 8))
        self.biased = torch.nn.Linear(16, 4)  # has a bias: left alone
        self.other = torch.nn.Linear(8, 4, bias=False)  # reads another input: left alone

    def forward(self, x):
        k = self.k(x)
        return self.q(x) * 2, k, self.v(x) + 1, self.biased(x), self.other(k)


def test_linears_sharing_an_input_become_one_matmul():
    x = torch.randn(2, 3, 16)
    ep = torch.export.export(Projections().eval(), (x,))
    new, groups = fuse_parallel_linears(ep)
    assert groups == 1
    linears = [n for n in new.graph.nodes if n.target is aten.linear.default]
    assert len(linears) == 3  # fused q/k/v, biased, other
    fused = next(n for n in linears if n.meta["val"].shape[-1] == 32)
    # in graph order (k is computed first), each part a slice that keeps the module scope of its block
    parts = sorted((n.args[2], n.args[3]) for n in fused.users if n.target is aten.slice.Tensor)
    assert parts == [(0, 8), (8, 24), (24, 32)] and len(fused.users) == 3
    assert all("nn_module_stack" in n.meta for n in fused.users)
    for seed in range(3):
        x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(seed))
        for a, b in zip(new.module()(x), ep.module()(x)):
            # the same products and sums, but one GEMM instead of three may round differently by an ulp (MKL's
            # AVX2 path on an AMD EPYC does)
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_onnx_of_fused_linears_matches_torch(tmp_path):
    x = torch.randn(2, 3, 16)
    ep, _ = fuse_parallel_linears(torch.export.export(Projections().eval(), (x,)))
    path = export_onnx(ep, tmp_path / "p.onnx", ["x"], [f"y{i}" for i in range(5)])
    ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["MatMul"] == 3 and ops["Slice"] == 3  # fused q/k/v sliced, biased (Gemm or MatMul+Add), other
    outs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    for a, b in zip(outs, Projections().eval()(x)):
        torch.testing.assert_close(torch.from_numpy(a), b, rtol=1e-6, atol=1e-6)


class PreNormBlocks(torch.nn.Module):
    """Two pre-norm residual sub-layers (RMSNorm), and one residual sum that leaves the graph as an output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norms = torch.nn.ModuleList([torch.nn.RMSNorm(16, eps=1e-6) for _ in range(3)])
        self.lins = torch.nn.ModuleList([torch.nn.Linear(16, 16) for _ in range(2)])
        for n in self.norms:
            torch.nn.init.uniform_(n.weight, 0.5, 1.5)

    def forward(self, x):
        h = x + self.lins[0](self.norms[0](x))
        h2 = h + self.lins[1](self.norms[1](h))
        return self.norms[2](h2), h2, self.norms[2](x + 1.0)  # the last: a broadcast add, not fused


def test_residual_add_and_rms_norm_become_one_skip_norm(tmp_path):
    from graphopt.compiler.onnx_fusions import fuse_skip_rms_norm
    from graphopt.compiler.onnx_lower import rewrite_onnx_file
    x = torch.randn(2, 5, 16)
    ep = torch.export.export(PreNormBlocks().eval(), (x,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    path = export_onnx(ep, tmp_path / "n.onnx", ["x"], ["y", "h", "z"])
    before = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert rewrite_onnx_file(path, fuse_skip_rms_norm) == 2
    after = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert after["SkipSimplifiedLayerNormalization"] == 2
    assert after["RMSNormalization"] == before["RMSNormalization"] - 2 and after["Add"] == before["Add"] - 2
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 5, 16, generator=torch.Generator().manual_seed(batch))
        for a, b in zip(session.run(None, {"x": x.numpy()}), PreNormBlocks().eval()(x)):
            torch.testing.assert_close(torch.from_numpy(a), b, rtol=1e-5, atol=1e-5)


class OddGroup(torch.nn.Module):
    """A dq_linear with groups of 24 columns: MatMulNBits needs blocks of a power of two >= 16."""

    def __init__(self):
        super().__init__()
        import graphopt.kernels.dq_linear  # noqa: F401
        from graphopt.compiler.quantize import pack
        codes = torch.randint(-8, 8, (8, 48), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
        self.register_buffer("packed", pack(codes, 4))
        self.register_buffer("scale", torch.full((8, 2), 0.1))
        self.register_buffer("zero", torch.zeros(8, 2))

    def forward(self, x):
        return torch.ops.graphopt.dq_linear(x, self.packed, self.scale, self.zero, None, 4, 24, 48)


def test_export_errors_name_the_translations_own_cause(tmp_path):
    """The exporter wraps a translation's error in generic, colour-coded text; the user sees the cause."""
    from graphopt.errors import GraphoptError
    ep = torch.export.export(OddGroup(), (torch.randn(2, 48),))
    with pytest.raises(GraphoptError) as raised:
        export_onnx(ep, tmp_path / "m.onnx", ["x"], ["y"])
    message = str(raised.value)
    assert "group size 24 is not a multiple of 16" in message and "\x1b[" not in message
    assert "\n" not in message
