"""Ahead-of-time compilation of graphopt's Triton kernels to PTX, with the launch parameters a plugin needs.

A TensorRT plugin (or any CUDA driver loader) runs these kernels without Python or Triton: it loads the PTX
(cuModuleLoadData), takes the entry by name, and launches it with

    grid   = PluginKernel.launch(M, N)["grid"]       block = (32 * num_warps, 1, 1)
    shared = shared_bytes of dynamic shared memory (raise the function's limit first when it is over 48 KiB)
    params = the runtime arguments in `params` order: device pointers (u64) and i32 scalars, then Triton's scratch
             pointers (`scratch_params`: null when their size is 0, else a buffer of that many bytes per program)

Compilation needs no GPU: Triton lowers to LLVM and then to PTX, and runs its bundled ptxas to check that the PTX
assembles. The PTX ISA version is pinned (PTX_VERSION) so that drivers older than the local Triton's CUDA load it.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import GraphoptError

__all__ = ["PluginKernel", "compile_kernel", "dq_linear_plugin_kernels", "write_plugin_dir", "read_plugin_dir",
           "strip_unused_scratch", "ARCHS", "PTX_VERSION"]

ARCHS = (80, 90)  # Ampere (A100) and Hopper (H100/H200); sm_90 compiles to sm_90a, as Triton does
PTX_VERSION = 80  # PTX ISA 8.0 (CUDA 12.0 drivers and newer): the oldest ISA that has sm_90a
_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\((.*?)\)", re.S)
_PARAM = re.compile(r"\.param\s+\.(u64|u32|b32|s32|b64|f32)\b")


@dataclass
class PluginKernel:
    op: str  # the graphopt op this kernel implements
    variant: str  # "gemv" (M <= block_m) or "gemm" (any M)
    entry: str  # the PTX entry point
    arch: int
    ptx: str
    params: list[str]  # runtime argument names, in the entry's parameter order
    param_types: list[str]  # "ptr" or "i32" for each of params
    scratch_params: list[dict[str, int]]  # trailing Triton scratch pointers: {"bytes", "align"} each
    constexprs: dict[str, Any]
    num_warps: int
    shared_bytes: int
    block_m: int
    block_n: int
    triton_version: str
    ptx_version: int = PTX_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def launch(self, M: int, N: int) -> dict[str, tuple[int, int, int] | int]:
        """Grid, block and dynamic shared memory for an [M, K] x [N, K]ᵀ problem."""
        if self.variant == "gemv":
            if M > self.block_m:
                raise ValueError(f"the {self.entry} kernel handles at most {self.block_m} rows, got M={M}")
            grid = (-(-N // self.block_n), 1, 1)
        else:
            grid = (-(-M // self.block_m), -(-N // self.block_n), 1)
        return {"grid": grid, "block": (32 * self.num_warps, 1, 1), "shared_bytes": self.shared_bytes}

    @property
    def file_stem(self) -> str:
        c = self.constexprs
        group = "pc" if c["GROUP"] == 0 else f"g{c['GROUP']}"
        bias = "_bias" if c["HAS_BIAS"] else ""
        trt = "_trt" if self.extra.get("convention") == "tensorrt" else ""
        return (f"dq_linear_{self.variant}_w{c['BITS']}{group}_{self.extra.get('dtype', '')}{bias}{trt}"
                f"_sm{self.arch}")


def _entry_params(ptx: str, entry: str) -> list[str]:
    for name, body in _ENTRY.findall(ptx):
        if name == entry:
            return _PARAM.findall(body)
    raise GraphoptError(f"the compiled PTX has no entry '{entry}'")


def strip_unused_scratch(ptx: str, entry: str, n_scratch: int) -> str:
    """Remove the entry's last n_scratch parameters (Triton's scratch pointers) when its body never reads them,
    so the kernel takes exactly the arguments a TensorRT AOT plugin passes."""
    head, sep, rest = ptx.partition(f".entry {entry}(")
    if not sep:
        raise GraphoptError(f"the PTX has no entry '{entry}'")
    params, close, body = rest.partition(")")
    lines = [ln for ln in params.split("\n") if ".param" in ln]
    drop = lines[len(lines) - n_scratch:] if n_scratch else []
    for ln in drop:
        name = ln.strip().rstrip(",").split()[-1]
        if name in body:
            raise GraphoptError(f"{entry}: scratch parameter {name} is used by the kernel; it cannot be dropped")
    kept = lines[:len(lines) - n_scratch]
    new_params = "\n" + ",\n".join(ln.rstrip().rstrip(",") for ln in kept) + "\n"
    return head + sep + new_params + close + body


def compile_kernel(specs: dict[str, Any], arch: int, *, op: str, variant: str,
                   ptx_version: int = PTX_VERSION, extra: dict[str, Any] | None = None,
                   drop_unused_scratch: bool = False) -> PluginKernel:
    """Compile one kernel variant (a kernel_specs dict) for sm_<arch> and describe how to launch it.
    drop_unused_scratch: remove Triton's trailing scratch-pointer parameters when they are unused (TensorRT)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .dq_triton import launch_options

    kernel = specs["kernel"]
    if not hasattr(kernel, "fn") or type(kernel).__name__ == "InterpretedFunction":
        raise GraphoptError("ahead-of-time compilation needs Triton kernels compiled for a GPU: unset "
                            "TRITON_INTERPRET before graphopt.kernels is first imported")
    options = {**launch_options(specs), "ptx_version": ptx_version, "enable_fp_fusion": True}
    compiled = triton.compile(ASTSource(kernel, specs["signature"], specs["constexprs"]),
                              target=GPUTarget("cuda", arch, 32), options=options)
    md = compiled.metadata
    ptx = compiled.asm["ptx"]
    runtime = [n for n, t in specs["signature"].items() if t != "constexpr"]
    types = ["ptr" if specs["signature"][n].startswith("*") else "i32" for n in runtime]
    ptx_params = _entry_params(ptx, md.name)
    scratch = []
    for kind in ("global_scratch", "profile_scratch"):  # Triton >= 3.3 / >= 3.5 append these pointers
        if hasattr(md, f"{kind}_size"):
            scratch.append({"bytes": int(getattr(md, f"{kind}_size")), "align": int(getattr(md, f"{kind}_align"))})
    if len(ptx_params) != len(runtime) + len(scratch):
        raise GraphoptError(f"{md.name}: the PTX entry has {len(ptx_params)} parameters, expected "
                            f"{len(runtime)} arguments + {len(scratch)} scratch pointers")
    for name, t, p in zip(runtime, types, ptx_params):
        if (t == "ptr") != (p in ("u64", "b64")):
            raise GraphoptError(f"{md.name}: argument {name} is {t} but its PTX parameter is .{p}")
    if drop_unused_scratch and scratch and not any(s["bytes"] for s in scratch):
        ptx = strip_unused_scratch(ptx, md.name, len(scratch))
        scratch = []
    c = specs["constexprs"]
    return PluginKernel(op=op, variant=variant, entry=md.name, arch=arch, ptx=ptx, params=runtime, param_types=types,
                        scratch_params=scratch, constexprs=dict(c), num_warps=int(md.num_warps),
                        shared_bytes=int(md.shared), block_m=int(c["BLOCK_M"]), block_n=int(c["BLOCK_N"]),
                        triton_version=triton.__version__, ptx_version=ptx_version, extra=dict(extra or {}))


