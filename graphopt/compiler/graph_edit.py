"""Graph surgery on ExportedPrograms shared by all passes.

Invariant: an ExportedProgram is never edited in place. A pass opens a GraphEditor on a copy of its graph, edits,
and `build()`s a new ExportedProgram whose signature, state dict and constants match the edited graph (the
exporter's verifier checks that on construction).
"""
from __future__ import annotations

import copy
import itertools
import warnings

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import (ExportGraphSignature, InputKind, InputSpec, OutputKind, TensorArgument)
from torch.utils import _pytree as pytree

_CONST_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


class GraphEditor:
    def __init__(self, ep: ExportedProgram):
        self.ep = ep
        with warnings.catch_warnings():  # torch's own pytree deprecation noise on copying treespecs
            warnings.simplefilter("ignore", FutureWarning)
            self.gm = copy.deepcopy(ep.graph_module)
        self.graph: torch.fx.Graph = self.gm.graph
        self.input_specs: list[InputSpec] = copy.deepcopy(list(ep.graph_signature.input_specs))
        self.output_specs = copy.deepcopy(list(ep.graph_signature.output_specs))
        # Copying a graph renames nodes that shadow Python builtins (a user input called `input` becomes `input_1`):
        # keep the signature pointing at the copied placeholders, which are in input-spec order.
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        for spec, ph in zip(self.input_specs, placeholders):
            if isinstance(spec.arg, TensorArgument) and spec.arg.name != ph.name:
                spec.arg = TensorArgument(ph.name)
        self.state_dict = dict(ep.state_dict)
        self.constants = dict(ep.constants)
        self._counter = itertools.count()

    # ---- inspection -------------------------------------------------------------------------------------------
    def placeholders(self) -> dict[str, torch.fx.Node]:
        return {n.name: n for n in self.graph.nodes if n.op == "placeholder"}

    def spec_of(self, node: torch.fx.Node) -> InputSpec | None:
        for spec in self.input_specs:
            if isinstance(spec.arg, TensorArgument) and spec.arg.name == node.name:
                return spec
        return None

    def mutated_targets(self) -> set[str]:
        return {s.target for s in self.output_specs
                if s.kind in (OutputKind.BUFFER_MUTATION, OutputKind.PARAMETER_MUTATION) and s.target}

    def constant_value(self, node: torch.fx.Node) -> torch.Tensor | None:
        """The tensor behind a parameter/buffer/constant placeholder (None for user inputs and mutated buffers)."""
        if node.op != "placeholder":
            return None
        spec = self.spec_of(node)
        if spec is None or spec.kind not in _CONST_KINDS or spec.target in self.mutated_targets():
            return None
        if spec.target in self.state_dict:
            return self.state_dict[spec.target]
        return self.constants.get(spec.target)

    # ---- edits ------------------------------------------------------------------------------------------------
    def add_constant(self, value: torch.Tensor, hint: str = "folded") -> torch.fx.Node:
        """A new constant-tensor input (placed before the user inputs, as the signature requires)."""
        existing = {s.target for s in self.input_specs} | set(self.constants) | set(self.state_dict)
        while True:
            target = f"_graphopt_{hint}_{next(self._counter)}"
            if target not in existing:
                break
        first_user = next((i for i, s in enumerate(self.input_specs) if s.kind == InputKind.USER_INPUT),
                          len(self.input_specs))
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        if first_user < len(placeholders):
            ctx = self.graph.inserting_before(placeholders[first_user])
        elif placeholders:
            ctx = self.graph.inserting_after(placeholders[-1])
        else:
            ctx = self.graph.inserting_before(next(iter(self.graph.nodes)))
        with ctx:
            node = self.graph.placeholder(target.replace(".", "_"))
        node.meta["val"] = _fake_like(value, self.ep)
        self.input_specs.insert(first_user, InputSpec(InputKind.CONSTANT_TENSOR, TensorArgument(node.name), target))
        self.constants[target] = value.detach()
        return node

    def remove_unused_inputs(self) -> list[str]:
        """Drop parameter/buffer/constant inputs nothing reads; user inputs stay (they are the interface)."""
        removed = []
        mutated = self.mutated_targets()
        for node in list(self.graph.nodes):
            if node.op != "placeholder" or node.users:
                continue
            spec = self.spec_of(node)
            if spec is None or spec.kind not in _CONST_KINDS or spec.target in mutated:
                continue
            self.graph.erase_node(node)
            self.input_specs.remove(spec)
            still_used = any(s.target == spec.target for s in self.input_specs)
            if not still_used:
                self.state_dict.pop(spec.target, None)
                self.constants.pop(spec.target, None)
            removed.append(spec.target)
        return removed

    def build(self, range_constraints: dict | None = None) -> ExportedProgram:
        self.graph.lint()
        self.gm.recompile()
        out_node = next(n for n in self.graph.nodes if n.op == "output")
        for spec, arg in zip(self.output_specs, pytree.tree_leaves(out_node.args[0])):
            if isinstance(spec.arg, TensorArgument) and isinstance(arg, torch.fx.Node):
                spec.arg = TensorArgument(arg.name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module_call_graph = copy.deepcopy(self.ep.module_call_graph)
        new = ExportedProgram(
            root=self.gm, graph=self.graph,
            graph_signature=ExportGraphSignature(self.input_specs, self.output_specs),
            state_dict=self.state_dict,
            range_constraints=self.ep.range_constraints if range_constraints is None else range_constraints,
            module_call_graph=module_call_graph, example_inputs=self.ep.example_inputs,
            constants=self.constants, verifiers=list(self.ep.verifiers),
        )
        if getattr(self.ep, "_graphopt_no_guards", False):  # see drop_user_io: the construction recomputes them
            new._guards_code = []
            new._graphopt_no_guards = True
        return new


def keep_only_output_slice(graph: torch.fx.Graph) -> None:
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


def _fake_like(value: torch.Tensor, ep: ExportedProgram):
    """A fake tensor in the graph's fake mode (metadata for later passes and the ONNX exporter)."""
    for node in ep.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch._subclasses.fake_tensor.FakeTensor):
            return val.fake_mode.from_tensor(value, static_shapes=True)
    from torch._subclasses.fake_tensor import FakeTensorMode
    return FakeTensorMode().from_tensor(value, static_shapes=True)


