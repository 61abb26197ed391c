from __future__ import annotations

import operator

import torch

from ..compiler.graph_edit import GraphEditor, is_mutating, same_shape
from .base import Pass, register

aten = torch.ops.aten

# Ops that return their first input unchanged whenever the output has the input's shape, dtype and device.
_SHAPE_PRESERVING = {
    aten.clone.default, aten.alias.default, aten.detach.default, aten.contiguous.default,
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
    aten.flatten.using_ints, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.slice.Tensor, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default,
    aten.type_as.default,
}
_SCALAR_IDENTITY = {aten.mul.Tensor: 1, aten.mul.Scalar: 1, aten.div.Tensor: 1, aten.div.Scalar: 1,
                    aten.add.Tensor: 0, aten.add.Scalar: 0, aten.sub.Tensor: 0, aten.sub.Scalar: 0}
_DROPOUTS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default}


def _noop_input(node: torch.fx.Node) -> torch.fx.Node | None:
    """The node's input if the node is a no-op, else None."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    src = node.args[0]
    out, inp = node.meta.get("val"), src.meta.get("val")
    if not (isinstance(out, torch.Tensor) and isinstance(inp, torch.Tensor)):
        return None
    if out.dtype != inp.dtype or out.device != inp.device or not same_shape(out.shape, inp.shape):
        return None
    target = node.target
    if target in _DROPOUTS:
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        return src if train is False else None
    if target in _SHAPE_PRESERVING:
        return src
    if target in (aten.permute.default,):
        dims = list(node.args[1])
        return src if dims == list(range(len(dims))) else None
    if target in (aten.transpose.int,):
        d0, d1 = node.args[1], node.args[2]
        return src if d0 % max(len(inp.shape), 1) == d1 % max(len(inp.shape), 1) else None
    if target in _SCALAR_IDENTITY:
        other = node.args[1] if len(node.args) > 1 else None
        alpha = node.kwargs.get("alpha", 1)
        if not isinstance(other, torch.fx.Node) and other == _SCALAR_IDENTITY[target] and alpha == 1 \
                and not isinstance(other, bool):
            return src
    return None


def _is_assert(node: torch.fx.Node) -> bool:
    name = getattr(node.target, "__name__", "") or ""
    return node.op == "call_function" and (name.startswith("_assert") or node.target is torch._assert)


@register
class RemoveNoops(Pass):
    """Remove no-op nodes: identity views/clones/casts, eval-mode dropout, x*1 and x+0, and _assert_* checks."""
    name = "remove-noops"
    half_precision = True

    @classmethod
    def headline(cls, details) -> str:
        return f"{details['removed_noops']} no-ops, {details['removed_asserts']} asserts removed"

    def run(self, program, ctx):
        counts = {"noops": 0, "asserts": 0}
        methods = {}
        for name, ep in program.methods.items():
            ed = GraphEditor(ep)
            for node in list(ed.graph.nodes):
                if _is_assert(node):
                    ed.graph.erase_node(node)
                    counts["asserts"] += 1
                    continue
                src = _noop_input(node)
                if src is None:
                    continue
                # Aliasing matters only where something writes in place; leave those graphs alone.
                if any(is_mutating(u) for u in list(node.users) + list(src.users)):
                    continue
                if any(u.target is operator.getitem for u in node.users):
                    continue
                node.replace_all_uses_with(src)
                ed.graph.erase_node(node)
                counts["noops"] += 1
            methods[name] = ed.build()
        program.methods = methods
        return program, {"removed_noops": counts["noops"], "removed_asserts": counts["asserts"]}
