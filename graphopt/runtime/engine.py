"""Engines: load a bundle and run its methods on ONNX Runtime (default) or torch, with inputs checked."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..compiler.bundle import read_manifest
from ..compiler.program import DTYPES
from ..errors import GraphoptError

BACKENDS = ("onnxruntime", "torch", "tensorrt")


class Method:
    """One callable method: checks inputs against the manifest, runs the backend, returns tensors."""

    def __init__(self, name: str, spec: dict, dims: dict, run):
        self.name = name
        self.inputs = spec["inputs"]
        self.outputs = spec["outputs"]
        self.dims = dims
        self._run = run
        # Unchecked call in the backend's own arrays: takes torch tensors or arrays this method returned and returns
        # the backend's arrays (numpy for ONNX Runtime, tensors otherwise), so decode loops can keep their KV cache
        # as the backend returned it instead of converting every cache tensor on every step.
        self.native = getattr(run, "native", run)

    def __call__(self, *args, **kwargs):
        tensors = self.check(args, kwargs)
        outs = self._run(tensors)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def check(self, args, kwargs) -> list[torch.Tensor]:
        names = [s["name"] for s in self.inputs]
        if len(args) > len(names):
            raise GraphoptError(f"method '{self.name}' takes {len(names)} inputs ({', '.join(names)}), "
                                f"got {len(args)}")
        given = dict(zip(names, args))
        for k, v in kwargs.items():
            if k not in names:
                raise GraphoptError(f"method '{self.name}' has no input '{k}'; inputs: {', '.join(names)}")
            if k in given:
                raise GraphoptError(f"input '{k}' of method '{self.name}' given twice")
            given[k] = v
        missing = [n for n in names if n not in given]
        if missing:
            raise GraphoptError(f"method '{self.name}' is missing input(s) {', '.join(missing)}")
        bound: dict[str, int] = {}
        out = []
        for spec in self.inputs:
            x = given[spec["name"]]
            if isinstance(x, np.ndarray):
                x = torch.from_numpy(x)
            if not isinstance(x, torch.Tensor):
                raise GraphoptError(f"input '{spec['name']}' must be a tensor or numpy array, "
                                    f"not {type(x).__name__}")
            want = DTYPES[spec["dtype"]]
            if x.dtype != want:
                raise GraphoptError(f"input '{spec['name']}' has dtype {str(x.dtype).replace('torch.', '')}, "
                                    f"expected {spec['dtype']}")
            shape = spec["shape"]
            if x.dim() != len(shape):
                raise GraphoptError(f"input '{spec['name']}' has shape {list(x.shape)}, expected rank "
                                    f"{len(shape)} {shape}")
            for axis, (got, dim) in enumerate(zip(x.shape, shape)):
                if isinstance(dim, int):
                    if got != dim:
                        raise GraphoptError(f"input '{spec['name']}' has shape {list(x.shape)}, expected {shape} "
                                            f"(axis {axis} is fixed at {dim})")
                    continue
                lo, hi = self.dims.get(dim, [0, 2 ** 63 - 1])
                if not lo <= got <= hi:
                    raise GraphoptError(f"input '{spec['name']}' axis {axis} ({dim}) is {got}, outside the "
                                        f"compiled range {lo}..{hi}")
                if bound.setdefault(dim, got) != got:
                    raise GraphoptError(f"inputs disagree on dim {dim}: {bound[dim]} vs {got} "
                                        f"(input '{spec['name']}' axis {axis})")
            out.append(x.contiguous())
        return out


class Engine:
    """A loaded bundle. `engine(*inputs)` runs the plan's entry method; `engine.method(name)` any method."""

    def __init__(self, path: Path, manifest: dict, backend: str, methods: dict[str, Method]):
        self.path = path
        self.manifest = manifest
        self.backend = backend
        self._methods = methods
        self.plan = manifest.get("plan", {})
        self.last_stats: dict | None = None  # set by generate(speculative=...)

    @property
    def methods(self) -> list[str]:
        return list(self._methods)

    def method(self, name: str) -> Method:
        if name not in self._methods:
            raise GraphoptError(f"bundle has no method '{name}'; methods: {', '.join(self._methods)}")
        return self._methods[name]

    def __call__(self, *args, **kwargs):
        entry = self.plan.get("entry")
        if entry is None:
            raise GraphoptError(f"this is a {self.plan.get('kind')} bundle with no single entry method: "
                                f"use engine.method(name) with one of {', '.join(self._methods)}")
        return self.method(entry)(*args, **kwargs)

    def generate(self, input_ids, max_new_tokens: int, eos_token_id=None, do_sample: bool = False,
                 temperature: float = 1.0, top_k=None, top_p=None, seed=None, attention_mask=None, streamer=None,
                 speculative: bool | str = False):
        """Generate new token ids [B, N] with a causal-lm bundle (see graphopt.runtime.generate).

        speculative: False (plain KV-cache decoding), True or "heads" (the bundle's trained draft heads), or
        "layer-skip" (the bundle's skipped program drafts); greedy output is identical either way, and
        `self.last_stats` then holds steps and mean_accepted_length.
        """
        if self.plan.get("kind") != "causal-lm":
            raise GraphoptError(f"generate() needs a causal-lm bundle; this one is '{self.plan.get('kind')}' "
                                f"(optimize with --task causal-lm)")
        kwargs = dict(eos_token_id=eos_token_id, do_sample=do_sample, temperature=temperature, top_k=top_k,
                      top_p=top_p, seed=seed, attention_mask=attention_mask, streamer=streamer)
        if speculative:
            from .speculative import speculative_generate
            out, self.last_stats = speculative_generate(
                self, input_ids, max_new_tokens, drafter="heads" if speculative is True else speculative, **kwargs)
            return out
        from .generate import generate
        self.last_stats = None
        return generate(self, input_ids, max_new_tokens, **kwargs)

    def sample(self, noise=None, seed: int | None = None, steps: int | None = None, sampler: str | None = None,
               batch: int = 1, on_step=None, cache: bool = True, **conditioning) -> torch.Tensor:
        """Run the diffusion sampler of a diffusion bundle; returns the final sample (same shape as the noise).

        noise: the starting noise (default: standard normal from `seed`, `batch` samples of the plan's shape);
        steps: sampler steps (default: the plan's); sampler: "ddim" (deterministic) or "ddpm" (default: the plan's);
        conditioning: the model's extra inputs by name (e.g. class_labels), batched like the noise.
        cache: follow the plan's feature-cache schedule (cache-schedule pass) when there is one.
        """
        from .sampler import SAMPLERS
        from .sampler import sample as run_sampler
        plan = self.plan
        if plan.get("kind") != "diffusion":
            raise GraphoptError(f"sample() needs a diffusion bundle; this one is '{plan.get('kind')}' "
                                f"(optimize with --task diffusion)")
        roles = plan["inputs"]
        steps = plan["steps"] if steps is None else steps
        train_steps = int(plan["scheduler_config"].get("num_train_timesteps", 1000))
        if not isinstance(steps, int) or not 1 <= steps <= train_steps:
            raise GraphoptError(f"steps must be an integer in 1..{train_steps} (the training schedule's length), "
                                f"got {steps}")
        sampler = sampler or plan.get("sampler", "ddim")
        if sampler not in SAMPLERS:
            raise GraphoptError(f"sampler '{sampler}': choose one of {', '.join(SAMPLERS)}")
        unknown = set(conditioning) - set(roles["conditioning"])
        missing = [n for n in roles["conditioning"] if n not in conditioning]
        if unknown or missing:
            raise GraphoptError(f"conditioning inputs: the model takes {roles['conditioning'] or 'none'}; "
                                f"missing {missing or 'none'}, unknown {sorted(unknown) or 'none'}")
        method = self.method(plan["entry"])
        spec = {s["name"]: s for s in method.inputs}
        shape = plan["sample_shape"]
        if noise is None:
            g = torch.Generator().manual_seed(0 if seed is None else seed)
            if any(not isinstance(d, int) for d in shape[1:]):
                raise GraphoptError(f"the sample shape {shape} has symbolic dims besides the batch: pass noise=")
            dims = [batch, *shape[1:]]  # a static batch-1 graph is run once per sample below
            noise = torch.randn(*dims, generator=g, dtype=DTYPES[spec[roles["sample"]]["dtype"]])
        batch1 = isinstance(shape[0], int) and shape[0] == 1  # a static batch-1 graph runs once per row
        rows = noise.shape[0] if batch1 else 1
        t_spec = spec[roles["timestep"]]
        cache_plan = plan.get("cache") if cache else None
        if cache_plan is not None and steps != cache_plan["steps"]:
            raise GraphoptError(f"this bundle's cache schedule is for steps={cache_plan['steps']}; pass that, or "
                                f"cache=False to sample without it")
        shallow = self.method(cache_plan["method"]) if cache_plan else None
        recompute = set(cache_plan["schedule"]) if cache_plan else None
        state = {"step": 0, "cached": [None] * rows, "checked": set()}
        dec = None
        if cache_plan is not None and cache_plan.get("dec"):  # per-step tensors, made once
            dec_dtype = DTYPES[next(s for s in shallow.inputs if s["name"] == "dec_scale")["dtype"]]
            dec = [(torch.tensor(a, dtype=dec_dtype), torch.tensor(b, dtype=dec_dtype))
                   for a, b in zip(cache_plan["dec"]["scale"], cache_plan["dec"]["shift"])]

        def run(m: "Method", x, t, i, *extra):
            feed = {roles["sample"]: x, roles["timestep"]: t,
                    **{k: (v[i:i + 1] if batch1 else v) for k, v in conditioning.items()},
                    **dict(zip(["cached_feature", "dec_scale", "dec_shift"], extra))}
            if m.name not in state["checked"]:  # full input checks once per method; the loop repeats the same
                tensors = m.check((), feed)     # shapes and dtypes, and a small model's step is a few ms
                state["checked"].add(m.name)
            else:
                tensors = [feed[spec["name"]] for spec in m.inputs]
            return m._run(tensors)

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            step = state["step"]
            state["step"] += 1
            t = t.to(DTYPES[t_spec["dtype"]])
            t = t[:1].reshape([]) if not t_spec["shape"] else t
            parts = []
            for i in range(rows):
                xi = x[i:i + 1] if batch1 else x
                ti = t if t.dim() == 0 or not batch1 else t[i:i + 1]
                if cache_plan is None:
                    eps = run(method, xi, ti, i)[0]
                elif step in recompute:
                    out = run(method, xi, ti, i)
                    eps, state["cached"][i] = out[0], out[cache_plan["feature_output"]]
                else:
                    extra = [state["cached"][i], *(dec[step] if dec else ())]
                    eps = run(shallow, xi, ti, i, *extra)[0]
                # Models with a learned variance (DiT) emit [noise, variance] along channels: the sampler takes the
                # noise.
                eps = eps.to(xi.device)  # torch-on-GPU and TensorRT runners return device tensors
                parts.append(eps[:, :xi.shape[1]] if eps.shape[1] == 2 * xi.shape[1] else eps)
            return torch.cat(parts) if batch1 else parts[0]

        # DDPM's per-step noise must not repeat the starting noise: its generator gets a seed of its own.
        return run_sampler(denoise, noise, plan["scheduler_config"], steps, kind=sampler,
                           seed=(0 if seed is None else seed) + 1_000_003, on_step=on_step)

    def __repr__(self) -> str:
        return f"Engine({str(self.path)!r}, backend={self.backend!r}, methods={self.methods})"


