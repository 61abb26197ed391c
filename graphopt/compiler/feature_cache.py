"""Split a denoiser into a full graph that also returns a deep feature and a shallow graph that reuses it.

Cache points are found structurally. For a UNet (modules `up_blocks.K`), `up_blocks.K` names the input of up
block K: the output of up block K-1, which carries everything computed below it (DeepCache's skip branch). The
shallow graph is the backward slice of the output with that feature as an input: the time embedding, the input
convolution, the down blocks whose skips reach up blocks >= K, up blocks >= K and the output layers. With
decoupled error correction (DEC) the shallow graph takes a per-channel scale and shift, F' = a ⊙ F + b.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch.export.graph_signature import InputKind, InputSpec, OutputKind, OutputSpec, TensorArgument
from torch.utils import _pytree as pytree

from ..errors import GraphoptError
from .graph_edit import GraphEditor, _fake_like, keep_only_output_slice

aten = torch.ops.aten
_UP = re.compile(r"(?:^|\.)up_blocks\.(\d+)$")
_BLOCK = re.compile(r"(?:^|\.)transformer_blocks\.(\d+)$")


@dataclass
class CachePoint:
    """What the shallow graph reuses. kind "replace": the value of `out` (a UNet up block's input) is cached and
    substituted. kind "residual": the change `out - inp` across a run of transformer blocks is cached, and the
    shallow graph adds it to its own fresh `inp` (the blocks in between drop out)."""
    name: str
    kind: str
    out: torch.fx.Node
    inp: torch.fx.Node | None = None
    channel_axis: int = 1  # the axis DEC's per-channel scale and shift run along


def _index(node: torch.fx.Node, pattern: re.Pattern) -> int | None:
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        m = pattern.search(path)
        if m:
            return int(m.group(1))
    return None


def _edges(ep, pattern: re.Pattern) -> dict[int, torch.fx.Node]:
    """k -> the node of block k-1 whose value enters block k (the stream between consecutive blocks)."""
    found: dict[int, torch.fx.Node] = {}
    for n in ep.graph.nodes:
        k = _index(n, pattern)
        if k is not None and any(_index(u, pattern) == k + 1 for u in n.users):
            found.setdefault(k + 1, n)
    return found


def candidates(ep) -> dict[str, CachePoint]:
    """UNet: 'up_blocks.K' (the input of up block K). Transformer: 'transformer_blocks.A-B' (reuse the change
    across blocks A..B-1, recomputing the blocks before A and from B on), 1 <= A < B <= last block."""
    cands = {f"up_blocks.{k}": CachePoint(f"up_blocks.{k}", "replace", n) for k, n in _edges(ep, _UP).items()}
    edges = _edges(ep, _BLOCK)
    for a in edges:
        for b in edges:
            if a < b:
                name = f"transformer_blocks.{a}-{b}"
                cands[name] = CachePoint(name, "residual", edges[b], edges[a], channel_axis=-1)
    return cands


def find_point(ep, point: str) -> CachePoint:
    cands = candidates(ep)
    if not cands:
        raise GraphoptError("cache-schedule: found no cache point: it looks for a UNet's up blocks (up_blocks.K) or "
                            "a transformer's blocks (transformer_blocks.K) in the graph's module metadata")
    if point == "auto":
        ups = [c for c in cands.values() if c.kind == "replace"]
        if ups:  # the last up block: the cheapest shallow graph
            return max(ups, key=lambda c: int(c.name.rsplit(".", 1)[1]))
        # the widest run of blocks: keep the first and the last block fresh
        return max(cands.values(), key=lambda c: (lambda a, b: b - a)(*map(int, c.name.rsplit(".", 1)[1].split("-"))))
    if point not in cands:
        shown = sorted(cands)
        raise GraphoptError(f"cache-schedule: point '{point}' does not exist; candidates: {', '.join(shown[:12])}"
                            + (f" (and {len(shown) - 12} more)" if len(shown) > 12 else ""))
    return cands[point]


def _set_call_spec(ep, n_in: int, n_out: int) -> None:
    """Make the root call signature match the edited user inputs/outputs (ep.module() builds its forward from it)."""
    sig = ep.module_call_graph[0].signature
    sig.in_spec = pytree.tree_structure((tuple(range(n_in)), {}))
    sig.out_spec = pytree.tree_structure(tuple(range(n_out)))
    gs = ep.graph_signature
    sig.inputs = [TensorArgument(s.arg.name) for s in gs.input_specs if s.kind == InputKind.USER_INPUT]
    sig.outputs = [TensorArgument(s.arg.name) for s in gs.output_specs if s.kind == OutputKind.USER_OUTPUT]
    if getattr(sig, "forward_arg_names", None) is not None:  # names of the generated forward's parameters
        sig.forward_arg_names = [s.arg.name for s in gs.input_specs if s.kind == InputKind.USER_INPUT]


def _node(ed: GraphEditor, like: torch.fx.Node) -> torch.fx.Node:
    return next(n for n in ed.graph.nodes if n.name == like.name)


def feature_value(point: CachePoint):
    """Fake value (shape, dtype) of what is cached."""
    return point.out.meta["val"]


def full_with_feature(ep, point: CachePoint):
    """The same graph, returning what is cached as one more output (the value, or the change across the blocks)."""
    ed = GraphEditor(ep)
    node = _node(ed, point.out)
    if point.kind == "residual":
        inp = _node(ed, point.inp)
        with ed.graph.inserting_after(node):
            delta = ed.graph.call_function(aten.sub.Tensor, (node, inp))
        with node.meta["val"].fake_mode:
            delta.meta["val"] = node.meta["val"] - inp.meta["val"]
        node = delta
    out = next(n for n in ed.graph.nodes if n.op == "output")
    outs = list(out.args[0])
    out.args = (tuple(outs + [node]),)
    ed.output_specs.append(OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(node.name), None))
    new = ed.build()
    n_user_in = sum(s.kind == InputKind.USER_INPUT for s in new.graph_signature.input_specs)
    _set_call_spec(new, n_user_in, len(new.graph_signature.user_outputs))
    return new


def shallow_graph(ep, point: CachePoint, dec: bool, example_inputs: tuple):
    """The output computed from a cached feature (an input named cached_feature; with dec also dec_scale and
    dec_shift, [C]), with everything only the feature needed removed. example_inputs: the new user inputs."""
    ed = GraphEditor(ep)
    node = _node(ed, point.out)
    val = node.meta["val"]
    last_ph = [n for n in ed.graph.nodes if n.op == "placeholder"][-1]

    def add_input(name: str, fake) -> torch.fx.Node:
        nonlocal last_ph
        with ed.graph.inserting_after(last_ph):
            ph = ed.graph.placeholder(name)
        ph.meta["val"] = fake
        ed.input_specs.append(InputSpec(InputKind.USER_INPUT, TensorArgument(ph.name), None))
        last_ph = ph
        return ph

    cached = add_input("cached_feature", val)
    replacement = cached
    if dec:
        C = val.shape[point.channel_axis]
        scale = add_input("dec_scale", _fake_like(torch.empty(C, dtype=val.dtype), ep))
        shift = add_input("dec_shift", _fake_like(torch.empty(C, dtype=val.dtype), ep))
        C = val.shape[point.channel_axis]
        shape = [1] * val.dim()
        shape[point.channel_axis] = C
        with ed.graph.inserting_before(node):
            s4 = ed.graph.call_function(aten.view.default, (scale, shape))
            b4 = ed.graph.call_function(aten.view.default, (shift, shape))
            mul = ed.graph.call_function(aten.mul.Tensor, (cached, s4))
            add = ed.graph.call_function(aten.add.Tensor, (mul, b4))
        with val.fake_mode:
            s4.meta["val"] = scale.meta["val"].view(shape)
            b4.meta["val"] = shift.meta["val"].view(shape)
            mul.meta["val"] = val * s4.meta["val"]
            add.meta["val"] = mul.meta["val"] + b4.meta["val"]
        replacement = add
    if point.kind == "residual":  # the stream after the skipped blocks = fresh input + cached change
        inp = _node(ed, point.inp)
        with ed.graph.inserting_before(node):
            restored = ed.graph.call_function(aten.add.Tensor, (inp, replacement))
        with val.fake_mode:
            restored.meta["val"] = inp.meta["val"] + replacement.meta["val"]
        replacement = restored
    node.replace_all_uses_with(replacement)
    keep_only_output_slice(ed.graph)
    ed.remove_unused_inputs()
    new = ed.build()
    n_user_in = sum(s.kind == InputKind.USER_INPUT for s in new.graph_signature.input_specs)
    _set_call_spec(new, n_user_in, len(new.graph_signature.user_outputs))
    new.example_inputs = (tuple(example_inputs), {})
    return new


def flops(ep, inputs: tuple) -> int:
    """FLOPs of one call (torch's FlopCounterMode on the program's module)."""
    from torch.utils.flop_counter import FlopCounterMode
    args, kwargs = pytree.tree_unflatten(list(inputs), ep.call_spec.in_spec)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        ep.module()(*args, **kwargs)
    return int(counter.get_total_flops())
