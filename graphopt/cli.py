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
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch", "tensorrt"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="float dtype the program computes in; bfloat16/float16 need --backend torch (GPU "
                        "inference) and passes that support it (default float32)")
    p.add_argument("--report", metavar="FILE.json", help="also write the pass reports as JSON")
    p.add_argument("--on-error", default="stop", choices=["stop", "skip"],
                   help="a pass that fails or breaks its tolerance: stop (default) or roll it back and go on")
    p.add_argument("--unsafe-load", action="store_true",
                   help="allow unpickling a model file (runs code from the file: only for files you trust)")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    p.add_argument("--seed", type=int, default=0, help="seed for example inputs and calibration (default 0)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 23; 21 for older ONNX Runtime)")
    p.add_argument("--quiet", action="store_true", help="no progress or summary output")
    p.add_argument("--verbose", action="store_true", help="tracebacks and exporter logs")
    p.add_argument("--list-passes", action="store_true", help="list the passes with their options and exit")
    return p


def list_passes(out) -> None:
    from .passes import DEFAULT_PIPELINE, registry
    for name, cls in registry().items():
        kind = "exact" if cls.exact else f"lossy: {cls.tolerance_text()}"
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
    for col in ("pass", "status", "time s", "nodes", "params MB", "error / tolerance", "result"):
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
    if args.report and not Path(args.report).resolve().parent.is_dir():
        raise GraphoptError(f"--report {args.report}: its directory does not exist; create it or name another file")
    progress = Progress(enabled=not args.quiet)
    compiled = compile(args.model, args.passes, inputs=args.input, dynamic=args.dynamic, calibration=args.calib,
                       task=args.task, backend=args.backend, on_error=args.on_error, unsafe_load=args.unsafe_load,
                       seed=args.seed, opset=args.opset or DEFAULT_OPSET, progress=progress, verbose=args.verbose,
                       dtype=args.dtype)
    path = compiled.save(out, force=args.force)
    if args.report:
        report = {"passes": compiled.manifest["passes"], "timings": compiled.manifest["timings"],
                  "ort_check": compiled.manifest.get("ort_check")}
        Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
    if not args.quiet:
        _print_summary(compiled, path, progress.console)
    return 0


