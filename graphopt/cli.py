"""`optimize` console script: a thin layer over graphopt.api.compile."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import GraphoptError

PROG = "optimize"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Capture a PyTorch model, optimize its graph and write an engine bundle.",
        epilog="MODEL: a .pt2 archive, a Hugging Face model directory, package.module:factory, zoo:NAME, "
               "or a pickled nn.Module (with --unsafe-load).")
    p.add_argument("model", nargs="?", metavar="MODEL", help="model source")
    p.add_argument("-o", "--output", metavar="OUT", help="bundle directory to write")
    p.add_argument("--passes", metavar="SPEC", default=None,
                   help="pipeline, e.g. 'remove-noops,fold-constants{max_growth=2},dce' (default: the exact "
                        "clean-up passes)")
    p.add_argument("--task", default="auto", choices=["auto", "single", "causal-lm", "diffusion"])
    p.add_argument("--input", action="append", default=[], metavar="NAME:SHAPE:DTYPE",
                   help="example input, repeatable: input_ids:1x16:int64, symbolic: input_ids:1xS:int64, "
                        "integer value range: ids:1x16:int64:0..1000")
    p.add_argument("--dynamic", action="append", default=[], metavar="NAME=MIN..MAX",
                   help="range of a symbolic dim used in --input, e.g. S=1..512")
    p.add_argument("--calib", metavar="FILE.pt", help="calibration data: a torch.save'd list of input tuples")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    p.add_argument("--report", metavar="FILE.json", help="also write the pass reports as JSON")
    p.add_argument("--on-error", default="stop", choices=["stop", "skip"],
                   help="a pass that fails or breaks its tolerance: stop (default) or roll it back and go on")
    p.add_argument("--unsafe-load", action="store_true",
                   help="allow unpickling a model file (runs code from the file: only for files you trust)")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    p.add_argument("--seed", type=int, default=0, help="seed for example inputs and calibration (default 0)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 21)")
    p.add_argument("--quiet", action="store_true", help="no progress or summary output")
    p.add_argument("--verbose", action="store_true", help="tracebacks and exporter logs")
    p.add_argument("--list-passes", action="store_true", help="list the passes with their options and exit")
    return p


def list_passes(out) -> None:
    from .passes import DEFAULT_PIPELINE, registry
    for name, cls in registry().items():
        kind = "exact" if cls.exact else f"lossy: {cls.metric} <= {cls.tolerance:g}"
        needs = f"; needs {', '.join(sorted(cls.needs))}" if cls.needs else ""
        print(f"{name}  ({kind}{needs})", file=out)
        print(f"    {cls.summary()}", file=out)
        for key, opt in cls.options.items():
            default = str(opt.default).lower() if isinstance(opt.default, bool) else opt.default
            print(f"    {key}={default}  [{opt.describe()}]  {opt.doc}", file=out)
    print(f"\ndefault pipeline: {DEFAULT_PIPELINE}", file=out)


def _print_summary(compiled, out_path: Path, console) -> None:
    from rich.table import Table
    table = Table(title=f"graphopt: {out_path}", title_justify="left")
    for col in ("pass", "status", "time s", "nodes", "params MB", "error / tolerance"):
        table.add_column(col)
    for row in compiled.summary_rows():
        table.add_row(*row)
    console.print(table)
    t = compiled.timings
    stages = ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in t.items() if k != "total_s")
    console.print(f"total {t.get('total_s', 0):.2f} s ({stages})", markup=False)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verbose:
        import warnings
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        return _run(args, parser)
    except GraphoptError as e:
        if args.verbose:
            raise
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:  # an internal bug: still one line unless --verbose
        if args.verbose:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"{PROG}: internal error: {type(e).__name__}: {msg} (rerun with --verbose for the traceback; "
              f"nothing was written)", file=sys.stderr)
        return 1


def _run(args, parser) -> int:
    if args.list_passes:
        list_passes(sys.stdout)
        return 0
    if not args.model:
        raise GraphoptError("missing MODEL: give a model source (see optimize --help)")
    if not args.output:
        raise GraphoptError("missing -o OUT: name the bundle directory to write")
    from .api import compile
    from .compiler.bundle import check_destination
    from .compiler.onnx_lower import DEFAULT_OPSET
    from .progress import Progress
    out = Path(args.output)
    check_destination(out, args.force)
    progress = Progress(enabled=not args.quiet)
    compiled = compile(args.model, args.passes, inputs=args.input, dynamic=args.dynamic, calibration=args.calib,
                       task=args.task, backend=args.backend, on_error=args.on_error, unsafe_load=args.unsafe_load,
                       seed=args.seed, opset=args.opset or DEFAULT_OPSET, progress=progress, verbose=args.verbose)
    path = compiled.save(out, force=args.force)
    if args.report:
        report = {"passes": compiled.manifest["passes"], "timings": compiled.manifest["timings"],
                  "ort_check": compiled.manifest.get("ort_check")}
        Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
    if not args.quiet:
        _print_summary(compiled, path, progress.console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
