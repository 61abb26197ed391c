"""The Python API: graphopt.compile(...) -> CompiledModel, and graphopt.load(...). The CLI is a thin layer on this."""
from __future__ import annotations

import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import torch

from .compiler import bundle, capture as cap, guard
from .compiler.attention import native_gqa
from .compiler.fuse_linears import fuse_parallel_linears
from .compiler.onnx_attention import attention_3d
from .compiler.onnx_fusions import fuse_skip_rms_norm
from .compiler.onnx_lower import DEFAULT_OPSET, export_onnx, rewrite_onnx_file
from .compiler.pipeline import PassContext, parse_pipeline, run_pipeline, validate_needs, validate_tasks
from .compiler.program import DTYPES, Program
from .errors import GraphoptError
from .passes import DEFAULT_PIPELINE
from .progress import Progress
from .runtime import BACKENDS, load

ORT_TOLERANCE = 1e-4  # ORT vs torch for the same fp32 graph: only kernel-order rounding differs


def load_calibration(path) -> list[tuple[torch.Tensor, ...]]:
    """A torch.save'd list of input tuples, read with weights_only=True (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise GraphoptError(f"--calib '{path}' not found: give a torch.save'd list of input tuples")
    try:
        data = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise GraphoptError(f"--calib '{path}' cannot be read as a weights-only torch.save file "
                            f"({type(e).__name__}); save a list of tuples of tensors with torch.save")
    return normalize_calibration(data, f"--calib '{path}'")


def normalize_calibration(data: Any, where: str = "calibration") -> list[tuple[torch.Tensor, ...]]:
    if not isinstance(data, (list, tuple)) or not data:
        raise GraphoptError(f"{where}: expected a non-empty list of input tuples, got {type(data).__name__}")
    out = []
    for i, item in enumerate(data):
        if isinstance(item, torch.Tensor):
            item = (item,)
        if not isinstance(item, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in item):
            raise GraphoptError(f"{where}: item {i} is {type(item).__name__}; each item must be a tuple of "
                                f"tensors (the model's positional inputs)")
        out.append(tuple(item))
    return out


def check_calibration(program: Program, calibration, where: str) -> None:
    if program.plan.get("kind") == "causal-lm":
        vocab, max_len = program.plan["vocab_size"], program.plan["max_length"]
        for i, item in enumerate(calibration):
            ids = item[0]
            if len(item) != 1 or ids.dtype != torch.int64 or ids.dim() != 2:
                raise GraphoptError(f"{where}: item {i} must be a 1-tuple (input_ids int64 [batch, length],) for "
                                    f"a causal LM")
            if ids.shape[1] > max_len or ids.min() < 0 or ids.max() >= vocab:
                raise GraphoptError(f"{where}: item {i} has ids outside 0..{vocab - 1} or is longer than "
                                    f"{max_len} tokens")
        return
    entry = program.plan.get("entry")
    specs = program.inputs.get(entry, [])
    for i, item in enumerate(calibration):
        if len(item) != len(specs):
            raise GraphoptError(f"{where}: item {i} has {len(item)} tensors, the model takes {len(specs)} "
                                f"({', '.join(s.name for s in specs)})")
        for t, s in zip(item, specs):
            if t.dtype != DTYPES[s.dtype] or t.dim() != len(s.shape):
                raise GraphoptError(f"{where}: item {i} input '{s.name}' is {str(t.dtype)[6:]} "
                                    f"{list(t.shape)}, expected {s.dtype} {s.shape}")
            for d, want in zip(t.shape, s.shape):
                if isinstance(want, int) and d != want:
                    raise GraphoptError(f"{where}: item {i} input '{s.name}' has shape {list(t.shape)}, "
                                        f"expected {s.shape}")
                if isinstance(want, str) and want in program.dims:
                    lo, hi = program.dims[want]
                    if not lo <= d <= hi:
                        raise GraphoptError(f"{where}: item {i} input '{s.name}' dim {want}={d} is outside "
                                            f"{lo}..{hi}")


class CompiledModel:
    """The result of graphopt.compile: callable like an Engine; .save(path) writes the bundle."""

    def __init__(self, program: Program, reports: list[dict], staging: Path, manifest: dict, backend: str,
                 timings: dict[str, float]):
        self.program = program
        self.reports = reports
        self.manifest = manifest
        self.backend = backend
        self.timings = timings
        self._staging = staging
        self._engine = None
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(staging), True)

    @property
    def engine(self):
        if self._engine is None:
            self._engine = load(self._staging, backend=self.backend)
        return self._engine

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def method(self, name: str):
        return self.engine.method(name)

    def generate(self, *args, **kwargs):
        return self.engine.generate(*args, **kwargs)

    def save(self, path, force: bool = False) -> Path:
        return bundle.publish(self._staging, Path(path), force)

    def summary_rows(self) -> list[list[str]]:
        rows = []
        for r in self.reports:
            metric = r.get("error_metric", "-")
            metric = f"{metric:.2e}" if isinstance(metric, float) else str(metric)
            total = r.get("error_vs_original")  # a lossy pass after another: the accumulated error too
            total = "" if total is None else f" (total {total:.2e})" if isinstance(total, float) else f" ({total})"
            rows.append([r["pass"], r["status"], f"{r['seconds']:.2f}",
                         f"{r['nodes_before']} -> {r['nodes_after']}",
                         f"{r['param_bytes_before'] / 1e6:.2f} -> {r['param_bytes_after'] / 1e6:.2f}",
                         f"{metric} / {r['tolerance']:g}{total}", r.get("headline", "")])
        return rows


def compile(model: Any, passes: str | None = None, *, example_inputs: Any = None, inputs: list[str] | None = None,
            dynamic: list[str] | None = None, calibration: Any = None, task: str = "auto",
            backend: str = "onnxruntime", on_error: str = "stop", unsafe_load: bool = False, seed: int = 0,
            opset: int = DEFAULT_OPSET, progress: bool | Progress = False, verbose: bool = False,
            dtype: str = "float32") -> CompiledModel:
    """Capture `model` (nn.Module, ExportedProgram or a source string), run the pass pipeline, lower it.

    passes: a pipeline text such as "remove-noops,dce"; None runs the default exact clean-up passes.
    calibration: a list of input tuples (or a path to a torch.save'd one).
    backend: "onnxruntime" writes .pt2 + .onnx and checks ORT against torch; "torch" writes .pt2 only;
    "tensorrt" writes .pt2 + .engine (needs the graphopt[tensorrt] extra and an NVIDIA GPU; unverified).
    dtype: the float dtype the program computes in: "float32", or "bfloat16" / "float16" for the torch backend
    (GPU inference with the 16-bit Triton kernels); only passes marked half_precision run on those.
    """
    prog_ui = progress if isinstance(progress, Progress) else Progress(enabled=bool(progress))
    if backend not in BACKENDS:
        raise GraphoptError(f"--backend '{backend}': choose one of {', '.join(BACKENDS)}")
    if backend == "tensorrt":
        from .compiler.tensorrt_lower import require_tensorrt
        require_tensorrt()  # before any expensive work
    t_start = time.perf_counter()
    # Cheap checks first: nothing expensive runs before the pipeline and its requirements are known to be valid.
    steps = parse_pipeline(DEFAULT_PIPELINE if passes is None else passes)
    _check_dtype(dtype, backend, steps)
    calibration_where = "calibration"
    if isinstance(calibration, (str, Path)):
        calibration_where = f"calibration file '{calibration}'"
        calibration = load_calibration(calibration)
    elif calibration is not None:
        calibration = normalize_calibration(calibration)
    is_zoo = isinstance(model, str) and model.startswith("zoo:")
    validate_needs(steps, has_calibration=calibration is not None or is_zoo)
    for text in inputs or []:
        cap.parse_input(text)
    cap.parse_dynamic_all(dynamic or [])
    timings: dict[str, float] = {}

    with prog_ui.stage("capture"):
        t0 = time.perf_counter()
        loaded = cap.load_source(model, unsafe_load, dtype)
        if calibration is None and loaded.calibration is not None:
            calibration = loaded.calibration
        validate_tasks(steps, cap.resolve_task(task, loaded))
        program = cap.capture(model, task=task, inputs=inputs, dynamic=dynamic, example_inputs=example_inputs,
                              unsafe_load=unsafe_load, seed=seed, loaded=loaded, dtype=dtype,
                              extra_methods=frozenset().union(*(s.cls.methods_needed(s.config) for s in steps)))
        timings["capture_s"] = time.perf_counter() - t0
    if calibration is not None and dtype != "float32":  # float calibration inputs follow the program's dtype
        calibration = [tuple(t.to(DTYPES[dtype]) if t.is_floating_point() else t for t in item)
                       for item in calibration]
    if calibration is not None:
        check_calibration(program, calibration, calibration_where)

    ctx = PassContext(calibration=calibration, seed=seed, progress=prog_ui)
    t0 = time.perf_counter()
    program, reports, guard_s = run_pipeline(program, steps, ctx, on_error)
    timings["guard_s"] = guard_s
    timings["passes_s"] = time.perf_counter() - t0 - guard_s

    staging = Path(tempfile.mkdtemp(prefix="graphopt-"))
    try:
        files, ort_check = _lower(program, staging, backend, opset, calibration, prog_ui, timings, verbose)
        extra = {"backend": backend, "onnx_opset": opset if backend == "onnxruntime" else None,
                 "ort_check": ort_check, "dtype": dtype}
        timings["total_s"] = time.perf_counter() - t_start
        manifest = bundle.build_manifest(program, reports, files, extra)
        manifest["timings"] = {k: round(v, 4) for k, v in timings.items()}
        bundle.write_manifest(staging, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return CompiledModel(program, reports, staging, manifest, backend, timings)


def _check_dtype(dtype: str, backend: str, steps) -> None:
    if dtype not in cap.PROGRAM_DTYPES:
        raise GraphoptError(f"--dtype '{dtype}': choose one of {', '.join(cap.PROGRAM_DTYPES)}")
    if dtype == "float32":
        return
    if backend != "torch":
        raise GraphoptError(f"--dtype {dtype} needs --backend torch: the {backend} lowering and its checks run "
                            f"float32 programs (half precision is for the torch backend's GPU kernels)")
    float32_only = [s.cls.name for s in steps if not s.cls.half_precision]
    if float32_only:
        raise GraphoptError(f"--dtype {dtype}: pass{'es' if len(float32_only) > 1 else ''} "
                            f"{', '.join(float32_only)} run{'' if len(float32_only) > 1 else 's'} on float32 "
                            f"programs only; drop {'them' if len(float32_only) > 1 else 'it'} or use --dtype float32")


def _lower(program: Program, staging: Path, backend: str, opset: int, calibration, prog_ui: Progress,
           timings: dict, verbose: bool):
    files: dict[str, dict[str, str]] = {}
    onnx_opts = program.plan.get("onnx", {})
    ort_tolerance = onnx_opts.get("check_tolerance", ORT_TOLERANCE)
    if backend == "onnxruntime":
        from .kernels import dq_onnx
        # Always set: a program whose plan names no level (e.g. a quantized .pt2 as the source) must not inherit
        # the previous compile's level in this process. 0 is exact, which the default check tolerance expects.
        dq_onnx.settings["accuracy_level"] = onnx_opts.get("matmulnbits_accuracy_level", 0)
        dq_onnx.settings["standard_ops"] = bool(onnx_opts.get("standard_ops"))
        dq_onnx.settings["opset"] = opset
        if dq_onnx.settings["standard_ops"] and opset < dq_onnx.STANDARD_MIN_OPSET:
            raise GraphoptError(f"--opset {opset}: onnx_ops=standard writes blocked DequantizeLinear, which needs "
                                f"opset {dq_onnx.STANDARD_MIN_OPSET} or higher: raise --opset or use onnx_ops=contrib")
    t0 = time.perf_counter()
    if backend == "tensorrt":
        from .compiler import tensorrt_lower
        tensorrt_lower.check_plugins(program.methods)
    extra_file = {"onnxruntime": " + .onnx", "tensorrt": " + .engine"}.get(backend, "")
    with prog_ui.stage("lowering", f"(.pt2{extra_file})"):
        if backend != "tensorrt":  # exact; TensorRT's converter is untested with grouped SDPA
            for name, ep in list(program.methods.items()):
                program.methods[name] = fuse_parallel_linears(native_gqa(ep)[0])[0]
        for name, ep in program.methods.items():
            files[name] = {"pt2": f"{name}.pt2"}
            torch.export.save(ep, str(staging / f"{name}.pt2"))
            if backend == "onnxruntime":
                in_names = [s.name for s in program.inputs[name]]
                out_names = [s.name for s in program.output_specs(name)]
                export_onnx(ep, staging / f"{name}.onnx", in_names, out_names, opset, verbose)
                rewrite_onnx_file(staging / f"{name}.onnx", attention_3d)
                routing = program.plan.get("routing")
                if routing and routing.get("onnx") == "if":
                    from .compiler.onnx_if import route_blocks
                    done = route_blocks(staging / f"{name}.onnx", routing["blocks"],
                                        program.plan.get("kv_heads", []), program.plan.get("head_dim", []))
                    routing.setdefault("if_blocks", {})[name] = done
                if not onnx_opts.get("standard_ops"):  # a com.microsoft op: standard files keep Add + norm
                    rewrite_onnx_file(staging / f"{name}.onnx", fuse_skip_rms_norm)
                files[name]["onnx"] = f"{name}.onnx"
                if (staging / f"{name}.onnx.data").exists():
                    files[name]["onnx_data"] = f"{name}.onnx.data"
            elif backend == "tensorrt":
                tensorrt_lower.lower_method(ep, program.inputs[name], program.dims, program.example_inputs[name],
                                            staging / f"{name}.engine")
                files[name]["engine"] = f"{name}.engine"
    timings["lowering_s"] = time.perf_counter() - t0
    if backend != "onnxruntime":
        return files, None
    t0 = time.perf_counter()
    with prog_ui.stage("ORT check"):
        from .runtime.engine import _ort_runner, ort_session_config
        inputs = guard.guard_inputs(program, calibration, 4)
        worst, nonfinite = {}, set()
        for name, xs in inputs.items():
            run = _ort_runner(staging / files[name]["onnx"], ["CPUExecutionProvider"],
                              config=ort_session_config(program.plan))
            scores = []
            for x in xs:
                reference = program.run(name, *x)
                if any(t.is_floating_point() and not torch.isfinite(t).all() for t in reference
                       if isinstance(t, torch.Tensor)):
                    nonfinite.add(name)
                scores.append(guard.compare(reference, run(list(x)), "max_rel"))
            worst[name] = max(scores)
        bad = {m: v for m, v in worst.items() if not v <= ort_tolerance}
        if bad:
            m, v = next(iter(bad.items()))
            if m in nonfinite:  # nothing to compare: the model itself computes NaN/inf (e.g. a NaN weight)
                raise GraphoptError(f"the program's method '{m}' outputs NaN/inf on the check inputs, so ONNX "
                                    f"Runtime cannot be checked against it: check the model's weights and inputs")
            raise GraphoptError(f"ONNX Runtime output of method '{m}' differs from the torch program: max_rel "
                                f"{v:.3g} > {ort_tolerance:g}; use --backend torch, or report the model")
    timings["ort_check_s"] = time.perf_counter() - t0
    return files, {"metric": "max_rel", "tolerance": ort_tolerance,
                   "max_rel": {m: float(v) for m, v in worst.items()}}
