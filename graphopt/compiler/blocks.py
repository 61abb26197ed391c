"""Repeated residual blocks of an exported graph (decoder layers, encoder layers, DiT blocks, ...).

A block list is a module path prefix P with numbered children P.0, P.1, ... of one class (from each node's
`nn_module_stack`), at least two of them. A block's nodes are those whose stack holds P.k and that lie in graph
order between the block's first node and the next block's first node: a model may call a block's submodule again
outside it (diffusers' DiT re-uses block 0's norm in its output head), and those later calls do not belong to it.
The block's input is the value that enters it from before it (for k > 0, produced by block k-1) and its output the
value that leaves it for later nodes; `residual` says whether the output is an addition that reaches back to the
input (x + f(x) chains), which is what makes skipping a block meaningful.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .graph_edit import GraphEditor, keep_only_output_slice

_NUMBERED = re.compile(r"^(.*)\.(\d+)$")


@dataclass
class Block:
    path: str                 # e.g. "model.layers.3"
    index: int
    cls: str                  # module class name
    nodes: list[torch.fx.Node] = field(repr=False)
    input: torch.fx.Node | None = field(repr=False, default=None)
    output: torch.fx.Node | None = field(repr=False, default=None)
    residual: bool = False


def _stack(node: torch.fx.Node) -> list[tuple[str, str]]:
    return list((node.meta.get("nn_module_stack") or {}).values())


def _class_name(cls) -> str:
    return str(cls).rsplit(".", 1)[-1].rstrip("'>")


def block_lists(graph: torch.fx.Graph) -> dict[str, dict[int, str]]:
    """prefix -> {index: class} for every numbered module family with 2+ members of one class."""
    families: dict[str, dict[int, str]] = {}
    for n in graph.nodes:
        for path, cls in _stack(n):
            m = _NUMBERED.match(path)
            if m:
                families.setdefault(m.group(1), {})[int(m.group(2))] = _class_name(cls)
    return {p: f for p, f in families.items() if len(f) >= 2 and len(set(f.values())) == 1}


def find_blocks(ep, prefix: str | None = None) -> list[Block]:
    """The blocks of the graph's main block list (the family with the most members, or `prefix`), in order."""
    graph = ep.graph
    user_inputs = set(ep.graph_signature.user_inputs)  # weights are placeholders too, but not a stream
    lists = block_lists(graph)
    if not lists:
        return []
    if prefix is None:
        # The main stack: most members; ties go to the family whose nodes span more of the graph.
        prefix = max(lists, key=lambda p: len(lists[p]))
    if prefix not in lists:
        raise KeyError(f"no block list '{prefix}'; found: {', '.join(sorted(lists))}")
    order = {n: i for i, n in enumerate(graph.nodes)}
    members: dict[int, list[torch.fx.Node]] = {}
    for n in graph.nodes:
        for path, _ in _stack(n):
            m = _NUMBERED.match(path)
            if m and m.group(1) == prefix:
                members.setdefault(int(m.group(2)), []).append(n)
                break
    indices = sorted(members)
    starts = {k: order[members[k][0]] for k in indices}
    blocks = []
    for j, k in enumerate(indices):
        end = starts[indices[j + 1]] if j + 1 < len(indices) else len(order)
        nodes = [n for n in members[k] if order[n] < end]  # later re-uses of the block's modules are not it
        inside = set(nodes)
        entering = [a for n in nodes for a in n.all_input_nodes
                    if a not in inside and (a.op == "call_function" or a.name in user_inputs)]
        leaving = [n for n in nodes if any(u not in inside for u in n.users)]
        out = max(leaving, key=order.get) if leaving else None
        skip = _residual_operands(out, inside) if out is not None and out.target is torch.ops.aten.add.Tensor \
            else []
        prev = set(blocks[-1].nodes) if blocks else set()
        # The stream: from the previous block if it feeds this one, else what the skip path starts from, else the
        # latest value computed before the block.
        from_prev = [a for a in entering if a in prev]
        on_skip = [a for a in entering if any(a is x for x in skip)]
        inp = (from_prev or on_skip or [max(entering, key=order.get)] if entering else [None])[-1]
        residual = bool(inp is not None and any(a is inp for a in skip))
        blocks.append(Block(f"{prefix}.{k}", k, lists[prefix][k], nodes, inp, out, residual))
    return blocks


_SKIP_PATH = (torch.ops.aten.add.Tensor, torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default,
              torch.ops.aten.clone.default, torch.ops.aten.alias.default)


def _residual_operands(add: torch.fx.Node, inside: set[torch.fx.Node]) -> list[torch.fx.Node]:
    """The operands of a residual add, followed back through earlier residual adds and dtype casts of the same
    block (x + attn(x) + mlp(...), Llama's fp32 residual): the skip path ends at the block input."""
    out, frontier = [], [add]
    while frontier:
        n = frontier.pop()
        for a in n.all_input_nodes:
            out.append(a)
            if a in inside and a.op == "call_function" and a.target in _SKIP_PATH:
                frontier.append(a)
    return out


class Record(torch.fx.Interpreter):
    """Runs the graph, keeping the values of `watch` nodes."""

    def __init__(self, gm, watch: set[str]):
        super().__init__(gm)
        self.extra_traceback = False
        self.watch, self.values = watch, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.watch:
            self.values[n.name] = out
        return out


def skip_blocks(ep, paths: set[str]):
    """The graph with the blocks at `paths` cut out of the residual stream: later nodes read the block's input
    instead of its output. Whatever else reads the block (a KV-cache output) is kept, so method signatures and the
    runtime are unchanged."""
    ed = GraphEditor(ep)
    names = {n.name: n for n in ed.graph.nodes}
    replaced: dict[str, torch.fx.Node] = {}
    for b in find_blocks(ep):
        if b.path not in paths:
            continue
        inside = {n.name for n in b.nodes}
        out = names[b.output.name]
        # consecutive skipped blocks: this block's input is the previous one's output, itself replaced by its input
        inp = replaced.get(b.input.name, names[b.input.name])
        out.replace_all_uses_with(inp, delete_user_cb=lambda user: user.name not in inside)
        replaced[out.name] = inp
    keep_only_output_slice(ed.graph)
    ed.remove_unused_inputs()
    return ed.build()
