"""`graphopt::dq_linear`: a linear layer with packed low-bit weights (decoupleQ form Ŵ = s ⊙ W_int + z).

    y = x @ Ŵᵀ + bias,   Ŵ[n, k] = scale[n, k // group] * q[n, k] + zero[n, k // group]

`packed` is uint8 [N, ceil(K * storage_bits / 8)] in the layout of graphopt.compiler.quantize.pack. On CPU the op
runs a torch reference (unpack, dequantize, F.linear); on CUDA it runs graphopt's Triton kernels when they import
(GRAPHOPT_DQ_GEMV names the batch-1 GEMV to prefer, see dq_triton.preferred_gemv).
A fake implementation lets programs that contain it export, save as .pt2 and lower to ONNX (MatMulNBits).
"""
from __future__ import annotations

import torch

from ..compiler.quantize import unpack


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int,
               in_features: int) -> torch.Tensor:
    """Ŵ in float32 (16-bit scales too: one rounding to the activations' dtype afterwards, as the GPU kernels)."""
    q = unpack(packed, bits, in_features).to(torch.float32)
    s = scale.float().repeat_interleave(group, dim=1)
    z = zero.float().repeat_interleave(group, dim=1)
    return s * q + z


@torch.library.custom_op("graphopt::dq_linear", mutates_args=())
def dq_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
              bias: torch.Tensor | None, bits: int, group: int, in_features: int) -> torch.Tensor:
    if x.is_cuda:
        try:
            from .dq_triton import dq_linear_triton
            return dq_linear_triton(x, packed, scale, zero, bits, group, in_features, bias=bias)
        except ImportError:
            pass
    w = dequantize(packed, scale, zero, bits, group, in_features).to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


@dq_linear.register_fake
def _(x, packed, scale, zero, bias, bits, group, in_features):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))
