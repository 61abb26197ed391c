"""Split a denoiser into a full graph that also returns a deep feature and a shallow graph that reuses it.

Cache points are found structurally. For a UNet (modules `up_blocks.K`), `up_blocks.K` names the input of up
block K: the output of up block K-1, which carries everything computed below it (DeepCache's skip branch). The
shallow graph is the backward slice of the output with that feature as an input: the time embedding, the input
convolution, the down blocks whose skips reach up blocks >= K, up blocks >= K and the output layers. With
decoupled error correction (DEC) the shallow graph takes a per-channel scale and shift, F' = a ⊙ F + b.
"""
from __future__ import annotations

import re

import torch
from torch.export.graph_signature import InputKind, InputSpec, OutputKind, OutputSpec, TensorArgument
from torch.utils import _pytree as pytree

from ..errors import GraphoptError
from .graph_edit import GraphEditor, _fake_like

aten = torch.ops.aten
_UP = re.compile(r"(?:^|\.)up_blocks\.(\d+)$")


def _paths(node: torch.fx.Node) -> list[str]:
    return [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


def _up_index(node: torch.fx.Node) -> int | None:
    for p in _paths(node):
        m = _UP.search(p)
        if m:
            return int(m.group(1))
    return None


def candidates(ep) -> dict[str, torch.fx.Node]:
    """Cache points 'up_blocks.K' (K >= 1) -> the node whose value enters up block K from up block K-1."""
    found: dict[str, torch.fx.Node] = {}
    for n in ep.graph.nodes:
        k = _up_index(n)
        if k is None:
            continue
        for user in n.users:
            if _up_index(user) == k + 1:
                found.setdefault(f"up_blocks.{k + 1}", n)
    return found


def find_point(ep, point: str) -> tuple[str, torch.fx.Node]:
    cands = candidates(ep)
    if not cands:
        raise GraphoptError("cache-schedule: found no cache point: it looks for a UNet's up blocks (modules named "
                            "up_blocks.K) in the graph's module metadata")
    if point == "auto":
        name = max(cands, key=lambda c: int(c.rsplit(".", 1)[1]))  # the last up block: the cheapest shallow graph
        return name, cands[name]
    if point not in cands:
        raise GraphoptError(f"cache-schedule: point '{point}' does not exist; candidates: {', '.join(sorted(cands))}")
    return point, cands[point]


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


def _keep_only_output_slice(graph: torch.fx.Graph) -> None:
    """Erase every computation the outputs do not need. Not graph.eliminate_dead_code(): it keeps eval-mode dropout,
    attention and metadata asserts as impure, and with them the whole deep part."""
    out = next(n for n in graph.nodes if n.op == "output")
    needed, frontier = {out}, [out]
    while frontier:
        for a in frontier.pop().all_input_nodes:
            if a not in needed:
                needed.add(a)
                frontier.append(a)
    for n in reversed(list(graph.nodes)):
        if n.op == "call_function" and n not in needed:
            graph.erase_node(n)


def full_with_feature(ep, feature: torch.fx.Node):
    """The same graph, returning the feature as one more output."""
    ed = GraphEditor(ep)
    node = next(n for n in ed.graph.nodes if n.name == feature.name)
    out = next(n for n in ed.graph.nodes if n.op == "output")
    outs = list(out.args[0])
    out.args = (tuple(outs + [node]),)
    ed.output_specs.append(OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(node.name), None))
    new = ed.build()
    n_user_in = sum(s.kind == InputKind.USER_INPUT for s in new.graph_signature.input_specs)
    _set_call_spec(new, n_user_in, len(new.graph_signature.user_outputs))
    return new


def shallow_graph(ep, feature: torch.fx.Node, dec: bool, example_inputs: tuple):
    """The output computed from a cached feature (an input named cached_feature; with dec also dec_scale and
    dec_shift, [C]), with everything only the feature needed removed. example_inputs: the new user inputs."""
    ed = GraphEditor(ep)
    node = next(n for n in ed.graph.nodes if n.name == feature.name)
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
        C = val.shape[1]
        scale = add_input("dec_scale", _fake_like(torch.empty(C, dtype=val.dtype), ep))
        shift = add_input("dec_shift", _fake_like(torch.empty(C, dtype=val.dtype), ep))
        shape = [1, C] + [1] * (val.dim() - 2)
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
    node.replace_all_uses_with(replacement)
    _keep_only_output_slice(ed.graph)
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
