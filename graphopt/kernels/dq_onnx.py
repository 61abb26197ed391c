"""ONNX lowering of graphopt::dq_linear to ONNX Runtime's com.microsoft::MatMulNBits.

MatMulNBits dequantizes B as (u - zero_point) * scale per block of `block_size` values along K, with u the unsigned
stored value and a default zero point of 2^(sb-1); graphopt stores u = q + 2^(sb-1) with Ŵ = s*q + z, so
MatMulNBits without zero points computes x @ (s*q)ᵀ and the float zeros add (Σ_group x) @ zeroᵀ, exactly. 3-bit
weights are stored on the 4-bit layout and lower as bits=4 unchanged; 8-bit weights are dequantized in the graph
(see below). The byte layout of `packed` rows is MatMulNBits' layout of B [N, K/block, block*bits/8].
accuracy_level 0 computes in fp32; 4 quantizes activations to int8 inside ORT (much faster on CPU, ~0.5 % error).
"""
from __future__ import annotations

import onnxscript
from onnx import numpy_helper
from onnxscript import opset18 as op

import torch

from ..compiler.onnx_lower import register_onnx_translation

def _register_schema() -> None:
    """onnx ships no schema for ORT's contrib ops; onnxscript needs one to emit the node."""
    from onnx import defs
    if defs.has("MatMulNBits", "com.microsoft"):
        return
    P, A = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute
    optional = defs.OpSchema.FormalParameterOption.Optional
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    defs.register_schema(defs.OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[P("A", "T1", ""), P("B", "T2", ""), P("scales", "T1", ""),
                P("zero_points", "T3", "", param_option=optional)],
        outputs=[P("Y", "T1", "")],
        type_constraints=[("T1", floats, ""), ("T2", ["tensor(uint8)", "tensor(int32)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(int32)"] + floats, "")],
        attributes=[A("K", defs.OpSchema.AttrType.INT, ""), A("N", defs.OpSchema.AttrType.INT, ""),
                    A("bits", defs.OpSchema.AttrType.INT, ""), A("block_size", defs.OpSchema.AttrType.INT, ""),
                    A("accuracy_level", defs.OpSchema.AttrType.INT, "", required=False)],
    ))


_register_schema()
MSFT = onnxscript.values.Opset(domain="com.microsoft", version=1)
# Set by the lowering from the program plan ("onnx": {"matmulnbits_accuracy_level": N}) before each export.
settings = {"accuracy_level": 0}


def block_size_for(group: int) -> int:
    """MatMulNBits needs a power-of-two block >= 16; a group that is a multiple of one repeats its scale."""
    for b in (256, 128, 64, 32, 16):
        if group % b == 0:
            return b
    raise ValueError(f"dq_linear group size {group} is not a multiple of 16, which ONNX Runtime's MatMulNBits "
                     f"needs: quantize with group 32/64/128, or use --backend torch")


def storage_bits(bits: int) -> int:
    return 4 if bits == 3 else bits


@register_onnx_translation(torch.ops.graphopt.dq_linear.default)
def dq_linear_onnx(x, packed, scale, zero, bias, bits: int, group: int, in_features: int):
    sb = storage_bits(bits)
    if sb == 8:
        return _dequantize_then_matmul(x, packed, scale, zero, bias, group)
    block = block_size_for(group)
    repeat = group // block
    n_out = packed.shape[0]
    n_blocks = in_features // block
    original_zero = zero
    if repeat > 1:  # one scale per block: repeat each group's scale over its blocks
        scale = op.Reshape(op.Expand(op.Unsqueeze(scale, [2]), op.Constant(value_ints=[1, 1, repeat])), [0, -1])
    # No zero-point input: MatMulNBits then uses its default 2^(sb-1), i.e. computes x @ (s*q)ᵀ, and ORT's fast
    # CPU path (int8 activations at accuracy_level 4) applies; float zero points would force a slow fallback.
    # The zeros' part, x @ zᵀ per group, is a small exact side product: (Σ_{k in group} x_k) @ zeroᵀ.
    b = op.Reshape(packed, op.Constant(value_ints=[n_out, n_blocks, block * sb // 8]))
    y = MSFT.MatMulNBits(x, b, op.Reshape(scale, [-1]), K=in_features, N=n_out, bits=sb, block_size=block,
                         accuracy_level=int(settings["accuracy_level"]))
    y = op.Add(y, _zero_part(x, original_zero, in_features // group, group))
    if bias is not None:
        y = op.Add(y, bias)
    return y


def _zero_part(x, zero, n_groups: int, group: int):
    """(Σ_{k in group} x_k) @ zeroᵀ in as few runtime nodes as possible: a decode step runs this once per quantized
    linear, and at the zoo LM's size each node costs about as much as its arithmetic (the whole side product is about
    a sixth of a W4 decode step)."""
    if n_groups == 1:  # per channel: x.sum(-1, keepdim) * zero[:, 0]
        return op.Mul(op.ReduceSum(x, op.Constant(value_ints=[-1]), keepdims=1), op.Reshape(zero, [-1]))
    # group sums as one MatMul with a constant 0/1 [K, G] matrix (any rank of x, no shape arithmetic)
    k = n_groups * group
    member = torch.arange(k).unsqueeze(1) // group == torch.arange(n_groups).unsqueeze(0)
    ones = op.Constant(value=numpy_helper.from_array(member.float().numpy(), "group_members"))
    return op.MatMul(op.MatMul(x, op.CastLike(ones, zero)), op.Transpose(zero, perm=[1, 0]))


def _dequantize_then_matmul(x, packed, scale, zero, bias, group: int):
    """8-bit: ORT's MatMulNBits refuses float zero points at 8 bits on CPU, so dequantize in the graph (ORT folds
    it into an fp32 weight when the session starts: exact, but no memory saving at run time)."""
    q = op.Sub(op.CastLike(packed, scale), op.CastLike(op.Constant(value_float=128.0), scale))
    n_out = packed.shape[0]
    q = op.Reshape(q, op.Constant(value_ints=[n_out, -1, group]))
    w = op.Add(op.Mul(q, op.Unsqueeze(scale, [2])), op.Unsqueeze(zero, [2]))
    w = op.Reshape(w, op.Constant(value_ints=[n_out, -1]))
    y = op.MatMul(x, op.Transpose(w, perm=[1, 0]))
    if bias is not None:
        y = op.Add(y, bias)
    return y