# ---- `graphopt` command: subcommands around bundles -------------------------------------------------------------
def build_graphopt_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graphopt", description="graphopt: optimize models and run bundles.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("optimize", help="same as the optimize command (graphopt optimize --help)", add_help=False)
    r = sub.add_parser("run", help="generate text with a causal-lm bundle, or sample with a diffusion bundle")
    r.add_argument("bundle", metavar="OUT", help="bundle directory written by optimize")
    r.add_argument("--prompt", help="prompt text")
    r.add_argument("--prompt-ids", metavar="IDS", help="prompt as comma-separated token ids (no tokenizer needed)")
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch", "tensorrt"])
    r.add_argument("--tokenizer", metavar="DIR", help="Hugging Face tokenizer directory (zoo LMs need none)")
    r.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    r.add_argument("--temperature", type=float, default=1.0)
    r.add_argument("--top-k", type=int, default=None)
    r.add_argument("--top-p", type=float, default=None)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--eos-id", type=int, default=None, help="stop at this token id (default: the model's)")
    r.add_argument("--speculative", action="store_true",
                   help="speculative decoding with the bundle's trained draft heads (draft-heads pass)")
    r.add_argument("--self-speculative", action="store_true",
                   help="speculative decoding drafted by the bundle's skipped program (layer-skip pass)")
    d = r.add_argument_group("diffusion bundles")
    d.add_argument("--steps", type=int, default=None, help="sampler steps (default: the plan's)")
    d.add_argument("--batch", type=int, default=4, help="samples to draw")
    d.add_argument("--sampler", choices=["ddim", "ddpm"], default=None, help="default: the plan's")
    d.add_argument("--no-cache", action="store_true", help="ignore the bundle's cache schedule (cache-schedule pass)")
    d.add_argument("--class-label", type=int, default=None, help="class label for class-conditioned models")
    d.add_argument("--save", metavar="FILE", help="write the samples: FILE.pt (tensor) or FILE.png (grid, needs "
                                                 "matplotlib)")
    r.add_argument("--verbose", action="store_true")
    t = sub.add_parser("train-heads", help="train a bundle's draft heads by self-distillation (in place)")
    t.add_argument("bundle", metavar="OUT", help="bundle compiled with --passes draft-heads")
    t.add_argument("--steps", type=int, default=1500, help="optimizer steps (default 1500)")
    t.add_argument("--data", metavar="FILE", help="prompts: .txt (byte-tokenizer bundles; paragraphs) or a .pt "
                                                  "list of 1-D token-id tensors (default for the zoo LM: its "
                                                  "training split)")
    t.add_argument("--prompts", type=int, default=512, help="prompts to continue for training data (default 512)")
    t.add_argument("--new-tokens", type=int, default=128, help="greedy tokens generated per prompt (default 128)")
    t.add_argument("--tree-size", type=int, default=None,
                   help="tree nodes (default: the size with the best measured tokens per second)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true")
    t.add_argument("--verbose", action="store_true")
    return p


class _TextStreamer:
    """Prints generated text as it arrives (batch 1): decodes the whole new sequence and prints the new suffix."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = ""
        self.prompt_seen = False

    def put(self, ids):
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.ids.append(int(ids.reshape(-1)[0]))
        text = self.tokenizer.decode(self.ids)
        # A trailing replacement char may be half of a multi-byte character: wait for the rest.
        stable = text.rstrip("\ufffd")
        if stable.startswith(self.printed) and len(stable) > len(self.printed):
            self.out.write(stable[len(self.printed):])
            self.out.flush()
            self.printed = stable

    def end(self):
        text = self.tokenizer.decode(self.ids)
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
        self.out.write("\n")
        self.out.flush()


def _load_tokenizer(engine, directory):
    if directory:
        try:
            from transformers import AutoTokenizer
            return AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
        except Exception as e:
            raise GraphoptError(f"--tokenizer '{directory}': cannot load a Hugging Face tokenizer ({type(e).__name__})")
    if engine.plan.get("tokenizer") == "byte":
        from .zoo.tokenizer import ByteTokenizer
        return ByteTokenizer()
    return None


def _sample_command(engine, args) -> int:
    """graphopt run OUT on a diffusion bundle: draw --batch samples, report the time, optionally save them."""
    import time

    import torch
    if args.batch < 1:
        raise GraphoptError(f"--batch must be >= 1, got {args.batch}")
    save = Path(args.save) if args.save else None
    if save is not None and save.suffix not in (".pt", ".png"):
        raise GraphoptError(f"--save '{save}': use a .pt (tensor) or .png (picture) file name")
    if save is not None and save.suffix == ".png":
        try:
            import matplotlib
        except ImportError:
            raise GraphoptError("--save FILE.png needs matplotlib: pip install 'graphopt[pictures]', or save a .pt")
    conditioning = {}
    for name in engine.plan["inputs"]["conditioning"]:
        if args.class_label is None:
            raise GraphoptError(f"this model is conditioned on '{name}': pass --class-label N")
        conditioning[name] = torch.full((args.batch,), args.class_label, dtype=torch.int64)
    cache = engine.plan.get("cache") is not None and not args.no_cache
    if cache and args.steps is not None and args.steps != engine.plan["cache"]["steps"]:
        raise GraphoptError(f"--steps {args.steps}: this bundle's cache schedule is for {engine.plan['cache']['steps']}"
                            f" steps; pass --steps {engine.plan['cache']['steps']}, or --no-cache")
    t0 = time.perf_counter()
    samples = engine.sample(seed=args.seed, steps=args.steps, sampler=args.sampler, batch=args.batch,
                            cache=not args.no_cache, **conditioning)
    took = time.perf_counter() - t0
    steps = args.steps or engine.plan["steps"]
    print(f"[graphopt] {args.batch} samples of {list(samples.shape[1:])}, {steps} steps "
          f"({'cache schedule: ' + str(len(engine.plan['cache']['schedule'])) + ' full steps' if cache else 'no cache'}"
          f"), {args.backend}: {took:.2f} s")
    if save is not None:
        if save.suffix == ".pt":
            torch.save(samples, save)
        else:
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            img = samples.float().clamp(-1, 1)
            fig, axes = plt.subplots(1, args.batch, figsize=(1.2 * args.batch, 1.3), squeeze=False)
            for ax, x in zip(axes[0], img):
                ax.imshow(x[0].numpy() if x.shape[0] != 3 else (x.permute(1, 2, 0).numpy() + 1) / 2,
                          cmap="gray", vmin=-1, vmax=1)
                ax.axis("off")
            fig.savefig(save, dpi=120, bbox_inches="tight")
        print(f"[graphopt] wrote {save}")
    return 0


def run_command(args) -> int:
    import time

    import graphopt
    engine = graphopt.load(args.bundle, backend=args.backend)
    if engine.plan.get("kind") == "diffusion":
        return _sample_command(engine, args)
    if engine.plan.get("kind") != "causal-lm":
        raise GraphoptError(f"'{args.bundle}' is a {engine.plan.get('kind')} bundle; graphopt run works with "
                            f"causal-lm and diffusion bundles (optimize --task causal-lm / diffusion)")
    tokenizer = _load_tokenizer(engine, args.tokenizer)
    if args.prompt_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise GraphoptError(f"--prompt-ids '{args.prompt_ids}': expected comma-separated integers")
    elif args.prompt is not None:
        if tokenizer is None:
            raise GraphoptError("this bundle has no built-in tokenizer: pass --tokenizer DIR, or --prompt-ids")
        ids = tokenizer.encode(args.prompt)
        if hasattr(ids, "input_ids"):
            ids = ids.input_ids
    else:
        raise GraphoptError("give --prompt TEXT or --prompt-ids 1,2,3")
    if args.speculative and args.self_speculative:
        raise GraphoptError("choose one of --speculative (draft heads) and --self-speculative (layer skip)")
    speculative = "heads" if args.speculative else "layer-skip" if args.self_speculative else False
    if speculative:
        from .runtime.speculative import check_ready
        check_ready(engine, speculative)  # before the prompt is echoed
    if tokenizer is not None and args.prompt is not None:
        sys.stdout.write(args.prompt)
        streamer = _TextStreamer(tokenizer, sys.stdout)
    else:
        streamer = None
    t0 = time.perf_counter()
    first = []

    class _Timer:
        def put(self, x):
            if streamer is not None:
                streamer.put(x)
            if len(first) < 2:
                first.append(time.perf_counter())

        def end(self):
            if streamer is not None:
                streamer.end()
    new = engine.generate(ids, args.max_new_tokens, eos_token_id=args.eos_id, do_sample=args.do_sample,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          streamer=_Timer(), speculative=speculative)
    total = time.perf_counter() - t0
    n = new.shape[1]
    if streamer is None:
        print(",".join(str(int(t)) for t in new[0]))
    ttft = (first[1] - t0) * 1000 if len(first) > 1 else float("nan")
    decode_s = total - (first[1] - t0) if len(first) > 1 else total
    rate = (n - 1) / decode_s if n > 1 and decode_s > 0 else float("nan")
    print(f"[graphopt] {n} tokens in {total:.2f} s ({args.backend}): first token {ttft:.1f} ms, "
          f"decode {rate:.1f} tokens/s", file=sys.stderr)
    if engine.last_stats:
        st = engine.last_stats
        print(f"[graphopt] speculative: {st['steps']} verify steps, mean accepted tokens per step "
              f"{st['mean_accepted_length']:.2f}", file=sys.stderr)
    return 0


def train_heads_command(args) -> int:
    from .compiler.train_heads import train_heads
    from .progress import Progress
    report = train_heads(args.bundle, steps=args.steps, data=args.data, prompts=args.prompts,
                         new_tokens=args.new_tokens, seed=args.seed, tree_size=args.tree_size,
                         progress=Progress(enabled=not args.quiet))
    print(f"[graphopt] trained {len(report['top1_accuracy'])} heads in {report['seconds']} s: top-1 accuracy "
          f"{', '.join(f'{a:.2f}' for a in report['top1_accuracy'])}; tree of {report['tree_size']} nodes, "
          f"expected {report['expected_accepted_length']:.2f} tokens per step")
    return 0


def graphopt_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "optimize":
        return main(argv[1:])
    parser = build_graphopt_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return train_heads_command(args) if args.command == "train-heads" else run_command(args)
    except GraphoptError as e:
        if args.verbose:
            raise
        print(f"graphopt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if args.verbose:
            raise
        print(f"graphopt {args.command}: internal error: {type(e).__name__}: {e} (rerun with --verbose)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
