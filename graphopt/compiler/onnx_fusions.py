"""ONNX rewrite: a residual Add feeding an RMSNormalization becomes one com.microsoft::SkipSimplifiedLayerNormalization.

Pre-norm decoders add each sub-layer's output to the residual stream and normalize the sum for the next sub-layer:
two nodes per sub-layer, 2 x layers per decode step. ONNX Runtime fuses Add + SimplifiedLayerNormalization itself,
but not Add + ONNX's RMSNormalization (opset 23), which the exporter writes. SkipSimplifiedLayerNormalization
computes the same sum (its 4th output, which keeps the Add's output name for the residual's later readers) and
normalizes it in one pass: the zoo LM's decode step is ~25 us (3-5 %) faster. Only when both Add inputs have the same
known 3-D shape (the op's contract), the scale is 1-D and the normalization is over the last axis in fp32.
"""
from __future__ import annotations

import onnx
from onnx import helper

_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _shape(types: dict, name: str):
    t = types.get(name)
    if t is None or t.elem_type not in _FLOATS or not t.HasField("shape"):
        return None
    dims = tuple(d.dim_param or d.dim_value or None for d in t.shape.dim)
    return None if None in dims else (t.elem_type, dims)


def fuse_skip_rms_norm(model: onnx.ModelProto) -> int:
    """Rewrite the main graph in place; returns how many pairs were fused."""
    g = model.graph
    types = {v.name: v.type.tensor_type for v in [*g.value_info, *g.input, *g.output]}
    ranks = {t.name: len(t.dims) for t in g.initializer}
    position = {o: i for i, n in enumerate(g.node) for o in n.output}
    nodes = list(g.node)  # indices, not id(): protobuf hands out fresh wrapper objects
    fused, drop = {}, set()
    for k, norm in enumerate(nodes):
        if norm.op_type != "RMSNormalization" or norm.domain not in ("", "ai.onnx") or len(norm.input) != 2:
            continue
        if _attr(norm, "axis", -1) != -1 or _attr(norm, "stash_type", 1) != 1 or ranks.get(norm.input[1]) != 1:
            continue
        i = position.get(norm.input[0])
        if i is None or i in fused or nodes[i].op_type != "Add" or nodes[i].domain not in ("", "ai.onnx"):
            continue
        add = nodes[i]
        a, b = (_shape(types, x) for x in add.input)
        if a is None or a != b or len(a[1]) != 3:
            continue
        # The sum keeps its name (later residual adds, subgraphs and graph outputs read it by name); the node takes
        # the Add's place, where both addends and the (initializer) scale are already defined.
        fused[i] = helper.make_node(
            "SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], norm.input[1]],
            [norm.output[0], "", "", add.output[0]], domain="com.microsoft",
            name=f"{norm.name or 'rms'}_skip", epsilon=float(_attr(norm, "epsilon", 1e-5)))
        drop.add(k)
    if not fused:
        return 0
    kept = [fused.get(i, n) for i, n in enumerate(nodes) if i not in drop]
    del g.node[:]
    g.node.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(fused)
