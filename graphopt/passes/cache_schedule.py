from __future__ import annotations

import numpy as np
import torch

from ..compiler import cache_schedule as cs
from ..metrics import psnr
from ..compiler import feature_cache as fc
from ..compiler.program import TensorSpec
from ..errors import GraphoptError
from .base import Option, Pass, register

_DIST = {
    "l1": lambda a, b: (a - b).abs().mean(),
    "l2": lambda a, b: ((a - b) ** 2).mean(),
    "cos": lambda a, b: 1 - torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0),
}


def _error_weights(scheduler_config: dict, T: int, kind: str) -> np.ndarray:
    """Per step, how much of an error in the predicted noise reaches the final sample (deterministic DDIM view):
    the step moves x by c_i·δ with c_i = √(1−ᾱ_prev) − √ᾱ_prev·√(1−ᾱ_t)/√ᾱ_t, and the remaining steps scale a
    change of x at level ᾱ_prev by about √(ᾱ_final/ᾱ_prev)."""
    from ..runtime.sampler import make_scheduler
    sched = make_scheduler(scheduler_config, kind)
    sched.set_timesteps(T)
    ac = sched.alphas_cumprod.double()
    ts = [int(t) for t in sched.timesteps]
    final = float(getattr(sched, "final_alpha_cumprod", ac[0]))
    w = np.zeros(T)
    for i, t in enumerate(ts):
        a_t = float(ac[t])
        a_prev = float(ac[ts[i + 1]]) if i + 1 < T else final
        c_i = np.sqrt(1 - a_prev) - np.sqrt(a_prev) * np.sqrt(1 - a_t) / np.sqrt(a_t)
        w[i] = abs(c_i) * np.sqrt(final / a_prev)
    return w


