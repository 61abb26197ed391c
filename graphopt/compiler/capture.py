"""Capture: turn a model source into a Program (torch.export per method, plus the runtime plan)."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch.export import Dim

from ..errors import GraphoptError
from .program import DTYPES, Program, TensorSpec

TASKS = ("auto", "single", "causal-lm", "diffusion")
# The float dtype a program computes in (--dtype). Half precision is for the torch backend on GPUs, where the
# decoupleQ kernels take 16-bit activations; ONNX Runtime's CPU path stays float32.
PROGRAM_DTYPES = ("float32", "bfloat16", "float16")
SOURCE_HELP = "give a .pt2 archive, a Hugging Face model directory, a package.module:factory spec or zoo:NAME"


# ---- --input / --dynamic -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class InputSpec:
    name: str
    shape: list[int | str]
    dtype: str
    low: int | None = None
    high: int | None = None


_INPUT_RE = re.compile(r"^([A-Za-z_]\w*):([^:]+):(\w+)(?::(-?\d+)\.\.(-?\d+))?$")


def parse_input(text: str) -> InputSpec:
    """NAME:SHAPE:DTYPE[:LOW..HIGH], e.g. input_ids:1xS:int64:0..259 (symbolic dims need --dynamic)."""
    m = _INPUT_RE.match(text.strip())
    fix = "expected NAME:SHAPE:DTYPE, e.g. input_ids:1x16:int64 or input_ids:1xS:int64 with --dynamic S=1..512"
    if not m:
        raise GraphoptError(f"--input '{text}': {fix}")
    name, shape_text, dtype, low, high = m.groups()
    if dtype not in DTYPES:
        raise GraphoptError(f"--input '{text}': unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    shape: list[int | str] = []
    for d in shape_text.split("x") if shape_text != "scalar" else []:
        d = d.strip()
        if d.isdigit():
            shape.append(int(d))
        elif re.fullmatch(r"[A-Za-z_]\w*", d):
            shape.append(d)
        else:
            raise GraphoptError(f"--input '{text}': bad dimension '{d}'; {fix}")
    lo, hi = (int(low), int(high)) if low is not None else (None, None)
    if lo is not None and hi <= lo:
        raise GraphoptError(f"--input '{text}': value range {lo}..{hi} is empty; write LOW..HIGH with HIGH > LOW")
    return InputSpec(name, shape, dtype, lo, hi)


def parse_dynamic(text: str) -> tuple[str, int, int]:
    m = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*=\s*(\d+)\s*\.\.\s*(\d+)\s*", text)
    if not m:
        raise GraphoptError(f"--dynamic '{text}': expected NAME=MIN..MAX, e.g. S=1..512")
    name, lo, hi = m.group(1), int(m.group(2)), int(m.group(3))
    if lo < 1 or hi < lo:
        raise GraphoptError(f"--dynamic '{text}': need 1 <= MIN <= MAX")
    return name, lo, hi


def parse_dynamic_all(texts: list[str]) -> dict[str, tuple[int, int]]:
    dims: dict[str, tuple[int, int]] = {}
    for text in texts:
        name, lo, hi = parse_dynamic(text)
        if name in dims:
            raise GraphoptError(f"--dynamic {name} is given twice; give each dim once")
        dims[name] = (lo, hi)
    return dims


def check_dims(specs: list[InputSpec], dims: dict[str, tuple[int, int]]) -> None:
    used = {d for s in specs for d in s.shape if isinstance(d, str)}
    for d in sorted(used - set(dims)):
        raise GraphoptError(f"--input uses symbolic dim '{d}' but no range is given: add --dynamic {d}=MIN..MAX")
    for d in sorted(set(dims) - used):
        raise GraphoptError(f"--dynamic {d}: no --input uses dim '{d}'; write it in a shape, e.g. x:1x{d}:int64")


def example_size(lo: int, hi: int) -> int:
    # Sizes 0 and 1 are specialised by torch.export, so trace with a size of at least 2 where the range allows.
    return max(lo, min(hi, 16), 2) if hi >= 2 else lo


def make_examples(specs: list[InputSpec], dims: dict[str, tuple[int, int]], seed: int,
                  int_high: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in specs:
        shape = [d if isinstance(d, int) else example_size(*dims[d]) for d in s.shape]
        dt = DTYPES[s.dtype]
        if s.name == "attention_mask" and s.low is None:
            out.append(torch.ones(shape, dtype=dt))
        elif dt.is_floating_point:
            out.append(torch.randn(shape, generator=g).to(dt))
        elif dt == torch.bool:
            out.append(torch.randint(0, 2, shape, generator=g).bool())
        else:
            lo = 0 if s.low is None else s.low
            hi = int_high if s.high is None else s.high
            out.append(torch.randint(lo, hi, shape, generator=g, dtype=dt))
    return tuple(out)


# ---- wrappers: give every method a flat, named tensor signature ---------------------------------------------------
class _Method(torch.nn.Module):
    """Calls `model` with named inputs (as keywords if the model's forward has those names) and flattens outputs."""

    def __init__(self, model: torch.nn.Module, names: list[str], extra_kwargs: dict | None = None):
        super().__init__()
        self.model = model
        self._names = list(names)
        self._extra = dict(extra_kwargs or {})
        try:
            params = inspect.signature(model.forward).parameters
            has_var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
            self._by_name = has_var_kw or all(n in params for n in names)
        except (TypeError, ValueError):
            self._by_name = False
        sig = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
        inner = self._call

        def forward(*args, **kwargs):
            return inner(*args, **kwargs)
        forward.__signature__ = sig  # torch.export names the graph inputs after these
        self.forward = forward

    def _call(self, *args, **kwargs):
        bound = dict(zip(self._names, args))
        bound.update(kwargs)
        if self._by_name:
            out = self.model(**bound, **self._extra)
        else:
            out = self.model(*[bound[n] for n in self._names], **self._extra)
        return _flatten_outputs(out)


def _flatten_outputs(out) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        out = out.to_tuple()
    from torch.utils import _pytree as pytree
    return tuple(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


# ---- sources -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Loaded:
    """A model ready to export, or an already exported program."""
    kind: str
    description: str
    model: torch.nn.Module | None = None
    exported: torch.export.ExportedProgram | None = None
    example_inputs: Any = None            # tuple or dict from a factory / zoo
    input_specs: list[InputSpec] | None = None
    dims: dict[str, tuple[int, int]] | None = None  # ranges of the symbolic dims in input_specs
    int_high: int = 2
    extra_kwargs: dict | None = None
    output_names: list[str] | None = None
    sha256: str | None = None
    calibration: list | None = None
    plan_extra: dict | None = None                 # e.g. {"tokenizer": "byte"} for the zoo LM


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def hash_state(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def _is_factory_spec(text: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", text))


def load_source(source: Any, unsafe_load: bool = False, dtype: str = "float32") -> Loaded:
    """The model behind a source. dtype: the float dtype a Hugging Face directory is loaded in (other sources are
    converted by `capture`)."""
    if isinstance(source, torch.export.ExportedProgram):
        return Loaded("exported", "ExportedProgram", exported=source)
    if isinstance(source, torch.nn.Module):
        return Loaded("module", type(source).__name__, model=source)
    if not isinstance(source, (str, Path)):
        raise GraphoptError(f"model source of type {type(source).__name__} is not supported: {SOURCE_HELP}, "
                            f"or pass an nn.Module / ExportedProgram")
    text = str(source)
    if text.startswith("zoo:"):
        from .. import zoo
        return zoo.load_source(text[4:])
    path = Path(text)
    if not path.exists():
        if _is_factory_spec(text):
            return _load_factory(text)
        raise GraphoptError(f"model source '{text}' not found: {SOURCE_HELP}")
    if path.is_dir():
        return _load_hf_dir(path, unsafe_load, dtype)
    return _load_file(path, unsafe_load)


def _load_factory(spec: str) -> Loaded:
    module_name, fn_name = spec.split(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # like `python -m`, resolve modules from the working directory
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise GraphoptError(f"model source '{spec}': cannot import module '{module_name}' ({e}); "
                            f"check the name and that it is on PYTHONPATH")
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise GraphoptError(f"model source '{spec}': module '{module_name}' has no callable '{fn_name}'")
    result = fn()
    example = None
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module):
        result, example = result
    if not isinstance(result, torch.nn.Module):
        raise GraphoptError(f"model source '{spec}': {fn_name}() returned {type(result).__name__}, "
                            f"expected an nn.Module or (nn.Module, example_inputs)")
    return Loaded("factory", spec, model=result, example_inputs=example, sha256=hash_state(result))


def _load_hf_dir(path: Path, unsafe_load: bool, dtype: str = "float32") -> Loaded:
    config_file = path / "config.json"
    if not config_file.exists():
        raise GraphoptError(f"'{path}' is a directory without config.json: give a Hugging Face model directory "
                            f"(config.json + *.safetensors)")
    try:
        config_dict = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise GraphoptError(f"'{config_file}' is not valid JSON ({e}); re-save the model with save_pretrained")
    weights = sorted(path.glob("*.safetensors"))
    pickled = sorted(path.glob("pytorch_model*.bin"))
    if not weights and pickled and not unsafe_load:
        raise GraphoptError(f"'{path}' has only pickled weights ({pickled[0].name}); unpickling can run code, so "
                            f"graphopt refuses it: re-save with safetensors, or pass --unsafe-load if you trust it")
    if not weights and not pickled:
        raise GraphoptError(f"'{path}' has no *.safetensors weights: re-save the model with save_pretrained")
    import transformers
    archs = config_dict.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise GraphoptError(f"'{config_file}': architecture {archs or '(none)'} is not in transformers "
                            f"{transformers.__version__}; graphopt never runs remote code")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # graphopt shows its own stage progress
    from packaging.version import Version
    # float32 (or --dtype) whatever the checkpoint's dtype: transformers >= 5 would keep a half-precision checkpoint
    # in half ("auto"), which the CPU runtimes do not take.
    dtype_key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    try:
        model = cls.from_pretrained(path, local_files_only=True, trust_remote_code=False,
                                    use_safetensors=bool(weights), **{dtype_key: DTYPES[dtype]})
    except Exception as e:  # corrupt weights, shape mismatches
        raise GraphoptError(f"cannot load Hugging Face model from '{path}': {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}")
    finally:
        hf_logging.enable_progress_bar()
    model.eval()
    vocab = getattr(model.config, "vocab_size", None)
    return Loaded("hf-dir", str(path), model=model, int_high=vocab or 2,
                  input_specs=[InputSpec("input_ids", [1, 16], "int64")] if vocab else None,
                  extra_kwargs={"use_cache": False, "return_dict": False} if vocab else None,
                  output_names=["logits"] if vocab else None,
                  sha256=_hash_files(weights or pickled) if (weights or pickled) else None)


def _load_file(path: Path, unsafe_load: bool) -> Loaded:
    with open(path, "rb") as f:
        head = f.read(4)
    pickled = False
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            raise GraphoptError(f"'{path}' is a truncated or corrupt archive; re-create it with torch.export.save")
        pickled = any(n.endswith("data.pkl") for n in names) and not any(n.endswith("archive_format") or
                                                                          "/models/" in n for n in names)
        if not pickled:
            from ..kernels import dq_linear  # noqa: F401  (registers the op that quantized programs call)
            try:
                ep = torch.export.load(str(path))
            except Exception as e:
                raise GraphoptError(f"cannot read '{path}' as a torch.export archive ({type(e).__name__}); "
                                    f"it may be truncated or corrupt: re-create it with torch.export.save")
            return Loaded("pt2", str(path), exported=ep, sha256=_hash_files([path]))
    elif head[:1] == b"\x80":
        pickled = True
    if not pickled:
        raise GraphoptError(f"'{path}' is not a model file: {SOURCE_HELP}")
    if not unsafe_load:
        raise GraphoptError(f"'{path}' is a pickle; unpickling can run arbitrary code, so graphopt refuses it: "
                            f"pass --unsafe-load if you trust the file, or save the model with torch.export.save")
    try:
        obj = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as e:
        raise GraphoptError(f"cannot unpickle '{path}' ({type(e).__name__}: {e}); is it truncated?")
    if not isinstance(obj, torch.nn.Module):
        raise GraphoptError(f"'{path}' holds a {type(obj).__name__}, not an nn.Module; a state dict needs its "
                            f"model class: use a package.module:factory spec that builds and loads it")
    return Loaded("pickle", str(path), model=obj, sha256=_hash_files([path]))


# ---- capture -------------------------------------------------------------------------------------------------------
def resolve_task(task: str, loaded: Loaded) -> str:
    """auto: causal-lm for transformers models that generate, else single."""
    from .causal_lm import is_causal_lm
    if task not in TASKS:
        raise GraphoptError(f"--task '{task}': choose one of {', '.join(TASKS)}")
    from .diffusion import is_denoiser_model
    lm = loaded.model is not None and is_causal_lm(loaded.model)
    if task == "auto":
        return "causal-lm" if lm else "diffusion" if is_denoiser_model(loaded.model) else "single"
    if task == "causal-lm" and not lm:
        raise GraphoptError(f"--task causal-lm needs a transformers decoder model that can generate; "
                            f"'{loaded.description}' is not one (use --task single)")
    return task


def capture(source: Any, *, task: str = "auto", inputs: list[str] | None = None, dynamic: list[str] | None = None,
            example_inputs: Any = None, unsafe_load: bool = False, seed: int = 0,
            loaded: Loaded | None = None, extra_methods: frozenset = frozenset(), dtype: str = "float32") -> Program:
    """Export a model source into a Program (method 'forward', or a task's methods).

    extra_methods: optional methods the pipeline's passes need (causal-lm: "verify"). dtype: the float dtype the
    program computes in; the model is converted before export, so its own float32 islands (rotary angles, say)
    stay float32, and float inputs (examples, --input specs, the KV cache) take this dtype."""
    if dtype not in PROGRAM_DTYPES:
        raise GraphoptError(f"--dtype '{dtype}': choose one of {', '.join(PROGRAM_DTYPES)}")
    specs = [parse_input(s) if isinstance(s, str) else s for s in (inputs or [])]
    dims = parse_dynamic_all(dynamic or [])
    loaded = loaded or load_source(source, unsafe_load, dtype)
    kind = resolve_task(task, loaded)
    if dtype != "float32":
        if loaded.sha256 is None and loaded.model is not None:  # the source's hash, not the converted copy's
            loaded = dataclasses.replace(loaded, sha256=hash_state(loaded.model))
        loaded = _converted(loaded, kind, dtype)
    source_info = {"kind": loaded.kind, "spec": loaded.description, "sha256": loaded.sha256}
    if kind == "causal-lm":
        if specs or dims or example_inputs is not None:
            raise GraphoptError("causal-lm programs have fixed inputs (input_ids, attention_mask, position_ids and "
                                "the KV cache): drop --input/--dynamic/example inputs, or use --task single")
        from .causal_lm import capture_causal_lm
        if source_info["sha256"] is None:
            source_info["sha256"] = hash_state(loaded.model)
        return capture_causal_lm(loaded.model, source_info, loaded.plan_extra, seed,
                                 verify="verify" in extra_methods)
    if loaded.exported is not None:
        if specs or dims:
            raise GraphoptError(f"'{loaded.description}' is already exported: its inputs and dynamic shapes come "
                                f"from the archive; drop --input/--dynamic")
        program = _program_from_exported(loaded.exported, source_info)
        return _as_task(program, kind, loaded)

    model = loaded.model.eval()
    names, examples, dim_ranges, input_specs = _resolve_inputs(loaded, specs, dims, example_inputs, seed)
    if dtype != "float32":  # the model's own examples and specs follow the program's dtype too
        examples = tuple(t.to(DTYPES[dtype]) if t.is_floating_point() else t for t in examples)
        input_specs = [dataclasses.replace(s, dtype=dtype) if DTYPES[s.dtype].is_floating_point else s
                       for s in input_specs]
    dynamic_shapes = []
    for spec in input_specs:
        axes = {i: Dim(d, min=dim_ranges[d][0], max=dim_ranges[d][1])
                for i, d in enumerate(spec.shape) if isinstance(d, str)}
        dynamic_shapes.append(axes or None)
    wrapper = _Method(model, names, loaded.extra_kwargs)
    try:
        with torch.no_grad():
            ep = torch.export.export(wrapper, examples,
                                     dynamic_shapes=tuple(dynamic_shapes) if dim_ranges else None, strict=False)
    except Exception as e:
        raise GraphoptError(_export_error(loaded.description, e)) from e
    if source_info["sha256"] is None:
        source_info["sha256"] = hash_state(model)
    n_out = len(ep.graph_signature.user_outputs)
    out_names = loaded.output_names if loaded.output_names and len(loaded.output_names) == n_out else \
        [f"output_{i}" for i in range(n_out)] if n_out > 1 else ["output"]
    program = Program(
        methods={"forward": ep}, plan={"kind": "single", "entry": "forward"},
        inputs={"forward": [TensorSpec(s.name, s.dtype, list(s.shape)) for s in input_specs]},
        example_inputs={"forward": examples}, dims={k: list(v) for k, v in dim_ranges.items()},
        source=source_info, output_names={"forward": out_names},
    )
    return _as_task(program, kind, loaded)


def _converted(loaded: Loaded, kind: str, dtype: str) -> Loaded:
    """`loaded` with its model in `dtype` (a caller's own nn.Module is copied, not changed)."""
    if loaded.exported is not None:
        raise GraphoptError(f"--dtype {dtype}: '{loaded.description}' is already exported in its own dtype; give "
                            f"the model itself (a Hugging Face directory, a factory, a module or zoo:NAME)")
    if kind == "diffusion":
        raise GraphoptError(f"--dtype {dtype}: diffusion programs run in float32 only; drop --dtype")
    model = loaded.model
    if loaded.kind != "hf-dir":  # from_pretrained already loaded that in `dtype`, the way transformers does it
        if loaded.kind == "module":
            import copy
            model = copy.deepcopy(model)
        model = _to_dtype(model, DTYPES[dtype])
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise GraphoptError(f"--dtype {dtype}: '{name}' of '{loaded.description}' has values beyond {dtype}'s "
                                f"range (max {torch.finfo(t.dtype).max:.4g}); use --dtype bfloat16 or float32")
    return dataclasses.replace(loaded, model=model)


def _to_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """model.to(dtype), except what transformers' own loading keeps in float32: non-persistent float buffers (the
    rotary inverse frequencies: rounded to 16 bits they shift a position-2048 angle by radians) and the modules a
    model class lists in _keep_in_fp32_modules. Plain nn.Modules are converted whole."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        PreTrainedModel = ()
    if not isinstance(model, PreTrainedModel):
        return model.to(dtype)
    keep = [(m, n, b) for m in model.modules() for n, b in m._buffers.items()
            if b is not None and b.is_floating_point() and n in m._non_persistent_buffers_set]
    model.to(dtype)
    for m, n, b in keep:
        m._buffers[n] = b
    for pattern in getattr(model, "_keep_in_fp32_modules", None) or []:
        for name, m in model.named_modules():
            if pattern in name.split("."):
                m.to(torch.float32)
    return model


def _as_task(program: Program, kind: str, loaded: Loaded) -> Program:
    if kind == "diffusion":
        from .diffusion import to_diffusion
        return to_diffusion(program, loaded)
    return program


def _export_error(description: str, e: Exception) -> str:
    text = str(e)
    m = re.search(r"Not all values of (\w+) = .*? in the specified range (.*?) satisfy the generated guard (.*)", text)
    if m:
        dim, declared, guard = m.groups()
        bounds = re.findall(r"(\d+) <= |<= (\d+)", guard)
        lo = next((a for a, _ in bounds if a), None)
        hi = next((b for _, b in bounds if b), None)
        fix = f"--dynamic {dim}={lo or 1}..{hi}" if hi else f"narrow --dynamic {dim}"
        return (f"torch.export cannot keep dim {dim} dynamic over {declared.strip()}: the model's code only "
                f"holds for {guard.strip().replace(chr(10), ' ')}; use {fix}")
    first = text.strip().splitlines()[0] if text.strip() else ""
    return (f"torch.export failed on '{description}': {type(e).__name__}: {first} (check --input shapes/dtypes "
            f"and --dynamic ranges; --verbose shows the trace)")


def _resolve_inputs(loaded: Loaded, specs, dims, example_inputs, seed):
    """Names, example tensors, dim ranges and specs, from --input or from the model's own examples."""
    if example_inputs is None and not specs:
        example_inputs = loaded.example_inputs
    if example_inputs is not None:
        if specs:
            raise GraphoptError("give either --input specs or example inputs, not both")
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        if isinstance(example_inputs, dict):
            names, tensors = list(example_inputs), tuple(example_inputs.values())
        else:
            tensors = tuple(example_inputs)
            names = _positional_names(loaded.model, len(tensors))
        if not all(isinstance(t, torch.Tensor) for t in tensors):
            raise GraphoptError("example inputs must be tensors (a tuple, or a dict of name -> tensor)")
        from .program import DTYPE_NAMES
        if dims:
            raise GraphoptError("--dynamic needs --input specs that name the symbolic dims")
        input_specs = [InputSpec(n, list(t.shape), DTYPE_NAMES[t.dtype]) for n, t in zip(names, tensors)]
        return names, tensors, {}, input_specs
    if not specs:
        specs = loaded.input_specs
        if specs and not dims:
            dims = dict(loaded.dims or {})
    if not specs:
        raise GraphoptError(f"'{loaded.description}' has no example inputs: add --input NAME:SHAPE:DTYPE "
                            f"(e.g. --input x:1x3x32x32:float32)")
    check_dims(specs, dims)
    tensors = make_examples(specs, dims, seed, loaded.int_high)
    return [s.name for s in specs], tensors, dims, specs


def _positional_names(model: torch.nn.Module, n: int) -> list[str]:
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(params) >= n:
            return [p.name for p in params[:n]]
    except (TypeError, ValueError):
        pass
    return [f"input_{i}" for i in range(n)]


def _program_from_exported(ep: torch.export.ExportedProgram, source_info: dict) -> Program:
    from torch.utils import _pytree as pytree
    from .program import DTYPE_NAMES
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    sym_names: dict[str, str] = {}
    specs = []
    for name in ep.graph_signature.user_inputs:
        val = placeholders[name].meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise GraphoptError(f"'{source_info['spec']}': non-tensor input '{name}' is not supported")
        shape = []
        for d in val.shape:
            if isinstance(d, torch.SymInt):
                sym = str(d)
                sym_names.setdefault(sym, sym)
                shape.append(sym_names[sym])
            else:
                shape.append(int(d))
        specs.append(TensorSpec(name, DTYPE_NAMES.get(val.dtype, str(val.dtype)), shape))
    dims = {}
    for sym, vr in ep.range_constraints.items():
        if str(sym) in sym_names:
            hi = vr.upper if vr.upper != float("inf") and str(vr.upper) != "int_oo" else 2 ** 31 - 1
            dims[str(sym)] = [int(vr.lower), int(hi)]
    examples = None
    if ep.example_inputs is not None:
        flat = pytree.tree_leaves(ep.example_inputs)
        if len(flat) == len(specs) and all(isinstance(t, torch.Tensor) for t in flat):
            examples = tuple(flat)
    if examples is None:
        raise GraphoptError(f"'{source_info['spec']}' carries no example inputs; re-save it with torch.export.save "
                            f"from torch >= 2.6, which stores them")
    n_out = len(ep.graph_signature.user_outputs)
    return Program(methods={"forward": ep}, plan={"kind": "single", "entry": "forward"},
                   inputs={"forward": specs}, example_inputs={"forward": examples}, dims=dims,
                   source=source_info,
                   output_names={"forward": [f"output_{i}" for i in range(n_out)] if n_out > 1 else ["output"]})
