"""Exact lowering rewrite: linears that read the same input (q/k/v projections, gate/up of a gated MLP) become one
linear over the concatenated weights (packed low-bit weights too), sliced afterwards. Each output column is the same
dot product as before, so the result is bit-identical; the runtime launches one larger matmul instead of several.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch.export import ExportedProgram

from .graph_edit import GraphEditor

aten = torch.ops.aten


def _dq_linear_op():
    try:  # registered when graphopt.kernels is imported, which a program holding the op has been
        return torch.ops.graphopt.dq_linear.default
    except (AttributeError, RuntimeError):
        return None


def _fusable(ed: GraphEditor, node: torch.fx.Node):
    """(group key, constant operands) of a bias-free linear or dq_linear with constant weights, else None."""
    if not isinstance(node.args[0] if node.args else None, torch.fx.Node) or node.kwargs:
        return None
    if node.target is aten.linear.default and len(node.args) == 2:
        consts = [ed.constant_value(node.args[1])]
        key = ("linear",)
    elif node.target is _dq_linear_op() and node.args[4] is None:
        consts = [ed.constant_value(a) for a in node.args[1:4]]
        key = ("dq_linear", *node.args[5:8])  # bits, group, in_features
    else:
        return None
    if any(c is None for c in consts) or consts[0].dim() != 2:
        return None
    return (node.args[0], *key, *((c.dtype, c.device, tuple(c.shape[1:])) for c in consts)), consts


def fuse_parallel_linears(ep: ExportedProgram) -> tuple[ExportedProgram, int]:
    """(program, number of groups fused). Bias-free linears with constant 2-D weights (or graphopt dq_linears with
    constant packed weights, scales and zeros: all per-output-row tensors) that read the same input with the same
    dtypes and settings are grouped; the input program is not modified."""
    ed = GraphEditor(ep)
    order = {n: i for i, n in enumerate(ed.graph.nodes)}
    groups: dict[tuple, list[tuple[torch.fx.Node, list[torch.Tensor]]]] = defaultdict(list)
    for node in ed.graph.nodes:
        if node.op == "call_function":
            found = _fusable(ed, node)
            if found is not None:
                groups[found[0]].append((node, found[1]))
    fused = 0
    merged_by_weights: dict[tuple, list] = {}  # the same weights fused at two inputs (a drafter and its verifier)
    for key, members in groups.items():
        if len(members) < 2:
            continue
        nodes = [n for n, _ in members]
        first = min(nodes, key=order.__getitem__)
        weights = tuple(tuple(a.name for a in n.args[1:4] if isinstance(a, torch.fx.Node)) for n in nodes)
        merged = merged_by_weights.get(weights)
        if merged is None:
            merged = [ed.add_constant(torch.cat(parts, 0), "fused_weight") for parts in zip(*(c for _, c in members))]
            merged_by_weights[weights] = merged
        sizes = [c[0].shape[0] for _, c in members]
        with ed.graph.inserting_before(first):
            if first.target is aten.linear.default:
                y = ed.graph.call_function(aten.linear.default, (first.args[0], merged[0]))
            else:
                y = ed.graph.call_function(first.target, (first.args[0], *merged, None, *first.args[5:8]))
            # Slices, not split_with_sizes: ONNX export turns a split into SplitToSequence/SequenceAt, which its
            # optimizer then folds into a Split without module scopes, and onnx_if finds a block's nodes by scope.
            ends = [sum(sizes[:i + 1]) for i in range(len(sizes))]
            outs = [ed.graph.call_function(aten.slice.Tensor, (y, -1, end - size, end))
                    for size, end in zip(sizes, ends)]
        ref = first.meta["val"]
        y.meta["val"] = ref.new_empty((*ref.shape[:-1], sum(sizes)))
        for meta_key in ("nn_module_stack", "stack_trace"):  # scopes stay with the block that held the linears
            if meta_key in first.meta:
                y.meta[meta_key] = first.meta[meta_key]
        for n, out in zip(nodes, outs):
            out.meta.update({k: v for k, v in n.meta.items() if k in ("val", "nn_module_stack", "stack_trace")})
            n.replace_all_uses_with(out)
            ed.graph.erase_node(n)
        fused += 1
    if not fused:
        return ep, 0
    ed.remove_unused_inputs()
    return ed.build(), fused
