"""Weight quantization quality and speed on the zoo LM: rtn vs gptq vs decoupleq.

    python benchmarks/quant_quality.py [--quick] [--json FILE]

Quality: held-out bits per byte of the quantized program (the exported graph with graphopt::dq_linear, run by
torch) on evenly spaced held-out windows of 256 tokens (512 windows; quick: 64), calibrated on the zoo's 16 x 128
token calibration set. Keys: fp32_bits_per_byte, {method}_{setting}_bits_per_byte, _rel_increase (bits/byte / fp32
- 1), _quant_seconds; settings w2pc (2-bit per channel), w2g64, w3g128, w4g128 (quick: w2g64 and w4g128); methods
rtn, gptq, decoupleq and decoupleq_bw (with the block-wise stage, 256 steps per block); --methods picks a subset.
Speed: ONNX Runtime CPU greedy decode tokens/s of causal-lm bundles, fp32 vs decoupleq W4g128 / W2g64 (MatMulNBits,
accuracy_level 4 and 0), batch 1, 4 prompts x 64 new tokens, end to end (prefill and the Python loop included):
ort_{fp32,w4,w2,w4_acc0}_tokens_per_s, ort_{...}_vs_fp32_speedup; and the time inside ONNX Runtime per prompt's
prefill and per decode step: ort_{...}_prefill_ms, ort_{...}_decode_step_us, ort_{...}_vs_fp32_decode_step_speedup.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from common import emit, machine, parse_args

SETTINGS = {"w2pc": (2, -1), "w2g64": (2, 64), "w3g128": (3, 128), "w4g128": (4, 128)}
METHODS = {"rtn": "rtn{{bits={bits},group={group}}}", "gptq": "gptq{{bits={bits},group={group}}}",
           "decoupleq": "decoupleq{{bits={bits},group={group}}}",
           # decoupleQ with its block-wise stage (keys decoupleq_bw_*)
           "decoupleq_bw": "decoupleq{{bits={bits},group={group},blockwise=true,blockwise_steps=256}}"}


def bits_per_byte(program, windows: int) -> float:
    from graphopt import metrics
    return metrics.lm_bits_per_byte(lambda ids: program.run("forward", ids)[0], max_windows=windows)


def decode_speed(spec: str | None, prompts, new: int, tmp: Path) -> tuple[float, float, dict]:
    """(end-to-end tokens/s, ORT vs torch max_rel, {prefill_ms, decode_step_us}: the time inside the two
    methods' ONNX Runtime calls, per prompt / per step)"""
    import graphopt
    out = tmp / f"lm-{abs(hash(spec))}"
    c = graphopt.compile("zoo:tiny-code-lm", passes=spec)
    c.save(out, force=True)
    engine = graphopt.load(out)
    spent = {"prefill": [0.0, 0], "decode": [0.0, 0]}
    for name, acc in spent.items():
        method = engine.method(engine.plan[name])

        def timed(xs, run=method.native, acc=acc):
            t0 = time.perf_counter()
            r = run(xs)
            acc[0] += time.perf_counter() - t0
            acc[1] += 1
            return r
        method.native = timed
    engine.generate(prompts[0], 4)  # warm-up
    for acc in spent.values():
        acc[:] = [0.0, 0]
    t, n = time.perf_counter(), 0
    for p in prompts:
        n += engine.generate(p, new, eos_token_id=[]).shape[1]
    max_rel = max(c.manifest["ort_check"]["max_rel"].values())
    phases = {"prefill_ms": 1e3 * spent["prefill"][0] / spent["prefill"][1],
              "decode_step_us": 1e6 * spent["decode"][0] / spent["decode"][1]}
    return n / (time.perf_counter() - t), max_rel, phases


def main() -> None:
    import sys
    speed_only = "--speed-only" in sys.argv  # re-measure only the ORT decode speeds
    if speed_only:
        sys.argv.remove("--speed-only")
    args = parse_args(__doc__.splitlines()[0], lambda ap: ap.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}"))
    methods = [x for x in args.methods.split(",") if x]
    if set(methods) - set(METHODS):
        raise SystemExit(f"--methods: choose from {', '.join(METHODS)}")
    from graphopt import zoo
    from graphopt.compiler.capture import capture
    from graphopt.compiler.pipeline import PassContext, parse_pipeline, run_pipeline
    torch.set_num_threads(2)
    windows = 64 if args.quick else 512
    settings = {k: SETTINGS[k] for k in (("w2g64", "w4g128") if args.quick else SETTINGS)}
    m: dict = {"machine": machine(), "heldout_windows": windows}
    base = capture("zoo:tiny-code-lm", task="single")
    calibration = zoo.lm_calibration()
    m["fp32_bits_per_byte"] = round(bits_per_byte(base, windows), 4)
    print(f"fp32: {m['fp32_bits_per_byte']}", flush=True)
    for method in () if speed_only else methods:
        for name, (bits, group) in settings.items():
            spec = METHODS[method].format(bits=bits, group=group)
            t0 = time.perf_counter()
            program, reports, _ = run_pipeline(base, parse_pipeline(spec), PassContext(calibration=calibration))
            quant_s = reports[0]["seconds"]
            bpb = bits_per_byte(program, windows)
            key = f"{method}_{name}"
            m[f"{key}_bits_per_byte"] = round(bpb, 4)
            m[f"{key}_rel_increase"] = round(bpb / m["fp32_bits_per_byte"] - 1, 4)
            m[f"{key}_quant_seconds"] = round(quant_s, 2)
            print(f"{key}: {bpb:.4f} bits/byte (+{m[f'{key}_rel_increase']:.1%}), quantized in {quant_s:.1f} s "
                  f"({time.perf_counter() - t0:.0f} s with evaluation)", flush=True)

    tok = zoo.byte_tokenizer()
    prompts = [torch.tensor([tok.encode(p)]) for p in zoo.prompts(4)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32, _, base = decode_speed(None, prompts, 64, tmp)
        m["ort_fp32_tokens_per_s"] = round(fp32, 1)
        m["ort_fp32_prefill_ms"] = round(base["prefill_ms"], 2)
        m["ort_fp32_decode_step_us"] = round(base["decode_step_us"])
        for name, spec in [("w4", "decoupleq{bits=4,group=128,iters=2,ort_accuracy=4}"),
                           ("w2", "decoupleq{bits=2,group=64,iters=2,ort_accuracy=4}"),
                           ("w4_acc0", "decoupleq{bits=4,group=128,iters=2,ort_accuracy=0}")]:
            rate, max_rel, phases = decode_speed(spec, prompts, 64, tmp)
            m[f"ort_{name}_tokens_per_s"] = round(rate, 1)
            m[f"ort_{name}_prefill_ms"] = round(phases["prefill_ms"], 2)
            m[f"ort_{name}_decode_step_us"] = round(phases["decode_step_us"])
            m[f"ort_{name}_vs_fp32_decode_step_speedup"] = round(base["decode_step_us"] / phases["decode_step_us"], 2)
            m[f"ort_{name}_vs_fp32_speedup"] = round(rate / fp32, 2)
            m[f"ort_{name}_max_rel_vs_torch"] = float(f"{max_rel:.3g}")
            print(f"ORT {name}: {rate:.1f} tokens/s ({rate / fp32:.2f}x fp32), ORT vs torch max_rel {max_rel:.2g}",
                  flush=True)
    emit(m, args.json)


if __name__ == "__main__":
    main()