def dq_linear_plugin_kernels(bits: int, group: int, dtype: torch.dtype | str, *, has_bias: bool = False,
                             archs: tuple[int, ...] = ARCHS, scale_dtype: torch.dtype | str | None = None,
                             in_features: int | None = None, convention: str = "triton") -> list[PluginKernel]:
    """The two kernels of one graphopt::dq_linear configuration (GEMV for M <= 4, GEMM otherwise) per arch.

    convention "tensorrt": TensorRT's AOT plugin argument order (inputs, scalars, outputs) and no scratch
    parameters; "triton" (default): the kernels' own order, as benchmarks/plugin_ptx.py launches them."""
    from .dq_triton import GEMV_MAX_M, _dtype_name, kernel_specs, with_bias

    act = _dtype_name(dtype, "activation")
    out = []
    for arch in archs:
        for variant, m_small in (("gemv", True), ("gemm", False)):
            # The dequant GEMM: plugins launch on any row alignment (the planes GEMM reads 16-bit units), and it
            # is the kernel verified through the CUDA driver (benchmarks/plugin_ptx.py).
            specs = with_bias(kernel_specs(bits, group, act, m_small, in_features=in_features,
                                           scale_dtype=scale_dtype, gemm="dequant", convention=convention), has_bias)
            k = compile_kernel(specs, arch, op="graphopt::dq_linear", variant=variant,
                               extra={"dtype": act, "max_m": GEMV_MAX_M if m_small else None,
                                      "convention": convention},
                               drop_unused_scratch=convention == "tensorrt")
            out.append(k)
    return out


