"""Layer skipping on the zoo LM: quality and decode speed against the fraction of blocks skipped, and
self-speculative decoding.

    python benchmarks/layer_skip.py [--quick] [--json FILE] [--png FILE]

Quality: held-out bits per byte of the skipped program (torch, plain forward) on evenly spaced windows of 256 tokens
(512; quick: 64), relative to the unskipped model, where 25 / 50 % of the 8 blocks are skipped: naive = the deepest
blocks before the last; static = layer-skip{skip=N,heal=true} (lowest block influence on the zoo calibration set,
first and last block kept, then the remaining norm weights tuned to the original's outputs):
{naive,static}_{25,50}_rel_increase, static_{25,50}_noheal_rel_increase (heal=false) and loss_{25,50}_rel_increase
(select=loss: greedy by calibration loss, no heal). Speed: ONNX Runtime greedy decode tokens/s of causal-lm bundles
(batch 1, 4 prompts x 64 tokens, end to end; median of 7 interleaved rounds, quick 3): unskipped_tokens_per_s, static_{25,50}_tokens_per_s (naive skips as many blocks,
so it runs at the same speed). Self-speculative (layer-skip{skip=N,self_speculative=true,heal=true}, the skipped
program drafts, the full one verifies): on 16 held-out prompts (quick: 4) x 128 tokens, batch 1, ORT:
self_spec_identical_rate (output equal to plain greedy), self_spec_speedup (tokens/s over plain decoding of the same
bundle), self_spec_mean_accepted_length, for N = 2 and 4 under self_spec_{25,50}; top-level keys: the faster.
Routers (layer-skip{mode=router,rate=r}, r = 0.25 / 0.5, trained on 128 calibration sequences of 256 tokens, as long
as the held-out windows; quick: 32):
router_{25,50}_rel_increase (each held-out window's decision from its first 64 tokens, then the whole window
scored with those blocks skipped), router_{25,50}_heldout_skip_rate (the average fraction of blocks it skipped),
router_{25,50}_tokens_per_s (ONNX If lowering) and router_{25,50}_where_tokens_per_s (gated Where lowering).
static_at_router_{25,50}_rate_rel_increase: non-adaptive skipping at the router's held-out skip rate (that share of
windows skipping one block more than the rest, the blocks in the router's order, no heal), the same-rate baseline.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from common import emit, interleaved_medians, machine, parse_args

N_BLOCKS = 8
FRACTIONS = {"25": 2, "50": 4}
PROMPT = 64  # router decisions on held-out windows come from their first PROMPT tokens


def main() -> None:
    def options(ap):
        ap.add_argument("--png", type=Path, help="write the quality-vs-speed plot here (needs matplotlib)")
        ap.add_argument("--parts", default="quality,router,speed,self_spec", help="which parts to run")
        ap.add_argument("--merge", type=Path, help="start from this earlier result (e.g. to rerun one part)")
    args = parse_args(__doc__.splitlines()[0], options)
    import graphopt
    from graphopt import metrics, zoo
    from graphopt.compiler.capture import capture
    from graphopt.compiler.pipeline import PassContext, parse_pipeline, run_pipeline
    from graphopt.passes.layer_skip import skip_blocks
    torch.set_num_threads(2)
    windows = 64 if args.quick else 512
    calibration = zoo.lm_calibration()
    base = capture("zoo:tiny-code-lm", task="single")

    def bits(program) -> float:
        return metrics.lm_bits_per_byte(lambda ids: program.run("forward", ids)[0], max_windows=windows)

    def skipped(spec: str):
        new, reports, _ = run_pipeline(base, parse_pipeline(spec), PassContext(calibration=calibration))
        return new, reports[0]["details"]

    parts = set(args.parts.split(","))
    m: dict = json.loads(args.merge.read_text()) if args.merge else {}
    m.update({"machine": machine(), "heldout_windows": windows, "blocks": N_BLOCKS})
    router_calibration = zoo.lm_calibration(n=32 if args.quick else 128, length=256)
    static_cache: dict = {}
    depth_cache: dict = {}

    def static_depth(paths) -> float:
        """rel_increase with these blocks skipped (no heal)"""
        key = frozenset(paths)
        if key not in depth_cache:
            prog = base.copy()
            prog.methods = {"forward": skip_blocks(base.methods["forward"], set(key))} if key else base.methods
            depth_cache[key] = bits(prog) / full - 1 if key else 0.0
        return depth_cache[key]
    full = bits(base) if parts & {"quality", "router"} else None
    if full is not None:
        m["unskipped_bits_per_byte"] = round(full, 4)
    for pct, k in FRACTIONS.items() if "quality" in parts else ():
        new, details = skipped(f"layer-skip{{skip={k}}}")
        m["block_influence"] = details.get("influence")
        m[f"static_{pct}_blocks"] = details["skipped"]
        m[f"static_{pct}_noheal_rel_increase"] = round(bits(new) / full - 1, 4)
        new, details = skipped(f"layer-skip{{skip={k},heal=true}}")
        m[f"static_{pct}_rel_increase"] = round(bits(new) / full - 1, 4)
        m[f"static_{pct}_heal"] = details.get("heal")
        new, details = skipped(f"layer-skip{{skip={k},select=loss}}")
        m[f"loss_{pct}_blocks"] = details["skipped"]
        m[f"loss_{pct}_rel_increase"] = round(bits(new) / full - 1, 4)
        naive = base.copy()
        paths = {f"model.model.layers.{i}" for i in range(N_BLOCKS - 1 - k, N_BLOCKS - 1)}
        naive.methods = {"forward": skip_blocks(base.methods["forward"], paths)}
        m[f"naive_{pct}_blocks"] = sorted(paths)
        m[f"naive_{pct}_rel_increase"] = round(bits(naive) / full - 1, 4)
    for pct, k in FRACTIONS.items() if "router" in parts else ():
        # routers: trained on more sequences (one decision per sequence); on each held-out window the decision is
        # taken from its first 64 tokens (the "prompt"), then the whole window is scored with those blocks skipped
        routed, details = run_pipeline(base, parse_pipeline(f"layer-skip{{mode=router,rate={k / N_BLOCKS}}}"),
                                       PassContext(calibration=router_calibration))[:2]
        details = details[0]["details"]
        m[f"router_{pct}_train"] = {key: details.get(key) for key in (
            "calib_skip_rate_in_graph", "oracle_mean_depth", "oracle_mean_cost", "routed_mean_depth",
            "routed_mean_cost", "static_mean_cost", "train_r2", "ridge_strength", "order")}
        decisions = []

        def routed_logits(ids, routed=routed):
            keep = routed.run("forward", ids[:, :PROMPT])[-1][0].tolist()
            off = frozenset(p for p, kk in zip(details["routed"], keep) if not kk)
            decisions.append(len(off))
            if off not in static_cache:
                prog = base.copy()
                prog.methods = {"forward": skip_blocks(base.methods["forward"], set(off))} if off else base.methods
                static_cache[off] = prog
            return static_cache[off].run("forward", ids)[0]
        m[f"router_{pct}_rel_increase"] = round(
            metrics.lm_bits_per_byte(routed_logits, max_windows=windows) / full - 1, 4)
        m[f"router_{pct}_heldout_skip_rate"] = round(sum(decisions) / (N_BLOCKS * len(decisions)), 4)
        # the same average skip rate without adapting: a share of the windows skips floor(depth) blocks, the rest
        # one more (the first blocks of the router's order, as static skipping picks them), no heal
        depth = sum(decisions) / len(decisions)
        lo = int(depth)
        order = details["order"]
        mix = [static_depth(order[:lo]), static_depth(order[:lo + 1])]
        m[f"static_at_router_{pct}_rate_rel_increase"] = round(mix[0] + (depth - lo) * (mix[1] - mix[0]), 4)
        print(pct, {key: v for key, v in m.items() if pct in key}, flush=True)

    tok = zoo.byte_tokenizer()
    prompts = [torch.tensor([tok.encode(p)]) for p in zoo.prompts(16)]
    with tempfile.TemporaryDirectory() as tmp:
        def build(spec: str | None, name: str):
            c = graphopt.compile("zoo:tiny-code-lm", spec, calibration=calibration if spec else None)
            c.save(Path(tmp) / name)
            return graphopt.load(Path(tmp) / name)

        def tokens_per_s(engine) -> dict[str, float]:
            t, n = time.perf_counter(), 0
            for p in prompts[:4]:
                n += engine.generate(p, 64, eos_token_id=[]).shape[1]
            return {"tokens_per_s": n / (time.perf_counter() - t)}
        engines = {}  # metric key -> engine; all built first, then timed in interleaved rounds
        if "speed" in parts:
            engines["unskipped_tokens_per_s"] = build(None, "full")
        for pct, k in FRACTIONS.items() if "speed" in parts else ():
            engines[f"static_{pct}_tokens_per_s"] = build(f"layer-skip{{skip={k}}}", f"s{pct}")
            for lowering in ("if", "where"):
                c = graphopt.compile("zoo:tiny-code-lm", f"layer-skip{{mode=router,rate={k / N_BLOCKS},"
                                     f"onnx={lowering}}}", calibration=router_calibration)
                c.save(Path(tmp) / f"r{pct}{lowering}")
                engine = graphopt.load(Path(tmp) / f"r{pct}{lowering}")
                engines[f"router_{pct}_tokens_per_s" if lowering == "if" else f"router_{pct}_where_tokens_per_s"] = engine
            kept = [engine.method("prefill")(p, torch.ones_like(p), torch.arange(p.shape[1])[None])[-1]
                    for p in prompts[:4]]
            m[f"router_{pct}_speed_prompts_skip_rate"] = round(
                float(sum((1 - r).sum() for r in kept)) / (N_BLOCKS * 4), 4)
        for engine in engines.values():
            engine.generate(prompts[0], 4)  # warm-up
        medians = interleaved_medians({key: (lambda e=e: tokens_per_s(e)) for key, e in engines.items()},
                                      rounds=3 if args.quick else 7)
        m.update({key: round(v["tokens_per_s"], 1) for key, v in medians.items()})
        if medians:
            print({key: m[key] for key in medians}, flush=True)
        for pct, k in FRACTIONS.items() if "self_spec" in parts else ():
            engine = build(f"layer-skip{{skip={k},self_speculative=true,heal=true}}", f"self{pct}")
            engine.generate(prompts[0], 4)
            engine.generate(prompts[0], 4, speculative="layer-skip")
            same, t_plain, t_spec, steps, verified, n = 0, 0.0, 0.0, 0, 0, 0
            for p in prompts[:4 if args.quick else 16]:
                t = time.perf_counter()
                plain = engine.generate(p, 128)
                t_plain += time.perf_counter() - t
                t = time.perf_counter()
                spec = engine.generate(p, 128, speculative="layer-skip")
                t_spec += time.perf_counter() - t
                same += int(torch.equal(plain, spec))
                n += 1
                steps += engine.last_stats["steps"]
                verified += engine.last_stats["verified_tokens"]
            m[f"self_spec_{pct}"] = {"identical_rate": round(same / n, 4), "speedup": round(t_plain / t_spec, 3),
                                     "mean_accepted_length": round(verified / steps, 3)}
            print("self-spec", pct, m[f"self_spec_{pct}"], flush=True)
    best = max(FRACTIONS, key=lambda pct: m.get(f"self_spec_{pct}", {}).get("speedup", 0))
    if f"self_spec_{best}" in m:  # self_spec ran now or came with --merge
        m["self_spec_skipped_fraction"] = int(best) / 100
        for key in ("identical_rate", "speedup", "mean_accepted_length"):
            m[f"self_spec_{key}"] = m[f"self_spec_{best}"][key]
    if args.png:
        plot(m, args.png)
    emit(m, args.json)


def plot(m: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    base = m["unskipped_tokens_per_s"]
    ax.scatter([base], [0], c="k", label="unskipped")
    for name, marker in (("naive", "x"), ("static_{}_noheal", "s"), ("static", "o")):
        xs, ys = [], []
        for pct in FRACTIONS:
            key = name.format(pct) if "{}" in name else f"{name}_{pct}"
            xs.append(m[f"static_{pct}_tokens_per_s"])
            ys.append(100 * m[f"{key}_rel_increase"])
        label = {"naive": "naive (deepest)", "static": "static + heal"}.get(name, "static, no heal")
        ax.plot(xs, ys, marker=marker, label=label)
    if all(f"router_{pct}_tokens_per_s" in m for pct in FRACTIONS):
        ax.plot([m[f"router_{pct}_tokens_per_s"] for pct in FRACTIONS],
                [100 * m[f"router_{pct}_rel_increase"] for pct in FRACTIONS], marker="^",
                label="router (If lowering; held-out skip " + " / ".join(
                    f"{100 * m[f'router_{pct}_heldout_skip_rate']:.0f} %" for pct in FRACTIONS) + ")")
    for pct in FRACTIONS:
        if f"self_spec_{pct}" not in m:
            continue
        ax.scatter([base * m[f"self_spec_{pct}"]["speedup"]], [0], marker="*", s=120,
                   label=f"self-speculative ({pct} % drafter)")
    ax.set_xlabel("ORT decode tokens/s (batch 1)")
    ax.set_ylabel("held-out bits/byte increase (%)")
    ax.set_title("zoo LM layer skipping: quality vs speed")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
