"""Weight-only quantization of a program's linear layers: find them, calibrate them in order, rewrite them.

Shared by the rtn, gptq and decoupleq passes. Linear layers are quantized in graph order, groups of layers that read
the same input (q/k/v, gate/up) together, each group calibrated on activations produced by the program with every
earlier group already quantized (so later layers see, and compensate for, the earlier layers' error). With
device=cuda all of that runs on a copy of the program moved to the GPU (`program_on`).
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Callable

import torch
from torch.export.graph_signature import InputKind
from torch.utils import _pytree as pytree

from ..errors import GraphoptError
from .graph_edit import GraphEditor
from .quantize import HessianAccumulator, QuantResult, pack

aten = torch.ops.aten


@dataclasses.dataclass
class LinearSite:
    node: str            # name of the aten.linear node in the calibration method
    weight: str          # state-dict name of its weight parameter
    input_node: str      # name of the node that feeds it
    in_features: int
    out_features: int


def _param_targets(ep) -> dict[str, str]:
    """placeholder name -> state-dict name, for parameters."""
    return {s.arg.name: s.target for s in ep.graph_signature.input_specs if s.kind == InputKind.PARAMETER}


def _feeds_output(node: torch.fx.Node) -> bool:
    """True if the node's value reaches a graph output through shape-only ops (an LM head's logits)."""
    shape_ops = {aten.view.default, aten.reshape.default, aten.slice.Tensor, aten.select.int,
                 aten.contiguous.default, aten.clone.default, aten._unsafe_view.default}
    frontier = [node]
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u.op == "output":
                return True
            if u.op == "call_function" and u.target in shape_ops:
                frontier.append(u)
    return False


def find_linears(ep, exclude: str = "", label: str = "quantization") -> tuple[list[LinearSite], dict[str, str]]:
    """Quantizable linear layers, and the excluded ones with the reason (LM head, tied weights, patterns)."""
    params = _param_targets(ep)
    patterns = [p.strip() for p in exclude.split("|") if p.strip()]
    sites, skipped = [], {}
    for node in ep.graph.nodes:
        if node.op != "call_function" or node.target is not aten.linear.default:
            continue
        w = node.args[1]
        if not isinstance(w, torch.fx.Node) or w.name not in params:
            continue
        target = params[w.name]
        if any(u.target is not aten.linear.default for u in w.users):
            skipped[target] = "tied to a non-linear use (embedding)"
            continue
        if _feeds_output(node):
            skipped[target] = "LM head / output layer"
            continue
        if any(fnmatch.fnmatch(target, p) for p in patterns):
            skipped[target] = "excluded by pattern"
            continue
        out_f, in_f = w.meta["val"].shape
        sites.append(LinearSite(node.name, target, node.args[0].name, int(in_f), int(out_f)))
    names = sorted({s.weight for s in sites} | set(skipped))
    for pattern in patterns:
        if not any(fnmatch.fnmatch(name, pattern) for name in names):
            examples = ", ".join(f"'{n}'" for n in names[:3]) or "none"
            raise GraphoptError(f"{label}: exclude pattern '{pattern}' matches no linear weight (a typo would "
                                f"quantize a layer meant to stay in float); the names look like {examples}: use "
                                f"globs such as '*down_proj*'")
    return sites, skipped


def linears_from_matmuls(ep):
    """GPT-2's Conv1D computes addmm(b, x, W) (or mm(x, W)) with an [in, out] parameter W. Rewrite each such
    product as aten.linear(x, Wᵀ, b), storing the parameter transposed under its own name: the same function, and
    every quantizer, the calibration runs and the dq_linear rewrite then see an ordinary linear. Parameters with
    any other use (tied, or read as the first operand) stay. Returns (program, number of products rewritten)."""
    params = _param_targets(ep)
    products = (aten.addmm.default, aten.mm.default)
    candidates = {}
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in params and node.users and all(
                u.op == "call_function" and u.target in products and u.args[-1] is node and
                all(a is not node for a in u.args[:-1]) and not u.kwargs for u in node.users):
            candidates[node.name] = params[node.name]
    if not candidates:
        return ep, 0
    ed = GraphEditor(ep)
    placeholders = ed.placeholders()
    count = 0
    for name, target in candidates.items():
        ph = placeholders[name]
        old = ed.state_dict[target]
        value = old.detach().T.contiguous()
        ed.state_dict[target] = torch.nn.Parameter(value, requires_grad=old.requires_grad) \
            if isinstance(old, torch.nn.Parameter) else value
        with ph.meta["val"].fake_mode:
            ph.meta["val"] = ph.meta["val"].new_empty(tuple(value.shape))
        for user in list(ph.users):
            x, bias = (user.args[1], user.args[0]) if user.target is aten.addmm.default else (user.args[0], None)
            with ed.graph.inserting_before(user):
                new = ed.graph.call_function(aten.linear.default, (x, ph, bias) if bias is not None else (x, ph))
            new.meta.update(user.meta)
            user.replace_all_uses_with(new)
            ed.graph.erase_node(user)
            count += 1
    return ed.build(), count


def unsupported_layers(ep) -> list[str]:
    """Matrix products with a parameter weight left after `linears_from_matmuls` (the weight has another use, or
    is the first operand): not quantized; named in the error when nothing else is left."""
    params = _param_targets(ep)
    found = []
    for node in ep.graph.nodes:
        if node.op == "call_function" and node.target in (aten.addmm.default, aten.mm.default):
            w = node.args[-1]
            if isinstance(w, torch.fx.Node) and w.name in params:
                found.append(f"{params[w.name]} ({node.target.__name__.split('.')[0]})")
    return found


def resolve_device(name: str, where: str) -> torch.device:
    """The device calibration and solves run on, from a pass's `device` option; a one-line error if absent."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GraphoptError(f"{where}: device={name} but torch sees no CUDA device "
                            f"(torch {torch.__version__}, a CPU build?); use device=cpu")
    return device


