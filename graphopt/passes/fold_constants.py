from __future__ import annotations

import operator

import torch
from torch.fx.node import map_arg

from ..compiler.graph_edit import GraphEditor, is_mutating
from .base import Option, Pass, register

_SMALL_BYTES = 64 * 1024


def _foldable_target(node: torch.fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    if not isinstance(node.target, torch._ops.OpOverload) or is_mutating(node):
        return False
    tags = set(node.target.tags)
    if torch.Tag.nondeterministic_seeded in tags or torch.Tag.nondeterministic_bitwise in tags:
        return False
    name = node.target.__name__
    return not (name.startswith("_assert") or name.startswith("sym_") or "rand" in name)


def _nbytes(v) -> int:
    return v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 0


@register
class FoldConstants(Pass):
    """Evaluate subgraphs that read only weights/constants once, at compile time, and store their results."""
    name = "fold-constants"
    half_precision = True
    options = {
        "max_growth": Option(float, 1.0, "fold a result only if its bytes are at most this multiple of its "
                                         "constant inputs' bytes (or under 64 KiB), so broadcasts are not stored",
                             min=0.0, max=1e6),
    }

    @classmethod
    def headline(cls, details) -> str:
        return f"{details['folded_subgraphs']} subgraphs folded"

    def run(self, program, ctx):
        max_growth = self.config.get("max_growth", 1.0)
        folded = 0
        methods = {}
        for name, ep in program.methods.items():
            ed = GraphEditor(ep)
            values: dict[torch.fx.Node, object] = {}
            for node in ed.graph.nodes:
                if node.op == "placeholder":
                    v = ed.constant_value(node)
                    if v is not None:
                        values[node] = v
                    continue
                if not _foldable_target(node):
                    continue
                deps = node.all_input_nodes
                if not deps or not all(d in values for d in deps):
                    continue  # ops with no tensor inputs (arange, full) would only grow the file
                args = map_arg(node.args, lambda n: values[n])
                kwargs = map_arg(node.kwargs, lambda n: values[n])
                with torch.no_grad():
                    values[node] = node.target(*args, **kwargs)
            # Materialize the frontier: computed tensors that a non-constant node reads.
            for node, value in list(values.items()):
                if node.op == "placeholder" or not isinstance(value, torch.Tensor):
                    continue
                if all(u in values for u in node.users):
                    continue
                if any(is_mutating(u) for u in node.users):
                    continue  # an in-place user would write into the stored constant
                in_bytes = sum(_nbytes(values[d]) for d in node.all_input_nodes if isinstance(values[d], torch.Tensor))
                if _nbytes(value) > max(max_growth * in_bytes, _SMALL_BYTES):
                    continue
                const = ed.add_constant(value.detach().clone().contiguous(), "folded")
                node.replace_all_uses_with(const, delete_user_cb=lambda u: u not in values)
                folded += 1
            ed.graph.eliminate_dead_code()
            ed.remove_unused_inputs()
            methods[name] = ed.build()
        program.methods = methods
        return program, {"folded_subgraphs": folded}
