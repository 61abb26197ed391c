"""Exact attention rewrites applied at lowering.

Grouped-query attention as traced from Hugging Face models repeats each key/value head for its query heads
(`repeat_kv`: unsqueeze -> expand -> reshape) before `scaled_dot_product_attention`, which materialises the
repeated cache on every decode step and, in ONNX, adds shape arithmetic around each layer. SDPA's `enable_gqa=True`
computes the same thing from the un-repeated heads (query head j reads key/value head j // repeats, the order
repeat_kv produces), and the ONNX exporter lowers it to one Attention node (opset >= 23) that reads the grouped heads
directly.
"""
from __future__ import annotations

import torch
from torch.export import ExportedProgram

from .graph_edit import GraphEditor

aten = torch.ops.aten
_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
_NOOPS = (aten.slice.Tensor, aten.alias.default, aten.clone.default, aten.contiguous.default)


def _same(a, b) -> bool:
    """Equal sizes; symbolic sizes by expression (no guards are added to the program's shape environment)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return str(a) == str(b)


def _skip_noops(node):
    """Back through full-range slices and copies (the trace of x[:, :, None] when remove-noops has not run)."""
    while (isinstance(node, torch.fx.Node) and node.target in _NOOPS and isinstance(node.args[0], torch.fx.Node)
           and len(node.meta["val"].shape) == len(node.args[0].meta["val"].shape)
           and all(_same(a, b) for a, b in zip(node.meta["val"].shape, node.args[0].meta["val"].shape))):
        node = node.args[0]
    return node


def _repeated_heads(node) -> tuple[torch.fx.Node, int] | None:
    """(x, repeats) when node = reshape(expand(unsqueeze(x, 2), [B, H, r, S, D]), [B, H * r, S, D]), else None."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _RESHAPES):
        return None
    expand = node.args[0]
    if not (isinstance(expand, torch.fx.Node) and expand.target is aten.expand.default and len(expand.users) == 1):
        return None
    unsq = _skip_noops(expand.args[0])
    if not (isinstance(unsq, torch.fx.Node) and unsq.target is aten.unsqueeze.default and unsq.args[1] == 2):
        return None
    x = unsq.args[0]
    xs, es, out = x.meta["val"].shape, expand.meta["val"].shape, node.meta["val"].shape
    if len(xs) != 4 or len(es) != 5 or len(out) != 4:
        return None
    # The expanded axes must be exactly (B, H, r, S, D) and the reshape must merge H and r.
    if not (_same(es[0], xs[0]) and _same(es[1], xs[1]) and _same(es[3], xs[2]) and _same(es[4], xs[3])
            and _same(out[1], xs[1] * es[2]) and _same(out[2], xs[2]) and _same(out[3], xs[3])):
        return None
    return x, es[2]


def native_gqa(ep: ExportedProgram) -> tuple[ExportedProgram, int]:
    """The program with repeat_kv removed before every SDPA whose key and value are both repeated (same factor);
    returns (program, number of attention calls rewritten). The input program is not modified."""
    sdpa = aten.scaled_dot_product_attention.default
    if not any(n.target is sdpa for n in ep.graph.nodes):
        return ep, 0
    ed = GraphEditor(ep)
    done = 0
    for node in ed.graph.nodes:
        if node.target is not sdpa or node.kwargs.get("enable_gqa") or len(node.args) < 3:
            continue
        k, v = _repeated_heads(node.args[1]), _repeated_heads(node.args[2])
        if k is None or v is None or k[1] != v[1] or k[1] == 1:
            continue
        node.args = (node.args[0], k[0], v[0], *node.args[3:])
        node.kwargs = {**node.kwargs, "enable_gqa": True}
        done += 1
    if not done:
        return ep, 0
    ed.graph.eliminate_dead_code()
    return ed.build(), done
