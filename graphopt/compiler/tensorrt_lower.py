"""`--backend tensorrt`: each method to a serialized TensorRT engine through torch-tensorrt's dynamo path.

graphopt's custom ops become TensorRT plugins whose kernels are compiled ahead of time (graphopt.kernels.trt_plugin),
so the engine runs without Python. Needs the `graphopt[tensorrt]` extra and an NVIDIA GPU.

Not verified on any machine of this project (TensorRT is not installable here nor on the GPU machine); the checks that
run before any TensorRT call (missing install, ops without a plugin) are tested.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import GraphoptError

EXTRA = "pip install 'graphopt[tensorrt]'"
PLUGINS = {"graphopt::dq_linear": "graphopt.kernels.trt_plugin"}  # custom op -> module with register()


def require_tensorrt():
    """(tensorrt, torch_tensorrt), or a one-line error naming the extra to install."""
    try:
        import tensorrt
        import torch_tensorrt
    except ImportError as e:
        raise GraphoptError(f"--backend tensorrt needs TensorRT and torch-tensorrt ({e.name} is not installed): "
                            f"{EXTRA} on a machine with an NVIDIA GPU")
    return tensorrt, torch_tensorrt


def custom_ops(ep) -> set[str]:
    """Ops of the graph outside aten/prims (by 'namespace::name'), which TensorRT needs plugins for."""
    ops = set()
    for n in ep.graph.nodes:
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
            ns = n.target.namespace
            if ns not in ("aten", "prims"):
                ops.add(f"{ns}::{n.target._opname}")
    return ops


def check_plugins(methods: dict) -> None:
    for name, ep in methods.items():
        missing = sorted(custom_ops(ep) - set(PLUGINS))
        if missing:
            raise GraphoptError(f"--backend tensorrt: method '{name}' uses {', '.join(missing)}, which has no "
                                f"TensorRT plugin; use --backend onnxruntime or torch")


def with_explicit_bias(ep):
    """dq_linear nodes without a bias get a zero bias constant: the plugin always takes five tensor inputs."""
    from .graph_edit import GraphEditor
    ed = GraphEditor(ep)
    changed = False
    for n in list(ed.graph.nodes):
        if n.op == "call_function" and n.target is torch.ops.graphopt.dq_linear.default and n.args[4] is None:
            x_val = n.args[0].meta["val"]
            with ed.graph.inserting_before(n):
                bias = ed.add_constant(torch.zeros(n.args[1].meta["val"].shape[0], dtype=x_val.dtype), "dq_bias")
            n.args = (*n.args[:4], bias, *n.args[5:])
            changed = True
    return ed.build() if changed else ep


def tensorrt_inputs(specs, dims: dict, example_inputs: tuple) -> list:
    """torch_tensorrt.Input per user input: min/opt/max shapes from the manifest's dim ranges (opt = the example)."""
    import torch_tensorrt
    out = []
    for spec, ex in zip(specs, example_inputs):
        lo = [d if isinstance(d, int) else dims[d][0] for d in spec.shape]
        hi = [d if isinstance(d, int) else dims[d][1] for d in spec.shape]
        out.append(torch_tensorrt.Input(min_shape=lo, opt_shape=list(ex.shape), max_shape=hi, dtype=ex.dtype))
    return out


def lower_method(ep, specs, dims: dict, example_inputs: tuple, path: Path) -> None:
    """Build and serialize one method's engine (dynamic over the manifest's dim ranges) to `path`."""
    import importlib

    _, torch_tensorrt = require_tensorrt()
    from torch_tensorrt.dynamo.conversion.plugins import generate_plugin_converter
    for op in custom_ops(ep):
        plugin_id = importlib.import_module(PLUGINS[op]).register()
        generate_plugin_converter(plugin_id, use_aot_if_available=True)
    ep = with_explicit_bias(ep)
    engine = torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine(
        ep, arg_inputs=tensorrt_inputs(specs, dims, example_inputs))
    path.write_bytes(bytes(engine))
