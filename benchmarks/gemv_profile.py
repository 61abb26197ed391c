"""Launches for Nsight Compute: the batch-1 GEMVs (default, units, units_h2, units_hi without the W2 register cap,
units_pf) and the read-only kernel at 8192² (W4g128, W2g64), and the 16-row defaults, each once after a warm-up,
between cudaProfilerStart/Stop (run it under `ncu --profile-from-start off`; benchmarks/gpu_profile.sh does).
Needs a CUDA GPU; exits 2 without one.

    python benchmarks/gemv_profile.py
"""
from __future__ import annotations

import sys

import torch
import triton

from common import parse_args
from dq_kernels import _read_kernel, quantized


def main() -> None:
    parse_args(__doc__.splitlines()[0])
    if not torch.cuda.is_available():
        print("gemv_profile: no CUDA GPU here; run it on the GPU machine", file=sys.stderr)
        sys.exit(2)
    from graphopt.kernels.dq_triton import dq_linear_triton
    K = N = 8192
    gen = torch.Generator().manual_seed(0)
    launches = []  # (label, fn)
    for bits, group in ((4, 128), (2, 64)):
        packed, scale, zero = quantized(bits, group, N, K, torch.bfloat16, gen)
        for M, kws in ((1, ({}, {"gemv": "units"}, {"gemv": "units_h2"}, {"gemv": "units_hi", "maxnreg": 0},
                            {"gemv": "units_pf", "block_n": 8, "num_warps": 1,
                             "block_k": 1024 if bits == 4 else 2048})),
                       (16, ({},))):
            x = torch.randn(M, K, generator=gen).to("cuda", torch.bfloat16)
            for kw in kws:
                launches.append((f"w{bits} M={M} {kw or 'default'}",
                                 lambda x=x, p=packed, s=scale, z=zero, b=bits, g=group, kw=kw:
                                 dq_linear_triton(x, p, s, z, b, g, K, **kw)))
        n = packed.numel() + 2 * scale.numel() * 2 + 2 * K
        n4 = -(-n // 4)
        src = torch.randint(0, 1 << 30, (n4,), dtype=torch.int32, device="cuda")
        out = torch.empty(triton.cdiv(n4, 4096), dtype=torch.int32, device="cuda")
        launches.append((f"w{bits} read-only ceiling",
                         lambda src=src, out=out, n4=n4: _read_kernel[(triton.cdiv(n4, 4096),)](
                             src, out, n4, BLOCK=4096, num_warps=4)))
    for _, fn in launches:  # compile and warm
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for label, fn in launches:
        print("launch:", label, flush=True)
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