def _noise(eps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The noise prediction of models that also emit a learned variance (DiT: 2·C channels)."""
    return eps[:, :x.shape[1]] if eps.shape[1] == 2 * x.shape[1] else eps


@register
class CacheSchedule(Pass):
    """Diffusion feature caching: a shallow graph reuses a deep feature; recompute steps chosen by DP."""
    name = "cache-schedule"
    tasks = frozenset({"diffusion"})
    exact = False
    # The guard compares the full method's original outputs (they must not change); the schedule's own quality
    # (PSNR of cached against uncached sampling on the calibration noises) is in the report.
    metric = "max_rel"
    tolerance = 1e-5
    adds_outputs = True
    options = {
        "budget": Option(float, 0.34, "recompute steps: a fraction of the steps (< 1) or a count K (>= 1)",
                         min=0.0, max=1000.0),
        "steps": Option(int, 0, "sampler steps T the schedule is for; 0 = the plan's", min=0, max=1000),
        "point": Option(str, "auto", "cache point: auto (the input of the last up block) or up_blocks.K"),
        "metric": Option(str, "out", "what the schedule minimises: a feature distance (l1, l2, cos), or out: the "
                                    "shallow graph's noise-prediction error from reusing each cached feature, "
                                    "weighted by how much the sampler passes that step's error to the sample",
                         choices=("l1", "l2", "cos", "out")),
        "dec": Option(bool, False, "decoupled error correction: per step and channel a·F + b, least squares"),
        "schedule": Option(str, "dp", "dp, or uniform (DeepCache's fixed interval, for comparison)",
                           choices=("dp", "uniform")),
        "samples": Option(int, 8, "calibration noises the full sampler runs on", min=1, max=256),
    }

    @classmethod
    def headline(cls, details) -> str:
        return (f"{details['K']} of {details['T']} steps run in full, "
                f"ideal speed-up {details['ideal_speedup']:.2f}x")

    def run(self, program, ctx):
        from ..runtime.sampler import sample
        c = self.config
        plan = program.plan
        T = c["steps"] or int(plan["steps"])
        budget = c["budget"]
        if budget >= 1 and not float(budget).is_integer():
            raise GraphoptError(f"cache-schedule: budget={budget}: give a fraction below 1 or a whole number K")
        K = int(budget) if budget >= 1 else max(1, int(round(budget * T)))
        cs.check_budget(T, K)
        entry = plan["entry"]
        ep = program.methods[entry]
        cp = fc.find_point(ep, c["point"])
        point, f_val, axis = cp.name, fc.feature_value(cp), cp.channel_axis
        full = fc.full_with_feature(ep, cp)
        n_out = len(ep.graph_signature.user_outputs)
        roles = plan["inputs"]
        specs = program.inputs[entry]
        order = [s.name for s in specs]
        # Conditioning inputs (class labels, ...) take the example inputs' values during calibration.
        cond = {n: program.example_inputs[entry][order.index(n)] for n in roles["conditioning"]}
        full_mod = full.module()

        def call(mod, x, t, *extra):
            named = {roles["sample"]: x, roles["timestep"]: t, **cond}
            args = [named[n] for n in order] + list(extra)
            with torch.no_grad():
                out = mod(*args)
            return out if isinstance(out, (tuple, list)) else (out,)

        t_dtype = next(s.dtype for s in specs if s.name == roles["timestep"])
        shape = plan["sample_shape"]
        if any(not isinstance(d, int) for d in shape) or any(not isinstance(d, int) for d in f_val.shape):
            raise GraphoptError(f"cache-schedule needs static shapes (the shallow graph takes the cached feature as "
                                f"an input); the sample is {shape}: capture without --dynamic")
        g = torch.Generator().manual_seed(ctx.seed)
        s_dtype = getattr(torch, next(s.dtype for s in specs if s.name == roles["sample"]))
        noises = [torch.randn(1, *shape[1:], generator=g, dtype=s_dtype) for _ in range(c["samples"])]
        feats: list[list[torch.Tensor]] = []
        trajectories: list[list[tuple]] = []  # (x, t, eps) per step: the inputs and outputs of the full graph
        finals = []
        for noise in ctx.progress.track(noises, "cache-schedule: calibration"):
            seq: list[torch.Tensor] = []
            traj: list[tuple] = []

            def denoise(x, t, seq=seq, traj=traj):
                t = t.to(getattr(torch, t_dtype))
                out = call(full_mod, x, t)
                seq.append(out[n_out])
                traj.append((x, t, _noise(out[0], x)))
                return _noise(out[0], x)
            finals.append(sample(denoise, noise, plan["scheduler_config"], T, kind=plan.get("sampler", "ddim")))
            feats.append(seq)
            trajectories.append(traj)
        shallow_plain = fc.shallow_graph(ep, cp, False, tuple(program.example_inputs[entry]) + (
            torch.zeros(tuple(f_val.shape), dtype=f_val.dtype),)).module()
        D = np.zeros((T, T))
        if c["metric"] == "out":
            w = _error_weights(plan["scheduler_config"], T, plan.get("sampler", "ddim"))
            for s in range(T):
                for i in range(s + 1, T):
                    errs = [float(((_noise(call(shallow_plain, x, t, f[s])[0], x) - eps) ** 2).mean())
                            for f, (x, t, eps) in ((f, traj[i]) for f, traj in zip(feats, trajectories))]
                    D[s, i] = w[i] ** 2 * float(np.mean(errs))
        else:
            dist = _DIST[c["metric"]]
            for s in range(T):
                for i in range(s, T):
                    D[s, i] = float(np.mean([float(dist(f[i], f[s])) for f in feats]))
        if c["schedule"] == "dp":
            steps, cost = cs.dp_schedule(D, K)
        else:
            steps = cs.uniform_schedule(T, K)
            cost = cs.schedule_cost(D, steps)
        C = feats[0][0].shape[axis]
        scale = np.ones((T, C))
        shift = np.zeros((T, C))
        start = {}
        for i in range(T):
            start[i] = max(s for s in steps if s <= i)
        if c["dec"]:
            for i in range(T):
                s = start[i]
                if s == i:
                    continue
                Fs = torch.cat([f[s] for f in feats]).movedim(axis, 0).reshape(C, -1).double()
                Fi = torch.cat([f[i] for f in feats]).movedim(axis, 0).reshape(C, -1).double()
                ms, mi = Fs.mean(1), Fi.mean(1)
                var = ((Fs - ms[:, None]) ** 2).mean(1)
                cov = ((Fs - ms[:, None]) * (Fi - mi[:, None])).mean(1)
                a = torch.where(var > 1e-12, cov / var.clamp_min(1e-12), torch.ones_like(var))
                scale[i] = a.numpy()
                shift[i] = (mi - a * ms).numpy()
        example_feat = torch.zeros(tuple(f_val.shape), dtype=f_val.dtype)
        extra = (torch.ones(C, dtype=f_val.dtype), torch.zeros(C, dtype=f_val.dtype)) if c["dec"] else ()
        shallow_inputs = tuple(program.example_inputs[entry]) + (example_feat,) + extra
        shallow = fc.shallow_graph(ep, cp, c["dec"], shallow_inputs)

        # Quality on the calibration noises: the cached sampler against the uncached one.
        shallow_mod = shallow.module()
        psnrs = []
        for noise, ref in zip(noises, finals):
            state = {"i": 0, "F": None}

            def cached_denoise(x, t):
                i = state["i"]
                state["i"] += 1
                t = t.to(getattr(torch, t_dtype))
                if i in steps:
                    out = call(full_mod, x, t)
                    state["F"] = out[n_out]
                    return _noise(out[0], x)
                dec = (torch.tensor(scale[i], dtype=f_val.dtype), torch.tensor(shift[i], dtype=f_val.dtype))
                return _noise(call(shallow_mod, x, t, state["F"], *(dec if c["dec"] else ()))[0], x)
            out = sample(cached_denoise, noise, plan["scheduler_config"], T, kind=plan.get("sampler", "ddim"))
            psnrs.append(psnr(out, ref))
        flops_full = fc.flops(ep, tuple(program.example_inputs[entry]))
        flops_shallow = fc.flops(shallow, shallow_inputs)
        frac = flops_shallow / flops_full

        program.methods = {**program.methods, entry: full, "shallow": shallow}
        dtype = str(f_val.dtype).replace("torch.", "")
        program.inputs = {**program.inputs, "shallow": list(specs) + [
            TensorSpec("cached_feature", dtype, list(f_val.shape))] + (
            [TensorSpec("dec_scale", dtype, [C]), TensorSpec("dec_shift", dtype, [C])] if c["dec"] else [])}
        program.example_inputs = {**program.example_inputs, "shallow": shallow_inputs}
        names = list(program.output_names.get(entry) or [f"output_{k}" for k in range(n_out)])
        program.output_names = {**program.output_names, entry: names + ["cached_feature"], "shallow": names}
        program.plan = {**plan, "steps": T, "cache": {
            "point": point, "method": "shallow", "feature_output": n_out, "steps": T, "schedule": steps,
            "dec": {"scale": scale.round(6).tolist(), "shift": shift.round(6).tolist()} if c["dec"] else None}}
        return program, {
            "point": point, "T": T, "K": K, "schedule": steps, "schedule_kind": c["schedule"],
            "schedule_cost": cost, "uniform_cost": cs.schedule_cost(D, cs.uniform_schedule(T, K)),
            "calibration_psnr_db": float(np.mean(psnrs)), "shallow_flops_fraction": frac,
            "ideal_speedup": T / (K + (T - K) * frac),
        }
