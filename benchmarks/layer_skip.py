"""Static layer skipping on the zoo LM: quality and decode speed against the fraction of blocks skipped.

    python benchmarks/layer_skip.py [--quick] [--json FILE]

Quality: held-out bits per byte of the skipped program (torch, plain forward) on evenly spaced windows of 256 tokens
(512; quick: 64), relative to the unskipped model: {naive,static}_{25,50}_rel_increase, where 25 / 50 % of the 8
blocks are skipped, naive = the deepest blocks before the last, static = layer-skip{skip=N} (lowest block influence
on the zoo calibration set, first and last block kept). No healing yet, so static_25_noheal_rel_increase equals
static_25_rel_increase. Speed: ONNX Runtime greedy decode tokens/s of causal-lm bundles (batch 1, one intra-op
thread, 4 prompts x 64 tokens): unskipped_tokens_per_s, static_{25,50}_tokens_per_s (naive skips as many blocks;
its speed is not measured separately). Routers and self-speculative decoding are not implemented yet (no keys).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from common import emit, machine, parse_args

N_BLOCKS = 8
FRACTIONS = {"25": 2, "50": 4}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
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

    m: dict = {"machine": machine(), "heldout_windows": windows, "blocks": N_BLOCKS}
    full = bits(base)
    m["unskipped_bits_per_byte"] = round(full, 4)
    for pct, k in FRACTIONS.items():
        new, reports, _ = run_pipeline(base, parse_pipeline(f"layer-skip{{skip={k}}}"),
                                       PassContext(calibration=calibration))
        m[f"static_{pct}_blocks"] = reports[0]["details"]["skipped"]
        m[f"static_{pct}_rel_increase"] = round(bits(new) / full - 1, 4)
        naive = base.copy()
        paths = {f"model.model.layers.{i}" for i in range(N_BLOCKS - 1 - k, N_BLOCKS - 1)}
        naive.methods = {"forward": skip_blocks(base.methods["forward"], paths)}
        m[f"naive_{pct}_blocks"] = sorted(paths)
        m[f"naive_{pct}_rel_increase"] = round(bits(naive) / full - 1, 4)
        print(pct, {key: v for key, v in m.items() if pct in key}, flush=True)
    m["static_25_noheal_rel_increase"] = m["static_25_rel_increase"]
    m["block_influence"] = reports[0]["details"]["influence"]

    tok = zoo.byte_tokenizer()
    prompts = [torch.tensor([tok.encode(p)]) for p in zoo.prompts(4)]
    with tempfile.TemporaryDirectory() as tmp:
        def speed(spec: str | None, name: str) -> float:
            c = graphopt.compile("zoo:tiny-code-lm", spec, calibration=calibration if spec else None)
            c.save(Path(tmp) / name)
            engine = graphopt.load(Path(tmp) / name, threads=1)
            engine.generate(prompts[0], 4)
            t, n = time.perf_counter(), 0
            for p in prompts:
                n += engine.generate(p, 64, eos_token_id=[]).shape[1]
            return round(n / (time.perf_counter() - t), 1)
        m["unskipped_tokens_per_s"] = speed(None, "full")
        for pct, k in FRACTIONS.items():
            m[f"static_{pct}_tokens_per_s"] = speed(f"layer-skip{{skip={k}}}", f"s{pct}")
            print(pct, m[f"static_{pct}_tokens_per_s"], "tok/s", flush=True)
    emit(m, args.json)


if __name__ == "__main__":
    main()