def same_shape(a, b) -> bool:
    """Shapes known equal, symbolic dims compared by expression."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, int) and isinstance(y, int):
            if x != y:
                return False
        elif isinstance(x, torch.SymInt) and isinstance(y, torch.SymInt):
            if str(x.node.expr) != str(y.node.expr):
                return False
        else:
            return False
    return True


def is_mutating(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def drop_user_io(ep: ExportedProgram, inputs: set[int] = frozenset(), outputs: set[int] = frozenset()):
    """The graph without the given user outputs (by position) and then without the given user inputs, which must
    have become unused (e.g. the KV cache of layers a drafter skips)."""
    from .feature_cache import _set_call_spec
    ed = GraphEditor(ep)
    out = next(n for n in ed.graph.nodes if n.op == "output")
    user_specs = [s for s in ed.output_specs if s.kind == OutputKind.USER_OUTPUT]
    n_other = len(ed.output_specs) - len(user_specs)  # mutations come first in an export signature
    args = list(out.args[0])
    keep = [i for i in range(len(user_specs)) if i not in outputs]
    out.args = (tuple(args[:n_other] + [args[n_other + i] for i in keep]),)
    ed.output_specs = ed.output_specs[:n_other] + [user_specs[i] for i in keep]
    keep_only_output_slice(ed.graph)
    users = [s for s in ed.input_specs if s.kind == InputKind.USER_INPUT]
    placeholders = ed.placeholders()
    dropped = {users[i].arg.name for i in inputs}
    kept = [placeholders[s.arg.name] for s in users if s.arg.name not in dropped]
    for i in sorted(inputs):
        node = placeholders[users[i].arg.name]
        for user in list(node.users):  # a size read (the cache length) can come from any input with that dim
            if user.target is torch.ops.aten.sym_size.int:
                donor = _same_dim(node, user.args[1], kept)
                if donor is not None:
                    user.replace_input_with(node, donor[0])
                    user.args = (donor[0], donor[1])
        if node.users:
            raise ValueError(f"user input {users[i].arg.name} is still read")
        ed.graph.erase_node(node)
        ed.input_specs.remove(users[i])
    ed.remove_unused_inputs()
    new = ed.build()
    if new.example_inputs is not None:  # re-tracing (run_decompositions) calls the program with these
        args, kwargs = new.example_inputs
        new._example_inputs = (tuple(a for i, a in enumerate(args) if i not in inputs), kwargs)
    # Export's shape guards name inputs by position (L['args'][0][i]); with inputs gone they point at the wrong
    # ones. Engines check inputs against the manifest instead. (Later edits of this program keep them off.)
    new._guards_code = []
    new._graphopt_no_guards = True
    _set_call_spec(new, len(new.graph_signature.user_inputs), len(new.graph_signature.user_outputs))
    return new


def _same_dim(node, dim: int, candidates):
    """(placeholder, axis) among candidates whose size is the same symbol as node's axis `dim`."""
    size = node.meta["val"].shape[dim]
    if not isinstance(size, torch.SymInt):
        return None
    for c in candidates:
        for axis, other in enumerate(c.meta["val"].shape):
            if isinstance(other, torch.SymInt) and str(other.node.expr) == str(size.node.expr):
                return c, axis
    return None
