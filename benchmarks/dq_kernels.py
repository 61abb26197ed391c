"""GPU timing of graphopt's Triton dq_linear kernels against torch bf16 linear and torch's int4 matmul.

    python benchmarks/dq_kernels.py [--quick] [--json FILE]        (needs a CUDA GPU; exits 2 without one)

For (K, N) in {(4096, 4096), (8192, 8192), (4096, 14336)}, M in {1, 16, 64}, bits 2 (group 64) and 4 (group 128):
microseconds (triton.testing.do_bench, median) and the fraction of the card's measured copy bandwidth that the bytes
read (packed weights + fp16 scales/zeros + activations) and written represent. The kernels are checked against the
reference op before timing.
"""
from __future__ import annotations

import sys

import torch

from common import emit, parse_args


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    if not torch.cuda.is_available():
        print("dq_kernels: no CUDA GPU here; run it on the GPU machine", file=sys.stderr)
        sys.exit(2)
    import triton.testing

    from graphopt.compiler.quantize import pack
    from graphopt.kernels.dq_triton import dq_linear_reference, dq_linear_triton
    dev, dt = "cuda", torch.float16
    big = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
    copy_us = triton.testing.do_bench(lambda: big.clone(), return_mode="median") * 1e3
    copy_bw = 2 * big.numel() / (copy_us * 1e-6)  # bytes read + written per second
    m: dict = {"device": torch.cuda.get_device_name(), "copy_tb_per_s": round(copy_bw / 1e12, 3)}
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (8192, 8192), (4096, 14336)]
    for K, N in shapes:
        w = torch.randn(N, K, device=dev, dtype=dt)
        for M in (1, 16, 64):
            x = torch.randn(M, K, device=dev, dtype=dt)
            key = f"k{K}_n{N}_m{M}"
            m[f"{key}_bf16_us"] = round(triton.testing.do_bench(
                lambda: torch.nn.functional.linear(x.bfloat16(), w.bfloat16()), return_mode="median") * 1e3, 2)
            for bits, group in ((4, 128), (2, 64)):
                q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (N, K), dtype=torch.int8)
                packed = pack(q, bits).to(dev)
                scale = (torch.rand(N, K // group, device=dev) * 0.01).to(dt)
                zero = (torch.randn(N, K // group, device=dev) * 0.01).to(dt)
                ref = dq_linear_reference(x, packed, scale, zero, bits, group, K)
                got = dq_linear_triton(x, packed, scale, zero, bits, group, K)
                err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                us = triton.testing.do_bench(lambda: dq_linear_triton(x, packed, scale, zero, bits, group, K),
                                             return_mode="median") * 1e3
                moved = packed.numel() + 2 * 2 * scale.numel() + 2 * M * K + 2 * M * N
                m[f"{key}_w{bits}_us"] = round(us, 2)
                m[f"{key}_w{bits}_bw_fraction"] = round(moved / (us * 1e-6) / copy_bw, 3)
                m[f"{key}_w{bits}_max_rel_err"] = float(f"{err:.2g}")
            if hasattr(torch.ops.aten, "_weight_int4pack_mm") and M in (1, 16):
                try:
                    qi = torch.randint(0, 16, (N, K // 2), dtype=torch.uint8, device=dev)
                    wp = torch.ops.aten._convert_weight_to_int4pack(qi, 8)
                    sz = torch.rand(K // 128, N, 2, device=dev, dtype=torch.bfloat16)
                    m[f"{key}_torch_int4_us"] = round(triton.testing.do_bench(
                        lambda: torch.ops.aten._weight_int4pack_mm(x.bfloat16(), wp, 128, sz),
                        return_mode="median") * 1e3, 2)
                except Exception as e:  # its packing API changes between torch versions
                    m[f"{key}_torch_int4_error"] = type(e).__name__
            print(key, {k: v for k, v in m.items() if k.startswith(key)}, flush=True)
    emit(m, args.json)


if __name__ == "__main__":
    main()