def program_on(ep, device: torch.device, copy_on_cpu: bool = False):
    """`ep` for running on `device`: a copy (GraphEditor's: same signature, verifiers and guards) with its device
    arguments rewritten and its weights and constants moved there by torch's move_to_device_pass. The original
    program is not touched; on the CPU it is returned as is unless copy_on_cpu (tests take that path)."""
    if device.type == "cpu" and not copy_on_cpu:
        return ep
    from torch.export.passes import move_to_device_pass
    twin = GraphEditor(ep).build()  # a copied graph and copied dicts: the pass rebinds only the copies' entries
    return move_to_device_pass(twin, device)


def to_device(tree, device: torch.device):
    """Every tensor in a nested structure of inputs, on `device`."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), tree)


def _flat_args(ep, weights: dict[str, torch.Tensor], user_inputs: tuple) -> list:
    args, it = [], iter(user_inputs)
    for spec in ep.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            args.append(next(it))
        elif spec.target in weights:
            args.append(weights[spec.target])
        elif spec.target in ep.state_dict:
            args.append(ep.state_dict[spec.target])
        else:
            args.append(ep.constants[spec.target])
    return args


class _PausedRuns:
    """The calibration method run on every calibration input at once, each run paused before a chosen node.

    Each input keeps its live values between pauses (a value is freed after its last use, as in fx's
    Interpreter), so calibrating L groups of layers costs one pass through the graph per input rather than L
    runs of a growing prefix. Quantized weights are swapped into the paused runs; a run that already used a
    changed weight (a weight shared with an earlier layer) starts again from the top.
    """

    def __init__(self, ep, calibration: list[tuple]):
        self.ep = ep
        self.nodes = list(ep.graph_module.graph.nodes)
        self.position = {n: i for i, n in enumerate(self.nodes)}
        self.by_name = {n.name: n for n in self.nodes}
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.placeholder_of = {s.target: self.by_name[s.arg.name] for s in ep.graph_signature.input_specs
                               if s.target is not None}
        self.free_after: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        seen: set[torch.fx.Node] = set()
        for node in reversed(self.nodes):
            if node.op == "output":  # never reached: the runs only pause before layers
                continue
            for inp in node.all_input_nodes:
                if inp not in seen:
                    seen.add(inp)
                    self.free_after.setdefault(node, []).append(inp)
        for node in self.nodes:  # values only the output reads (a prefill's KV cache): freed once computed
            if node not in seen and node.op != "output":
                self.free_after.setdefault(node, []).append(node)
        self.interpreter = torch.fx.Interpreter(ep.graph_module)
        self.interpreter.extra_traceback = False  # keep our one-line errors one line
        self.calibration = calibration
        self.weights: dict[str, torch.Tensor] = {}
        self.runs = [self._start(inputs) for inputs in calibration]

    def _start(self, inputs: tuple) -> dict:
        return {"env": dict(zip(self.placeholders, _flat_args(self.ep, self.weights, inputs))), "next": 0}

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Use these values for the named parameters from now on."""
        self.weights.update(weights)
        for i, run in enumerate(self.runs):
            used = any(self.position[u] < run["next"] for name in weights for u in self.placeholder_of[name].users)
            if used:
                self.runs[i] = self._start(self.calibration[i])
                continue
            for name, value in weights.items():
                if self.placeholder_of[name] in run["env"]:
                    run["env"][self.placeholder_of[name]] = value

    def inputs_of(self, node_name: str):
        """Advance every run to `node_name` (not running it) and yield its first argument, run by run."""
        stop = self.by_name[node_name]
        interp = self.interpreter
        for run in self.runs:
            if self.position[stop] < run["next"]:
                raise ValueError(f"calibration runs are past '{node_name}': pause at layers in graph order")
            env = interp.env = run["env"]
            with torch.no_grad():
                for i in range(run["next"], self.position[stop]):
                    node = self.nodes[i]
                    if node.op != "placeholder":
                        env[node] = interp.run_node(node)
                    for dead in self.free_after.get(node, ()):
                        del env[dead]
            run["next"] = self.position[stop]
            yield env[stop.args[0]]