def ort_session_config(plan: dict) -> dict[str, str]:
    """ONNX Runtime session config entries a bundle's plan asks for: a standard-ops (DequantizeLinear) quantized
    file carries no accuracy level, ORT takes it from the session when it fuses DequantizeLinear + MatMul."""
    onnx_plan = plan.get("onnx", {})
    if not onnx_plan.get("standard_ops"):
        return {}
    return {"session.qdq_matmulnbits_accuracy_level": str(int(onnx_plan.get("matmulnbits_accuracy_level", 4)))}


def _ort_runner(path: Path, providers: list[str] | None, threads: int | None = None, spinning: bool | None = None,
                config: dict[str, str] | None = None):
    """threads: intra-op threads (None: ORT's default); spinning: let idle pool threads spin for the next kernel
    (default: only when threads is None); config: session config entries."""
    import onnxruntime as ort
    if not path.is_file():
        raise GraphoptError(f"bundle file '{path}' is missing; re-run optimize (or load with backend='torch')")
    available = ort.get_available_providers()
    wanted = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if spinning is False or (spinning is None and threads):
        # Spinning threads wait for the next small kernel; on a shared CPU they steal it from the caller instead.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=wanted)
    except Exception as e:
        raise GraphoptError(f"ONNX Runtime {ort.__version__} cannot load '{path}': {str(e).splitlines()[0]}; "
                            f"{_load_fix(path, ort.__version__)}")
    names = [i.name for i in session.get_inputs()]

    def run(tensors: list[torch.Tensor]):
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}
        return [torch.from_numpy(np.asarray(o)) for o in session.run(None, feeds)]

    def native(xs: list) -> list[np.ndarray]:
        return session.run(None, {n: x if isinstance(x, np.ndarray) else x.detach().cpu().numpy()
                                  for n, x in zip(names, xs)})
    run.session = session
    run.native = native
    return run


