"""GPU check and timing of graphopt's Triton dq_linear kernels against torch bf16 linear and torch's int4 matmul.

    python benchmarks/dq_kernels.py [--quick] [--json FILE]        (needs a CUDA GPU; exits 2 without one)

1. Correctness on this GPU: bits 2/3/4/8 x group 32/128/per channel x M 1, 3, 70 (both GEMV kernels at M <= 4)
   with fp16 activations, bits 2/4 group 64 with bf16, against dq_linear_reference (rel L2 error); key
   `check_failures`. Every swept configuration is checked too before it is timed.
2. Tile sweep at M = 1 (GEMV kernel x BLOCK_N x BLOCK_K x warps) and M = 16, 64 (GEMM BLOCK_N x BLOCK_K x warps)
   for W4g128 and W2g64: the best configuration per shape, its time, and the default configuration's time.
3. For (K, N) in {(4096, 4096), (8192, 8192), (4096, 14336)}, M in {1, 16, 64}, bits 2 (group 64) and 4 (group
   128), bf16 activations: microseconds (triton.testing.do_bench, median; it flushes the L2 cache before every run,
   so weights always come from HBM) for graphopt's default and best-swept configuration, torch bf16 linear and
   torch int4 (_weight_int4pack_mm, group 128), and the fraction of the card's measured copy bandwidth that the
   bytes read (packed weights, scales/zeros, activations) and written represent.
"""
from __future__ import annotations

import itertools
import sys

import torch

from common import emit, parse_args

SHAPES = [(4096, 4096), (8192, 8192), (4096, 14336)]
SETTINGS = {4: 128, 2: 64}  # bits -> group
GEMV_SWEEP = [dict(gemv=g, block_n=bn, block_k=bk, num_warps=nw) for g, bn, bk, nw in
              itertools.product(("reduce", "dequant"), (16, 32), (256, 512), (2, 4, 8))]
GEMM_SWEEP = {16: [dict(block_n=bn, block_k=bk, num_warps=nw) for bn, bk, nw in
                   itertools.product((16, 32, 64), (64, 128, 256), (4, 8))],
              64: [dict(block_n=bn, block_k=bk, num_warps=nw) for bn, bk, nw in
                   itertools.product((32, 64, 128), (64, 128), (4, 8))]}


