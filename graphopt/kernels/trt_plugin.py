"""`graphopt::dq_linear` as a TensorRT Quick Deployable Plugin with an ahead-of-time implementation.

The plugin's kernels are graphopt's own Triton kernels compiled to PTX by graphopt.kernels.aot in TensorRT's calling
convention (input pointers, i32 scalars, output pointer; no scratch parameters), so a serialized engine runs them
without Python. Importing this module needs `tensorrt` (the `graphopt[tensorrt]` extra); `register()` is idempotent.

Verified: the PTX, its parameter order and launch parameters (CI, no GPU), and the same kernels loaded and launched
through the CUDA driver on an H100 (benchmarks/plugin_ptx.py). Not verified: this registration against a real
TensorRT, which is not installable on the machines this project has.
"""
from __future__ import annotations

from functools import lru_cache

PLUGIN_ID = "graphopt::dq_linear"
_TRT_DTYPES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "bf16": "bf16", "float32": "fp32",
               "float": "fp32"}


@lru_cache(maxsize=None)
def register() -> str:
    import tensorrt.plugin as trtp

    from .aot import dq_linear_plugin_kernels

    @trtp.register(PLUGIN_ID)
    def _desc(x: trtp.TensorDesc, packed: trtp.TensorDesc, scale: trtp.TensorDesc, zero: trtp.TensorDesc,
              bias: trtp.TensorDesc, bits: int, group: int, in_features: int) -> trtp.TensorDesc:
        shape = list(x.shape_expr)
        shape[-1] = packed.shape_expr[0]
        return trtp.from_shape_expr(tuple(shape), dtype=x.dtype)

    @trtp.aot_impl(PLUGIN_ID)
    def _aot(x: trtp.TensorDesc, packed: trtp.TensorDesc, scale: trtp.TensorDesc, zero: trtp.TensorDesc,
             bias: trtp.TensorDesc, bits: int, group: int, in_features: int, outputs, tactic: int):
        import torch
        major, minor = torch.cuda.get_device_capability()
        dtype = _TRT_DTYPES.get(str(x.dtype).split(".")[-1].lower())
        if dtype is None:
            raise ValueError(f"{PLUGIN_ID}: activations must be float16, bfloat16 or float32, got {x.dtype}")
        # The row count is only known symbolically here, so the GEMM variant (any M) is the one embedded.
        kernel = next(k for k in dq_linear_plugin_kernels(bits, group, dtype, has_bias=True,
                                                          archs=(major * 10 + minor,), in_features=in_features,
                                                          convention="tensorrt") if k.variant == "gemm")
        M = x.shape_expr.numel() // x.shape_expr[-1]
        N = packed.shape_expr[0]
        G = scale.shape_expr[1]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(M, kernel.block_m)
        launch.grid_y = trtp.cdiv(N, kernel.block_n)
        launch.block_x = kernel.num_warps * 32
        launch.shared_mem = kernel.shared_bytes
        scalars = {"M": M, "N": N, "K": in_features, "stride_xm": in_features, "stride_pn": packed.shape_expr[1],
                   "stride_sn": G, "stride_zn": G, "stride_ym": N}
        names = [p for p, t in zip(kernel.params, kernel.param_types) if t == "i32"]
        extra = trtp.SymIntExprs(len(names))
        for i, name in enumerate(names):
            extra[i] = trtp.SymInt32(scalars[name])
        return kernel.entry, kernel.ptx, launch, extra

    return PLUGIN_ID