def _load_fix(path: Path, version: str) -> str:
    """What to do when ORT rejects a bundle file: opset 23 (the default) needs ONNX Runtime >= 1.23."""
    try:
        import onnx
        opset = next((o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                      if o.domain in ("", "ai.onnx")), None)
    except Exception:
        opset = None
    major_minor = tuple(int(x) for x in version.split(".")[:2] if x.isdigit())
    if opset is not None and opset >= 23 and major_minor < (1, 23):
        return (f"the file is ONNX opset {opset}, which needs onnxruntime >= 1.23: upgrade it (pip install -U "
                f"onnxruntime), or re-run optimize with --opset 21")
    return "re-run optimize"


def _torch_runner(path: Path, device: str | None):
    if not path.is_file():
        raise GraphoptError(f"bundle file '{path}' is missing; re-run optimize")
    from ..kernels import dq_linear  # noqa: F401  (registers graphopt::dq_linear, which quantized programs call)
    try:
        import logging
        serde_log = logging.getLogger("torch._export.serde.serialize")
        level = serde_log.level
        serde_log.setLevel(logging.ERROR)  # "Symbol sN did not appear in the graph": edited graphs drop symbols
        try:
            ep = torch.export.load(str(path))
        finally:
            serde_log.setLevel(level)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise GraphoptError(f"cannot load '{path}' ({type(e).__name__}: {first}); the file may be corrupt: "
                            f"re-run optimize")
    if device:
        # Moves parameters and buffers, and rewrites the device arguments of tensors the graph creates (masks,
        # positions), which module.to() would leave on the export device.
        from torch.export.passes import move_to_device_pass
        try:
            ep = move_to_device_pass(ep, device)
        except (RuntimeError, ValueError, AssertionError) as e:  # AssertionError: torch built without CUDA
            raise GraphoptError(f"cannot move '{path}' to device '{device}': {str(e).splitlines()[0]}")
    module = ep.module()
    from torch.utils import _pytree as pytree

    def run(tensors: list[torch.Tensor]):
        args, kwargs = pytree.tree_unflatten(
            [t.to(device) if device else t for t in tensors], ep.call_spec.in_spec)
        with torch.no_grad():
            out = module(*args, **kwargs)
        return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    run.module = module
    return run


