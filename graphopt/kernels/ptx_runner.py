"""Run an ahead-of-time compiled PluginKernel through the CUDA driver API (cuda-python), without Triton.

This is what a TensorRT plugin's enqueue does with the same PTX: load the module, find the entry, launch it with the
plugin's launch parameters. Used to prove the AOT kernels on a GPU (benchmarks/plugin_ptx.py).
"""
from __future__ import annotations

import ctypes

import torch

from .aot import PluginKernel

__all__ = ["PtxFunction"]

_MAX_STATIC_SHARED = 48 * 1024


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError:  # cuda-python < 12.6 names it cuda.cuda
        from cuda import cuda as driver
    return driver


def _check(result, what: str):
    driver = _driver()
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        _, msg = driver.cuGetErrorString(err)
        raise RuntimeError(f"{what}: {err.name} ({msg.decode() if msg else ''})")
    return rest[0] if len(rest) == 1 else rest


class PtxFunction:
    """One PluginKernel loaded into the current CUDA context (torch's primary context)."""

    def __init__(self, kernel: PluginKernel):
        torch.cuda.init()
        torch.zeros(1, device="cuda")  # makes the primary context current on this thread
        driver = _driver()
        self.kernel = kernel
        image = ctypes.create_string_buffer(kernel.ptx.encode())  # NUL-terminated, alive during the call
        self.module = _check(driver.cuModuleLoadData(ctypes.addressof(image)), f"cuModuleLoadData {kernel.entry}")
        self.function = _check(driver.cuModuleGetFunction(self.module, kernel.entry.encode()),
                               f"cuModuleGetFunction {kernel.entry}")
        if kernel.shared_bytes > _MAX_STATIC_SHARED:
            attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            _check(driver.cuFuncSetAttribute(self.function, attr, kernel.shared_bytes), "cuFuncSetAttribute")

    def __call__(self, args: dict[str, torch.Tensor | int], M: int, N: int) -> None:
        """Launch on torch's current stream with the runtime arguments by name (tensors or ints)."""
        driver = _driver()
        k = self.kernel
        launch = k.launch(M, N)
        values, types, keep = [], [], []
        for name, t in zip(k.params, k.param_types):
            v = args[name]
            if t == "ptr":
                values.append(v.data_ptr() if isinstance(v, torch.Tensor) else int(v))
                types.append(ctypes.c_void_p)
            else:
                values.append(int(v))
                types.append(ctypes.c_int32)
        n_programs = launch["grid"][0] * launch["grid"][1] * launch["grid"][2]
        for s in k.scratch_params:
            if s["bytes"]:
                buf = torch.empty(s["bytes"] * n_programs + s["align"], dtype=torch.uint8, device="cuda")
                keep.append(buf)
                values.append(buf.data_ptr())
            else:
                values.append(0)
            types.append(ctypes.c_void_p)
        stream = driver.CUstream(torch.cuda.current_stream().cuda_stream)
        gx, gy, gz = launch["grid"]
        bx, by, bz = launch["block"]
        _check(driver.cuLaunchKernel(self.function, gx, gy, gz, bx, by, bz, launch["shared_bytes"], stream,
                                     (tuple(values), tuple(types)), 0), f"cuLaunchKernel {k.entry}")
        _check(driver.cuCtxSynchronize(), f"{k.entry} execution")