def calibrate_and_quantize(ep, sites: list[LinearSite], calibration: list[tuple],
                           quantize: Callable[[torch.Tensor, torch.Tensor], QuantResult], progress,
                           label: str, stats: dict | None = None,
                           pad_to: dict[str, int] | None = None) -> dict[str, QuantResult]:
    """Quantize `sites` in graph order, each input group calibrated on the partially quantized program.

    `ep` and `calibration` may live on a GPU (see `program_on`): the activations, H and the solves then stay there
    (the solvers run where H is); the results come back on the CPU."""
    groups: dict[str, list[LinearSite]] = {}
    for s in sites:
        groups.setdefault(s.input_node, []).append(s)
    runs = _PausedRuns(ep, calibration) if calibration else None  # none: data-free (rtn), no H and no loss
    results: dict[str, QuantResult] = {}
    for input_node, members in progress.track(list(groups.items()), f"{label}: layers"):
        H = None
        if runs is not None:
            acc = HessianAccumulator(members[0].in_features, ep.state_dict[members[0].weight].device)
            for x in runs.inputs_of(members[0].node):
                x = x.detach().reshape(-1, x.shape[-1])
                if not torch.isfinite(x).all():
                    raise GraphoptError(f"{label}: calibration activations into '{members[0].weight}' contain "
                                        f"NaN/inf; check the calibration data and the layers before it")
                acc.add(x)
            H = acc.hessian()
            if stats is not None:
                stats["calibration_rows"] = min(stats.get("calibration_rows", acc.count), acc.count)
        quantized = {}
        for site in members:
            w0 = ep.state_dict[site.weight].detach().float()  # (on the program's device, like H)
            if not torch.isfinite(w0).all():
                raise GraphoptError(f"{label}: weight '{site.weight}' contains NaN/inf; refusing to quantize it "
                                    f"(fix the checkpoint; exclude='{site.weight}' would keep it in float)")
            pad = (pad_to or {}).get(site.weight, 0)
            if pad:
                # Zero columns for zero inputs: the padded layer computes the same function.
                w0 = torch.nn.functional.pad(w0, (0, pad))
                H_padded = None if H is None else torch.nn.functional.pad(H, (0, pad, 0, pad))
                res = quantize(w0, H_padded)
            else:
                res = quantize(w0, H)
            results[site.weight] = res
            quantized[site.weight] = as_stored(res, ep.state_dict[site.weight].dtype)[:, :site.in_features] \
                .contiguous().to(ep.state_dict[site.weight].device)
        if runs is not None:
            runs.set_weights(quantized)
    return results


