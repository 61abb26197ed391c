"""ONNX rewrite: attention on the [B, S, heads·d] layout the projections produce.

The exporter writes HF attention as it is traced: each projection is reshaped to [B, S, H, d] and transposed to
[B, H, S, d], rotated (RotaryEmbedding), the new K/V concatenated to the cache, and the output transposed and
reshaped back; a decode step of a small model spends a good part of its time launching those ~10 layout nodes per
layer. ONNX's RotaryEmbedding and Attention (opset 23) take the 3-D layout directly (num_heads / q_num_heads /
kv_num_heads) and Attention appends to the cache itself (past_key/past_value in, present_key/present_value out), so
the chain becomes RotaryEmbedding ×2 + Attention. The arithmetic is the same; the ORT check after lowering compares
the result with the torch program as for any method.
"""
from __future__ import annotations

from collections import defaultdict

import onnx
from onnx import helper, numpy_helper

PERM = [0, 2, 1, 3]


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class _Graph:
    def __init__(self, graph: onnx.GraphProto):
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers = defaultdict(list)
        for n in graph.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.outputs = {o.name for o in graph.output}
        self.inits = {i.name: i for i in graph.initializer}

    def const(self, name):
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        n = self.producer.get(name)
        if n is not None and n.op_type == "Constant":
            return numpy_helper.to_array(_attr(n, "value"))
        return None

    def shape_const(self, name) -> list | None:
        """A reshape target as a list, None for the parts computed at run time (Concat of Shape-derived dims)."""
        value = self.const(name)
        if value is not None:
            return [int(v) for v in value.reshape(-1)]
        n = self.producer.get(name)
        if n is None or n.op_type != "Concat":
            return None
        out = []
        for i in n.input:
            part = self.const(i)
            if part is None:
                out.append(None)  # one runtime dim per part: the exporter's Shape/Gather pieces are [1]
            else:
                out += [int(v) for v in part.reshape(-1)]
        return out

    def only_user(self, name, node) -> bool:
        return name not in self.outputs and [id(u) for u in self.consumers[name]] == [id(node)]

    def to_heads(self, name, user, heads: int):
        """(x3, d, nodes) when `name` = Transpose(perm 0,2,1,3)(Reshape(x3, [.., .., H or -1, d])); user: the only node
        allowed to read `name` (None: any reader, as the rewrite produces the same tensor again)."""
        t = self.producer.get(name)
        if t is None or t.op_type != "Transpose" or list(_attr(t, "perm", [])) != PERM:
            return None
        if user is not None and not self.only_user(name, user):
            return None
        r = self.producer.get(t.input[0])
        if r is None or r.op_type != "Reshape" or not self.only_user(t.input[0], t):
            return None
        shape = self.shape_const(r.input[1])
        if shape is None or len(shape) != 4 or shape[2] not in (heads, -1) or shape[3] is None or shape[3] <= 0:
            return None
        return r.input[0], shape[3], [t, r]


def _cache_append(gr: _Graph, name):
    """(past, new, concat) when `name` = Concat(past, new) on the sequence axis, else (None, name, None)."""
    c = gr.producer.get(name)
    if c is not None and c.op_type == "Concat" and len(c.input) == 2 and _attr(c, "axis") in (-2, 2):
        return c.input[0], c.input[1], c
    return None, name, None


