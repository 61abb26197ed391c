"""ONNX lowering of graphopt::dq_linear: ONNX Runtime's com.microsoft::MatMulNBits, or standard ONNX ops.

MatMulNBits dequantizes B as (u - zero_point) * scale per block of `block_size` values along K, with u the unsigned
stored value and a default zero point of 2^(sb-1); graphopt stores u = q + 2^(sb-1) with Ŵ = s*q + z, so
MatMulNBits without zero points computes x @ (s*q)ᵀ and the float zeros add (Σ_group x) @ zeroᵀ, exactly. Weights
quantized with zero="int" (z = c*s, c integer) need no such side product: they lower with MatMulNBits' own packed
integer zero points 2^(sb-1) - c, one node per linear (about 1.2x faster decode steps on the zoo LM). 3-bit
weights are stored on the 4-bit layout and lower as bits=4 unchanged; 8-bit weights are dequantized in the graph
(see below). The byte layout of `packed` rows is MatMulNBits' layout of B [N, K/block, block*bits/8].
accuracy_level 0 computes in fp32; 4 quantizes activations to int8 inside ORT (much faster on CPU, ~0.5 % error).

With settings["standard_ops"] (the passes' onnx_ops=standard) each linear is instead a blocked DequantizeLinear of a
constant INT4/INT2 weight [K, N] (axis 0, the same blocks, scales and integer zero points) + MatMul: standard ONNX
that other runtimes read, and that ONNX Runtime fuses back into MatMulNBits when it loads the file (its accuracy
level is then the session option session.qdq_matmulnbits_accuracy_level, which graphopt.load sets from the plan).
INT2 needs opset 25, so below it (the default is 23) 2-bit weights are INT4 tensors of the same codes. Opset 25
costs more than it saves on ONNX Runtime: the exporter writes single Attention/RotaryEmbedding/RMSNormalization
nodes only at 23 (and ORT 1.32 has no Attention kernel past 23), so the zoo LM's decode file has 615 nodes instead
of 260 and a step takes 1.49 ms instead of 0.63 (fp32: 0.87).
"""
from __future__ import annotations

import ml_dtypes
import onnx_ir as ir
import onnxscript
from onnx import numpy_helper
from onnxscript import opset18 as op
from onnxscript import opset21 as op21  # blocked DequantizeLinear (block_size) is opset 21

import torch

from ..compiler.onnx_lower import constant_input, register_onnx_rewrite, register_onnx_translation
from ..compiler.quantize import pack, unpack, zero_multiple_range

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
# Set by the lowering from the program plan ("onnx": {"matmulnbits_accuracy_level": N, "standard_ops": bool}) before
# each export.
settings = {"accuracy_level": 0, "standard_ops": False, "opset": 23}
STANDARD_MIN_OPSET = 21  # blocked DequantizeLinear
INT2_OPSET = 25


def block_size_for(group: int, in_features: int) -> int:
    """MatMulNBits needs a power-of-two block >= 16; a group that is a multiple of one repeats its scale. Per channel
    (group == in_features) any K works: the last block is padded (MatMulNBits takes K that is not a whole number of
    blocks), and the channel's scale repeats over the blocks."""
    for b in (256, 128, 64, 32, 16):
        if group % b == 0:
            return b
    if group == in_features:
        return next((b for b in (128, 64, 32) if b <= in_features), 16)
    raise ValueError(f"dq_linear group size {group} is not a multiple of 16, which ONNX Runtime's MatMulNBits "
                     f"needs: quantize with group 32/64/128, or use --backend torch")


