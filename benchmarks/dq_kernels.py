"""GPU check and timing of graphopt's Triton dq_linear kernels against torch bf16 linear and torch's int4 matmul.

    python benchmarks/dq_kernels.py [--quick] [--json FILE]        (needs a CUDA GPU; exits 2 without one)

1. Correctness on this GPU: bits 2/3/4/8 x group 32/128/per channel x M 1, 3, 70 (the GEMV kernels at M <= 4,
   all GEMMs at 70, whole and split) with fp16 activations, bits 2/4 group 64 with bf16, and bits 2/3/4/8 x group 128/per channel
   x M 16 with bf16 and fp32 (all GEMMs, whole and split over 3 K ranges, and split_k="auto"), against
   dq_linear_reference (rel L2 error); key `check_failures`.
   Every swept configuration is checked too before it is timed.
2. Sweep (on the two larger shapes) at M = 1 (the "units" GEMV family, plain, with biased codes, software
   pipelined and in fp16x2 ("units_h2"), over rows per program x warps x K step; the "dequant" GEMV) and
   M = 16, 64 (the "planes", "planes8", "scaled" and "scaled8" GEMMs over tiles, pipeline stages and split K,
   and the "dequant" GEMM) for W4g128 and W2g64 (`--sweep h2`: only the "units_h2" GEMVs at M = 1, on every
   shape): the best configuration per shape and its time, and the default configuration's time. At M = 1 also
   `*_read_ceiling_us`: a kernel that only streams the same number of bytes. Correctness checks and the
   compilation of every timed configuration run first in `--jobs` processes (spawned; Triton's compiler is
   single-threaded and dominated the run time), so the timing loop finds Triton's disk cache warm.
3. For (K, N) in {(4096, 4096), (8192, 8192), (4096, 14336)}, M in {1, 16, 64}, bits 2 (group 64) and 4 (group
   128), bf16 activations: GPU microseconds per call (graph_us: calls replayed in a CUDA graph, so Python launch
   overhead is excluded, over enough rotated copies of the weights that every call reads them from HBM, not
   L2) for graphopt's default and best-swept configuration, torch bf16 linear and torch int4 (_weight_int4pack_mm,
   group 128), timed the same way; the fraction of the card's measured copy bandwidth that the bytes read (packed
   weights, scales/zeros, activations) and written represent; and `*_eager_us`: one eager call as Python code sees
   it (triton.testing.do_bench, L2 flushed, launch overhead included).
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

from common import emit, parse_args

SHAPES = [(4096, 4096), (8192, 8192), (4096, 14336)]
SETTINGS = {4: 128, 2: 64}  # bits -> group
# M = 1: the "units" GEMV family: plain (the default; the two runs that were within 2 % of it on the H100,
# 2026-11-27), "units_hi" (biased codes), and both software-pipelined forms ("_pf": next K step in registers; "_sw":
# Triton's pipeliner, 3 stages; runs of up to 8 units) over rows per program x warps x K step in thread runs
# (k_runs; offline SASS: a K step shorter than one run per thread replicates work across threads, 1.3-2x the
# instructions per code, so none is swept; fewer warps give more, shorter K steps to overlap); and the older
# "dequant" GEMV. Block_n 4, "reduce" and the planes GEMM at M = 1 were slower (2026-11-27); "_pf" needs ~250
# registers at 8 rows, so fewer of its forms are swept.
# "units_h2" (fp16x2 arithmetic, 2026-11-28, untimed when added; offline SASS 2.9 / 2.5 instructions per code at
# W4g128 / W2g64 against units_hi's 4.1 / 3.9): 8 rows (the units default), 4 rows (fewer registers: W2 needs ~170
# at 8), 2 warps (shorter K steps), and "units_h2_r2" (runs of 2 words: W2 2.8 with 124 registers at 8 rows; W4 3.1
# with 128 at 16 rows). `--sweep h2` times only these and the default at M = 1, on every shape.
# Stop 28 (untimed when added): full K steps load without masks, and W2 at batch 1 with the default tile is capped at
# 128 registers (maxnreg; uncapped, units_hi takes 158 and units_h2 166: 3 programs per SM instead of 4). A named
# tile gets no cap, so "units_hi" 8 x 4 warps times the default's kernel uncapped, and "units_h2" with maxnreg=128
# the fp16x2 kernel capped (at W4 the cap is not the default: there it times the cap's cost).
H2_SWEEP = ([dict(gemv="units_h2", block_n=bn, num_warps=nw) for bn, nw in ((8, 4), (4, 4), (8, 2))]
            + [dict(gemv="units_h2_r2", block_n=bn, num_warps=4) for bn in (8, 16)]
            + [dict(gemv="units_hi", block_n=8, num_warps=4),
               dict(gemv="units_h2", block_n=8, num_warps=4, maxnreg=128)])
GEMV_SWEEP = ([dict(gemv="units", block_n=8, num_warps=4, k_runs=2), dict(gemv="units", block_n=16, num_warps=4),
               dict(gemv="units_hi", block_n=8, num_warps=4)]
              + [dict(gemv=g, block_n=bn, num_warps=nw, k_runs=1) for g, bn, nw in
                 itertools.product(("units_sw", "units_hi_sw"), (8, 16), (1, 2, 4))]
              + [dict(gemv=g, block_n=8, num_warps=nw, k_runs=2) for g, nw in
                 itertools.product(("units_sw", "units_hi_sw"), (1, 2))]
              + [dict(gemv=g, block_n=8, num_warps=nw, k_runs=1) for g, nw in
                 itertools.product(("units_pf", "units_hi_pf"), (1, 2))]
              + [dict(gemv="dequant")]
              + H2_SWEEP)
# M = 16, 64: the tensor-core GEMMs over tiles and pipeline depth ("planes"/"planes8": integer codes, scaled per
# group after the dot; "scaled"/"scaled8": operand dequantized in registers), and the older "dequant" GEMM; the
# tiles are the best four of the 2026-11-27 sweep. 8 warps or 16 columns per program were 2-7x slower then.
# Split K (K ranges per tile, fp32 partials summed after): at 16 rows one tile per program gives N / block_n
# programs, ~2 per SM at N = 8192, where the registers and shared memory would let 3-6 run (offline sm_90 SASS,
# 2026-11-27, split kernels: planes W4 64 x 128 x 4 stages 121 registers, scaled W2 same tile 84, scaled8 W2
# 32 x 256 x 2 stages 128); the splits below fill one wave of those slots, "auto" computes that from the compiled
# kernel.
# split_k=1 names the unsplit kernels: without it the launcher splits K itself (default_split).
TILES16 = ((32, 512, 4), (64, 128, 4), (64, 256, 2), (32, 256, 2))  # (block_n, block_k, num_stages)
SPLITS16 = ([dict(gemm=g, block_n=64, block_k=128, num_stages=4, split_k=sk)
             for g, sk in itertools.product(("planes", "scaled"), (2, 4, "auto"))]
            + [dict(gemm="planes", block_n=32, block_k=256, num_stages=3, split_k=2),
               dict(gemm="scaled8", block_n=32, block_k=256, num_stages=2, split_k=2), dict(split_k="auto")])
GEMM_SWEEP = {16: [dict(gemm=g, block_n=bn, block_k=bk, num_stages=st, split_k=1) for g, (bn, bk, st) in
                   itertools.product(("planes", "planes8", "scaled", "scaled8"), TILES16)]
              + SPLITS16 + [dict(gemm="dequant", block_n=32, block_k=256)],
              64: [dict(gemm=g, block_n=bn, block_k=bk, split_k=1) for g, (bn, bk) in
                   itertools.product(("planes", "scaled"), ((64, 128), (32, 256)))]
              + [dict(gemm=g, block_n=64, block_k=128, split_k=sk) for g, sk in
                 itertools.product(("planes", "scaled"), (2, 4, "auto"))]
              + [dict(gemm="dequant", block_n=32, block_k=128)]}
# --sweep gemm16: the three planes kernels at the M = 16 defaults' tile
# --sweep previous: the defaults before the H200 sweep of 2026-11-28, on every shape (4096² included)
PREVIOUS = {1: [dict(gemv="units")],
            16: [dict(gemm="planes", block_n=32, block_k=512, num_stages=4, split_k=1),
                 dict(gemm="planes8", block_n=32, block_k=512, num_stages=4, split_k=1)],
            64: [dict(gemm="planes", block_n=64, block_k=128, split_k=1),
                 dict(gemm="dequant", block_n=32, block_k=128)]}
# (entries without split_k get the launcher's default split)
GEMM16_VARIANTS = ([dict(gemm=g) for g in ("planes", "planes8", "scaled", "scaled8", "dequant")]
                   + [dict(gemm=g, block_n=64, block_k=256, num_stages=2) for g in ("planes8", "scaled", "scaled8")]
                   + SPLITS16)
L2_SPAN = 160 << 20  # bytes the rotated copies of a problem cover: > 3x the H100's 50 MB L2


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def quantized(bits: int, group: int, N: int, K: int, dt: torch.dtype, gen: torch.Generator, device: str = "cuda"):
    from graphopt.compiler.quantize import pack
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (N, K), dtype=torch.int8, generator=gen)
    G = 1 if group == -1 else K // group
    scale = (torch.rand(N, G, generator=gen) * 0.02 + 0.005).to(device, dt)
    zero = (torch.randn(N, G, generator=gen) * 0.01).to(device, dt)
    return pack(q, bits).to(device), scale, zero


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def correctness_cases() -> list[tuple]:
    """(index, bits, group, M, dtype name) of every correctness case."""
    cases = list(itertools.product((2, 3, 4, 8), (32, 128, -1), (1, 3, 70), ("fp16",)))
    cases += list(itertools.product((2, 4), (64,), (1, 3, 70), ("bf16",)))  # M = 16: checked in the sweep
    cases += list(itertools.product((2, 3, 4, 8), (128, -1), (16,), ("bf16", "fp32")))
    return [(i, *c) for i, c in enumerate(cases)]


def check_cases(cases: list[tuple], device: str = "cuda") -> tuple[int, float, list[str]]:
    """Every kernel variant of each case against dq_linear_reference: (runs, worst rel L2, failures). Each case's
    data comes from its own seed, so the cases can be split across processes."""
    from graphopt.kernels.dq_triton import dq_linear_reference, dq_linear_triton, planes_fit
    K, N, runs, worst, failures = 1024, 320, 0, 0.0, []
    for index, bits, group, M, dt_name in cases:
        dt = DTYPES[dt_name]
        gen = torch.Generator().manual_seed(1000 + index)
        packed, scale, zero = quantized(bits, group, N, K, dt, gen, device)
        x = torch.randn(M, K, generator=gen).to(device, dt)
        bias = torch.randn(N, generator=gen).to(device, dt)
        ref = dq_linear_reference(x, packed, scale, zero, bits, group, K, bias=bias)
        # the pipelined GEMVs with 256-wide K steps: 4 steps, so the prefetch of a next step is exercised; the plain
        # units GEMVs too: their default K step is longer than K here (only the masked tail step runs), 256 gives 4
        # full (unmasked) steps
        variants = ([{}] + [dict(gemv=v) for v in ("units", "units_hi", "reduce", "dequant")]
                    + [dict(gemv=v, block_k=256) for v in ("units", "units_hi", "units_pf", "units_sw", "units_hi_pf",
                                                           "units_hi_sw")]
                    if M <= 4 else
                    [{}, dict(gemm="dequant"), dict(split_k="auto")]
                    + [dict(gemm=g, block_k=256, split_k=sk) for g, u in (("planes", 16), ("planes8", 8),
                                                                          ("scaled", 16), ("scaled8", 8))
                       for sk in (1, 3) if planes_fit(bits, max(group, 0), 256, u)])
        if M <= 4 and dt != torch.float32:
            variants.append(dict(gemv="planes", block_k=256))
            # fp16x2 GEMV: its default K step is longer than K here (only the masked tail step runs), 256 gives
            # 4 full (unmasked) steps
            variants += [dict(gemv="units_h2"), dict(gemv="units_h2", block_k=256)]
        for kw in variants:
            runs += 1
            try:
                y = dq_linear_triton(x, packed, scale, zero, bits, group, K, bias=bias, **kw)
                err = rel_l2(y, ref)
            except Exception as e:  # report and go on: one broken variant must not hide the others
                failures.append(f"w{bits} g{group} M={M} {dt_name} {kw}: {type(e).__name__}: {str(e)[:200]}")
                continue
            worst = max(worst, err)
            if not err <= {"fp16": 2e-3, "bf16": 1e-2, "fp32": 1e-5}[dt_name]:
                failures.append(f"w{bits} g{group} M={M} {dt_name} {kw}: rel_l2 {err:.3g}")
    return runs, worst, failures


def warm(tasks: list[tuple], device: str = "cuda") -> int:
    """Compile (call once) each (K, N, M, bits, group, launch kwargs) so that later timing finds Triton's disk cache
    warm; returns how many calls failed (the timing loop reports those)."""
    from graphopt.kernels.dq_triton import dq_linear_triton
    data, failed = {}, 0
    for K, N, M, bits, group, kw in tasks:
        if (K, N, bits) not in data:
            data[(K, N, bits)] = quantized(bits, group, N, K, torch.bfloat16, torch.Generator().manual_seed(0), device)
        x = torch.zeros(M, K, dtype=torch.bfloat16, device=device)
        try:
            dq_linear_triton(x, *data[(K, N, bits)], bits, group, K, **kw)
        except Exception:
            failed += 1
    return failed


def in_parallel(fn, chunks: list[list], jobs: int) -> list:
    """fn over the chunks in `jobs` processes (compilation is single-threaded and dominates these phases)."""
    if jobs <= 1:
        return [fn(c) for c in chunks]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(fn, chunks))


def split(items: list, parts: int) -> list[list]:
    return [items[i::parts] for i in range(parts) if items[i::parts]]


def graph_us(calls: list) -> float:
    """GPU microseconds per call: `calls` (one per rotated copy of the inputs) replayed in a CUDA graph, so
    neither Python launch overhead nor L2-resident weights enter the time (each copy was last read >= 160 MB
    of traffic earlier). Median over 10 replays of >= 240 calls."""
    import statistics
    for c in calls:  # compile / warm on the current stream
        c()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    reps = -(-240 // len(calls))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for c in calls:
                c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (reps * len(calls)))
    del graph
    return statistics.median(times)


@triton.jit
def _read_kernel(src_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # Streams n int32s (one 16-byte vector per thread and step) and keeps one XOR per program: the time a
    # kernel needs just to read that many bytes from HBM, the ceiling for a batch-1 GEMV over the same bytes.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(src_ptr + offs, mask=offs < n, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.xor_sum(v, axis=0))


def read_us(n_bytes: int) -> float:
    """GPU microseconds to stream n_bytes (rotated copies over > 3x L2) with _read_kernel."""
    n = -(-n_bytes // 4)
    block = 4096
    bufs = [torch.randint(0, 1 << 30, (n,), dtype=torch.int32, device="cuda")
            for _ in range(max(2, -(-L2_SPAN // n_bytes)))]
    out = torch.empty(triton.cdiv(n, block), dtype=torch.int32, device="cuda")
    return graph_us([lambda b=b: _read_kernel[(triton.cdiv(n, block),)](b, out, n, BLOCK=block, num_warps=4)
                     for b in bufs])


def launch_cfg(cfg: dict, bits: int, group: int, dtype: torch.dtype) -> dict:
    """Sweep entry -> dq_linear_triton keyword arguments (k_runs: K step in thread runs of the units GEMV)."""
    from graphopt.kernels.dq_triton import units_run
    cfg = dict(cfg)
    k_runs = cfg.pop("k_runs", None)
    if k_runs:
        run = units_run(bits, group, dtype, cfg.get("gemv", "units"))[1]
        cfg["block_k"] = run * 32 * cfg.get("num_warps", 4) * k_runs
    return cfg


def main() -> None:
    def options(ap) -> None:
        ap.add_argument("--sweep", choices=("full", "gemm16", "h2", "previous", "none"), default="full",
                        help="configurations to sweep: all, only the M = 16 GEMM variants, only the fp16x2 GEMVs "
                             "at M = 1 (on every shape), the defaults before 2026-11-28 (on every shape), or none "
                             "(defaults only)")
        ap.add_argument("--no-checks", action="store_true",
                        help="skip the correctness phase (each timed configuration, the default too, is still "
                             "checked against the reference at its shape first)")
        ap.add_argument("--jobs", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)),
                        help="processes that compile in parallel for the correctness and warm-up phases")

    args = parse_args(__doc__.splitlines()[0], options)
    if not torch.cuda.is_available():
        print("dq_kernels: no CUDA GPU here; run it on the GPU machine", file=sys.stderr)
        sys.exit(2)
    import triton
    import triton.testing

    from graphopt.kernels.dq_triton import _prepare, dq_linear_reference, dq_linear_triton

    def eager_us(fn) -> float:  # with Python launch overhead; L2 flushed before every run
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3

    gen = torch.Generator().manual_seed(0)
    dt = torch.bfloat16
    big = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    copy_us = graph_us([lambda: big.clone()])
    copy_bw = 2 * big.numel() / (copy_us * 1e-6)  # bytes read + written per second
    m: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "copy_tb_per_s": round(copy_bw / 1e12, 3)}
    print("copy TB/s", m["copy_tb_per_s"], flush=True)

    t0 = time.perf_counter()
    results = [] if args.no_checks else in_parallel(check_cases, split(correctness_cases(), args.jobs), args.jobs)
    results = results or [(0, 0.0, [])]
    runs, worst = sum(r[0] for r in results), max(r[1] for r in results)
    failures = [f for r in results for f in r[2]]
    n_fail = len(failures)
    m.update(check_runs=runs, check_failures=n_fail, check_max_rel_l2=float(f"{worst:.3g}"))
    for f in failures[:20]:
        print("FAIL", f, flush=True)
    print(f"correctness: {runs} runs, {n_fail} failures, worst rel_l2 {worst:.3g} "
          f"({time.perf_counter() - t0:.0f} s, {args.jobs} processes)", flush=True)

    shapes = SHAPES[:1] if args.quick else SHAPES

    def sweep_for(K: int, N: int, M: int) -> list[dict]:
        if args.sweep == "previous":
            return PREVIOUS[M]
        if args.sweep == "h2":
            return H2_SWEEP if M == 1 else []
        if (K, N) == SHAPES[0] or args.sweep == "none" or (args.sweep == "gemm16" and M != 16):
            return []
        if args.sweep == "gemm16":
            return GEMM16_VARIANTS
        return GEMV_SWEEP if M == 1 else GEMM_SWEEP[M]

    t0 = time.perf_counter()  # compile every timed configuration in parallel first
    tasks = [(K, N, M, bits, group, launch_cfg(entry, bits, group, dt)) for K, N in shapes for M in (1, 16, 64)
             for bits, group in SETTINGS.items() for entry in [{}] + sweep_for(K, N, M)]
    failed = sum(in_parallel(warm, split(tasks, args.jobs), args.jobs))
    print(f"warm-up: {len(tasks)} configurations, {failed} failed ({time.perf_counter() - t0:.0f} s)", flush=True)

    def moved(packed, scale, M, K, N) -> int:
        return packed.numel() + 2 * scale.numel() * scale.element_size() + 2 * M * K + 2 * M * N

    for K, N in shapes:
        bf16_copies = max(2, -(-L2_SPAN // (2 * N * K)))
        ws = [torch.randn(N, K, generator=gen).to("cuda", dt) for _ in range(bf16_copies)]
        weights = {}
        for bits, group in SETTINGS.items():
            first = quantized(bits, group, N, K, dt, gen)
            n_copies = max(2, -(-L2_SPAN // moved(first[0], first[1], 1, K, N)))
            weights[bits] = [first] + [tuple(t.clone() for t in first) for _ in range(n_copies - 1)]
        qi = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen).cuda()
        for M in (1, 16, 64):
            x = torch.randn(M, K, generator=gen).to("cuda", dt)
            key = f"k{K}_n{N}_m{M}"
            m[f"{key}_bf16_us"] = round(graph_us([lambda w=w: torch.nn.functional.linear(x, w) for w in ws]), 2)
            for bits, group in SETTINGS.items():
                copies = weights[bits]
                packed, scale, zero = copies[0]
                ref = dq_linear_reference(x, packed, scale, zero, bits, group, K)
                tag = f"{key}_w{bits}"

                def chosen(cfg: dict) -> str:  # the kernel and split the launcher picked (for "auto" and defaults)
                    if cfg and cfg.get("split_k") != "auto":
                        return ""
                    try:
                        sp = _prepare(x, packed, scale, zero, bits, group, K, None, cfg.get("block_n"),
                                      cfg.get("block_k"), cfg.get("num_warps"), cfg.get("gemv"), cfg.get("gemm"),
                                      cfg.get("num_stages"), cfg.get("split_k"), cfg.get("maxnreg"))
                    except Exception as e:
                        return f" ({type(e).__name__})"
                    c = sp.specs["constexprs"]
                    return (f" ({sp.specs['name']}, {c['BLOCK_N']} x {c['BLOCK_K']}, "
                            f"split {c.get('SPLIT_K', 1)})")

                def timed(cfg: dict) -> float:
                    return graph_us([lambda p=p, s=s, z=z: dq_linear_triton(x, p, s, z, bits, group, K, **cfg)
                                     for p, s, z in copies])

                try:  # a default that fails to compile must not hide the sweep
                    y = dq_linear_triton(x, packed, scale, zero, bits, group, K)
                    m[f"{tag}_rel_l2"] = float(f"{rel_l2(y, ref):.2g}")
                    if rel_l2(y, ref) > 1e-2:  # the sweep entries' threshold
                        m["default_failures"] = m.get("default_failures", 0) + 1
                        print(f"{tag} default: WRONG rel_l2 {rel_l2(y, ref):.3g}", flush=True)
                    us = timed({})
                    m[f"{tag}_us"] = round(us, 2)
                    m[f"{tag}_bw_fraction"] = round(moved(packed, scale, M, K, N) / (us * 1e-6) / copy_bw, 3)
                    m[f"{tag}_eager_us"] = round(eager_us(lambda: dq_linear_triton(x, packed, scale, zero, bits,
                                                                                  group, K)), 2)
                except Exception as e:
                    print(f"{tag} default: {type(e).__name__} {str(e)[:300]}", flush=True)
                    us = float("inf")
                print(f"  {tag} default: {us:.2f} us{chosen({})}", flush=True)
                sweep = sweep_for(K, N, M)
                best = (us, "default")
                for entry in sweep:
                    cfg = launch_cfg(entry, bits, group, dt)
                    try:
                        y = dq_linear_triton(x, packed, scale, zero, bits, group, K, **cfg)
                        if rel_l2(y, ref) > 1e-2:
                            print(f"{tag} {entry}: WRONG rel_l2 {rel_l2(y, ref):.3g}", flush=True)
                            continue
                        t = timed(cfg)
                    except Exception as e:
                        print(f"{tag} {entry}: {type(e).__name__} {str(e)[:120]}", flush=True)
                        continue
                    print(f"  {tag} {entry}: {t:.2f} us{chosen(cfg)}", flush=True)
                    if t < best[0]:
                        best = (t, f"{entry}{chosen(cfg)}")
                m[f"{tag}_best_us"] = round(best[0], 2)
                m[f"{tag}_best_bw_fraction"] = round(moved(packed, scale, M, K, N) / (best[0] * 1e-6) / copy_bw, 3)
                m[f"{tag}_best_config"] = str(best[1])
                if M == 1:  # how fast the same bytes can be read at all
                    r = read_us(moved(packed, scale, M, K, N))
                    m[f"{tag}_read_ceiling_us"] = round(r, 2)
                    m[f"{tag}_read_ceiling_bw_fraction"] = round(moved(packed, scale, M, K, N) / (r * 1e-6)
                                                                 / copy_bw, 3)
            try:  # torch's int4 matmul (tinygemm): its packing API has changed between versions
                wps = [torch.ops.aten._convert_weight_to_int4pack(qi, 8)]
                wps += [wps[0].clone() for _ in range(max(1, -(-L2_SPAN // (N * K // 2))) - 1)]
                sz = (torch.rand(K // 128, N, 2, generator=gen) * 0.01).to("cuda", torch.bfloat16)
                torch.ops.aten._weight_int4pack_mm(x, wps[0], 128, sz)
                m[f"{key}_torch_int4_us"] = round(graph_us(
                    [lambda wp=wp: torch.ops.aten._weight_int4pack_mm(x, wp, 128, sz) for wp in wps]), 2)
            except Exception as e:
                m[f"{key}_torch_int4_error"] = f"{type(e).__name__}: {str(e)[:160]}"
            print(key, {k[len(key) + 1:]: v for k, v in m.items() if k.startswith(key)}, flush=True)
            if args.json:  # what is measured so far survives a run cut off by its time limit
                args.json.write_text(json.dumps({**m, "partial": 1}, indent=1, sort_keys=True) + "\n")
        del ws, weights
        torch.cuda.empty_cache()
    emit(m, args.json)


if __name__ == "__main__":
    main()