def _match(gr: _Graph, att):
    """The nodes to replace and the new ones for one Attention, or None."""
    if len(att.input) != 4 or len(att.output) != 1 or not att.input[3]:
        return None
    q_in, k_in, v_in, mask = att.input
    # K and V: Concat(past, new) on the sequence axis (decode, verify) or the new states alone (prefill). Either way
    # the rewritten Attention produces the same tensors (present_key/present_value) under the same names.
    past_k, k_new, cat_k = _cache_append(gr, k_in)
    past_v, v_new, cat_v = _cache_append(gr, v_in)
    if (cat_k is None) != (cat_v is None):
        return None
    rope_q, rope_k = gr.producer.get(q_in), gr.producer.get(k_new)
    if any(r is None or r.op_type != "RotaryEmbedding" or len(r.input) != 3 for r in (rope_q, rope_k)):
        return None
    if not gr.only_user(q_in, att) or (cat_k is not None and not gr.only_user(k_new, cat_k)):
        return None
    h, hk = _attr(rope_q, "num_heads"), _attr(rope_k, "num_heads")  # the exporter sets them on 4-D inputs too
    if not h or not hk:
        return None
    q = gr.to_heads(rope_q.input[0], rope_q, h)
    k = gr.to_heads(rope_k.input[0], rope_k, hk)
    v = gr.to_heads(v_new, cat_v, hk)  # prefill: V is also the present output, produced again
    if q is None or k is None or v is None:
        return None
    (q3, d, q_nodes), (k3, dk, k_nodes), (v3, dv, v_nodes) = q, k, v
    out_name, extra = att.output[0], []
    t_out = gr.consumers[out_name]
    if len(t_out) == 1 and t_out[0].op_type == "Reshape" and out_name not in gr.outputs:
        # a re-traced graph (draft_verify) keeps the view torch traced: a reshape to the same [B, H, S, d]
        same = gr.shape_const(t_out[0].input[1])
        if same is None or len(same) != 4 or same[1] != h or same[3] != dv:
            return None
        extra, out_name = [t_out[0]], t_out[0].output[0]
        t_out = gr.consumers[out_name]
    if len(t_out) != 1 or t_out[0].op_type != "Transpose" or list(_attr(t_out[0], "perm", [])) != PERM \
            or out_name in gr.outputs:
        return None
    r_out = gr.consumers[t_out[0].output[0]]
    if len(r_out) != 1 or r_out[0].op_type != "Reshape" or t_out[0].output[0] in gr.outputs:
        return None
    shape = gr.shape_const(r_out[0].input[1])
    if shape is None or len(shape) != 3 or shape[2] not in (h * d, -1) or d != dk or d != dv:
        return None
    tag = att.name or att.output[0]
    qr, kr = f"{tag}_q_rot3d", f"{tag}_k_rot3d"
    new = [helper.make_node("RotaryEmbedding", [q3, *rope_q.input[1:]], [qr], name=f"{tag}_rope_q3d",
                            interleaved=_attr(rope_q, "interleaved", 0), num_heads=h),
           helper.make_node("RotaryEmbedding", [k3, *rope_k.input[1:]], [kr], name=f"{tag}_rope_k3d",
                            interleaved=_attr(rope_k, "interleaved", 0), num_heads=hk)]
    attrs = {a.name: helper.get_attribute_value(a) for a in att.attribute}
    inputs = [qr, kr, v3, mask] + ([past_k, past_v] if cat_k is not None else [])
    new.append(helper.make_node("Attention", inputs, [r_out[0].output[0], k_in, v_in], name=f"{tag}_3d",
                                q_num_heads=h, kv_num_heads=hk, **attrs))
    for node in new:  # keep the module scope: onnx_if moves a block's nodes by it
        node.metadata_props.extend(att.metadata_props)
    old = [att, rope_q, rope_k, *extra, t_out[0], r_out[0], *q_nodes, *k_nodes, *v_nodes]
    return old + [n for n in (cat_k, cat_v) if n is not None], new


def _toposort(nodes: list, graph_inputs: set) -> list:
    produced = set(graph_inputs)
    pending, out = list(nodes), []
    while pending:
        rest = []
        for n in pending:
            if all(not i or i in produced for i in n.input):
                out.append(n)
                produced.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError("attention_3d: the rewritten graph has a cycle or a missing input")
        pending = rest
    return out


def attention_3d(model: onnx.ModelProto) -> int:
    """Rewrite every matching Attention of the main graph; returns how many."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node
           for a in n.attribute):
        return 0  # subgraphs read outer values implicitly, which the reordering below would not see
    gr = _Graph(model.graph)
    dropped, replaced = set(), {}
    for att in [n for n in model.graph.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]:
        found = _match(gr, att)
        if found is None or any(id(n) in dropped for n in found[0]):
            continue
        dropped.update(id(n) for n in found[0])
        replaced[id(att)] = found[1]
    if not replaced:
        return 0
    nodes = []
    for n in model.graph.node:
        if id(n) in replaced:
            nodes += replaced[id(n)]
        elif id(n) not in dropped:
            nodes.append(n)
    known = {i.name for i in model.graph.input} | set(gr.inits)
    del model.graph.node[:]
    model.graph.node.extend(_toposort(nodes, known))
    return len(replaced)
