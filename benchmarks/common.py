"""Shared benchmark plumbing: --quick / --json arguments, fixed seeds, interleaved timing, and the result writer."""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(description: str, extra=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="a smaller run that finishes in a few minutes on a CPU")
    ap.add_argument("--json", type=Path, help="write the metrics as JSON to this file")
    if extra:
        extra(ap)  # script-specific options
    args = ap.parse_args()
    random.seed(0)
    torch.manual_seed(0)
    return args


def machine() -> str:
    """What the figures were measured on. The CPU model matters: sessions' 2-core machines differ (on 2026-11-28 an
    AMD EPYC ran the zoo LM's fp32 ORT decode at 0.39x the tokens/s recorded on 2026-11-27)."""
    return f"{_cpu_model()} ({platform.machine()}), {torch.get_num_threads()} threads, torch {torch.__version__}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def emit(metrics: dict, path: Path | None) -> None:
    text = json.dumps(metrics, indent=1, sort_keys=True)
    print(text)
    if path:
        path.write_text(text + "\n")


def interleaved_medians(measures: dict[str, Callable[[], dict[str, float]]], rounds: int) -> dict[str, dict[str, float]]:
    """Run every measurement once per round, in turn, and return each one's per-key medians: drift on a shared
    machine (here +-10 % between runs) then hits all of them alike instead of whichever ran during a slow spell."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            runs[name].append(measure())
    return {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
