"""Text pipelines (`decoupleq{bits=2,group=64},dce`), their validation, and the pass manager that runs them."""
from __future__ import annotations

import dataclasses
import math
import time
import traceback
from typing import Any

from ..errors import GraphoptError, PassFailure
from ..progress import Progress
from . import guard


@dataclasses.dataclass
class PassContext:
    """What passes may use besides the program: calibration inputs, seed, progress display."""
    calibration: list[tuple] | None = None
    seed: int = 0
    progress: Progress = dataclasses.field(default_factory=lambda: Progress(enabled=False))
    device: str = "cpu"
    guard_samples: int = 4


@dataclasses.dataclass
class PassStep:
    cls: type
    config: dict[str, Any]

    @property
    def name(self) -> str:
        return self.cls.name

    def __str__(self) -> str:
        opts = ",".join(f"{k}={_fmt(v)}" for k, v in self.config.items())
        return f"{self.name}{{{opts}}}" if opts else self.name


def _fmt(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _split_top(text: str, sep: str, where: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth < 0:
                raise GraphoptError(f"{where}: unbalanced '{ch}' in '{text}'")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise GraphoptError(f"{where}: unclosed brace in '{text}'")
    parts.append("".join(cur))
    return parts


def _unquoted(value: str) -> str:
    """A value written in quotes (exclude='*a*|*b*', natural inside a shell's double quotes) means its contents."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def parse_pipeline(text: str, where: str = "--passes") -> list[PassStep]:
    """Parse and resolve a pipeline: unknown passes, options and bad values are errors listing what is allowed."""
    from ..passes import registry
    passes = registry()
    steps = []
    if not text.strip():
        return steps
    for item in _split_top(text, ",", where):
        item = item.strip()
        if not item:
            raise GraphoptError(f"{where}: empty pass name in '{text}'; write e.g. 'dce,fold-constants'")
        name, _, rest = item.partition("{")
        name = name.strip()
        if rest and not rest.endswith("}"):
            raise GraphoptError(f"{where}: '{item}' must look like NAME or NAME{{KEY=VALUE,...}}")
        if name not in passes:
            raise GraphoptError(f"{where}: unknown pass '{name}'; available: {', '.join(passes)} "
                                f"(see optimize --list-passes)")
        cls = passes[name]
        raw: dict[str, str] = {}
        body = rest[:-1].strip() if rest else ""
        if body:
            for kv in _split_top(body, ",", where):
                key, eq, value = kv.partition("=")
                key = key.strip()
                if not eq or not key:
                    raise GraphoptError(f"{where}: '{kv.strip()}' in '{item}' must be KEY=VALUE")
                if key not in cls.options:
                    allowed = ", ".join(f"{k} ({o.describe()}, default {_fmt(o.default)})"
                                        for k, o in cls.options.items()) or "none"
                    raise GraphoptError(f"{where}: pass '{name}' has no option '{key}'; options: {allowed}")
                if key in raw:
                    raise GraphoptError(f"{where}: option '{key}' given twice for pass '{name}'")
                raw[key] = _unquoted(value.strip())
        config = {k: opt.default for k, opt in cls.options.items()}
        for k, v in raw.items():
            config[k] = cls.options[k].parse(f"{where}: {name}{{{k}}}", v)
        cls.check_config(config, f"{where}: {name}")
        steps.append(PassStep(cls, config))
    return steps


def validate_needs(steps: list[PassStep], has_calibration: bool) -> None:
    """Requirement checks that must fail before capture or any expensive work."""
    for step in steps:
        if "calibration" in step.cls.needs and not has_calibration:
            raise GraphoptError(f"pass '{step.name}' needs calibration data: pass --calib FILE.pt "
                                f"(a torch.save'd list of input tuples) or calibration=[...]")


def validate_tasks(steps: list[PassStep], program_kind: str) -> None:
    for step in steps:
        if step.cls.tasks is not None and program_kind not in step.cls.tasks:
            raise GraphoptError(f"pass '{step.name}' applies to {'/'.join(sorted(step.cls.tasks))} programs, "
                                f"not '{program_kind}'; choose --task accordingly")


def run_pipeline(program, steps: list[PassStep], ctx: PassContext, on_error: str = "stop"):
    """Run passes in order; after each, lint and check numerics against the program the pass was given (the
    original until a lossy pass is kept; a lossy pass after another also reports its error against the original).

    A pass that raises or breaks its tolerance stops the run (PassFailure), or with on_error="skip" is rolled back
    (the previous program is kept) and recorded as such. Returns (program, reports, guard_seconds).
    """
    if on_error not in ("stop", "skip"):
        raise GraphoptError(f"--on-error '{on_error}': choose stop or skip")
    inputs = guard.guard_inputs(program, ctx.calibration, ctx.guard_samples)
    reference = original = guard.reference_outputs(program, inputs)
    reports, guard_seconds = [], 0.0
    extra_outputs = False  # once a pass appends outputs (cache-schedule), later guards compare the original ones
    for step in steps:
        instance = step.cls(**step.config)
        tolerance = instance.tolerance  # a pass may set it per instance (e.g. by bit width)
        report: dict[str, Any] = {
            "pass": step.name, "options": step.config, "exact": step.cls.exact, "metric": step.cls.metric,
            "tolerance": tolerance, "nodes_before": program.node_count(),
            "param_bytes_before": program.parameter_bytes(),
        }
        t0 = time.perf_counter()
        error = None
        candidate = None
        with ctx.progress.stage("pass", step.name):
            try:
                candidate, details = instance.run(program.copy(), ctx)
                report["details"] = details or {}
                for ep in candidate.methods.values():
                    ep.graph_module.graph.lint()
            except Exception as exc:  # a pass bug or a user-facing failure: either way roll back or stop
                error = exc
                report["traceback"] = traceback.format_exc()
        report["seconds"] = round(time.perf_counter() - t0, 4)
        if error is None:
            g0 = time.perf_counter()
            with ctx.progress.stage("guard", step.name):
                value = guard.check(candidate, reference, inputs, step.cls.metric,
                                    extra_outputs=extra_outputs or step.cls.adds_outputs)
                if reference is not original and not step.cls.exact:
                    total = guard.check(candidate, original, inputs, step.cls.metric,
                                        extra_outputs=extra_outputs or step.cls.adds_outputs)
                    report["error_vs_original"] = total if math.isfinite(total) else "inf"
            report["guard_seconds"] = round(time.perf_counter() - g0, 4)
            guard_seconds += report["guard_seconds"]
            report["error_metric"] = value if math.isfinite(value) else "inf"
            if not value <= tolerance:
                kind = "exact" if step.cls.exact else "lossy"
                against = "the original program" if reference is original else "the last lossy pass's program"
                error = GraphoptError(f"pass '{step.name}' ({kind}) broke its tolerance: {step.cls.metric} "
                                      f"{value:.3g} > {tolerance:g} against {against}")
        if error is not None:
            msg = str(error) if isinstance(error, GraphoptError) else \
                f"pass '{step.name}' raised {type(error).__name__}: {error}"
            report["status"] = "rolled back" if on_error == "skip" else "failed"
            report["error"] = msg
            report.update(nodes_after=report["nodes_before"], param_bytes_after=report["param_bytes_before"])
            reports.append(report)
            if on_error == "stop":
                raise PassFailure(f"{msg}; rerun with --on-error=skip to continue without it", report) from error
            ctx.progress.info(f"{msg}; rolled back (--on-error=skip)")
            continue
        program = candidate
        extra_outputs = extra_outputs or step.cls.adds_outputs
        if not step.cls.exact:  # later passes answer for their own change, not for this one's error
            g0 = time.perf_counter()  # (the original outputs only: outputs a pass appended are not compared)
            reference = guard.reference_outputs(program, inputs, {m: len(r[0]) for m, r in original.items() if r})
            guard_seconds += time.perf_counter() - g0
        report["status"] = "ok"
        report["headline"] = step.cls.headline(report["details"])
        report["nodes_after"] = program.node_count()
        report["param_bytes_after"] = program.parameter_bytes()
        reports.append(report)
    return program, reports, guard_seconds