def rewrite_linears(ep, results: dict[str, QuantResult],
                    param_updates: dict[str, torch.Tensor] | None = None) -> tuple[object, int]:
    """Replace aten.linear(x, W, b) by graphopt::dq_linear(x, packed, scale, zero, b, ...) for quantized W, and
    give the parameters in `param_updates` (state-dict name -> tensor) their new values."""
    from ..kernels import dq_linear  # noqa: F401  (registers torch.ops.graphopt.dq_linear)
    ed = GraphEditor(ep)
    for target, value in (param_updates or {}).items():
        if target in ed.state_dict:
            old = ed.state_dict[target]
            ed.state_dict[target] = torch.nn.Parameter(value.to(old.dtype), requires_grad=old.requires_grad) \
                if isinstance(old, torch.nn.Parameter) else value.to(old.dtype)
    params = _param_targets(ep)
    consts: dict[str, tuple] = {}
    count = 0
    for node in list(ed.graph.nodes):
        if node.op != "call_function" or node.target is not aten.linear.default:
            continue
        w = node.args[1]
        target = params.get(getattr(w, "name", None))
        if target not in results:
            continue
        r = results[target]
        if target not in consts:
            consts[target] = _encode(r, ep.state_dict[target].dtype)
        packed, scale, zero = consts[target]
        with ed.graph.inserting_before(node):
            p_node = ed.add_constant(packed, "dq_packed")
            s_node = ed.add_constant(scale, "dq_scale")
            z_node = ed.add_constant(zero, "dq_zero")
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        x = node.args[0]
        pad = r.w_int.shape[1] - w.meta["val"].shape[1]
        with ed.graph.inserting_before(node):
            if pad:  # the weight was padded with zero columns to a whole number of groups
                x_val = x.meta["val"]
                x = ed.graph.call_function(aten.constant_pad_nd.default, (x, [0, pad], 0.0))
                # Build the metadata by shape, not by running pad on the fake tensor: that would record guards
                # on the symbolic dims (and specialise them) in the program's shape environment.
                with x_val.fake_mode:
                    x.meta["val"] = x_val.new_empty((*x_val.shape[:-1], x_val.shape[-1] + pad))
            new = ed.graph.call_function(torch.ops.graphopt.dq_linear.default,
                                         (x, p_node, s_node, z_node, bias, r.bits, r.group, r.w_int.shape[1]))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        ed.graph.erase_node(node)
        count += 1
    ed.remove_unused_inputs()
    return ed.build(), count


def _scale_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """How scales and zeros are stored: in a half-precision program's dtype, else float32."""
    return weight_dtype if weight_dtype in (torch.bfloat16, torch.float16) else torch.float32


def as_stored(r: QuantResult, dtype: torch.dtype) -> torch.Tensor:
    """The weight the rewritten layer computes with, in `dtype`: with scales and zeros rounded as _encode stores
    them, so later layers calibrate on what the bundle runs."""
    sdt = _scale_dtype(dtype)
    r = dataclasses.replace(r, scale=r.scale.to(sdt).float(), zero=r.zero.to(sdt).float())
    return r.dequantize().to(dtype)