def _trt_runner(path: Path):
    """A serialized TensorRT engine run on torch's current CUDA stream (unverified: no TensorRT here)."""
    import importlib

    from ..compiler.tensorrt_lower import PLUGINS, require_tensorrt
    trt, _ = require_tensorrt()
    for module in set(PLUGINS.values()):  # plugin creators must exist before the engine is deserialized
        importlib.import_module(module).register()
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise GraphoptError(f"TensorRT could not deserialize '{path}' (built for another TensorRT or GPU?): "
                            f"re-run optimize --backend tensorrt on this machine")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def run(tensors: list[torch.Tensor]):
        tensors = [t.cuda().contiguous() for t in tensors]
        for n, t in zip(inputs, tensors):
            if not context.set_input_shape(n, tuple(t.shape)):
                raise GraphoptError(f"TensorRT engine '{path}' refuses shape {list(t.shape)} for input '{n}' "
                                    f"(outside the range it was built for)")
            context.set_tensor_address(n, t.data_ptr())
        results = []
        for n in outputs:
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(engine.get_tensor_dtype(n)))).dtype
            out = torch.empty(tuple(context.get_tensor_shape(n)), dtype=dtype, device="cuda")
            context.set_tensor_address(n, out.data_ptr())
            results.append(out)
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise GraphoptError(f"TensorRT failed to run '{path}'")
        stream.synchronize()
        return results
    return run


