"""Routed blocks into ONNX If nodes, so that a block its router switched off is not computed at all.

The exported graph gates a routed block as where(keep, block(x), x) (compiler/routing.py), which ONNX Runtime
runs as the whole block plus a Where. Here the block's ONNX nodes (found by their module scope, e.g.
`model.model.layers.3`) and that Where move into the then-branch of an If on "any row keeps the block"; the
else-branch returns x and, for the layer's KV-cache outputs, the past followed by zeros for the new positions
(never read: the decision holds for the whole sequence). ONNX subgraphs may read outer values, so the moved nodes
keep their inputs as they are, except the initializers of DequantizeLinear nodes (onnx_ops=standard), which move
into the branch: ONNX Runtime fuses DequantizeLinear + MatMul only with weights of the node's own graph.
"""
from __future__ import annotations

import re
from pathlib import Path

import onnx
from onnx import TensorProto, helper

_LAYER = re.compile(r"\.(\d+)$")


def _scopes(node) -> list[str]:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                import ast
                return list(ast.literal_eval(p.value))
            except (ValueError, SyntaxError):
                return []
    return []


def route_blocks(path: Path, routed: list[str], kv_heads: list[int], head_dim: list[int]) -> list[str]:
    """Rewrite the ONNX file at `path` in place; returns the blocks turned into If nodes."""
    # weights stay where they are (external .onnx.data above 256 MB): only the graph is rewritten
    model = onnx.load(str(path), load_external_data=False)
    model = onnx.shape_inference.infer_shapes(model)
    g = model.graph
    types = {vi.name: vi.type for vi in list(g.value_info) + list(g.input) + list(g.output)}
    for init in g.initializer:
        types.setdefault(init.name, helper.make_tensor_type_proto(init.data_type, list(init.dims)))
    graph_inputs = {i.name for i in g.input}
    graph_outputs = {o.name for o in g.output}
    done = []
    for block in routed:
        nodes = list(g.node)
        index = {id(n): i for i, n in enumerate(nodes)}
        inside = [n for n in nodes if block in _scopes(n)]
        if not inside:
            continue
        produced = {o for n in inside for o in n.output}
        inside_ids = {id(n) for n in inside}
        where = [n for n in nodes if n.op_type == "Where" and id(n) not in inside_ids
                 and n.input[1] in produced and n.input[2] not in produced]
        if len(where) != 1:
            continue
        where = where[0]
        layer = int(_LAYER.search(block).group(1))
        # the gate that zeroes this layer's cache outputs belongs in the If too (else: zeros, nothing computed)
        kv_names = {f"present_key_{layer}", f"present_value_{layer}"}
        gates = [n for n in nodes if n.op_type == "Mul" and set(n.output) & kv_names & graph_outputs
                 and any(i in produced for i in n.input)]
        anchors = {id(where)} | {id(n) for n in gates}
        members = {id(n) for n in inside} | anchors
        consumers: dict[str, list] = {}
        for n in nodes:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        # Drop nodes whose values are also read outside (shared shape computations, ...), then their producers.
        changed = True
        while changed:
            changed = False
            for n in nodes:
                if id(n) not in members or id(n) in anchors:
                    continue
                for o in n.output:
                    outside = [c for c in consumers.get(o, []) if id(c) not in members]
                    if outside and o not in graph_outputs and not all(c is where for c in outside):
                        members.discard(id(n))
                        changed = True
                        break
        moved = [n for n in nodes if id(n) in members]
        moved_out = {o for n in moved for o in n.output}
        exports = [o for o in moved_out
                   if o in graph_outputs or any(id(c) not in members for c in consumers.get(o, []))]
        x = where.input[2]
        if o_missing_type(exports, types):
            continue
        else_nodes, ok = [], True
        for o in exports:
            if o == where.output[0]:
                else_nodes.append(helper.make_node("Identity", [x], [f"{o}__else"]))
            elif _kv_output(o, consumers, members, layer, graph_outputs):
                # the KV of a skipped layer is zeroed by the graph anyway (never read): zeros of its shape
                past = _kv_output(o, consumers, members, layer, graph_outputs).replace("present_", "past_")
                sx, parts = f"{o}__sx", [f"{o}__b", f"{o}__h", f"{o}__t", f"{o}__d"]
                else_nodes += [
                    helper.make_node("Shape", [x], [sx]),
                    helper.make_node("Slice", [sx, _c(g, "i0", [0]), _c(g, "i1", [1])], [parts[0]]),
                    helper.make_node("Constant", [], [parts[1]], value=helper.make_tensor(
                        f"{o}__hv", TensorProto.INT64, [1], [kv_heads[layer]])),
                    helper.make_node("Slice", [sx, _c(g, "i1", [1]), _c(g, "i2", [2])], [f"{o}__new"]),
                    helper.make_node("Constant", [], [parts[3]], value=helper.make_tensor(
                        f"{o}__dv", TensorProto.INT64, [1], [head_dim[layer]])),
                ]
                if past in graph_inputs:  # decode: cache length + new tokens
                    else_nodes += [helper.make_node("Shape", [past], [f"{o}__ps"], start=2, end=3),
                                   helper.make_node("Add", [f"{o}__ps", f"{o}__new"], [parts[2]])]
                else:
                    else_nodes.append(helper.make_node("Identity", [f"{o}__new"], [parts[2]]))
                else_nodes += [
                    helper.make_node("Concat", parts, [f"{o}__shape"], axis=0),
                    helper.make_node("ConstantOfShape", [f"{o}__shape"], [f"{o}__else"],
                                     value=helper.make_tensor(f"{o}__z", types[o].tensor_type.elem_type, [1], [0])),
                ]
            else:
                ok = False
        if not ok:
            continue
        # Values inside a subgraph may not shadow outer names: the branch computes o__then, the If returns o.
        rename = {o: f"{o}__then" for o in exports}
        # ORT fuses DequantizeLinear + MatMul (onnx_ops=standard) only when the weights are initializers of the
        # DequantizeLinear's own graph: those go into the branch (as name__then).
        outer_inits = {t.name: t for t in g.initializer}
        branch_inits = sorted({i for n in moved if n.op_type == "DequantizeLinear" for i in n.input} & outer_inits.keys())
        rename.update({name: f"{name}__then" for name in branch_inits})
        moved = [_renamed(n, rename) for n in moved]
        then_graph = helper.make_graph(moved, f"{block}_then", [],
                                       [helper.make_value_info(rename[o], types[o]) for o in exports],
                                       initializer=[_copy_named(outer_inits[name], rename[name])
                                                    for name in branch_inits])
        else_graph = helper.make_graph(else_nodes, f"{block}_else", [],
                                       [helper.make_value_info(f"{o}__else", types[o]) for o in exports])
        cond_name = f"{block}__any"
        cond_nodes = [
            helper.make_node("Cast", [where.input[0]], [f"{cond_name}_i"], to=TensorProto.INT64),
            helper.make_node("ReduceMax", [f"{cond_name}_i"], [f"{cond_name}_m"], keepdims=0),
            helper.make_node("Cast", [f"{cond_name}_m"], [cond_name], to=TensorProto.BOOL),
        ]
        if_node = helper.make_node("If", [cond_name], exports, then_branch=then_graph, else_branch=else_graph,
                                   name=f"route_{block}")
        # Place the If where the first of its results is needed (or where the last moved node was).
        first_use = min([index[id(c)] for o in exports for c in consumers.get(o, []) if id(c) not in members]
                        + [len(nodes)])
        cond_src = where.input[0]
        kept = [n for n in nodes if id(n) not in members]
        pos = sum(1 for n in nodes[:first_use] if id(n) not in members)
        # the Where's condition and every outer input of the moved nodes must exist before the If
        defined_before = graph_inputs | {i.name for i in g.initializer} | {
            o for n in kept[:pos] for o in n.output}
        in_branch = {rename[name] for name in branch_inits}
        needed = {i for n in moved for i in n.input if i and i not in moved_out and i not in in_branch} | {cond_src}
        if not needed <= defined_before:
            continue
        new_nodes = kept[:pos] + cond_nodes + [if_node] + kept[pos:]
        del g.node[:]
        g.node.extend(new_nodes)
        still_read = _reads(g)
        for name in branch_inits:
            if name not in still_read:
                g.initializer.remove(outer_inits[name])
        done.append(block)
    onnx.save(model, str(path))
    return done