def _encode(r: QuantResult, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed codes, scale and zero as the op takes them: scale and zero in float32, or in the weight's own dtype
    for half-precision programs (half the bytes the GPU kernels read per group)."""
    q, scale, zero = r.w_int.clone(), r.scale.clone(), r.zero.clone()
    # A zero scale makes the group constant (= zero) whatever the integers: re-encode it as q = 0, s = 1, which
    # every backend represents exactly (ONNX's zero point is zero/scale).
    flat = scale == 0
    if flat.any():
        cols = flat.repeat_interleave(r.group, dim=1)
        q[cols] = 0
        scale[flat] = 1.0
    sdt = _scale_dtype(dtype)
    return pack(q, r.bits), scale.to(sdt), zero.to(sdt)


class WeightQuantPass:
    """Mixin for rtn/gptq/decoupleq: subclasses define `quantize(w0, H) -> QuantResult` from self.config."""
    needs = frozenset({"calibration"})
    exact = False
    metric = "rel_l2"
    half_precision = True  # statistics and solves in float64 whatever the program's dtype
    # Relative L2 error of the program's outputs that still counts as working; the real quality measure is the
    # benchmark's bits per byte. Looser for fewer bits.
    TOLERANCE_BY_BITS = {2: 1.0, 3: 0.7, 4: 0.4, 8: 0.05}
    MAX_CALIBRATION = 64

    def __init__(self, **config):
        super().__init__(**config)
        self.tolerance = self.TOLERANCE_BY_BITS[config.get("bits", 4)]

    @classmethod
    def tolerance_text(cls) -> str:
        by_bits = ", ".join(f"{v:g} at {b} bits" for b, v in cls.TOLERANCE_BY_BITS.items())
        return f"{cls.metric} <= {by_bits}"

    @classmethod
    def headline(cls, details) -> str:
        parts = [f"{details['quantized_layers']} layers quantized"]
        parts += [f"{len(details[k])} {k}" for k in ("skipped", "padded") if details.get(k)]
        return ", ".join(parts)

    def run(self, program, ctx):
        given = list(ctx.calibration or [])  # empty only for passes that do not need it (rtn: data-free)
        method, inputs = program.calibration_inputs(given, self.MAX_CALIBRATION)
        program.methods = {name: linears_from_matmuls(m_ep)[0] for name, m_ep in program.methods.items()}
        ep = program.methods[method]
        sites, skipped = find_linears(ep, self.config.get("exclude", ""), self.name)
        group = self.config.get("group", -1)
        usable = sites
        pad_to = {s.weight: (-s.in_features) % group for s in sites if group != -1 and s.in_features % group}
        if not usable:
            other = unsupported_layers(ep)
            why = (f"; {len(other)} matrix products with parameter weights are not linears (their weight has "
                   f"another use): {', '.join(other[:3])}{' ...' if len(other) > 3 else ''}" if other else "")
            kept = ", ".join(f"{k} ({v})" for k, v in list(skipped.items())[:3])
            raise GraphoptError(f"{self.name}: no linear layer to quantize (kept in float: {kept or 'none'}){why}")
        torch.manual_seed(ctx.seed)
        stats: dict = {}
        device = resolve_device(self.config.get("device", "cpu"), f"{self.name}{{device}}")
        run_ep, run_inputs = program_on(ep, device), to_device(inputs, device)
        results = calibrate_and_quantize(run_ep, usable, run_inputs, self.quantize, ctx.progress, self.name, stats,
                                         pad_to)
        param_updates, blockwise = {}, None
        losses = {k: r.loss for k, r in results.items() if r.loss is not None}  # layer-wise, before any tuning
        if self.config.get("blockwise"):
            from .blockwise import tune_blocks
            results, param_updates, blockwise = tune_blocks(
                run_ep, usable, results, run_inputs, steps=int(self.config["blockwise_steps"]), progress=ctx.progress,
                label=f"{self.name} block-wise", int_zero=self.config.get("zero") == "int")
            if not blockwise["blocks"]:
                ctx.progress.info(f"note: {self.name}{{blockwise=true}} found no repeated blocks (numbered module "
                                  f"paths such as layers.0) to tune: the layer-wise result stands")
        k_max = max(s.in_features for s in usable)
        if inputs and stats.get("calibration_rows", 0) < 2 * k_max:
            more = (f"longer items: only the first {len(inputs)} of the {len(given)} calibration items "
                    f"are used" if len(given) > len(inputs) else "more --calib data")
            ctx.progress.info(f"warning: {self.name} calibrated on {stats['calibration_rows']} rows for layers "
                              f"with up to {k_max} input features; give at least {2 * k_max} ({more})")
        rewritten = 0
        methods = {}
        for name, m_ep in program.methods.items():
            methods[name], n = rewrite_linears(m_ep, results, param_updates)
            rewritten += n
        program.methods = methods
        level = int(self.config.get("ort_accuracy", 0))
        program.plan = {**program.plan, "onnx": {"matmulnbits_accuracy_level": level,
                                                 "standard_ops": self.config.get("onnx_ops") == "standard",
                                                 "check_tolerance": 1e-4 if level == 0 else 5e-2}}
        return program, {
            "quantized_layers": len(results), "rewritten_nodes": rewritten,
            "skipped": skipped, "padded": {k: f"in_features padded by {v} to a multiple of group {group}"
                                           for k, v in pad_to.items()}, "calibration_rows": stats.get("calibration_rows"),
            "calibration_items": f"{len(inputs)} of {len(given)} (at most {self.MAX_CALIBRATION} are used)",
            "mean_layer_loss": sum(losses.values()) / len(losses) if losses else None,
            **({"blockwise": blockwise} if blockwise is not None else {}),
        }