SMALL_DECODE_BYTES = 64 << 20


def _default_threads(path: Path, manifest: dict) -> dict[str, tuple[int | None, bool]]:
    """(ORT intra-op threads, spinning) per method when the caller gives no thread count; None threads = ORT's
    default (one per core).

    A small causal LM's step is a few hundred small kernels: its per-token method (decode; verify or draft_verify
    when decoding speculatively) gains from a second spinning thread in its matmuls (zoo LM: 660 -> 780 tok/s), but
    any other session's spinning pool then competes with it for the cores (speculative: 1140 tok/s with only verify
    spinning, 980 with prefill spinning too). Prefills are long enough to wake threads for (17.3 -> 14.5 ms for a
    120-token prompt); per-token drafters stay on the caller's thread.
    """
    plan = manifest.get("plan", {})
    if plan.get("kind") != "causal-lm":
        return {}
    files = manifest["methods"].get(plan.get("decode"), {}).get("files", {})
    size = sum((path / files[k]).stat().st_size for k in ("onnx", "onnx_data") if k in files
               and (path / files[k]).is_file())
    if not 0 < size < SMALL_DECODE_BYTES:
        return {}
    hot = {plan.get("decode"), plan.get("verify"), (plan.get("self_speculative") or {}).get("fused")}
    prefills = {plan.get("prefill")}
    return {name: (None, True) if name in hot else (None, False) if name in prefills else (1, False)
            for name in manifest["methods"]}


def load(path, backend: str = "onnxruntime", *, providers: list[str] | None = None,
         device: str | None = None, threads: int | None = None) -> Engine:
    """Load a bundle written by `optimize -o` / `CompiledModel.save`.

    providers: ONNX Runtime execution providers (default CUDA when available, else CPU); threads: ORT intra-op
    threads for every method (default: ORT's choice, except for causal LMs whose decode graph is under
    SMALL_DECODE_BYTES: see _default_threads);
    device: torch backend device.
    """
    if backend not in BACKENDS:
        raise GraphoptError(f"backend '{backend}': choose one of {', '.join(BACKENDS)}")
    if backend == "tensorrt":
        from ..compiler.tensorrt_lower import require_tensorrt
        require_tensorrt()
    path = Path(path)
    manifest = read_manifest(path)
    per_method = _default_threads(path, manifest) if threads is None and backend == "onnxruntime" else {}
    methods = {}
    for name, spec in manifest["methods"].items():
        files = spec.get("files", {})
        if backend == "onnxruntime":
            if "onnx" not in files:
                raise GraphoptError(f"bundle '{path}' has no ONNX file for method '{name}' (it was built with "
                                    f"--backend torch): load it with backend='torch' or re-run optimize")
            run = _ort_runner(path / files["onnx"], providers, *per_method.get(name, (threads, not threads)),
                              config=ort_session_config(manifest.get("plan", {})))
        elif backend == "tensorrt":
            if "engine" not in files:
                raise GraphoptError(f"bundle '{path}' has no TensorRT engine for method '{name}': re-run optimize "
                                    f"with --backend tensorrt")
            run = _trt_runner(path / files["engine"])
        else:
            run = _torch_runner(path / files["pt2"], device)
        methods[name] = Method(name, spec, manifest.get("dims", {}), run)
    return Engine(path, manifest, backend, methods)
