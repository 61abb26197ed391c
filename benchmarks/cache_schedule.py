"""Diffusion feature caching on the zoo UNet: uniform vs DP schedules, with and without DEC, at T = 30.

    python benchmarks/cache_schedule.py [--quick] [--json FILE] [--png FILE]

Zoo UNet (top-level keys): every method samples from the same 64 held-out noises (quick: 8), DDIM, T = 30 steps; K = 15 / 10 / 6 recompute
steps (suffix k2 / k3 / k5). Quality: PSNR (dB, over the batch, range [-1, 1]) against the uncached sampler's output
from the same noise: uniform_kN_psnr (DeepCache's fixed interval), dp_kN_psnr, dp_dec_kN_psnr; dp_minus_uniform_db
at k3; dp_dec_k3_classifiable_rate (zoo classifier, confidence >= 0.9; uncached_classifiable_rate for reference).
Cost: shallow_flops_fraction (FLOPs of the shallow graph / the full graph), ideal_speedup_k3 = T / (K + (T−K)·f),
speedup_k3 (ONNX Runtime, one intra-op thread: best of 3 interleaved runs of uncached / cached sampling, same
noises, same engine). PSNR runs use the
torch backend (the ORT bundles compute the same graphs; the speed run checks ORT against it). DiT (under "dit"): a
6-block random-init diffusers DiT, class label 3, K = 10 of T = 30, 16 noises (quick: 4), ONNX Runtime throughout;
its calibration uses 2 noises (each costs T²/2 shallow runs with metric=out).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from common import emit, machine, parse_args

T = 30
BUDGETS = {"k2": 15, "k3": 10, "k5": 6}
METHODS = {"uniform": "schedule=uniform,dec=false", "dp": "schedule=dp,dec=false", "dp_dec": "schedule=dp,dec=true"}


def tiny_dit():
    """A small random-init DiT (diffusers), class-conditioned, learned variance: the transformer case."""
    from diffusers import DiTTransformer2DModel
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                 num_layers=6, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                 norm_type="ada_norm_zero").eval()


def dit_part(args, n: int) -> dict:
    """K = T/3 on the DiT: uniform / DP / DP+DEC PSNR against uncached sampling, FLOPs fraction, ORT speed-up."""
    import graphopt
    from graphopt import metrics
    model = tiny_dit()
    example = {"hidden_states": torch.randn(1, 4, 8, 8), "timestep": torch.tensor([10]),
               "class_labels": torch.tensor([3])}
    noises = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(1234))
    labels = torch.full((n,), 3, dtype=torch.int64)  # the class the pass calibrated with
    out: dict = {"samples": n, "layers": 6}
    K = BUDGETS["k3"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for method, opts in METHODS.items():
            metric = f",metric={args.metric}" if args.metric and method != "uniform" else ""
            spec = f"cache-schedule{{budget={K},steps={T},samples=2,{opts}{metric}}}"
            c = graphopt.compile(model, spec, example_inputs=example)
            details = c.reports[-1]["details"]
            c.save(tmp / method)
            engine = graphopt.load(tmp / method, threads=1)
            if method == "uniform":
                reference = engine.sample(noise=noises, steps=T, cache=False, class_labels=labels)
                out["shallow_flops_fraction"] = round(details["shallow_flops_fraction"], 4)
                out["ideal_speedup_k3"] = round(details["ideal_speedup"], 3)
                out["point"] = details["point"]
            result = engine.sample(noise=noises, steps=T, class_labels=labels)
            out[f"{method}_k3_psnr"] = round(metrics.psnr(result, reference), 2)
            print(f"dit {method}_k3: {out[f'{method}_k3_psnr']} dB (schedule {details['schedule']})", flush=True)
            if method == "dp":
                times = {}
                for cache in (False, True) * 3:
                    t0 = time.perf_counter()
                    engine.sample(noise=noises, steps=T, cache=cache, class_labels=labels)
                    times.setdefault(cache, []).append(time.perf_counter() - t0)
                out["speedup_k3"] = round(min(times[False]) / min(times[True]), 3)
    out["dp_minus_uniform_db"] = round(out["dp_k3_psnr"] - out["uniform_k3_psnr"], 2)
    out["speedup_k3_of_ideal"] = round(out["speedup_k3"] / out["ideal_speedup_k3"], 3)
    return out


def main() -> None:
    def options(ap):
        ap.add_argument("--png", type=Path, help="write a picture of samples (uncached / uniform / DP / DP+DEC at k3)")
        ap.add_argument("--metric", choices=["l1", "l2", "cos", "out"], help="the DP schedules' metric (default: "
                        "the pass's)")
        ap.add_argument("--parts", default="zoo,dit", help="zoo (the zoo UNet, top-level keys) and/or dit (a tiny "
                        "random-init diffusers DiT, under 'dit')")
    args = parse_args(__doc__.splitlines()[0], options)
    import graphopt
    from graphopt import metrics, zoo
    torch.set_num_threads(2)
    n = 8 if args.quick else 64
    noises = zoo.diffusion_noises(n, seed=1234)  # held out: the pass calibrates on its own seeded noises
    m: dict = {"machine": machine(), "T": T, "samples": n, "dp_metric": args.metric or "pass default"}
    samples = {}
    parts = set(args.parts.split(","))
    if "dit" in parts:
        m["dit"] = dit_part(args, 4 if args.quick else 16)
    if "zoo" not in parts:
        emit(m, args.json)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = graphopt.compile("zoo:tiny-diffusion", backend="torch")
        base.save(tmp / "base")
        reference = graphopt.load(tmp / "base", backend="torch").sample(noise=noises, steps=T)
        samples["uncached"] = reference
        m["uncached_classifiable_rate"] = round(metrics.classifiable_rate(reference), 4)
        for suffix, K in BUDGETS.items():
            for method, opts in METHODS.items():
                metric = f",metric={args.metric}" if args.metric and method != "uniform" else ""
                spec = f"cache-schedule{{budget={K},steps={T},{opts}{metric}}}"
                c = graphopt.compile("zoo:tiny-diffusion", spec, backend="torch")
                details = c.reports[-1]["details"]
                out_dir = tmp / f"{method}_{suffix}"
                c.save(out_dir)
                out = graphopt.load(out_dir, backend="torch").sample(noise=noises, steps=T)
                m[f"{method}_{suffix}_psnr"] = round(metrics.psnr(out, reference), 2)
                if suffix == "k3":
                    samples[method] = out
                    m["shallow_flops_fraction"] = round(details["shallow_flops_fraction"], 4)
                    m["ideal_speedup_k3"] = round(details["ideal_speedup"], 3)
                    if method == "dp_dec":
                        m["dp_dec_k3_classifiable_rate"] = round(metrics.classifiable_rate(out), 4)
                        m["dp_k3_schedule"] = details["schedule"]
                    if method == "dp":
                        m["dp_k3_classifiable_rate"] = round(metrics.classifiable_rate(out), 4)
                print(f"{method}_{suffix}: {m[f'{method}_{suffix}_psnr']} dB (schedule {details['schedule']})",
                      flush=True)
        m["dp_minus_uniform_db"] = round(m["dp_k3_psnr"] - m["uniform_k3_psnr"], 2)
        m["dp_dec_minus_uniform_db"] = round(m["dp_dec_k3_psnr"] - m["uniform_k3_psnr"], 2)

        # Speed on ONNX Runtime: the same bundle with and without its schedule.
        metric = f",metric={args.metric}" if args.metric else ""
        c = graphopt.compile("zoo:tiny-diffusion", f"cache-schedule{{budget={BUDGETS['k3']},steps={T}{metric}}}")
        c.save(tmp / "ort")
        engine = graphopt.load(tmp / "ort", threads=1)  # one ORT thread: this small model's steps take ~1-3 ms
        engine.sample(noise=noises[:1], steps=T)  # warm-up
        times = {}
        for cache in (False, True) * 3:
            t0 = time.perf_counter()
            out = engine.sample(noise=noises, steps=T, cache=cache)
            times.setdefault(cache, []).append(time.perf_counter() - t0)
            if cache:
                m["ort_k3_psnr"] = round(metrics.psnr(out, reference), 2)  # the pass defaults
        m["uncached_ort_seconds"] = round(min(times[False]), 3)
        m["cached_ort_seconds"] = round(min(times[True]), 3)
        m["speedup_k3"] = round(min(times[False]) / min(times[True]), 3)
        m["speedup_k3_of_ideal"] = round(m["speedup_k3"] / m["ideal_speedup_k3"], 3)
    if args.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        rows = [("uncached", "uncached"), ("uniform", f"uniform K=10 ({m['uniform_k3_psnr']} dB)"),
                ("dp", f"DP K=10 ({m['dp_k3_psnr']} dB)"), ("dp_dec", f"DP + DEC K=10 ({m['dp_dec_k3_psnr']} dB)")]
        cols = min(8, n)
        fig, axes = plt.subplots(len(rows), cols, figsize=(cols * 1.1, len(rows) * 1.25))
        for r, (key, title) in enumerate(rows):
            for j in range(cols):
                ax = axes[r][j]
                ax.imshow(samples[key][j, 0].clamp(-1, 1).numpy(), cmap="gray", vmin=-1, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
            axes[r][0].set_ylabel(title, fontsize=6, rotation=0, ha="right", va="center")
        fig.suptitle(f"tiny-diffusion, DDIM T={T}: cached samples from the same noise", fontsize=8)
        fig.tight_layout()
        fig.savefig(args.png, dpi=150)
    emit(m, args.json)


if __name__ == "__main__":
    main()
