"""Offline SASS counts of the batch-1 GEMVs: instructions per code in the main loop, registers (no GPU needed).

    python benchmarks/gemv_sass.py [--gemv units_hi,units] [--maxnreg N] [--json FILE]

Compiles each GEMV for sm_90 with the installed Triton (the GPU machine has 3.6: `pip install --target DIR
triton==3.6.0` and put DIR first on PYTHONPATH to count what it runs) at K = N = 8192, bf16, batch 1, W4g128 and
W2g64, with the 16-byte divisibility facts a GPU launch passes (without them Triton neither vectorizes the loads
nor avoids shared-memory layout conversions, and the counts mean nothing). The loop is the longest backward
branch's body; instructions per code = loop instructions x 32 lanes x warps / (BLOCK_N x BLOCK_K). Keys:
w{bits}g{group}_{gemv}_instr_per_code, ..._registers, and the top opcodes in the printout. --maxnreg 0 compiles
without the launcher's register cap (W2 at batch 1: 128). `--quick` is accepted and changes nothing (it takes well
under a minute).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

from common import emit, parse_args

ALIGNED = ("x_ptr", "packed_ptr", "scale_ptr", "zero_ptr", "bias_ptr", "y_ptr", "N", "K", "stride_xm",
           "stride_pn", "stride_sn", "stride_zn", "stride_ym")
_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);")


def compile_cubin(specs: dict) -> bytes:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from graphopt.kernels.dq_triton import launch_options

    names = list(specs["signature"])
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ALIGNED if n in names}
    compiled = triton.compile(ASTSource(specs["kernel"], specs["signature"], specs["constexprs"], attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options=launch_options(specs))
    return compiled.asm["cubin"]


def nvidia_tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def loop_opcodes(cubin: bytes) -> tuple[Counter, int]:
    """Opcodes of the longest backward branch's body, and the kernel's registers."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([nvidia_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([nvidia_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    code = [(int(m.group(1), 16), m.group(2)) for m in map(_LINE.match, sass.splitlines()) if m]
    best: tuple[int, int] | None = None
    for addr, text in code:
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            lo = int(target.group(1), 16)
            if best is None or addr - lo > best[1] - best[0]:
                best = (lo, addr)
    if best is None:
        raise SystemExit("gemv_sass.py: no loop found in the SASS")
    ops = Counter()
    for addr, text in code:
        if best[0] <= addr <= best[1]:
            words = text.split()
            op = words[1] if words[0].startswith("@") else words[0]
            ops[op.split(".")[0]] += 1
    return ops, int(re.search(r"REG:(\d+)", usage).group(1))


def main() -> None:
    def options(ap) -> None:
        ap.add_argument("--gemv", default="units_hi,units,units_h2",
                        help="comma-separated GEMV forms (graphopt.kernels.dq_triton.UNITS_GEMVS)")
        ap.add_argument("--maxnreg", type=int, default=None,
                        help="register cap per thread: 0 for none (default: the launcher's, 128 for W2 at batch 1)")
    args = parse_args(__doc__.splitlines()[0], options)
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    import triton

    from graphopt.kernels.dq_triton import kernel_specs
    metrics: dict = {"triton": triton.__version__, "target": "sm_90", "k": 8192, "n": 8192, "m": 1}
    if args.maxnreg is not None:
        metrics["maxnreg"] = args.maxnreg
    for bits, group in ((4, 128), (2, 64)):
        for gemv in args.gemv.split(","):
            specs = kernel_specs(bits, group, torch.bfloat16, True, m=1, in_features=8192, gemv=gemv,
                                 maxnreg=args.maxnreg)
            c = specs["constexprs"]
            ops, regs = loop_opcodes(compile_cubin(specs))
            per_code = sum(ops.values()) * 32 * specs["num_warps"] / (c["BLOCK_N"] * c["BLOCK_K"])
            key = f"w{bits}g{group}_{gemv}"
            metrics[f"{key}_instr_per_code"] = round(per_code, 3)
            metrics[f"{key}_registers"] = regs
            top = ", ".join(f"{op} {n}" for op, n in ops.most_common(8))
            print(f"{key}: {per_code:.2f} instructions per code, {regs} registers, BLOCK_N {c['BLOCK_N']} "
                  f"BLOCK_K {c['BLOCK_K']} warps {specs['num_warps']}; loop: {top}", file=sys.stderr, flush=True)
    emit(metrics, args.json)


if __name__ == "__main__":
    main()