def quantized(bits: int, group: int, N: int, K: int, dt: torch.dtype, gen: torch.Generator):
    from graphopt.compiler.quantize import pack
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (N, K), dtype=torch.int8, generator=gen)
    G = 1 if group == -1 else K // group
    scale = (torch.rand(N, G, generator=gen) * 0.02 + 0.005).to("cuda", dt)
    zero = (torch.randn(N, G, generator=gen) * 0.01).to("cuda", dt)
    return pack(q, bits).cuda(), scale, zero


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def correctness(gen: torch.Generator) -> tuple[int, int, float, list[str]]:
    from graphopt.kernels.dq_triton import dq_linear_reference, dq_linear_triton
    K, N, runs, worst, failures = 1024, 320, 0, 0.0, []
    cases = list(itertools.product((2, 3, 4, 8), (32, 128, -1), (1, 3, 70), (torch.float16,)))
    cases += list(itertools.product((2, 4), (64,), (1, 3, 70), (torch.bfloat16,)))  # M = 16: checked in the sweep
    for bits, group, M, dt in cases:
        packed, scale, zero = quantized(bits, group, N, K, dt, gen)
        x = torch.randn(M, K, generator=gen).to("cuda", dt)
        bias = torch.randn(N, generator=gen).to("cuda", dt)
        ref = dq_linear_reference(x, packed, scale, zero, bits, group, K, bias=bias)
        for gemv in (("reduce", "dequant") if M <= 4 else ("reduce",)):
            runs += 1
            try:
                y = dq_linear_triton(x, packed, scale, zero, bits, group, K, bias=bias, gemv=gemv)
                err = rel_l2(y, ref)
            except Exception as e:  # report and go on: one broken variant must not hide the others
                failures.append(f"w{bits} g{group} M={M} {dt} {gemv}: {type(e).__name__}: {str(e)[:200]}")
                continue
            worst = max(worst, err)
            if not err <= (2e-3 if dt == torch.float16 else 1e-2):
                failures.append(f"w{bits} g{group} M={M} {dt} {gemv}: rel_l2 {err:.3g}")
    return runs, len(failures), worst, failures


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    if not torch.cuda.is_available():
        print("dq_kernels: no CUDA GPU here; run it on the GPU machine", file=sys.stderr)
        sys.exit(2)
    import triton
    import triton.testing

    from graphopt.kernels.dq_triton import dq_linear_reference, dq_linear_triton

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # µs

    gen = torch.Generator().manual_seed(0)
    dt = torch.bfloat16
    big = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    copy_us = bench(lambda: big.clone())
    copy_bw = 2 * big.numel() / (copy_us * 1e-6)  # bytes read + written per second
    m: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "copy_tb_per_s": round(copy_bw / 1e12, 3)}
    print("copy TB/s", m["copy_tb_per_s"], flush=True)

    runs, n_fail, worst, failures = correctness(gen)
    m.update(check_runs=runs, check_failures=n_fail, check_max_rel_l2=float(f"{worst:.3g}"))
    for f in failures[:20]:
        print("FAIL", f, flush=True)
    print(f"correctness: {runs} runs, {n_fail} failures, worst rel_l2 {worst:.3g}", flush=True)

    shapes = SHAPES[:1] if args.quick else SHAPES

    def moved(packed, scale, M, K, N) -> int:
        return packed.numel() + 2 * scale.numel() * scale.element_size() + 2 * M * K + 2 * M * N

    for K, N in shapes:
        w = torch.randn(N, K, generator=gen).to("cuda", dt)
        weights = {bits: quantized(bits, group, N, K, dt, gen) for bits, group in SETTINGS.items()}
        qi = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen).cuda()
        for M in (1, 16, 64):
            x = torch.randn(M, K, generator=gen).to("cuda", dt)
            key = f"k{K}_n{N}_m{M}"
            m[f"{key}_bf16_us"] = round(bench(lambda: torch.nn.functional.linear(x, w)), 2)
            for bits, group in SETTINGS.items():
                packed, scale, zero = weights[bits]
                ref = dq_linear_reference(x, packed, scale, zero, bits, group, K)
                tag = f"{key}_w{bits}"
                m[f"{tag}_rel_l2"] = float(f"{rel_l2(dq_linear_triton(x, packed, scale, zero, bits, group, K), ref):.2g}")
                us = bench(lambda: dq_linear_triton(x, packed, scale, zero, bits, group, K))
                m[f"{tag}_us"] = round(us, 2)
                m[f"{tag}_bw_fraction"] = round(moved(packed, scale, M, K, N) / (us * 1e-6) / copy_bw, 3)
                sweep = GEMV_SWEEP if M == 1 else GEMM_SWEEP[M]
                best = (us, "default")
                for cfg in sweep:
                    try:
                        y = dq_linear_triton(x, packed, scale, zero, bits, group, K, **cfg)
                        if rel_l2(y, ref) > 1e-2:
                            print(f"{tag} {cfg}: WRONG rel_l2 {rel_l2(y, ref):.3g}", flush=True)
                            continue
                        t = bench(lambda: dq_linear_triton(x, packed, scale, zero, bits, group, K, **cfg))
                    except Exception as e:
                        print(f"{tag} {cfg}: {type(e).__name__} {str(e)[:120]}", flush=True)
                        continue
                    if t < best[0]:
                        best = (t, cfg)
                if sweep:
                    m[f"{tag}_best_us"] = round(best[0], 2)
                    m[f"{tag}_best_bw_fraction"] = round(moved(packed, scale, M, K, N) / (best[0] * 1e-6) / copy_bw, 3)
                    m[f"{tag}_best_config"] = str(best[1])
            try:  # torch's int4 matmul (tinygemm): its packing API has changed between versions
                wp = torch.ops.aten._convert_weight_to_int4pack(qi, 8)
                sz = (torch.rand(K // 128, N, 2, generator=gen) * 0.01).to("cuda", torch.bfloat16)
                torch.ops.aten._weight_int4pack_mm(x, wp, 128, sz)
                m[f"{key}_torch_int4_us"] = round(bench(lambda: torch.ops.aten._weight_int4pack_mm(x, wp, 128, sz)), 2)
            except Exception as e:
                m[f"{key}_torch_int4_error"] = f"{type(e).__name__}: {str(e)[:160]}"
            print(key, {k[len(key) + 1:]: v for k, v in m.items() if k.startswith(key)}, flush=True)
    emit(m, args.json)


if __name__ == "__main__":
    main()