def write_plugin_dir(kernels: list[PluginKernel], path: str | Path) -> Path:
    """<stem>.ptx per kernel plus kernels.json (everything but the PTX text), written atomically."""
    from ..zoo import write_dir_atomically

    def fill(tmp: Path) -> None:
        index = []
        for k in kernels:
            (tmp / f"{k.file_stem}.ptx").write_text(k.ptx)
            meta = {key: v for key, v in asdict(k).items() if key != "ptx"}
            index.append({**meta, "ptx_file": f"{k.file_stem}.ptx"})
        (tmp / "kernels.json").write_text(json.dumps(index, indent=1) + "\n")
    write_dir_atomically(Path(path), fill)
    return Path(path)


def read_plugin_dir(path: str | Path) -> list[PluginKernel]:
    path = Path(path)
    index_file = path / "kernels.json"
    if not index_file.is_file():
        raise GraphoptError(f"'{path}' has no kernels.json: write it with graphopt.kernels.aot.write_plugin_dir")
    kernels = []
    for meta in json.loads(index_file.read_text()):
        ptx_file = meta.pop("ptx_file")
        kernels.append(PluginKernel(ptx=(path / ptx_file).read_text(), **meta))
    return kernels


def main(argv: list[str] | None = None) -> None:
    """python -m graphopt.kernels.aot -o DIR [--bits 2,4] [--group 64,128,-1] [--dtype fp16,bf16] [--arch 80,90]"""
    import argparse
    import itertools

    from ..progress import Progress

    ap = argparse.ArgumentParser(prog="python -m graphopt.kernels.aot",
                                 description="compile graphopt::dq_linear's Triton kernels to PTX (no GPU needed)")
    ap.add_argument("-o", "--out", type=Path, required=True, help="directory for the .ptx files and kernels.json")
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--group", default="64,128,-1", help="group sizes; -1 = per channel")
    ap.add_argument("--dtype", default="fp16,bf16", help="activation dtypes: fp16, bf16, fp32")
    ap.add_argument("--arch", default=",".join(map(str, ARCHS)), help="compute capabilities, e.g. 80,90")
    ap.add_argument("--bias", action="store_true", help="also compile the variants that add a bias")
    ap.add_argument("--convention", default="triton", choices=["triton", "tensorrt"],
                    help="argument order: the kernels' own, or TensorRT's AOT plugin order without scratch pointers")
    a = ap.parse_args(argv)
    try:
        ints = {k: [int(v) for v in getattr(a, k).split(",")] for k in ("bits", "group", "arch")}
    except ValueError:
        raise SystemExit("--bits, --group and --arch take comma-separated integers, e.g. --bits 2,4")
    combos = list(itertools.product(ints["bits"], ints["group"], a.dtype.split(","), (False, True) if a.bias
                                    else (False,)))
    kernels = []
    for bits, group, dtype, bias in Progress().track(combos, "compiling to PTX"):
        try:
            kernels += dq_linear_plugin_kernels(bits, group, dtype, has_bias=bias, archs=tuple(ints["arch"]),
                                                convention=a.convention)
        except (ValueError, GraphoptError) as e:
            raise SystemExit(f"error: {e}")
    write_plugin_dir(kernels, a.out)
    print(f"wrote {len(kernels)} kernels to {a.out}")


if __name__ == "__main__":
    main()