def _blocks(group: int, in_features: int) -> tuple[int, int, int]:
    """(block size, blocks per row, blocks per group) of a dq_linear on MatMulNBits' blocks."""
    block = block_size_for(group, in_features)
    n_blocks = -(-in_features // block)
    return block, n_blocks, n_blocks // (in_features // group)


def storage_bits(bits: int) -> int:
    return 4 if bits == 3 else bits


def lowered_bits(bits: int, accuracy_level: int) -> int:
    """MatMulNBits' `bits` for a dq_linear of `bits`: the storage bits, except 2-bit weights below accuracy level 4,
    which go on the 4-bit layout (exact: the same codes, twice the bytes). ORT 1.32's CPU MatMulNBits has no fp32
    kernel for 2 bits: it dequantizes the whole weight on every call, 150x slower than 4 bits at 4096 x 4096."""
    sb = storage_bits(bits)
    return 4 if sb == 2 and accuracy_level < 4 else sb


@register_onnx_translation(torch.ops.graphopt.dq_linear.default)
def dq_linear_onnx(x, packed, scale, zero, bias, bits: int, group: int, in_features: int):
    if storage_bits(bits) == 8:
        return _dequantize_then_matmul(x, packed, scale, zero, bias, group)
    if settings["standard_ops"]:
        return _blocked_dequantize_then_matmul(x, packed, scale, zero, bias, bits, group, in_features)
    n_out = packed.shape[0]
    sb = lowered_bits(bits, int(settings["accuracy_level"]))
    block, n_blocks, repeat = _blocks(group, in_features)
    if sb != storage_bits(bits) or n_blocks * block != in_features:
        packed = _repacked(packed, storage_bits(bits), sb, in_features, n_blocks * block)
    original_scale, original_zero = scale, zero
    if repeat > 1:  # one scale per block: repeat each group's scale over its blocks
        scale = op.Reshape(op.Expand(op.Unsqueeze(scale, [2]), op.Constant(value_ints=[1, 1, repeat])), [0, -1])
    b = op.Reshape(packed, op.Constant(value_ints=[n_out, n_blocks, block * sb // 8]))
    # Zeros that are integer multiples of the scales (zero="int") are MatMulNBits' own zero points: exact, one node.
    # Float zeros get no zero-point input: MatMulNBits then uses its default 2^(sb-1), i.e. computes x @ (s*q)ᵀ on
    # ORT's fast CPU path (int8 activations at accuracy_level 4; float zero points would force a slow fallback), and
    # the zeros' part, x @ zᵀ per group, is a small exact side product: (Σ_{k in group} x_k) @ zeroᵀ.
    zero_points = _integer_zero_points(original_scale, original_zero, bits, repeat, sb)
    y = MSFT.MatMulNBits(x, b, op.Reshape(scale, [-1]), *([] if zero_points is None else [zero_points]),
                         K=in_features, N=n_out, bits=sb, block_size=block,
                         accuracy_level=int(settings["accuracy_level"]))
    if zero_points is None:
        y = op.Add(y, _zero_part(x, original_zero, in_features // group, group))
    return _add_bias(y, bias)


def _add_bias(y, bias):
    return y if bias is None else op.Add(y, bias)


def _repacked(packed, from_bits: int, to_bits: int, K: int, padded_K: int):
    """The packed constant's codes on the layout of `to_bits` (same codes: u - 2^(b-1) is kept), rows padded with
    code 0 to `padded_K` (whole MatMulNBits blocks; ORT reads only K of them)."""
    tensor = constant_input(packed)
    if tensor is None:
        raise ValueError("dq_linear's packed weights must be a constant of the program to re-pack them for ONNX "
                         f"Runtime ({from_bits} -> {to_bits} bits, K {K} -> {padded_K})")
    codes = unpack(tensor, from_bits, K)
    if padded_K > K:
        codes = torch.cat([codes, codes.new_zeros(codes.shape[0], padded_K - K)], dim=1)
    return op.Constant(value=numpy_helper.from_array(pack(codes, to_bits).numpy(), "packed_repacked"))


def _zero_multiples(scale, zero, bits: int) -> torch.Tensor | None:
    """c [N, groups] (integer-valued) when every zero is c·scale with an integer c that an unsigned zero point
    2^(sb-1) - c on the stored codes can express, i.e. the weights were quantized with zero="int"; else None."""
    s, z = constant_input(scale), constant_input(zero)
    if s is None or z is None:
        return None
    c = z.double() / torch.where(s == 0, torch.ones_like(s), s).double()
    lo, hi = zero_multiple_range(bits)
    if not bool(((c - c.round()).abs() <= 1e-3).all()) or float(c.min()) < lo - 1e-3 or float(c.max()) > hi + 1e-3:
        return None
    return c.round()


def _integer_zero_points(scale, zero, bits: int, repeat: int, sb: int):
    """MatMulNBits' packed uint8 zero points (one per block, sb: the lowered storage bits) for zero="int" weights,
    else None."""
    c = _zero_multiples(scale, zero, bits)
    if c is None:
        return None
    negated = (-c).to(torch.int8).repeat_interleave(repeat, dim=1)  # pack stores -c + 2^(sb-1) = zp
    packed = pack(negated, sb).reshape(-1)
    return op.Constant(value=numpy_helper.from_array(packed.numpy(), "zero_points"))


_ONNX_INTS = {(4, True): ml_dtypes.int4, (4, False): ml_dtypes.uint4, (2, True): ml_dtypes.int2, (2, False): ml_dtypes.uint2}


def _blocked_dequantize_then_matmul(x, packed, scale, zero, bias, bits: int, group: int, in_features: int):
    """Standard ONNX: MatMul(x, DequantizeLinear(W [K, N], scales [blocks, N], zero points, axis 0, block_size)).
    zero="int" weights: UINT codes u = q + 2^(sb-1) with zero points 2^(sb-1) - c, exact. Float zeros: signed INT
    codes without zero points (q·s) plus the same side product as on the MatMulNBits path. The blocks are
    MatMulNBits' (power-of-two, >= 16; per channel a partial last block and the scale repeated), so ONNX Runtime's
    DequantizeLinear + MatMul fusion applies."""
    codes, s_t = constant_input(packed), constant_input(scale)
    if codes is None or s_t is None:
        raise ValueError("dq_linear's packed weights and scales must be constants of the program for "
                         "onnx_ops=standard (DequantizeLinear needs them as initializers)")
    sb = lowered_bits(bits, int(settings["accuracy_level"]))
    if sb == 2 and int(settings["opset"]) < INT2_OPSET:
        sb = 4  # the same codes as INT4: exact
    block, _, repeat = _blocks(group, in_features)
    q = unpack(codes, storage_bits(bits), in_features).to(torch.int16)  # [N, K], the same codes at any storage
    scales = s_t.repeat_interleave(repeat, dim=1).t().contiguous()  # [blocks, N]
    c = _zero_multiples(scale, zero, bits)
    half = 1 << (sb - 1)
    scale_constant = op.Constant(value=numpy_helper.from_array(scales.numpy(), "dq_scale"))
    if c is None:
        inputs = [_int_constant(q.t(), sb, signed=True, name="dq_weight"), scale_constant]
    else:
        inputs = [_int_constant(q.t() + half, sb, signed=False, name="dq_weight"), scale_constant,
                  _int_constant((half - c).to(torch.int16).repeat_interleave(repeat, dim=1).t(), sb, signed=False,
                                name="dq_zero_point")]
    y = op.MatMul(x, op21.DequantizeLinear(*inputs, axis=0, block_size=block))
    if c is None:
        y = op.Add(y, _zero_part(x, zero, in_features // group, group))
    return _add_bias(y, bias)


def _int_constant(values: torch.Tensor, bits: int, signed: bool, name: str):
    array = values.contiguous().numpy().astype(_ONNX_INTS[(bits, signed)])
    return op.Constant(value=numpy_helper.from_array(array, name))


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
    return _add_bias(y, bias)


@register_onnx_rewrite
def drop_padding(model) -> None:
    """A layer whose input features do not divide the group is quantized with zero columns appended, and the graph
    pads its input to match (aten.constant_pad_nd). MatMulNBits takes K that is not a whole number of blocks, so a
    Pad read only by MatMulNBits nodes goes, and they get the true K: one node less per such layer."""
    for node in list(model.graph.all_nodes()):
        if node.op_type != "Pad" or node.domain not in ("", "ai.onnx") or len(node.inputs) > 3:
            continue
        pads = _constant(node.inputs[1] if len(node.inputs) > 1 else None)
        fill = _constant(node.inputs[2] if len(node.inputs) > 2 else None)
        mode = node.attributes.get("mode")
        if pads is None or (mode is not None and mode.value != "constant") or (fill is not None and fill.any()):
            continue
        rank, width = len(pads) // 2, int(pads[-1])
        if width <= 0 or pads[:-1].any() or rank == 0:
            continue
        users = [user for user, _ in node.outputs[0].uses()]
        if not users or any(u.op_type != "MatMulNBits" or u.domain != "com.microsoft" or u.inputs[0] is not node.outputs[0]
                            or not _same_blocks(u, width) for u in users) or node.outputs[0].is_graph_output():
            continue
        for user in users:
            user.replace_input_with(0, node.inputs[0])
            user.attributes["K"] = ir.AttrInt64("K", user.attributes["K"].value - width)
        node.graph.remove(node, safe=True)


def _same_blocks(matmul, width: int) -> bool:
    """Whether K - width still spans as many blocks as K: B's shape is fixed by the block count ORT derives from K
    (a model's own wider padding must stay)."""
    k, block = matmul.attributes["K"].value, matmul.attributes["block_size"].value
    return -(-(k - width) // block) == -(-k // block)


def _constant(value):
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None and value.producer() is not None and value.producer().op_type == "Constant":
        attr = value.producer().attributes.get("value")
        tensor = attr.value if attr is not None else None
    return None if tensor is None else tensor.numpy()