def _kv_output(value: str, consumers: dict, members: set, layer: int, graph_outputs: set) -> str | None:
    """The graph output present_key/value_<layer> that `value` feeds (directly or through the gate's Mul)."""
    names = (f"present_key_{layer}", f"present_value_{layer}")
    if value in names:
        return value
    for c in consumers.get(value, []):
        if id(c) not in members:
            for o in c.output:
                if o in names and o in graph_outputs:
                    return o
    return None


def _copy_named(tensor, name: str):
    new = onnx.TensorProto()
    new.CopyFrom(tensor)
    new.name = name
    return new


def _reads(graph) -> set[str]:
    """Every value name the graph's nodes read, subgraphs included, and its outputs."""
    names = {o.name for o in graph.output}
    for n in graph.node:
        names.update(n.input)
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                names |= _reads(sub)
    return names


def _renamed(node, rename: dict):
    new = onnx.NodeProto()
    new.CopyFrom(node)
    for i, v in enumerate(new.input):
        if v in rename:
            new.input[i] = rename[v]
    for i, v in enumerate(new.output):
        if v in rename:
            new.output[i] = rename[v]
    return new


def o_missing_type(names, types) -> bool:
    return any(n not in types for n in names)


def _c(g, name: str, values: list[int]) -> str:
    """A shared int64 initializer."""
    full = f"__graphopt_{name}"
    if not any(i.name == full for i in g.initializer):
        g.initializer.append(helper.make_tensor(full, TensorProto.INT64, [len(values)], values))
    return full
