"""GPU proof of the ahead-of-time plugin kernels: load their PTX through the CUDA driver and compare with the reference.

    python benchmarks/plugin_ptx.py [--ptx-dir DIR] [--json FILE]      (needs a CUDA GPU; exits 2 without one)

DIR holds PTX written by `python -m graphopt.kernels.aot -o DIR` (possibly on another machine, with another Triton);
without it the kernels are compiled here first. Every kernel for this GPU's arch is loaded with cuModuleLoadData,
launched with cuLaunchKernel and PluginKernel.launch's grid/block/shared memory (no Triton involved), on fresh
random inputs with a NaN-poisoned output, for two row counts each (GEMV: 1 and 3; GEMM: 16 and 70) and N = 200
(a partial column block). Metrics: kernels, launches, failures, max_rel_l2 (‖y − ref‖ / ‖ref‖ against
dq_linear_reference in fp32), and the JIT Triton kernels' error on the same inputs (4-bit variants) for comparison.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from common import emit

TOL = {"fp16": 2e-3, "bf16": 1e-2, "fp32": 1e-5}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ptx-dir", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("plugin_ptx: no CUDA GPU here; run it on the GPU machine", file=sys.stderr)
        sys.exit(2)
    import triton

    from graphopt.compiler.quantize import pack
    from graphopt.kernels.aot import dq_linear_plugin_kernels, read_plugin_dir
    from graphopt.kernels.dq_triton import dq_linear_reference, dq_linear_triton
    from graphopt.kernels.ptx_runner import PtxFunction

    major, minor = torch.cuda.get_device_capability()
    arch = major * 10 + minor
    if args.ptx_dir:
        kernels = read_plugin_dir(args.ptx_dir)
    else:
        kernels = []
        for bits in (2, 3, 4, 8):
            for group in (64, 128, -1):
                for dt in ("fp16", "bf16"):
                    kernels += dq_linear_plugin_kernels(bits, group, dt, archs=(arch,))
    kernels = [k for k in kernels if k.arch == arch]
    m: dict = {"device": torch.cuda.get_device_name(), "arch": arch, "runtime_triton": triton.__version__,
               "ptx_triton": sorted({k.triton_version for k in kernels}),
               "ptx_isa": sorted({k.ptx_version for k in kernels}), "kernels": len(kernels)}
    torch.manual_seed(0)
    launches, failures, worst, worst_jit = 0, [], 0.0, 0.0
    K, N = 512, 200
    for k in kernels:
        c = k.constexprs
        bits, dt = c["BITS"], DTYPES[k.extra["dtype"]]
        group = -1 if c["GROUP"] == 0 else c["GROUP"]
        try:
            fn = PtxFunction(k)
        except Exception as e:
            failures.append(f"{k.file_stem}: load {e}")
            continue
        for M in ((1, 3) if k.variant == "gemv" else (16, 70)):
            q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (N, K), dtype=torch.int8)
            G = 1 if group == -1 else K // group
            packed = pack(q, bits).cuda()
            scale = (torch.rand(N, G, device="cuda") * 0.02 + 0.005).to(dt)
            zero = (torch.randn(N, G, device="cuda") * 0.01).to(dt)
            x = torch.randn(M, K, device="cuda").to(dt)
            bias = torch.randn(N, device="cuda").to(dt) if c["HAS_BIAS"] else None
            y = torch.full((M, N), float("nan"), device="cuda", dtype=dt)
            call = {"x_ptr": x, "packed_ptr": packed, "scale_ptr": scale, "zero_ptr": zero,
                    "bias_ptr": bias if bias is not None else y, "y_ptr": y, "M": M, "N": N, "K": K,
                    "stride_xm": x.stride(0), "stride_pn": packed.stride(0), "stride_sn": scale.stride(0),
                    "stride_zn": zero.stride(0), "stride_ym": y.stride(0)}
            launches += 1
            try:
                fn(call, M, N)
            except Exception as e:
                failures.append(f"{k.file_stem} M={M}: {e}")
                continue
            ref = dq_linear_reference(x, packed, scale, zero, bits, group, K, bias=bias).float()
            err = ((y.float() - ref).norm() / ref.norm()).item()
            worst = max(worst, err)
            if bits == 4 and bias is None and M in (1, 16):  # JIT Triton on the same inputs, for comparison
                jit = dq_linear_triton(x, packed, scale, zero, bits, group, K, bias=bias).float()
                worst_jit = max(worst_jit, ((jit - ref).norm() / ref.norm()).item())
            if not (err <= TOL[k.extra["dtype"]]):  # NaN fails too
                failures.append(f"{k.file_stem} M={M}: rel_l2 {err:.3g}")
    m.update(launches=launches, failures=len(failures), max_rel_l2=float(f"{worst:.3g}"),
             jit_max_rel_l2=float(f"{worst_jit:.3g}"))
    for f in failures[:20]:
        print("FAIL", f, flush=True)
    emit(m, args.json)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
