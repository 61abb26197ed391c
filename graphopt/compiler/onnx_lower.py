"""Lowering to ONNX with torch.onnx.export(dynamo=True), plus the translation registry for graphopt's custom ops."""
from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch.export.graph_signature import InputKind

from ..errors import GraphoptError

# Opset 23: the exporter then emits ONNX Attention, RMSNormalization and RotaryEmbedding nodes, which ONNX Runtime
# (>= 1.23) runs as single kernels: a decode step of the zoo LM is 273 nodes instead of 680 (with the rewrites in
# attention.py and fuse_linears.py) and runs ~1.4x faster.
# --opset 21 serves older runtimes; it is the lowest that the quantization passes' onnx_ops=standard (blocked
# DequantizeLinear) takes.
DEFAULT_OPSET = 23
# Above this many bytes of weights, tensors go to a side file `<method>.onnx.data` (protobuf caps files at 2 GB).
EXTERNAL_DATA_BYTES = 256 * 1024 * 1024

_TRANSLATIONS: dict[Callable, Callable] = {}
# The program's parameters, buffers and constants by placeholder name, while export_onnx runs: a translation may
# choose its lowering by the values of constant inputs (see `constant_input`).
_CONSTANTS: dict[str, torch.Tensor] = {}


_REWRITES: list[Callable] = []


def register_onnx_rewrite(fn: Callable) -> Callable:
    """Decorator: fn(model: onnx_ir.Model) rewrites the exported model in place before it is saved."""
    _REWRITES.append(fn)
    return fn


def constant_input(value) -> torch.Tensor | None:
    """The tensor behind a translation's input when that input is one of the program's constants, else None."""
    return _CONSTANTS.get(getattr(value, "name", None))


def _root_cause(error: BaseException) -> str:
    """First line of the innermost exception with a message: the exporter wraps a translation's own error (e.g.
    a group size MatMulNBits cannot take) in generic "Failed to convert ..." text with terminal colour codes."""
    found, seen = None, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
        if text:
            found = text.splitlines()[0]
        error = error.__cause__ or error.__context__
    return found or "unknown error"


def _program_constants(ep: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    found = {}
    for spec in ep.graph_signature.input_specs:
        tensor = ep.state_dict.get(spec.target, ep.constants.get(spec.target)) if spec.target else None
        if isinstance(tensor, torch.Tensor):
            # the exporter re-traces the program, which names placeholders after torch.export's convention
            prefix = {InputKind.PARAMETER: "p_", InputKind.BUFFER: "b_"}.get(spec.kind, "c_")
            for name in (spec.arg.name, prefix + spec.target.replace(".", "_")):
                found[name] = tensor.detach()
    return found


def rewrite_onnx_file(path: Path, rewrite: Callable) -> int:
    """Apply rewrite(model: onnx.ModelProto) -> count to an ONNX file in place (external weights stay where they are);
    the file is written only when something changed. Returns the count."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    done = rewrite(model)
    if done:
        onnx.save(model, str(path))
    return done


def register_onnx_translation(op: Callable):
    """Decorator: `@register_onnx_translation(torch.ops.graphopt.dq_linear.default)` on an onnxscript function."""
    def deco(fn):
        _TRANSLATIONS[op] = fn
        return fn
    return deco


def translations() -> dict[Callable, Callable]:
    from .. import kernels  # noqa: F401  (importing kernels registers their ops' translations)
    return dict(_TRANSLATIONS)


def export_onnx(ep: torch.export.ExportedProgram, path: Path, input_names: list[str], output_names: list[str],
                opset: int = DEFAULT_OPSET, verbose: bool = False) -> Path:
    """Write `path` (and `path.data` when large); returns the path."""
    table = translations()
    missing = sorted({str(n.target) for n in ep.graph.nodes if n.op == "call_function"
                      and getattr(n.target, "namespace", None) == "graphopt" and n.target not in table})
    if missing:
        raise GraphoptError(f"no ONNX translation for {', '.join(missing)}: use --backend torch, or register one "
                            f"with graphopt.compiler.onnx_lower.register_onnx_translation")
    sink = io.StringIO()
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(sink)
    _CONSTANTS.update(_program_constants(ep))
    with quiet, warnings.catch_warnings(), _quiet_logs(verbose):
        warnings.simplefilter("ignore")
        try:
            onnx_program = torch.onnx.export(
                ep, (), dynamo=True, opset_version=opset, input_names=input_names, output_names=output_names,
                custom_translation_table=table or None, verbose=False, optimize=True,
            )
        except Exception as e:
            raise GraphoptError(f"ONNX export failed: {_root_cause(e)} (use --backend torch to skip ONNX; "
                                f"--verbose shows the exporter's log)") from e
        finally:
            _CONSTANTS.clear()
    for rewrite in _REWRITES:
        rewrite(onnx_program.model)
    weight_bytes = sum(t.numel() * t.element_size() for t in list(ep.state_dict.values()) +
                       [c for c in ep.constants.values() if isinstance(c, torch.Tensor)])
    onnx_program.save(str(path), external_data=weight_bytes > EXTERNAL_DATA_BYTES)
    return path


@contextlib.contextmanager
def _quiet_logs(verbose: bool):
    if verbose:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, old):
            lg.setLevel(lv)
