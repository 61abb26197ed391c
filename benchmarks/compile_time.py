"""Time `optimize` with the default pipeline on tiny GPT-2 and Llama (one forward method, dynamic sequence length),
split by stage.

    python benchmarks/compile_time.py [--quick] [--json FILE]

Keys: <model>_<stage>_s for stage in capture, passes, guard, lowering, ort_check, total (median of the runs).
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path


from common import emit, machine, parse_args

from graphopt.testing import tiny_hf_lm


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    import graphopt
    runs = 1 if args.quick else 3
    metrics: dict = {"machine": machine(), "runs": runs}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("gpt2", "llama"):
            src = tiny_hf_lm(kind, Path(tmp) / kind, vocab=512, hidden=64, max_positions=512)
            samples: dict[str, list[float]] = {}
            for _ in range(runs):
                compiled = graphopt.compile(str(src), task="single", inputs=["input_ids:1xS:int64"],
                                            dynamic=["S=1..512"])
                for k, v in compiled.timings.items():
                    samples.setdefault(k, []).append(v)
                compiled.save(Path(tmp) / f"{kind}-out", force=True)
            for k, vs in samples.items():
                metrics[f"{kind}_{k}"] = round(statistics.median(vs), 3)
            metrics[f"{kind}_nodes_before"] = compiled.reports[0]["nodes_before"]
            metrics[f"{kind}_nodes_after"] = compiled.reports[-1]["nodes_after"]
    emit(metrics, args.json)


if __name__ == "__main__":
    main()
