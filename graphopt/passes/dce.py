from __future__ import annotations

from ..compiler.graph_edit import GraphEditor
from .base import Pass, register


@register
class DeadCodeElimination(Pass):
    """Remove nodes whose results are never used, and the weights only they read."""
    name = "dce"
    half_precision = True

    @classmethod
    def headline(cls, details) -> str:
        return f"{details['removed_nodes']} nodes, {details['removed_weights']} weights removed"

    def run(self, program, ctx):
        removed_nodes, removed_inputs = 0, []
        methods = {}
        for name, ep in program.methods.items():
            ed = GraphEditor(ep)
            before = len(ed.graph.nodes)
            ed.graph.eliminate_dead_code()  # keeps impure nodes (asserts, in-place ops)
            removed_inputs += ed.remove_unused_inputs()
            removed_nodes += before - len(ed.graph.nodes)
            methods[name] = ed.build()
        program.methods = methods
        return program, {"removed_nodes": removed_nodes, "removed_weights": len(removed_inputs)}
