"""Program: the unit every pass rewrites: named methods (ExportedPrograms) plus a JSON-able runtime plan."""
from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class TensorSpec:
    """Name, dtype and shape of one method input/output; a str dim is symbolic (its range is in Program.dims)."""
    name: str
    dtype: str
    shape: list[int | str]

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], d["dtype"], list(d["shape"]))


@dataclass
class Program:
    """Named methods and how the runtime drives them.

    Each method is called with a flat tuple of tensors (its `inputs` specs, in order) and returns a flat tuple of
    tensors. `plan` is read by the runtime: {"kind": "single", "entry": "forward"} for one-method programs; later kinds
    (causal-lm, diffusion) name the methods they drive.
    """
    methods: dict[str, torch.export.ExportedProgram]
    plan: dict[str, Any]
    inputs: dict[str, list[TensorSpec]]
    example_inputs: dict[str, tuple[torch.Tensor, ...]]
    dims: dict[str, list[int]] = field(default_factory=dict)  # symbolic dim name -> [min, max]
    source: dict[str, Any] = field(default_factory=dict)
    output_names: dict[str, list[str]] = field(default_factory=dict)

    def run(self, method: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ep = self.methods[method]
        args, kwargs = pytree.tree_unflatten(list(inputs), ep.call_spec.in_spec)
        with torch.no_grad():
            out = _callable(ep)(*args, **kwargs)
        return tuple(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))

    def calibration_inputs(self, calibration, limit: int) -> tuple[str, list[tuple]]:
        """(method, inputs) that calibration items feed: a causal LM's prefill (items are (input_ids,)), else the
        entry method (items are its positional inputs)."""
        if self.plan.get("kind") == "causal-lm":
            from .causal_lm import prefill_inputs
            return self.plan["prefill"], [prefill_inputs(c[0]) for c in calibration[:limit]]
        return self.plan["entry"], [tuple(c) for c in calibration[:limit]]

    def copy(self) -> "Program":
        # ExportedPrograms are never edited in place (graph_edit builds new ones), so sharing them is safe and
        # keeping the old Program is all a rollback needs.
        return Program(
            methods=dict(self.methods),
            plan=copy.deepcopy(self.plan), inputs=copy.deepcopy(self.inputs),
            example_inputs=dict(self.example_inputs), dims=copy.deepcopy(self.dims),
            source=copy.deepcopy(self.source), output_names=copy.deepcopy(self.output_names),
        )

    def output_specs(self, method: str) -> list[TensorSpec]:
        ep = self.methods[method]
        names = self.output_names.get(method)
        sym_names = self._symbol_names(method)
        out_node = next(n for n in ep.graph.nodes if n.op == "output")
        user_outs = [a for a in pytree.tree_leaves(out_node.args[0])][-len(ep.graph_signature.user_outputs):] \
            if ep.graph_signature.user_outputs else []
        specs = []
        for i, node in enumerate(user_outs):
            val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
            if not isinstance(val, torch.Tensor):
                continue
            name = names[i] if names and i < len(names) else f"output_{i}"
            if name in {s.name for s in self.inputs.get(method, [])}:
                name = f"{name}_out"  # ONNX names inputs and outputs in one namespace
            specs.append(TensorSpec(name, DTYPE_NAMES.get(val.dtype, str(val.dtype)),
                                    [_dim_name(d, sym_names) for d in val.shape]))
        return specs

    def _symbol_names(self, method: str) -> dict[str, str]:
        """Map the exporter's symbols (s41) to the user's dim names (S) through the input placeholders."""
        ep = self.methods[method]
        placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
        mapping = {}
        for spec, user_name in zip(self.inputs[method], ep.graph_signature.user_inputs):
            val = placeholders[user_name].meta.get("val")
            if not isinstance(val, torch.Tensor):
                continue
            for d, declared in zip(val.shape, spec.shape):
                if isinstance(d, torch.SymInt) and isinstance(declared, str):
                    mapping[str(d)] = declared
        return mapping

    def parameter_bytes(self) -> int:
        """Bytes of weights and constants over all methods, counting shared storage once."""
        seen, total = set(), 0
        for ep in self.methods.values():
            for t in list(ep.state_dict.values()) + list(ep.constants.values()):
                if not isinstance(t, torch.Tensor):
                    continue
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
                if key not in seen:
                    seen.add(key)
                    total += t.numel() * t.element_size()
        return total

    def node_count(self) -> int:
        return sum(sum(1 for n in ep.graph.nodes if n.op == "call_function") for ep in self.methods.values())


def _dim_name(d, sym_names: dict[str, str]) -> int | str:
    if isinstance(d, int):
        return d
    import sympy
    expr = d.node.expr
    expr = expr.subs({s: sympy.Symbol(sym_names[str(s)]) for s in expr.free_symbols if str(s) in sym_names})
    return str(expr)


# ep.module() builds a new GraphModule on every call. Passes never edit an ExportedProgram in place (they build a
# new one, see graph_edit.rebuild), so caching per object is safe; a weak map is not carried along by deepcopy.
_MODULES: "weakref.WeakKeyDictionary[torch.export.ExportedProgram, torch.nn.Module]" = weakref.WeakKeyDictionary()


def _callable(ep: torch.export.ExportedProgram):
    mod = _MODULES.get(ep)
    if mod is None:
        mod = _MODULES[ep] = ep.module()
    return mod
