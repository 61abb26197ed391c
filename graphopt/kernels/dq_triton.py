"""Triton kernels for `graphopt::dq_linear`: y = x @ Ŵᵀ (+ bias) with packed low-bit weights.

    Ŵ[n, k] = scale[n, k // g] * q[n, k] + zero[n, k // g],   q signed, b ∈ {2, 3, 4, 8} bits

`packed` is uint8 [N, ceil(K * sb / 8)] in the layout of graphopt.compiler.quantize.pack: codes stored
unsigned (q + 2^(sb-1)), 8 // sb per byte, first value in the lowest bits; sb = 4 for b = 3.

Kernels (all accumulate in fp32 and write y in x's dtype)
  _dq_gemv_kernel  small M (1-4 rows). Grid (cdiv(N, BLOCK_N),): each program owns BLOCK_N output columns for
                   all M rows (BLOCK_M = next power of two >= M, padded rows masked) and walks K in BLOCK_K chunks.
                   A chunk is split into sub-blocks that each lie inside one quantization group, and per group
                   Σ_k x_k (s q_k + z) = s Σ_k x_k q_k + z Σ_k x_k, so codes are never dequantized element-wise.
  _dq_gemv_units_kernel  the batch-1-4 GEMV when in_features is a multiple of its run (16-32 codes; 16-64 in the
                   pipelined forms below) and the
                   packed rows are aligned to its unit: codes read in units whose activations are one 16-byte
                   load, runs of up to 4 units per thread, each code one LOP3 + FADD + FFMA (_code_exact), the
                   group scale once per run (see the kernel's comment). Grid (cdiv(N, BLOCK_N),).
  _dq_gemv_dequant_kernel  the same grid; codes dequantized element-wise (s q + z) into a 3-D register tile
                   reduced over K once at the end (no cross-thread reduction per group). kernel_specs(gemv=...)
                   picks one of the GEMVs; benchmarks/dq_kernels.py measures them.
  _dq_gemv_units_hi_kernel  the units GEMV with biased codes for 16-bit activations: each code is shifted by a
                   multiple of 8 bits into a high mantissa window and read as 2^(23-shift) + code, and Σ bias x is
                   removed once per run for all rows, so no subtraction per code (~7-10 % fewer instructions in the
                   loop). The default at M <= 4 where the units GEMV fits (H200: 2-8 % faster than plain units at
                   8192² and 4096 x 14336, the same within 1.5 % at 4096²).
  _dq_gemv_units(_hi)_pf_kernel / _dq_gemv_units(_hi)_sw_kernel  the same, software pipelined: the next K step's
                   loads issued before this step's arithmetic, into registers (_pf) or through shared memory by
                   Triton's pipeliner with 3 stages (_sw; scales and zeros one step ahead in registers). With one or
                   two waves of programs and 1-2 K steps each, the plain kernel alternates load and arithmetic
                   phases in lockstep on every SM (its H100 batch-1 times lie between the max and the sum of the
                   pure read time and the issue time). Runs of up to 8 units. Timed on an H200: "_pf" no faster
                   than units_hi, "_sw" 1.8-4.3x slower than the plain kernels, so neither is a default.
  _dq_gemv_units_h2(_r2)_kernel  the units GEMV in fp16x2 for 16-bit activations (gemv="units_h2", not a
                   default: untimed): 32-bit words, each pair of codes one LOP3 + HFMA2 to exact signed codes and one
                   HFMA2 per activation row into an fp16x2 partial sum (inline PTX: _h2_dq, _h2_fma), activations
                   scaled per run by a power of two so the fp16 sums cannot overflow; full K steps load without
                   masks. Offline 2.9 / 2.5 SASS instructions per code at W4g128 / W2g64 against units_hi's 4.1 /
                   3.9; "_r2" takes runs of 2 words (fewer registers). GRAPHOPT_DQ_GEMV=units_h2 prefers it.
  _dq_gemm_planes_kernel / _dq_gemm_planes8_kernel  the default GEMM up to 16 rows at 3/4 (and 8) bits: code
                   slot j of every 16-bit (8-bit) unit is its own operand, element-wise in the loaded units, so Triton
                   dequantizes in the tensor-core operand registers; integer codes go into tl.dot and each group's
                   partial is scaled afterwards (see _planes_gemm). _dq_gemm_scaled(8)_kernel: the same operands
                   dequantized (s q + z) in registers before the dot: the default at 2 bits up to 16 rows and at
                   2-4 bits above. _default_gemm picks; the launcher splits K (default_split).
  _dq_gemm_kernel  the "dequant" GEMM (the default at 8 bits above 16 rows; also the ahead-of-time GEMM).
                   Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)) for all GEMMs; the M index varies fastest so programs
                   that share a weight tile run close together (L2 reuse). Each BLOCK_K × BLOCK_N weight tile is
                   dequantized to x's dtype, put back in k order and fed to tl.dot.

Unpacking: a chunk of BLOCK_K codes is BLOCK_K // P bytes per row (P = 8 // sb codes per byte), loaded once and
contiguously. Code j of byte i is k = i*P + j, extracted as (byte >> (j*sb)) & (2^sb - 1) for each j in a static
loop; the matching activations x[:, i*P + j] are loaded with stride P (x is small and cache resident), so no code is
ever re-interleaved into k order. The K sum is order-independent, so each j contributes a separate partial product.

Constexprs are BITS, GROUP (0 = per channel), BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS; everything else is a pointer or an
i32, so `kernel_specs` can hand the kernels to triton.compile(ASTSource(...)) for ahead-of-time PTX. Offsets are i32:
x, packed and y must each have fewer than 2^31 elements (checked by the launcher).

Triton's CPU interpreter (TRITON_INTERPRET=1, set before triton is imported) runs these kernels on CPU tensors. It
computes bf16 tl.dot on the raw bf16 bit patterns (Triton 3.9), so the launcher refuses bf16 GEMM when interpreted.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from ..compiler.quantize import SUPPORTED_BITS, unpack

__all__ = ["dq_linear_triton", "dq_linear_reference", "kernel_specs", "is_interpreted", "GEMV_MAX_M", "GEMV_KERNELS"]

GEMV_MAX_M = 4  # rows up to which the GEMV kernel is used
_FLOAT_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_INT_ARGS = ("M", "N", "K", "stride_xm", "stride_pn", "stride_sn", "stride_zn", "stride_ym")
_I32_LIMIT = 2**31


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------

@triton.jit
def _dq_gemv_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr,
                    M, N, K, stride_xm, stride_pn, stride_sn, stride_zn, stride_ym,
                    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    SB: tl.constexpr = 4 if BITS == 3 else BITS  # 3-bit codes use the 4-bit layout
    P: tl.constexpr = 8 // SB
    CODE_MASK: tl.constexpr = (1 << SB) - 1
    OFFSET: tl.constexpr = 1 << (SB - 1)
    # Sub-blocks never straddle a group: GROUP is a power of two, so either it divides BLOCK_K or BLOCK_K divides it.
    KSUB: tl.constexpr = BLOCK_K if (GROUP == 0 or GROUP >= BLOCK_K) else GROUP

    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, KSUB // P)
    w_rows = packed_ptr + offs_n[:, None] * stride_pn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    for k0 in range(0, K, BLOCK_K):
        for sub in tl.static_range(BLOCK_K // KSUB):
            kb = k0 + sub * KSUB  # first k of this sub-block; a multiple of P
            byte = kb // P + offs_b
            k_first = byte * P  # k of code 0 in each byte
            w = tl.load(w_rows + byte[None, :], mask=n_mask[:, None] & (k_first < K)[None, :], other=0)
            w = w.to(tl.int32)
            qx = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # Σ_k x_k q_k over this sub-block
            xs = tl.zeros([BLOCK_M], dtype=tl.float32)  # Σ_k x_k over this sub-block
            for j in tl.static_range(P):
                q = (((w >> (j * SB)) & CODE_MASK) - OFFSET).to(tl.float32)  # [BLOCK_N, KSUB // P]
                k = k_first + j
                for m in tl.static_range(BLOCK_M):
                    k_end = tl.where(m < M, K, 0)  # padded rows load nothing
                    xj = tl.load(x_ptr + m * stride_xm + k, mask=k < k_end, other=0.0).to(tl.float32)
                    part = tl.sum(q * xj[None, :], axis=1)
                    if BLOCK_M == 1:
                        qx += part[None, :]
                        xs += tl.sum(xj)
                    else:
                        # No per-row register arrays in Triton: route the row's partial into its accumulator row.
                        qx += tl.where(rows[:, None] == m, part[None, :], 0.0)
                        xs += tl.where(rows == m, tl.sum(xj), 0.0)
            g_mask = offs_n < tl.where(kb < K, N, 0)  # sub-blocks past K (K % BLOCK_K != 0) have no group
            if GROUP == 0:
                s = tl.load(scale_ptr + offs_n * stride_sn, mask=g_mask, other=0.0).to(tl.float32)
                z = tl.load(zero_ptr + offs_n * stride_zn, mask=g_mask, other=0.0).to(tl.float32)
            else:
                s = tl.load(scale_ptr + offs_n * stride_sn + kb // GROUP, mask=g_mask, other=0.0).to(tl.float32)
                z = tl.load(zero_ptr + offs_n * stride_zn + kb // GROUP, mask=g_mask, other=0.0).to(tl.float32)
            acc += qx * s[None, :] + xs[:, None] * z[None, :]

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rows < M)[:, None] & n_mask[None, :])


@triton.jit
def _codes_to_f32(w, j: tl.constexpr, SB: tl.constexpr, OFFSET: tl.constexpr):
    # Signed code j of each int32-widened byte as fp32 without an int-to-float instruction (those issue at a
    # quarter of the FMA rate): OR-ing the code into the mantissa of 2^23 gives exactly 2^23 + code.
    code = (w >> (j * SB)) & ((1 << SB) - 1)
    return (code | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)


@triton.jit
def _split_last(x, P: tl.constexpr):
    # x [R, C, P] (P in 1, 2, 4) -> its P slices [R, C] along the last dim, ordered by index.
    if P == 1:
        return (tl.reshape(x, [x.shape[0], x.shape[1]]),)
    elif P == 2:
        a, b = tl.split(x)
        return (a, b)
    elif P == 4:
        lo, hi = tl.split(tl.reshape(x, [x.shape[0], x.shape[1], 2, 2]))  # lo: index 0, 2; hi: 1, 3
        x0, x2 = tl.split(lo)
        x1, x3 = tl.split(hi)
        return (x0, x1, x2, x3)
    else:
        ev, od = tl.split(tl.reshape(x, [x.shape[0], x.shape[1], 4, 2]))  # ev: 0, 2, 4, 6; od: 1, 3, 5, 7
        e0, e1 = tl.split(tl.reshape(ev, [x.shape[0], x.shape[1], 2, 2]))  # e0: 0, 4; e1: 2, 6
        o0, o1 = tl.split(tl.reshape(od, [x.shape[0], x.shape[1], 2, 2]))  # o0: 1, 5; o1: 3, 7
        x0, x4 = tl.split(e0)
        x2, x6 = tl.split(e1)
        x1, x5 = tl.split(o0)
        x3, x7 = tl.split(o1)
        return (x0, x1, x2, x3, x4, x5, x6, x7)


@triton.jit
def _join_last(c0, c1, c2, c3, P: tl.constexpr):
    # P tensors [R, C] -> [R, C * P] with element (r, i*P + j) = c_j[r, i] (the inverse of _split_last).
    if P == 1:
        return c0
    elif P == 2:
        return tl.reshape(tl.join(c0, c1), [c0.shape[0], c0.shape[1] * 2])
    else:
        j = tl.join(tl.join(c0, c2), tl.join(c1, c3))  # [R, C, 2 (j // 2), 2 (j % 2)]
        return tl.reshape(j, [c0.shape[0], c0.shape[1] * 4])


@triton.jit
def _dq_gemv_dequant_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr,
                            M, N, K, stride_xm, stride_pn, stride_sn, stride_zn, stride_ym,
                            BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    # Same grid and sub-blocks as _dq_gemv_kernel, but codes are dequantized element-wise and accumulated into a
    # [BLOCK_M, BLOCK_N, KSUB // P] register tile that is reduced over K once at the end: no cross-thread
    # reduction inside the K loop. x is loaded contiguously once per sub-block and split into its P code slots
    # in registers; codes become floats by the 2^23 mantissa trick.
    SB: tl.constexpr = 4 if BITS == 3 else BITS
    P: tl.constexpr = 8 // SB
    OFFSET: tl.constexpr = 1 << (SB - 1)
    KSUB: tl.constexpr = BLOCK_K if (GROUP == 0 or GROUP >= BLOCK_K) else GROUP
    KB: tl.constexpr = KSUB // P

    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, KB)
    offs_k = tl.arange(0, KSUB)
    w_rows = packed_ptr + offs_n[:, None] * stride_pn
    x_rows = x_ptr + rows[:, None] * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N, KB], dtype=tl.float32)

    for k0 in range(0, K, BLOCK_K):
        for sub in tl.static_range(BLOCK_K // KSUB):
            kb = k0 + sub * KSUB
            byte = kb // P + offs_b
            w = tl.load(w_rows + byte[None, :], mask=n_mask[:, None] & (byte * P < K)[None, :], other=0)
            w = w.to(tl.int32)
            g_mask = offs_n < tl.where(kb < K, N, 0)
            if GROUP == 0:
                s = tl.load(scale_ptr + offs_n * stride_sn, mask=g_mask, other=0.0).to(tl.float32)
                z = tl.load(zero_ptr + offs_n * stride_zn, mask=g_mask, other=0.0).to(tl.float32)
            else:
                s = tl.load(scale_ptr + offs_n * stride_sn + kb // GROUP, mask=g_mask, other=0.0).to(tl.float32)
                z = tl.load(zero_ptr + offs_n * stride_zn + kb // GROUP, mask=g_mask, other=0.0).to(tl.float32)
            k = kb + offs_k
            xk = tl.load(x_rows + k[None, :], mask=(rows < M)[:, None] & (k < K)[None, :], other=0.0)
            xs = _split_last(tl.reshape(xk.to(tl.float32), [BLOCK_M, KB, P]), P)
            for j in tl.static_range(P):
                wt = _codes_to_f32(w, j, SB, OFFSET) * s[:, None] + z[:, None]  # codes past K meet x = 0
                acc += wt[None, :, :] * xs[j][:, None, :]

    out = tl.sum(acc, axis=2)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=(rows < M)[:, None] & n_mask[None, :])


@triton.jit
def _code_exact(h, SH: tl.constexpr, MASK: tl.constexpr, zero):
    # The unsigned code at bit SH of h (SH + code bits <= 23) as an exact fp32 in two instructions: OR-ed into the
    # mantissa of 2^(23-SH), whose last place is worth 2^-SH, it reads 2^(23-SH) + code; subtract 2^(23-SH).
    # `zero` is a runtime 0 the compiler cannot fold: the exponent then sits in a register and the mask becomes
    # LOP3's immediate (with two constants, ptxas rematerializes one of them before every LOP3).
    EXP: tl.constexpr = (150 - SH) << 23
    return ((h & (MASK << SH)) | (zero + EXP)).to(tl.float32, bitcast=True) - (8388608.0 / (1 << SH))


@triton.jit
def _unit_code(w, j: tl.constexpr, SB: tl.constexpr, MASK: tl.constexpr, zero):
    # Code j of each int32-widened unit; codes reaching past mantissa bit 22 come from the unit's upper half.
    if j * SB + SB <= 23:
        return _code_exact(w, j * SB, MASK, zero)
    else:
        return _code_exact(w >> 16, j * SB - 16, MASK, zero)


@triton.jit
def _code_biased(h, SH: tl.constexpr, MASK: tl.constexpr, zero):
    # 2^(23-SH) + the code at bit SH of h (the exponent trick of _code_exact without the subtraction).
    EXP: tl.constexpr = (150 - SH) << 23
    return ((h & (MASK << SH)) | (zero + EXP)).to(tl.float32, bitcast=True)


@triton.jit
def _hi_code(w, PJ: tl.constexpr, SB: tl.constexpr, MASK: tl.constexpr, zero):
    # The code at bit PJ of w moved by a multiple of 8 bits into the window [12, 23 - SB] and read as
    # 2^(23-SH) + code (bias <= 2^11): no subtraction per code; the caller removes Σ bias_j x_j once per run for
    # all rows (the bias of each slot is this function at w = 0). Codes the window cannot take are read exactly.
    TOP: tl.constexpr = 23 - SB
    if PJ >= 12 and PJ <= TOP:
        return _code_biased(w, PJ, MASK, zero)
    elif PJ + 8 >= 12 and PJ + 8 <= TOP:
        return _code_biased(w << 8, PJ + 8, MASK, zero)
    elif PJ + 16 >= 12 and PJ + 16 <= TOP:
        return _code_biased(w << 16, PJ + 16, MASK, zero)
    elif PJ - 8 >= 12 and PJ - 8 <= TOP:
        return _code_biased(w >> 8, PJ - 8, MASK, zero)
    elif PJ - 16 >= 12 and PJ - 16 <= TOP:
        return _code_biased(w >> 16, PJ - 16, MASK, zero)
    else:
        return _unit_code(w, PJ // SB, SB, MASK, zero)  # exact; bias 0


@triton.jit
def _split_cols(x, C: tl.constexpr):
    # x [R, C] (C in 1, 2, 4, 8) with each row in one thread -> its C columns as [R] tensors, in register moves.
    R: tl.constexpr = x.shape[0]
    if C == 1:
        c0 = tl.reshape(x, [R])
        return c0, c0, c0, c0, c0, c0, c0, c0
    elif C == 2:
        c0, c1 = tl.split(x)
        return c0, c1, c0, c0, c0, c0, c0, c0
    elif C == 4:
        ev, od = tl.split(tl.reshape(x, [R, 2, 2]))  # ev: columns 0, 2; od: 1, 3
        c0, c2 = tl.split(ev)
        c1, c3 = tl.split(od)
        return c0, c1, c2, c3, c0, c0, c0, c0
    else:
        ev, od = tl.split(tl.reshape(x, [R, 4, 2]))  # ev: 0, 2, 4, 6; od: 1, 3, 5, 7
        e0, e1 = tl.split(tl.reshape(ev, [R, 2, 2]))  # e0: 0, 4; e1: 2, 6
        o0, o1 = tl.split(tl.reshape(od, [R, 2, 2]))  # o0: 1, 5; o1: 3, 7
        c0, c4 = tl.split(e0)
        c2, c6 = tl.split(e1)
        c1, c5 = tl.split(o0)
        c3, c7 = tl.split(o1)
        return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _stack4(a, b, c, d):
    # four [T] tensors -> [4, T] (row i = the i-th argument), by in-thread joins
    T: tl.constexpr = a.shape[0]
    return tl.trans(tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), [T, 4]))


@triton.jit
def _x_load(x_ptr, m, stride_xm, M, K, kx, R: tl.constexpr, CPU: tl.constexpr):
    # x[m] for the R unit slots of every run, as loaded: 8 [T, CPU] tensors (one 16-byte vector per thread each;
    # slots past R repeat the first). Each slot is its own load: no two dims of equal contiguity, whose order
    # Triton versions break differently (3.6 and 3.9 would then disagree on the thread layout).
    x0 = _x_slot(x_ptr, m, stride_xm, M, K, kx)
    x1 = x0
    x2 = x0
    x3 = x0
    x4 = x0
    x5 = x0
    x6 = x0
    x7 = x0
    if R >= 2:
        x1 = _x_slot(x_ptr, m, stride_xm, M, K, kx + CPU)
    if R >= 4:
        x2 = _x_slot(x_ptr, m, stride_xm, M, K, kx + 2 * CPU)
        x3 = _x_slot(x_ptr, m, stride_xm, M, K, kx + 3 * CPU)
    if R == 8:
        x4 = _x_slot(x_ptr, m, stride_xm, M, K, kx + 4 * CPU)
        x5 = _x_slot(x_ptr, m, stride_xm, M, K, kx + 5 * CPU)
        x6 = _x_slot(x_ptr, m, stride_xm, M, K, kx + 6 * CPU)
        x7 = _x_slot(x_ptr, m, stride_xm, M, K, kx + 7 * CPU)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _stack8(c0, c1, c2, c3, c4, c5, c6, c7, j: tl.constexpr):
    # column j of eight slots' column tuples -> [8, T] (row i = slot i), by in-thread joins
    T: tl.constexpr = c0[j].shape[0]
    ev = tl.join(tl.join(c0[j], c4[j]), tl.join(c2[j], c6[j]))  # slots 0, 2, 4, 6 as [T, 2, 2]
    od = tl.join(tl.join(c1[j], c5[j]), tl.join(c3[j], c7[j]))
    return tl.trans(tl.reshape(tl.join(ev, od), [T, 8]))


@triton.jit
def _x_slot(x_ptr, m, stride_xm, M, K, kx):
    k_end = tl.where(m < M, K, 0)  # padded rows load nothing
    return tl.load(x_ptr + m * stride_xm + kx, mask=kx < k_end, other=0.0)


@triton.jit
def _x_slot_at(x_ptr, m, stride_xm, M, K, kx, FULL: tl.constexpr):
    # As _x_slot; in a full K step row 0 loads unmasked (no registers zeroed first): it exists, since M >= 1
    # (dq_linear_triton returns before launching when M or N is 0)
    if FULL and m == 0:
        return tl.load(x_ptr + kx)
    return _x_slot(x_ptr, m, stride_xm, M, K, kx)


@triton.jit
def _x_col_slot(xr, i: tl.constexpr, x_ptr, m, stride_xm, M, K, kx, CPU: tl.constexpr, LOADED: tl.constexpr,
                FULL: tl.constexpr):
    # slot i of x[m] split into its CPU columns: from _x_load's slots when LOADED, else loaded here
    if LOADED:
        return _split_cols(xr[i].to(tl.float32), CPU)
    else:
        return _split_cols(_x_slot_at(x_ptr, m, stride_xm, M, K, kx + i * CPU, FULL).to(tl.float32), CPU)


@triton.jit
def _x_cols(xr, x_ptr, m, stride_xm, M, K, kx, R: tl.constexpr, CPU: tl.constexpr, LOADED: tl.constexpr,
            FULL: tl.constexpr):
    # The R (1, 2, 4 or 8) unit slots of x[m] as CPU column tensors (column j: code j of each unit), [1, T] for
    # R = 1, else [R, T]. Unless LOADED, each slot is loaded just before it is split (in that order ptxas keeps
    # fewer registers live than with all loads first). One if/elif chain: Triton type-checks every return that
    # follows a taken constexpr branch, so the shapes may not differ between fall-through returns.
    c0 = _x_col_slot(xr, 0, x_ptr, m, stride_xm, M, K, kx, CPU, LOADED, FULL)
    if R == 1:
        xc = (c0[0][None, :], c0[1][None, :], c0[2][None, :], c0[3][None, :],
              c0[4][None, :], c0[5][None, :], c0[6][None, :], c0[7][None, :])
    elif R == 2:
        c1 = _x_col_slot(xr, 1, x_ptr, m, stride_xm, M, K, kx, CPU, LOADED, FULL)
        xc = (tl.trans(tl.join(c0[0], c1[0])), tl.trans(tl.join(c0[1], c1[1])),
              tl.trans(tl.join(c0[2], c1[2])), tl.trans(tl.join(c0[3], c1[3])),
              tl.trans(tl.join(c0[4], c1[4])), tl.trans(tl.join(c0[5], c1[5])),
              tl.trans(tl.join(c0[6], c1[6])), tl.trans(tl.join(c0[7], c1[7])))
    elif R == 4:
        c1 = _x_col_slot(xr, 1, x_ptr, m, stride_xm, M, K, kx, CPU, LOADED, FULL)
        c2 = _x_col_slot(xr, 2, x_ptr, m, stride_xm, M, K, kx, CPU, LOADED, FULL)
        c3 = _x_col_slot(xr, 3, x_ptr, m, stride_xm, M, K, kx, CPU, LOADED, FULL)
        xc = (_stack4(c0[0], c1[0], c2[0], c3[0]), _stack4(c0[1], c1[1], c2[1], c3[1]),
              _stack4(c0[2], c1[2], c2[2], c3[2]), _stack4(c0[3], c1[3], c2[3], c3[3]),
              _stack4(c0[4], c1[4], c2[4], c3[4]), _stack4(c0[5], c1[5], c2[5], c3[5]),
              _stack4(c0[6], c1[6], c2[6], c3[6]), _stack4(c0[7], c1[7], c2[7], c3[7]))
    else:
        c1 = _x_col_slot(xr, 1, x_ptr, m, stride_xm, M, K, kx, CPU, LOADED, FULL)
        c2 = _x_col_slot(xr, 2, x_ptr, m, stride_xm, M, K, kx, CPU, LOADED, FULL)
        c3 = _x_col_slot(xr, 3, x_ptr, m, stride_xm, M, K, kx, CPU, LOADED, FULL)
        c4 = _x_col_slot(xr, 4, x_ptr, m, stride_xm, M, K, kx, CPU, LOADED, FULL)
        c5 = _x_col_slot(xr, 5, x_ptr, m, stride_xm, M, K, kx, CPU, LOADED, FULL)
        c6 = _x_col_slot(xr, 6, x_ptr, m, stride_xm, M, K, kx, CPU, LOADED, FULL)
        c7 = _x_col_slot(xr, 7, x_ptr, m, stride_xm, M, K, kx, CPU, LOADED, FULL)
        xc = (_stack8(c0, c1, c2, c3, c4, c5, c6, c7, 0), _stack8(c0, c1, c2, c3, c4, c5, c6, c7, 1),
              _stack8(c0, c1, c2, c3, c4, c5, c6, c7, 2), _stack8(c0, c1, c2, c3, c4, c5, c6, c7, 3),
              _stack8(c0, c1, c2, c3, c4, c5, c6, c7, 4), _stack8(c0, c1, c2, c3, c4, c5, c6, c7, 5),
              _stack8(c0, c1, c2, c3, c4, c5, c6, c7, 6), _stack8(c0, c1, c2, c3, c4, c5, c6, c7, 7))
    return xc


@triton.jit
def _units_row_partial(f_list, b_list, xc, CPU: tl.constexpr, HI: tl.constexpr):
    # Σ_k x[m, k] u_k per (weight row, run) and Σ_k x[m, k] per run, for one activation row (its _x_cols).
    p = tl.zeros(f_list[0].shape, dtype=tl.float32)
    xs = tl.zeros(xc[0].shape, dtype=tl.float32)
    cb = tl.zeros(xc[0].shape, dtype=tl.float32)  # HI: Σ_j bias_j x_j, shared by every weight row
    for j in tl.static_range(CPU):
        p += f_list[j] * xc[j][None, :, :]
        xs += xc[j]
        if HI:
            cb += b_list[j] * xc[j]
    if HI:
        return tl.sum(p, axis=1) - tl.sum(cb, axis=0)[None, :], tl.sum(xs, axis=0)
    return tl.sum(p, axis=1), tl.sum(xs, axis=0)


@triton.jit
def _units_w(units, k0, q_idx, q_row, i_idx, K, stride_pn, T: tl.constexpr, CPU: tl.constexpr, RUN: tl.constexpr,
             UB: tl.constexpr, FULL: tl.constexpr):
    # The weight units of the K step at k0 as [R, BLOCK_N * T] (column q: row q // T, run q % T: again no
    # contiguity tie), nothing past K (q_row is clamped to a real row). Offsets come straight from q (Triton 3.6
    # loses the alignment facts through a reshape and would not vectorize). FULL: the step lies inside K, so no
    # mask (a masked load zeroes its registers first: two CS2R per row).
    uq = k0 // CPU + (q_idx % T) * (RUN // CPU) + q_row * (stride_pn // (UB // 8))
    if FULL:
        return tl.load(units + uq[None, :] + i_idx[:, None])
    okq = k0 + (q_idx % T) * RUN < K
    return tl.load(units + uq[None, :] + i_idx[:, None], mask=okq[None, :], other=0)


@triton.jit
def _units_sz(scale_ptr, zero_ptr, k0, q_idx, q_row, K, stride_sn, stride_zn, BLOCK_N: tl.constexpr, T: tl.constexpr,
              RUN: tl.constexpr, GROUP: tl.constexpr, FULL: tl.constexpr):
    # The group scales and zeros [BLOCK_N * T] of the K step at k0, as stored (per channel: unused zeros). FULL:
    # unmasked (a masked 16-bit load costs a PRMT to zero its half register).
    if GROUP == 0:
        s = tl.zeros([BLOCK_N * T], dtype=scale_ptr.dtype.element_ty)
        z = s
    else:
        gq = (k0 + (q_idx % T) * RUN) // GROUP
        so = q_row * stride_sn + gq
        zo = q_row * stride_zn + gq
        if FULL:
            s = tl.load(scale_ptr + so)
            z = tl.load(zero_ptr + zo)
        else:
            okq = k0 + (q_idx % T) * RUN < K
            s = tl.load(scale_ptr + so, mask=okq, other=0.0)
            z = tl.load(zero_ptr + zo, mask=okq, other=0.0)
    return s, z


@triton.jit
def _dq_gemv_units_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr,
                          M, N, K, stride_xm, stride_pn, stride_sn, stride_zn, stride_ym,
                          BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    _units_gemv(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_pn, stride_sn,
                stride_zn, stride_ym, BITS, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, False, 0)


@triton.jit
def _dq_gemv_units_hi_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr,
                             M, N, K, stride_xm, stride_pn, stride_sn, stride_zn, stride_ym,
                             BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    # The units GEMV reading 16-bit activations' codes biased (_hi_code): no subtraction per code.
    _units_gemv(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_pn, stride_sn,
                stride_zn, stride_ym, BITS, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, True, 0)


@triton.jit
def _dq_gemv_units_pf_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr,
                             M, N, K, stride_xm, stride_pn, stride_sn, stride_zn, stride_ym,
                             BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    # The units GEMV loading each K step's weights one step ahead into registers (PIPE 1).
    _units_gemv(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_pn, stride_sn,
                stride_zn, stride_ym, BITS, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, False, 1)


@triton.jit
def _dq_gemv_units_hi_pf_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr,
                                M, N, K, stride_xm, stride_pn, stride_sn, stride_zn, stride_ym,
                                BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    # units_hi with PIPE 1.
    _units_gemv(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_pn, stride_sn,
                stride_zn, stride_ym, BITS, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, True, 1)


@triton.jit
def _dq_gemv_units_sw_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr,
                             M, N, K, stride_xm, stride_pn, stride_sn, stride_zn, stride_ym,
                             BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    # The units GEMV with Triton's pipeliner, 3 stages (PIPE 3).
    _units_gemv(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_pn, stride_sn,
                stride_zn, stride_ym, BITS, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, False, 3)


@triton.jit
def _dq_gemv_units_hi_sw_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr,
                                M, N, K, stride_xm, stride_pn, stride_sn, stride_zn, stride_ym,
                                BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    # units_hi with PIPE 3.
    _units_gemv(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_pn, stride_sn,
                stride_zn, stride_ym, BITS, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, True, 3)


@triton.jit
def _units_gemv(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr,
                M, N, K, stride_xm, stride_pn, stride_sn, stride_zn, stride_ym,
                BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, HI_CODES: tl.constexpr, PIPE: tl.constexpr):
    # Codes are read in units whose activations are one 16-byte load (8 codes for fp16/bf16 x, 4 for fp32; at most
    # 32 bits). Each thread owns runs of R consecutive units inside one quantization group, for BLOCK_N rows:
    # its weights are one vector load per row, its x is R vector loads shared by all rows, and a code costs one
    # LOP3, one FADD (exact code as fp32, _code_exact) and one FFMA. Per run and row, Σ x u and Σ x are scaled
    # once: Σ_k x_k (s (u_k - 2^(b-1)) + z) = s Σ x u + (z - 2^(b-1) s) Σ x.
    # Every load is a tensor with a single most-contiguous dim and one other (weights [R, BLOCK_N * T], x per unit
    # slot [T, CPU], scales [BLOCK_N * T]), so Triton's coalescing maps runs to threads the same way in all of
    # them and on every version (3.6 and 3.9 break ties between equally contiguous dims differently); the
    # [BLOCK_N, R, T] compute tile is then a register-only reshape, with no layout conversion through shared
    # memory. Needs K % (R * CPU) == 0 and rows aligned to the unit (checked by the launcher); BLOCK_K =
    # R * CPU * 32 * num_warps gives each thread one run. CPU and R must match units_run().
    SB: tl.constexpr = 4 if BITS == 3 else BITS
    MASK: tl.constexpr = (1 << SB) - 1
    OFFSET: tl.constexpr = 1 << (SB - 1)
    XB: tl.constexpr = x_ptr.dtype.element_ty.primitive_bitwidth
    CPU: tl.constexpr = min(128 // XB, 32 // SB)  # codes per unit
    UB: tl.constexpr = CPU * SB  # unit bits: 8, 16 or 32
    UT: tl.constexpr = tl.int8 if UB == 8 else (tl.int16 if UB == 16 else tl.int32)
    # units per run: up to 4, 8 in the pipelined forms (16-byte weight loads for 16-bit units, i.e. W2 with 16-bit
    # x or W3/W4 with fp32 x; 8-byte loads for W2 with fp32 x)
    RMAX: tl.constexpr = 8 if PIPE >= 1 else 4
    R: tl.constexpr = min(128 // UB, RMAX) if GROUP == 0 else min(128 // UB, RMAX, GROUP // CPU)
    RUN: tl.constexpr = R * CPU  # codes per run
    T: tl.constexpr = BLOCK_K // RUN  # runs per K step

    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    i_idx = tl.arange(0, R)
    t_idx = tl.arange(0, T)
    c_idx = tl.arange(0, CPU)
    units = packed_ptr.to(tl.pointer_type(UT))
    q_idx = tl.arange(0, BLOCK_N * T)
    q_row = tl.minimum(pid * BLOCK_N + q_idx // T, N - 1)  # rows past N read row N - 1 (never stored)
    zero = stride_ym >> 31  # 0 (strides are non-negative), opaque to the compiler
    # Biased codes only with 16-bit activations: the bias (<= 2^11) costs fp32 accumulator bits that fp32
    # activations' tolerance does not have.
    HI: tl.constexpr = HI_CODES if XB == 16 else False
    b_list = (_hi_code(zero, 0, SB, MASK, zero), _hi_code(zero, (1 % CPU) * SB, SB, MASK, zero),
              _hi_code(zero, (2 % CPU) * SB, SB, MASK, zero), _hi_code(zero, (3 % CPU) * SB, SB, MASK, zero),
              _hi_code(zero, (4 % CPU) * SB, SB, MASK, zero), _hi_code(zero, (5 % CPU) * SB, SB, MASK, zero),
              _hi_code(zero, (6 % CPU) * SB, SB, MASK, zero), _hi_code(zero, (7 % CPU) * SB, SB, MASK, zero))
    accs = (tl.zeros([BLOCK_N, T], dtype=tl.float32), tl.zeros([BLOCK_N, T], dtype=tl.float32),
            tl.zeros([BLOCK_N, T], dtype=tl.float32), tl.zeros([BLOCK_N, T], dtype=tl.float32),
            tl.zeros([T], dtype=tl.float32), tl.zeros([T], dtype=tl.float32),  # per channel: Σ x, scaled at the end
            tl.zeros([T], dtype=tl.float32), tl.zeros([T], dtype=tl.float32))
    # Software pipelining (PIPE): without it, a grid that fits in one or two waves alternates load and arithmetic
    # phases in lockstep on every SM. PIPE 1: the next K step's weights, scales, zeros and row-0 activations are
    # loaded into loop-carried registers, issued during this step's arithmetic (where in the body is ptxas's
    # choice: at W4 g128 it puts them in the last third). PIPE >= 2: Triton's pipeliner keeps PIPE - 1 K steps of
    # weights and activations in flight through shared memory (cp.async), and the scales and zeros (2-byte loads
    # for 16-bit scales, below cp.async's 4-byte minimum) are loaded one step ahead into registers.
    NS: tl.constexpr = PIPE if PIPE >= 2 else None
    REG_W: tl.constexpr = PIPE == 1
    REG_SZ: tl.constexpr = PIPE >= 1
    if PIPE == 0:
        # Full K steps load without masks, only a partial last step with them (6-10 % fewer loop instructions).
        # w_raw also fills the step's s_raw / z_raw / x_r0 slots: placeholders, _units_step loads those itself.
        k_full = K - K % BLOCK_K
        for k0 in range(0, k_full, BLOCK_K):
            w_raw = _units_w(units, k0, q_idx, q_row, i_idx, K, stride_pn, T, CPU, RUN, UB, True)
            accs = _units_step(k0, accs, w_raw, w_raw, w_raw, w_raw, x_ptr, scale_ptr, zero_ptr, q_idx, q_row, t_idx,
                               c_idx, b_list, M, K, stride_xm, stride_sn, stride_zn, BLOCK_M, BLOCK_N, T, R, CPU, RUN,
                               SB, MASK, OFFSET, GROUP, HI, False, False, True, zero)
        if k_full < K:
            w_raw = _units_w(units, k_full, q_idx, q_row, i_idx, K, stride_pn, T, CPU, RUN, UB, False)
            accs = _units_step(k_full, accs, w_raw, w_raw, w_raw, w_raw, x_ptr, scale_ptr, zero_ptr, q_idx, q_row,
                               t_idx, c_idx, b_list, M, K, stride_xm, stride_sn, stride_zn, BLOCK_M, BLOCK_N, T, R, CPU,
                               RUN, SB, MASK, OFFSET, GROUP, HI, False, False, False, zero)
    else:
        if REG_W:
            w_nx = _units_w(units, 0, q_idx, q_row, i_idx, K, stride_pn, T, CPU, RUN, UB, False)
            x_nx = _x_load(x_ptr, 0, stride_xm, M, K, t_idx[:, None] * RUN + c_idx[None, :], R, CPU)
        s_nx, z_nx = _units_sz(scale_ptr, zero_ptr, 0, q_idx, q_row, K, stride_sn, stride_zn, BLOCK_N, T, RUN, GROUP,
                               False)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=NS):
            if REG_W:
                w_raw, x_r0 = w_nx, x_nx
                w_nx = _units_w(units, k0 + BLOCK_K, q_idx, q_row, i_idx, K, stride_pn, T, CPU, RUN, UB, False)
                x_nx = _x_load(x_ptr, 0, stride_xm, M, K, (k0 + BLOCK_K + t_idx * RUN)[:, None] + c_idx[None, :], R,
                               CPU)
            else:
                w_raw = _units_w(units, k0, q_idx, q_row, i_idx, K, stride_pn, T, CPU, RUN, UB, False)
                x_r0 = w_raw  # a placeholder: _units_step loads the activations itself (LOADED false)
            s_raw, z_raw = s_nx, z_nx
            s_nx, z_nx = _units_sz(scale_ptr, zero_ptr, k0 + BLOCK_K, q_idx, q_row, K, stride_sn, stride_zn, BLOCK_N,
                                   T, RUN, GROUP, False)
            accs = _units_step(k0, accs, w_raw, s_raw, z_raw, x_r0, x_ptr, scale_ptr, zero_ptr, q_idx, q_row, t_idx,
                               c_idx, b_list, M, K, stride_xm, stride_sn, stride_zn, BLOCK_M, BLOCK_N, T, R, CPU, RUN,
                               SB, MASK, OFFSET, GROUP, HI, True, REG_W, False, zero)

    _units_epilogue(y_ptr, scale_ptr, zero_ptr, bias_ptr, M, stride_sn, stride_zn, stride_ym, offs_n, n_mask, accs,
                    OFFSET, GROUP, BLOCK_M, BLOCK_N, HAS_BIAS)


@triton.jit
def _units_step(k0, accs, w_raw, s_raw, z_raw, x_r0, x_ptr, scale_ptr, zero_ptr, q_idx, q_row, t_idx, c_idx, b_list,
                M, K, stride_xm, stride_sn, stride_zn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr,
                R: tl.constexpr, CPU: tl.constexpr, RUN: tl.constexpr, SB: tl.constexpr, MASK: tl.constexpr,
                OFFSET: tl.constexpr, GROUP: tl.constexpr, HI: tl.constexpr, SZ_LOADED: tl.constexpr,
                LOADED: tl.constexpr, FULL: tl.constexpr, zero):
    # One K step of a units GEMV for every activation row, from the step's weight units w_raw [R, BLOCK_N * T].
    # SZ_LOADED: s_raw / z_raw hold the step's scales and zeros, else they are loaded here (after the codes are
    # unpacked: in that order ptxas keeps fewer registers live). LOADED: x_r0 holds row 0's activation slots
    # (_x_load). FULL: the step lies inside K, so the scales, zeros and row 0's activations load unmasked.
    acc0, acc1, acc2, acc3, xt0, xt1, xt2, xt3 = accs
    w = tl.permute(tl.reshape(w_raw.to(tl.int32), [R, BLOCK_N, T]), (1, 0, 2))  # [BLOCK_N, R, T]
    if HI:
        f_list = (_hi_code(w, 0, SB, MASK, zero), _hi_code(w, (1 % CPU) * SB, SB, MASK, zero),
                  _hi_code(w, (2 % CPU) * SB, SB, MASK, zero), _hi_code(w, (3 % CPU) * SB, SB, MASK, zero),
                  _hi_code(w, (4 % CPU) * SB, SB, MASK, zero), _hi_code(w, (5 % CPU) * SB, SB, MASK, zero),
                  _hi_code(w, (6 % CPU) * SB, SB, MASK, zero), _hi_code(w, (7 % CPU) * SB, SB, MASK, zero))
    else:
        f_list = (_unit_code(w, 0, SB, MASK, zero), _unit_code(w, 1 % CPU, SB, MASK, zero),
                  _unit_code(w, 2 % CPU, SB, MASK, zero), _unit_code(w, 3 % CPU, SB, MASK, zero),
                  _unit_code(w, 4 % CPU, SB, MASK, zero), _unit_code(w, 5 % CPU, SB, MASK, zero),
                  _unit_code(w, 6 % CPU, SB, MASK, zero), _unit_code(w, 7 % CPU, SB, MASK, zero))
    kx = (k0 + t_idx * RUN)[:, None] + c_idx[None, :]  # [T, CPU]: the first unit of each run
    if not SZ_LOADED:
        s_raw, z_raw = _units_sz(scale_ptr, zero_ptr, k0, q_idx, q_row, K, stride_sn, stride_zn, BLOCK_N, T, RUN,
                                 GROUP, FULL)
    if not LOADED:
        x_r0 = (kx, kx, kx, kx, kx, kx, kx, kx)  # a placeholder: _x_cols loads the slots itself
    s = tl.reshape(s_raw.to(tl.float32), [BLOCK_N, T])
    zz = tl.reshape(z_raw.to(tl.float32), [BLOCK_N, T]) - OFFSET * s
    acc0, xt0 = _units_row(acc0, xt0, x_r0, x_ptr, 0, stride_xm, M, K, kx, f_list, b_list, s, zz, R, CPU, GROUP, HI,
                           LOADED, FULL)
    if BLOCK_M > 1:
        acc1, xt1 = _units_row(acc1, xt1, x_r0, x_ptr, 1, stride_xm, M, K, kx, f_list, b_list, s, zz, R, CPU, GROUP, HI,
                               False, FULL)
    if BLOCK_M > 2:
        acc2, xt2 = _units_row(acc2, xt2, x_r0, x_ptr, 2, stride_xm, M, K, kx, f_list, b_list, s, zz, R, CPU, GROUP, HI,
                               False, FULL)
        acc3, xt3 = _units_row(acc3, xt3, x_r0, x_ptr, 3, stride_xm, M, K, kx, f_list, b_list, s, zz, R, CPU, GROUP, HI,
                               False, FULL)
    return acc0, acc1, acc2, acc3, xt0, xt1, xt2, xt3


@triton.jit
def _units_row(acc, xt, x_r0, x_ptr, m, stride_xm, M, K, kx, f_list, b_list, s, zz, R: tl.constexpr, CPU: tl.constexpr,
               GROUP: tl.constexpr, HI: tl.constexpr, LOADED: tl.constexpr, FULL: tl.constexpr):
    # activation row m's K step into its accumulators: acc += s Σ x u + (z - OFFSET s) Σ x per (weight row, run)
    # (per channel: acc += Σ x u, xt += Σ x, both scaled after the loop)
    p, xs = _units_row_partial(f_list, b_list, _x_cols(x_r0, x_ptr, m, stride_xm, M, K, kx, R, CPU, LOADED, FULL), CPU,
                               HI)
    if GROUP == 0:
        return acc + p, xt + xs
    return acc + p * s + xs[None, :] * zz, xt


@triton.jit
def _units_epilogue(y_ptr, scale_ptr, zero_ptr, bias_ptr, M, stride_sn, stride_zn, stride_ym, offs_n, n_mask, accs,
                    OFFSET: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_BIAS: tl.constexpr):
    # The units GEMVs' outputs from their per-(row, run) accumulators (accs: acc0..3 [BLOCK_N, T], xt0..3 [T]); per
    # channel the scale and zero - OFFSET * scale are applied here (OFFSET: the codes' bias the kernel left in).
    acc0, acc1, acc2, acc3, xt0, xt1, xt2, xt3 = accs
    bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    s_pc = tl.zeros([BLOCK_N], dtype=tl.float32)
    zz_pc = s_pc
    if GROUP == 0:
        s_pc = tl.load(scale_ptr + offs_n * stride_sn, mask=n_mask, other=0.0).to(tl.float32)
        zz_pc = tl.load(zero_ptr + offs_n * stride_zn, mask=n_mask, other=0.0).to(tl.float32) - OFFSET * s_pc
    _units_store(y_ptr, 0, stride_ym, M, offs_n, n_mask, acc0, xt0, s_pc, zz_pc, bias, GROUP)
    if BLOCK_M > 1:
        _units_store(y_ptr, 1, stride_ym, M, offs_n, n_mask, acc1, xt1, s_pc, zz_pc, bias, GROUP)
    if BLOCK_M > 2:
        _units_store(y_ptr, 2, stride_ym, M, offs_n, n_mask, acc2, xt2, s_pc, zz_pc, bias, GROUP)
        _units_store(y_ptr, 3, stride_ym, M, offs_n, n_mask, acc3, xt3, s_pc, zz_pc, bias, GROUP)


@triton.jit
def _units_store(y_ptr, m, stride_ym, M, offs_n, n_mask, acc, xt, s_pc, zz_pc, bias, GROUP: tl.constexpr):
    out = tl.sum(acc, axis=1)
    if GROUP == 0:
        out = out * s_pc + tl.sum(xt, axis=0) * zz_pc
    tl.store(y_ptr + m * stride_ym + offs_n, (out + bias).to(y_ptr.dtype.element_ty),
             mask=n_mask & (offs_n * 0 + m < M))


@triton.jit
def _h2_split(v):
    # an int32 holding fp16x2 -> (low, high) fp16 halves (the interpreter's path)
    return (v.to(tl.int16).to(tl.float16, bitcast=True), (v >> 16).to(tl.int16).to(tl.float16, bitcast=True))


@triton.jit
def _h2_join(lo, hi):
    # two fp16 tensors -> one int32 holding them as fp16x2 (the interpreter's path)
    return ((hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)
            | (lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF))


@triton.jit
def _h2_dq(w, mask, magic, mul, add):
    # ((w & mask) | magic) * mul + add per fp16x2 lane: one LOP3 and one HFMA2 (the codes of one slot pair as exact
    # signed fp16x2, see _h2_slot_dq). Every operand is an int32 holding fp16x2, so Triton never sees the halves (as
    # fp16 tensors with a trailing pair dim, its layouts paired other elements and ptxas spent a PRMT per code
    # re-pairing them). Triton's CPU interpreter has no inline PTX: there the same arithmetic runs on the halves.
    if _H2_ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; lop3.b32 t, $1, $2, $3, 0xea; fma.rn.f16x2 $0, t, $4, $5; }",
            "=r,r,r,r,r,r", [w, mask, magic, mul, add], dtype=tl.int32, is_pure=True, pack=1)
    else:
        q_lo, q_hi = _h2_split((w & mask) | magic)
        m_lo, m_hi = _h2_split(mul)
        a_lo, a_hi = _h2_split(add)
        return _h2_join((q_lo.to(tl.float32) * m_lo.to(tl.float32) + a_lo.to(tl.float32)).to(tl.float16),
                        (q_hi.to(tl.float32) * m_hi.to(tl.float32) + a_hi.to(tl.float32)).to(tl.float16))


@triton.jit
def _h2_fma(d, xp, acc, FIRST: tl.constexpr):
    # acc + d * xp per fp16x2 lane (one HFMA2); FIRST: d * xp (acc unread). The interpreter computes the product in
    # fp32 and rounds the result to fp16: the fused HFMA2's result but for rare double-rounding ties.
    if _H2_ASM:
        if FIRST:
            return tl.inline_asm_elementwise("mul.rn.f16x2 $0, $1, $2;", "=r,r,r", [d, xp], dtype=tl.int32,
                                             is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [d, xp, acc],
                                             dtype=tl.int32, is_pure=True, pack=1)
    else:
        d_lo, d_hi = _h2_split(d)
        x_lo, x_hi = _h2_split(xp)
        c_lo, c_hi = _h2_split(acc)
        if FIRST:
            return _h2_join((d_lo.to(tl.float32) * x_lo.to(tl.float32)).to(tl.float16),
                            (d_hi.to(tl.float32) * x_hi.to(tl.float32)).to(tl.float16))
        return _h2_join((d_lo.to(tl.float32) * x_lo.to(tl.float32) + c_lo.to(tl.float32)).to(tl.float16),
                        (d_hi.to(tl.float32) * x_hi.to(tl.float32) + c_hi.to(tl.float32)).to(tl.float16))


@triton.jit
def _h2_cvt(lo, hi):
    # two fp32 tensors -> fp16x2 in an int32 (low half: lo), rounded to nearest
    if _H2_ASM:
        return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,r,r", [lo, hi], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        return _h2_join(lo.to(tl.float16), hi.to(tl.float16))


@triton.jit
def _h2_total(v):
    # fp16x2 in an int32 -> the sum of its halves in fp32
    if _H2_ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .f16 l, h; .reg .f32 a, b; mov.b32 {l, h}, $1; cvt.f32.f16 a, l; cvt.f32.f16 b, h; "
            "add.f32 $0, a, b; }", "=r,r", [v], dtype=tl.float32, is_pure=True, pack=1)
    else:
        lo, hi = _h2_split(v)
        return lo.to(tl.float32) + hi.to(tl.float32)


@triton.jit
def _h2_const(value: tl.constexpr, zero):
    # fp16 `value` in both halves of an int32 (a runtime value, so ptxas keeps it in a register)
    b = (tl.full([1], value, tl.float32).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) + zero
    return b | (b << 16)  # [1]: broadcasts


@triton.jit
def _h2_slot_dq(wi, wu, j: tl.constexpr, SB: tl.constexpr, MASK: tl.constexpr, OFFSET: tl.constexpr, zero):
    # Codes j and j + 16 / SB of words wi as one fp16x2 pair of exact signed codes. Each half's code is OR-ed into
    # the mantissa of fp16 1024 (0x6400) at bit p <= 10 - SB and reads 1024 + code * 2^p; one HFMA2 takes that to
    # code - OFFSET, exactly. Slots above bit 10 - SB come from wu = wi >> 8 (each half's upper byte; what lands in
    # the low half's upper byte is masked off).
    P: tl.constexpr = j * SB
    UP: tl.constexpr = P + SB > 10
    PP: tl.constexpr = P - 8 if P + SB > 10 else P
    M2: tl.constexpr = (MASK << PP) | (MASK << (PP + 16))
    mul = _h2_const(1.0 / (1 << PP), zero)
    add = _h2_const(-(1024.0 / (1 << PP) + OFFSET), zero)
    if UP:
        return _h2_dq(wu, zero + M2, zero + 0x64006400, mul, add)
    else:
        return _h2_dq(wi, zero + M2, zero + 0x64006400, mul, add)


@triton.jit
def _h2_half(x_ptr, m, stride_xm, M, K, kx, factor, H: tl.constexpr, FULL: tl.constexpr):
    # H (<= 8) activations per run at kx, scaled by `factor`, as H fp32 [T] columns. One load per half word
    # ([T, H]: at most 16 bytes per thread, so the thread layout matches the weights' and needs no shared memory).
    return _split_cols(_x_slot_at(x_ptr, m, stride_xm, M, K, kx, FULL).to(tl.float32) * factor[:, None], H)


@triton.jit
def _h2_run_stats(x_ptr, m, stride_xm, M, K, kx, i: tl.constexpr, CPW: tl.constexpr, FULL: tl.constexpr):
    # max |x| and Σ x (fp32) of word slot i of every run of x[m] ([T] each), from the same loads as _h2_half's
    H: tl.constexpr = CPW // 2
    lo = _x_slot_at(x_ptr, m, stride_xm, M, K, kx + i * CPW, FULL).to(tl.float32)
    hi = _x_slot_at(x_ptr, m, stride_xm, M, K, kx + i * CPW + H, FULL).to(tl.float32)
    return (tl.maximum(tl.max(tl.abs(lo), axis=1), tl.max(tl.abs(hi), axis=1)),
            tl.sum(lo, axis=1) + tl.sum(hi, axis=1))


@triton.jit
def _h2_row_scale(x_ptr, m, stride_xm, M, K, kx, R: tl.constexpr, CPW: tl.constexpr, FULL: tl.constexpr):
    # Per run of x[m]: the power of two 2^(127 - e) that takes its activations into [-2, 2) (e the exponent field
    # of its max |x|, at most 253), its inverse, and Σ x in fp32. There fp16 holds a bf16 or fp16 value exactly
    # (above 2^-14 of the max), and with |q| <= 2^(b-1) the fp16 lanes cannot overflow (each sums RUN / 2 <= 32
    # products of |q x| <= 2^b). The inverse is 0 when max |x| < 2^-126 (a negligible run).
    amax, xs = _h2_run_stats(x_ptr, m, stride_xm, M, K, kx, 0, CPW, FULL)
    for i in tl.static_range(1, R):
        a_i, s_i = _h2_run_stats(x_ptr, m, stride_xm, M, K, kx, i, CPW, FULL)
        amax = tl.maximum(amax, a_i)
        xs += s_i
    e = tl.minimum((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF, 253)
    return ((254 - e) << 23).to(tl.float32, bitcast=True), (e << 23).to(tl.float32, bitcast=True), xs


@triton.jit
def _h2_finish(acc, xt, p, inv, xs, s, z, GROUP: tl.constexpr):
    # one activation row's K step into its fp32 accumulators: acc += s Σ x q + z Σ x per (weight row, run) (per
    # channel: acc += Σ x q, xt += Σ x, both scaled after the loop)
    p32 = _h2_total(p) * inv[None, :]
    if GROUP == 0:
        return acc + p32, xt + xs
    return acc + p32 * s + xs[None, :] * z, xt


@triton.jit
def _h2_step(k0, accs, words, scale_ptr, zero_ptr, x_ptr, q_idx, q_row, i_idx, t_idx, c_idx, M, N, K, stride_xm,
             stride_pn, stride_sn, stride_zn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr,
             R: tl.constexpr, CPW: tl.constexpr, RUN: tl.constexpr, SB: tl.constexpr, MASK: tl.constexpr,
             OFFSET: tl.constexpr, GROUP: tl.constexpr, FULL: tl.constexpr, zero):
    # One K step of the units_h2 GEMV for every activation row. FULL: the step lies inside K, so the weights,
    # scales and zeros load without masks (rows past N were clamped to N - 1 by the caller and are never stored).
    # Unmasked loads need no registers zeroed first (two CS2R per row and a PRMT per 16-bit scale or zero). Each
    # slot pair of codes is dequantized once (_h2_slot_dq) and multiplied into every activation row's fp16x2 sum.
    H: tl.constexpr = CPW // 2
    uq = k0 // CPW + (q_idx % T) * R + q_row * (stride_pn // 4)
    if FULL:
        w_raw = tl.load(words + uq[None, :] + i_idx[:, None])
    else:
        okq = k0 + (q_idx % T) * RUN < K
        w_raw = tl.load(words + uq[None, :] + i_idx[:, None], mask=okq[None, :], other=0)
    wc = _split_cols(tl.trans(w_raw), R)  # R tensors [BLOCK_N * T]: word slot i of each (row, run)
    kx = (k0 + t_idx * RUN)[:, None] + c_idx[None, :]  # [T, CPW / 2]: the first half word of each run
    s = tl.zeros([BLOCK_N, T], dtype=tl.float32)
    z = s
    if GROUP != 0:
        gq = (k0 + (q_idx % T) * RUN) // GROUP
        if FULL:
            s_raw = tl.load(scale_ptr + q_row * stride_sn + gq)
            z_raw = tl.load(zero_ptr + q_row * stride_zn + gq)
        else:
            okg = k0 + (q_idx % T) * RUN < K
            s_raw = tl.load(scale_ptr + q_row * stride_sn + gq, mask=okg, other=0.0)
            z_raw = tl.load(zero_ptr + q_row * stride_zn + gq, mask=okg, other=0.0)
        s = tl.reshape(s_raw.to(tl.float32), [BLOCK_N, T])
        z = tl.reshape(z_raw.to(tl.float32), [BLOCK_N, T])
    f0, inv0, xs0 = _h2_row_scale(x_ptr, 0, stride_xm, M, K, kx, R, CPW, FULL)
    f1, inv1, xs1 = f0, inv0, xs0
    f2, inv2, xs2 = f0, inv0, xs0
    f3, inv3, xs3 = f0, inv0, xs0
    if BLOCK_M > 1:
        f1, inv1, xs1 = _h2_row_scale(x_ptr, 1, stride_xm, M, K, kx, R, CPW, FULL)
    if BLOCK_M > 2:
        f2, inv2, xs2 = _h2_row_scale(x_ptr, 2, stride_xm, M, K, kx, R, CPW, FULL)
        f3, inv3, xs3 = _h2_row_scale(x_ptr, 3, stride_xm, M, K, kx, R, CPW, FULL)
    p0 = tl.zeros([BLOCK_N, T], dtype=tl.int32)  # fp16x2 sums (never read before the first product)
    p1, p2, p3 = p0, p0, p0
    for i in tl.static_range(R):
        wi = tl.reshape(wc[i], [BLOCK_N, T])
        wu = wi >> 8
        lo0 = _h2_half(x_ptr, 0, stride_xm, M, K, kx + i * CPW, f0, H, FULL)
        hi0 = _h2_half(x_ptr, 0, stride_xm, M, K, kx + i * CPW + H, f0, H, FULL)
        lo1, hi1, lo2, hi2, lo3, hi3 = lo0, hi0, lo0, hi0, lo0, hi0
        if BLOCK_M > 1:
            lo1 = _h2_half(x_ptr, 1, stride_xm, M, K, kx + i * CPW, f1, H, FULL)
            hi1 = _h2_half(x_ptr, 1, stride_xm, M, K, kx + i * CPW + H, f1, H, FULL)
        if BLOCK_M > 2:
            lo2 = _h2_half(x_ptr, 2, stride_xm, M, K, kx + i * CPW, f2, H, FULL)
            hi2 = _h2_half(x_ptr, 2, stride_xm, M, K, kx + i * CPW + H, f2, H, FULL)
            lo3 = _h2_half(x_ptr, 3, stride_xm, M, K, kx + i * CPW, f3, H, FULL)
            hi3 = _h2_half(x_ptr, 3, stride_xm, M, K, kx + i * CPW + H, f3, H, FULL)
        for j in tl.static_range(H):
            d = _h2_slot_dq(wi, wu, j, SB, MASK, OFFSET, zero)
            p0 = _h2_fma(d, _h2_cvt(lo0[j], hi0[j])[None, :], p0, i == 0 and j == 0)
            if BLOCK_M > 1:
                p1 = _h2_fma(d, _h2_cvt(lo1[j], hi1[j])[None, :], p1, i == 0 and j == 0)
            if BLOCK_M > 2:
                p2 = _h2_fma(d, _h2_cvt(lo2[j], hi2[j])[None, :], p2, i == 0 and j == 0)
                p3 = _h2_fma(d, _h2_cvt(lo3[j], hi3[j])[None, :], p3, i == 0 and j == 0)
    acc0, acc1, acc2, acc3, xt0, xt1, xt2, xt3 = accs
    acc0, xt0 = _h2_finish(acc0, xt0, p0, inv0, xs0, s, z, GROUP)
    if BLOCK_M > 1:
        acc1, xt1 = _h2_finish(acc1, xt1, p1, inv1, xs1, s, z, GROUP)
    if BLOCK_M > 2:
        acc2, xt2 = _h2_finish(acc2, xt2, p2, inv2, xs2, s, z, GROUP)
        acc3, xt3 = _h2_finish(acc3, xt3, p3, inv3, xs3, s, z, GROUP)
    return acc0, acc1, acc2, acc3, xt0, xt1, xt2, xt3


@triton.jit
def _dq_gemv_units_h2_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr,
                             M, N, K, stride_xm, stride_pn, stride_sn, stride_zn, stride_ym,
                             BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    # units_h2 with runs of up to 4 words (one 16-byte load per row and run)
    _units_h2_gemv(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_pn, stride_sn,
                   stride_zn, stride_ym, BITS, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, 4)


@triton.jit
def _dq_gemv_units_h2_r2_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr,
                                M, N, K, stride_xm, stride_pn, stride_sn, stride_zn, stride_ym,
                                BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    # units_h2 with runs of up to 2 words: half the activations per thread and step, fewer registers (W2g64 at 8 rows:
    # 124 instead of 167, at 2.8 instead of 2.5 instructions per code)
    _units_h2_gemv(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_pn, stride_sn,
                   stride_zn, stride_ym, BITS, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, 2)


@triton.jit
def _units_h2_gemv(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr,
                   M, N, K, stride_xm, stride_pn, stride_sn, stride_zn, stride_ym,
                   BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, WORDS: tl.constexpr):
    # The units GEMV with packed half-precision arithmetic, for fp16/bf16 activations. Codes are read in 32-bit
    # words (R <= WORDS per run); each pair of codes (slot j of both 16-bit halves) is one LOP3 and one HFMA2 to
    # exact signed codes in fp16x2 (_h2_slot_dq), and one HFMA2 per activation row multiplies it with the matching
    # pair of activations into an fp16x2 partial sum (_h2_fma): ~1.6 instructions per code in the core against ~3
    # for the fp32 forms. Activations are scaled per run by a power of two (_h2_row_scale) so fp16 neither
    # overflows nor drops their bits; each run's sums are finished in fp32: Σ_k x_k (s q_k + z) = s Σ x q + z Σ x.
    # The fp16 sums round (relative 2^-11 per add), so the error against the fp32 reference is larger than
    # "units_hi"'s, still below bf16's output rounding. Layout as in _units_gemv (one run per thread and K step,
    # BLOCK_K = RUN * 32 * num_warps); full K steps run without load masks and the last partial one with them
    # (_h2_step).
    SB: tl.constexpr = 4 if BITS == 3 else BITS
    MASK: tl.constexpr = (1 << SB) - 1
    OFFSET: tl.constexpr = 1 << (SB - 1)
    CPW: tl.constexpr = 32 // SB  # codes per word
    R: tl.constexpr = WORDS if GROUP == 0 else min(WORDS, GROUP // CPW)
    RUN: tl.constexpr = R * CPW
    T: tl.constexpr = BLOCK_K // RUN

    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    i_idx = tl.arange(0, R)
    t_idx = tl.arange(0, T)
    c_idx = tl.arange(0, CPW // 2)  # activations are loaded per half word
    words = packed_ptr.to(tl.pointer_type(tl.int32))
    q_idx = tl.arange(0, BLOCK_N * T)
    q_row = tl.minimum(pid * BLOCK_N + q_idx // T, N - 1)  # rows past N read row N - 1 (never stored)
    zero = stride_ym >> 31  # 0 (strides are non-negative), opaque to the compiler
    accs = (tl.zeros([BLOCK_N, T], dtype=tl.float32), tl.zeros([BLOCK_N, T], dtype=tl.float32),
            tl.zeros([BLOCK_N, T], dtype=tl.float32), tl.zeros([BLOCK_N, T], dtype=tl.float32),
            tl.zeros([T], dtype=tl.float32), tl.zeros([T], dtype=tl.float32),  # per channel: Σ x
            tl.zeros([T], dtype=tl.float32), tl.zeros([T], dtype=tl.float32))
    k_full = K - K % BLOCK_K
    for k0 in range(0, k_full, BLOCK_K):
        accs = _h2_step(k0, accs, words, scale_ptr, zero_ptr, x_ptr, q_idx, q_row, i_idx, t_idx, c_idx, M, N, K,
                        stride_xm, stride_pn, stride_sn, stride_zn, BLOCK_M, BLOCK_N, T, R, CPW, RUN, SB, MASK,
                        OFFSET, GROUP, True, zero)
    if k_full < K:
        accs = _h2_step(k_full, accs, words, scale_ptr, zero_ptr, x_ptr, q_idx, q_row, i_idx, t_idx, c_idx, M, N, K,
                        stride_xm, stride_pn, stride_sn, stride_zn, BLOCK_M, BLOCK_N, T, R, CPW, RUN, SB, MASK,
                        OFFSET, GROUP, False, zero)
    # signed codes: no bias left in (OFFSET 0)
    _units_epilogue(y_ptr, scale_ptr, zero_ptr, bias_ptr, M, stride_sn, stride_zn, stride_ym, offs_n, n_mask, accs, 0,
                    GROUP, BLOCK_M, BLOCK_N, HAS_BIAS)


@triton.jit
def _dq_gemm_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr,
                    M, N, K, stride_xm, stride_pn, stride_sn, stride_zn, stride_ym,
                    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    SB: tl.constexpr = 4 if BITS == 3 else BITS
    P: tl.constexpr = 8 // SB
    OFFSET: tl.constexpr = 1 << (SB - 1)
    KB: tl.constexpr = BLOCK_K // P
    # One (scale, zero) pair per row of the tile for the whole chunk, else one per group inside it.
    WHOLE_CHUNK: tl.constexpr = GROUP == 0 or GROUP >= BLOCK_K

    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_b = tl.arange(0, KB)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    w_rows = packed_ptr + offs_n[:, None] * stride_pn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    for k0 in range(0, K, BLOCK_K):
        byte = k0 // P + offs_b
        w = tl.load(w_rows + byte[None, :], mask=n_mask[:, None] & (byte * P < K)[None, :], other=0)
        w = w.to(tl.int32)  # [BLOCK_N, BLOCK_K // P], contiguous along K in memory
        # Codes back in k order, [BLOCK_N, BLOCK_K], by register shuffles (the P = 1 and 2 slots are unused
        # below 4 codes per byte: reusing code 0 keeps the call uniform and is compiled away).
        c0 = _codes_to_f32(w, 0, SB, OFFSET)
        c1 = _codes_to_f32(w, 1 % P, SB, OFFSET)
        c2 = _codes_to_f32(w, 2 % P, SB, OFFSET)
        c3 = _codes_to_f32(w, 3 % P, SB, OFFSET)
        q = _join_last(c0, c1, c2, c3, P)
        if WHOLE_CHUNK:
            g = 0 if GROUP == 0 else k0 // GROUP
            s = tl.load(scale_ptr + offs_n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)
            z = tl.load(zero_ptr + offs_n * stride_zn + g, mask=n_mask, other=0.0).to(tl.float32)
            wt = q * s[:, None] + z[:, None]
        else:
            NG: tl.constexpr = BLOCK_K // GROUP
            g = k0 // GROUP + tl.arange(0, NG)
            sz_mask = n_mask[:, None] & (g * GROUP < K)[None, :]
            s = tl.load(scale_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=sz_mask, other=0.0)
            z = tl.load(zero_ptr + offs_n[:, None] * stride_zn + g[None, :], mask=sz_mask, other=0.0)
            q3 = tl.reshape(q, [BLOCK_N, NG, GROUP])
            wt = q3 * s.to(tl.float32)[:, :, None] + z.to(tl.float32)[:, :, None]
            wt = tl.reshape(wt, [BLOCK_N, BLOCK_K])
        k = k0 + offs_k
        a = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & (k < K)[None, :], other=0.0)
        # Codes past K (the unused high bits of a row's last byte) dequantize to finite junk; x is 0 there.
        # "ieee": exact fp32 products for fp32 activations (no TF32); fp16/bf16 operands are unaffected.
        acc = tl.dot(a, tl.trans(wt.to(a.dtype)), acc, input_precision="ieee")

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _plane(w, j: tl.constexpr, SB: tl.constexpr, OFFSET: tl.constexpr, XT: tl.constexpr):
    # Signed code j of each unit of w (widened to int16, or int32 for fp32 x) as an exact XT value, by OR-ing the
    # unsigned code into the mantissa of a power of two whose last place is 1 (bf16 128, fp16 1024, fp32 2^23)
    # and subtracting it again with the offset: no int-to-float conversion.
    code = (w >> (j * SB)) & ((1 << SB) - 1)
    if XT == tl.bfloat16 and SB == 8:  # 128 + code needs 9 significant bits: go through fp32
        return ((code.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)).to(XT)
    elif XT == tl.bfloat16:
        return (code | 0x4300).to(tl.bfloat16, bitcast=True) - (128.0 + OFFSET)
    elif XT == tl.float16:
        return (code | 0x6400).to(tl.float16, bitcast=True) - (1024.0 + OFFSET)
    else:
        return (code | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)


@triton.jit
def _planes_gemm(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr,
                 M, N, K, stride_xm, stride_pn, stride_sn, stride_zn, stride_ym,
                 BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, UB: tl.constexpr, PRESCALE: tl.constexpr,
                 SPLIT_K: tl.constexpr):
    # Like _dq_gemm_kernel, but the codes are never put back in k order: code slot j of every UB-bit unit
    # (k = i*P + j) is its own [BLOCK_N, KSUB / P] operand, an element-wise function of the loaded units,
    # multiplied by the activations at stride P (split from one contiguous load in registers). Element-wise
    # operands let Triton dequantize in the dot-operand registers. The codes enter the dot as exact small integers
    # and each group's partial product is scaled afterwards: Σ_k x_k (s q_k + z) = s Σ x q + z Σ x (per channel:
    # once, after the K loop). A sub-block of KSUB codes gives each slot >= 16 codes (one tensor-core K step);
    # when it spans NG groups, each group's partial comes from x masked to that group's units.
    # PRESCALE instead dequantizes the operand in x's dtype (s q + z, one rounding as in _dq_gemm_kernel, packed
    # half-precision FMAs): one dot per slot and K step whatever the groups, no Σ x dots, no per-group partials.
    # SPLIT_K > 1: program_id(2) takes one of SPLIT_K consecutive K ranges (whole K steps) and writes its fp32
    # partial to slice pid_k of a [SPLIT_K, M, N] workspace (y_ptr); the launcher sums the slices. At 16 rows
    # a tile-per-program grid has only N / BLOCK_N programs, ~2 per SM at N = 8192: too few warps to hide latency.
    SB: tl.constexpr = 4 if BITS == 3 else BITS
    OFFSET: tl.constexpr = 1 << (SB - 1)
    P: tl.constexpr = UB // SB  # codes per unit
    KSUB: tl.constexpr = BLOCK_K if (PRESCALE or GROUP == 0 or GROUP >= BLOCK_K) else max(GROUP, 16 * P)
    NG: tl.constexpr = KSUB // GROUP if (GROUP > 0 and GROUP < KSUB and not PRESCALE) else 1
    KB: tl.constexpr = KSUB // P
    GRAIN: tl.constexpr = GROUP if (GROUP > 0 and GROUP < KSUB) else KSUB  # K ends on a multiple of it
    XT: tl.constexpr = x_ptr.dtype.element_ty
    WT: tl.constexpr = tl.int32 if XT == tl.float32 else tl.int16
    units = packed_ptr.to(tl.pointer_type(tl.int16 if UB == 16 else tl.uint8))

    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_b = tl.arange(0, KB)
    offs_k = tl.arange(0, KSUB)
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    w_rows = units + offs_n[:, None] * (stride_pn // (UB // 8))
    # Σ_k x_k per row, broadcast over the tile's columns, comes from the tensor cores too (x times a ones
    # operand): a row sum across threads would cost more instructions than the dequantization.
    ones = tl.full([KB, BLOCK_N], 1.0, dtype=XT)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    x_sum = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # per channel: Σ x over all of K
    if PRESCALE and GROUP == 0:
        s_pc = tl.load(scale_ptr + offs_n * stride_sn, mask=n_mask, other=0.0).to(XT)[:, None]
        z_pc = tl.load(zero_ptr + offs_n * stride_zn, mask=n_mask, other=0.0).to(XT)[:, None]

    if SPLIT_K > 1:
        k_len = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_start = tl.program_id(2) * k_len
        k_end = tl.minimum(K, k_start + k_len)
        y_ptr += tl.program_id(2) * M * stride_ym
    else:
        k_start = 0
        k_end = K
    for k0 in range(k_start, k_end, BLOCK_K):
        for sub in tl.static_range(BLOCK_K // KSUB):
            kb = k0 + sub * KSUB
            byte = kb // P + offs_b
            k = kb + offs_k
            if GROUP == 0:  # K may end inside the sub-block
                w_ok = byte * P < K
                x_ok = k < K
            else:  # K ends on a group boundary: bounds in whole groups (or sub-blocks) keep the loads vectors
                grains_left = (K - kb) // GRAIN
                w_ok = offs_b < grains_left * (GRAIN // P)
                x_ok = offs_k < grains_left * GRAIN
            w = tl.load(w_rows + byte[None, :], mask=n_mask[:, None] & w_ok[None, :], other=0).to(WT)
            # codes past K (high bits of a row's last unit, masked units) meet x = 0
            xk = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & x_ok[None, :], other=0.0)
            a_list = _split_last(tl.reshape(xk, [BLOCK_M, KB, P]), P)
            if PRESCALE:
                if GROUP == 0:
                    s_t = s_pc
                    z_t = z_pc
                elif GROUP >= KSUB:  # one group
                    g_mask = offs_n < tl.where(kb < K, N, 0)
                    s_t = tl.load(scale_ptr + offs_n * stride_sn + kb // GROUP, mask=g_mask, other=0.0).to(XT)[:, None]
                    z_t = tl.load(zero_ptr + offs_n * stride_zn + kb // GROUP, mask=g_mask, other=0.0).to(XT)[:, None]
                else:  # KSUB // GROUP groups, each KB // NGS consecutive units: load once, broadcast in registers
                    NGS: tl.constexpr = KSUB // GROUP
                    gq = kb // GROUP + tl.arange(0, NGS)
                    sz_mask = n_mask[:, None] & (gq * GROUP < K)[None, :]
                    s2 = tl.load(scale_ptr + offs_n[:, None] * stride_sn + gq[None, :], mask=sz_mask, other=0.0)
                    z2 = tl.load(zero_ptr + offs_n[:, None] * stride_zn + gq[None, :], mask=sz_mask, other=0.0)
                    s_t = tl.reshape(tl.broadcast_to(s2.to(XT)[:, :, None], [BLOCK_N, NGS, KB // NGS]), [BLOCK_N, KB])
                    z_t = tl.reshape(tl.broadcast_to(z2.to(XT)[:, :, None], [BLOCK_N, NGS, KB // NGS]), [BLOCK_N, KB])
                for j in tl.static_range(P):
                    wq = _plane(w, j, SB, OFFSET, XT) * s_t + z_t
                    acc = tl.dot(a_list[j], tl.trans(wq), acc, input_precision="ieee")
            for gi in tl.static_range(0 if PRESCALE else NG):
                part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                xs = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for j in tl.static_range(P):
                    a = a_list[j]
                    if NG > 1:
                        a = tl.where((offs_b * P // GROUP == gi)[None, :], a, 0.0).to(XT)
                    part = tl.dot(a, tl.trans(_plane(w, j, SB, OFFSET, XT)), part, input_precision="ieee")
                    xs = tl.dot(a, ones, xs, input_precision="ieee")
                if GROUP == 0:
                    acc += part
                    x_sum += xs
                else:
                    g_mask = offs_n < tl.where(kb + gi * GROUP < K, N, 0)  # groups past K have no scale
                    g = kb // GROUP + gi
                    s = tl.load(scale_ptr + offs_n * stride_sn + g, mask=g_mask, other=0.0).to(tl.float32)
                    z = tl.load(zero_ptr + offs_n * stride_zn + g, mask=g_mask, other=0.0).to(tl.float32)
                    acc += part * s[None, :] + xs * z[None, :]

    if GROUP == 0 and not PRESCALE:
        s = tl.load(scale_ptr + offs_n * stride_sn, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(zero_ptr + offs_n * stride_zn, mask=n_mask, other=0.0).to(tl.float32)
        acc = acc * s[None, :] + x_sum * z[None, :]
    if HAS_BIAS:  # once: in the first K range's partial
        b_mask = (offs_n < tl.where(tl.program_id(2) == 0, N, 0)) if SPLIT_K > 1 else n_mask
        acc += tl.load(bias_ptr + offs_n, mask=b_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _dq_gemm_scaled_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr,
                           M, N, K, stride_xm, stride_pn, stride_sn, stride_zn, stride_ym,
                           BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    # The planes GEMM over 16-bit units with the operand dequantized in registers (PRESCALE).
    _planes_gemm(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_pn,
                 stride_sn, stride_zn, stride_ym, BITS, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, 16, True, SPLIT_K)


@triton.jit
def _dq_gemm_scaled8_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr,
                            M, N, K, stride_xm, stride_pn, stride_sn, stride_zn, stride_ym,
                            BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    _planes_gemm(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_pn,
                 stride_sn, stride_zn, stride_ym, BITS, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, 8, True, SPLIT_K)


@triton.jit
def _dq_gemm_planes_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr,
                           M, N, K, stride_xm, stride_pn, stride_sn, stride_zn, stride_ym,
                           BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    # The planes GEMM reading 16-bit units (rows 2-byte aligned: the launcher checks).
    _planes_gemm(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_pn,
                 stride_sn, stride_zn, stride_ym, BITS, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, 16, False, SPLIT_K)


@triton.jit
def _dq_gemm_planes8_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr,
                            M, N, K, stride_xm, stride_pn, stride_sn, stride_zn, stride_ym,
                            BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    # The planes GEMM reading bytes: twice the code slots of half the width (more byte permutes).
    _planes_gemm(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_pn,
                 stride_sn, stride_zn, stride_ym, BITS, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, 8, False, SPLIT_K)


@triton.jit
def _dq_gemv_trt_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr,
                        M, N, K, stride_xm, stride_pn, stride_sn, stride_zn, stride_ym, y_ptr,
                        BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    # TensorRT's AOT plugin calling convention: inputs, then scalar arguments, then outputs.
    _dq_gemv_dequant_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_pn,
                            stride_sn, stride_zn, stride_ym, BITS, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS)


@triton.jit
def _dq_gemm_trt_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr,
                        M, N, K, stride_xm, stride_pn, stride_sn, stride_zn, stride_ym, y_ptr,
                        BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    _dq_gemm_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_pn,
                    stride_sn, stride_zn, stride_ym, BITS, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS)


@triton.jit
def _sum_splits_kernel(ws_ptr, y_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    # y = Σ_s ws[s] for split K's fp32 partials [SPLIT_K, M, N] (y contiguous [M, N]), cast to y's dtype.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


GEMV_KERNELS = {"units": _dq_gemv_units_kernel, "units_hi": _dq_gemv_units_hi_kernel,
                "units_pf": _dq_gemv_units_pf_kernel, "units_hi_pf": _dq_gemv_units_hi_pf_kernel,
                "units_sw": _dq_gemv_units_sw_kernel, "units_hi_sw": _dq_gemv_units_hi_sw_kernel,
                "units_h2": _dq_gemv_units_h2_kernel, "units_h2_r2": _dq_gemv_units_h2_r2_kernel,
                "reduce": _dq_gemv_kernel,
                "dequant": _dq_gemv_dequant_kernel,
                "planes": _dq_gemm_planes_kernel}  # "planes": the GEMM kernel with a 16-row tile
# The _units_gemv family: name -> its PIPE constexpr (0 none, 1 registers, 3 Triton's pipeliner with 3 stages).
# Pipelined forms take runs of up to 8 units (units_run), so some need K to be a multiple of a longer run.
UNITS_PIPE = {"units": 0, "units_hi": 0, "units_pf": 1, "units_hi_pf": 1, "units_sw": 3, "units_hi_sw": 3,
              "units_h2": 0, "units_h2_r2": 0}
H2_WORDS = {"units_h2": 4, "units_h2_r2": 2}  # the fp16x2 GEMVs: 32-bit words per thread run (at most)
UNITS_GEMVS = tuple(UNITS_PIPE)
# GEMV_UNITS_DEFAULT when the shape allows it (units_run divides K, rows aligned: the launcher checks), else "dequant"
# (ahead-of-time kernels, which must take any K, always use "dequant").
GEMV_DEFAULT = "dequant"
# The units GEMV the launcher picks: biased codes (H200, 2026-11-28, batch 1: W4g128 16.19 / 15.70 us at 8192² /
# 4096 x 14336 vs 16.73 / 16.06 for "units", W2g64 14.92 / 13.77 vs 15.85 / 14.86; at 4096² within 1.5 % either
# way. The pipelined forms were no faster: "_pf" 1-4 % faster than "units" at W4 but not than "units_hi", slower
# at W2; "_sw" 1.8-4.3x slower). fp32 activations take the exact codes.
GEMV_UNITS_DEFAULT = "units_hi"
GEMM_KERNELS = {"planes": _dq_gemm_planes_kernel, "planes8": _dq_gemm_planes8_kernel,
                "scaled": _dq_gemm_scaled_kernel, "scaled8": _dq_gemm_scaled8_kernel, "dequant": _dq_gemm_kernel}
PLANES_KERNELS = (_dq_gemm_planes_kernel, _dq_gemm_planes8_kernel, _dq_gemm_scaled_kernel, _dq_gemm_scaled8_kernel)


def _default_gemm(bits: int, group: int, block_m: int) -> str:
    """The large-M kernel by default (where planes_fit allows it; the TensorRT entry points wrap "dequant").
    H200 sweep (benchmarks/dq_kernels.py, 2026-11-28, bf16, 64 x 128 tiles split into 4 K ranges): up to 16 rows
    the planes GEMM at 3/4 bits (W4g128 29.0 / 26.6 us at 8192² / 4096 x 14336, scaled 31.4 / 28.0) and the scaled
    GEMM at 2 bits (W2g64 32.6 / 29.8 us; planes 48.7 / 41.9, the byte-wide planes8 of before 59.7 / 60.3
    unsplit); more rows the scaled GEMM at 2-4 bits (64 rows: W4 49.9 / 44.5 us vs planes 69.7 / 69.8, W2 52.2 /
    49.5 vs the dequant GEMM's 81.0 / 69.8). Groups shorter than a 16-bit unit's code slots span (W2g64 above,
    W4g32) are split by masking, which costs the scaled GEMM least. 8 bits were not timed: the planes kernels up
    to 16 rows (byte-wide where 16-bit units would split groups), the dequant GEMM above."""
    sb = _storage_bits(bits)
    whole_groups = group == 0 or group >= 16 * (16 // sb)  # each code slot of a 16-bit unit within one group
    if sb == 8:
        return "dequant" if block_m > 16 else "planes" if whole_groups else "planes8"
    return "planes" if block_m <= 16 and sb == 4 and whole_groups else "scaled"


def default_split(tiles: int, k_steps: int, sm_count: int) -> int:
    """The launcher's split_k when none is given (planes-family GEMMs): 4 K ranges of >= 4 K steps each, fewer when
    the output tiles alone give ~6 programs per SM. H200 sweep (2026-11-28), 64 x 128 tiles: 4 ranges were the
    best or within 12 % of it on every timed shape at 16 and 64 rows; the one-wave split of split_k="auto" (2 at
    4096 x 14336, W4, 16 rows) was 8 % slower than 4."""
    want = max(1, round(6 * sm_count / max(tiles, 1)))
    return max(1, min(4, k_steps // 4, want))


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; an H100's 132 for the interpreter (so CPU tests take the GPU's
    kernel choices)."""
    if device.type != "cuda":
        return 132
    from triton.runtime import driver  # as _auto_split reads it (torch names the field differently by version)
    return driver.active.utils.get_device_properties(device.index if device.index is not None
                                                     else torch.cuda.current_device())["multiprocessor_count"]


# ---------------------------------------------------------------------------------------
# Kernel selection (shared by the launcher and ahead-of-time compilation)
# ---------------------------------------------------------------------------------------

def _decorated_for_interpreter() -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_dq_gemv_kernel, InterpretedFunction)


_INTERPRETED = _decorated_for_interpreter()  # fixed when the module was imported
_H2_ASM = tl.constexpr(not _INTERPRETED)  # the fp16x2 GEMVs' inline PTX, or their interpreter path (see _h2_dq)


def is_interpreted() -> bool:
    """Whether the kernels were decorated under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return _INTERPRETED


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _storage_bits(bits: int) -> int:
    return 4 if bits == 3 else bits


def _dtype_name(dtype: torch.dtype | str, what: str) -> str:
    if isinstance(dtype, str) and dtype in _FLOAT_DTYPES.values():
        return dtype
    if dtype in _FLOAT_DTYPES:
        return _FLOAT_DTYPES[dtype]
    raise ValueError(f"{what} dtype must be float16, bfloat16 or float32, got {dtype}")


def units_run(bits: int, group: int, dtype: torch.dtype | str, gemv: str = "units") -> tuple[int, int]:
    """(codes per unit, codes per thread run) of a units-family GEMV for this setting (group 0 = per channel)."""
    xbits = {"fp16": 16, "bf16": 16, "fp32": 32}[_dtype_name(dtype, "activation")]
    sb = _storage_bits(bits)
    cpu = min(128 // xbits, 32 // sb)
    if gemv not in UNITS_PIPE:
        raise ValueError(f"gemv must be one of {', '.join(UNITS_PIPE)} for units_run, got {gemv!r}")
    if gemv in H2_WORDS:  # 32-bit words, fp16x2 arithmetic
        if xbits != 16:
            raise ValueError(f"gemv={gemv!r} computes in fp16x2 and takes float16 or bfloat16 activations only; "
                             "use gemv='units' for float32")
        cpu = 32 // sb
        group = max(group, 0)
        r = H2_WORDS[gemv] if group == 0 else min(H2_WORDS[gemv], group // cpu)  # as R in _units_h2_gemv
        return cpu, r * cpu
    rmax = 8 if UNITS_PIPE[gemv] >= 1 else 4  # as RMAX in _units_gemv
    group = max(group, 0)  # -1: per channel too
    r = min(128 // (cpu * sb), rmax) if group == 0 else min(128 // (cpu * sb), rmax, group // cpu)
    return cpu, r * cpu


def planes_fit(bits: int, group: int, block_k: int, unit_bits: int = 16) -> bool:
    """Whether the planes GEMM reading unit_bits-wide units takes this setting: a K step must give each of the
    unit's code slots >= 16 codes (a tensor-core K step), i.e. block_k * storage bits / unit_bits >= 16, and a
    group that spans several sub-blocks must hold whole sub-blocks (powers of two: always)."""
    return block_k * _storage_bits(bits) // unit_bits >= 16


def _kernel_group(group: int, in_features: int | None) -> int:
    """The GROUP constexpr: 0 for per channel, else the group size (a power of two >= 16)."""
    if group in (-1, 0) or (in_features is not None and group == in_features):
        return 0
    if not _is_pow2(group) or group < 16:
        raise ValueError(f"the Triton kernels need group = -1 / in_features (per channel) or a power of two >= 16, "
                         f"got {group}")
    return group


def kernel_specs(bits: int, group: int, dtype: torch.dtype | str, m_small: bool, *, m: int | None = None,
                 in_features: int | None = None, scale_dtype: torch.dtype | str | None = None,
                 block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None,
                 num_stages: int | None = None, gemv: str = GEMV_DEFAULT, gemm: str | None = None,
                 split_k: int | None = None, convention: str = "triton", maxnreg: int | None = None
                 ) -> dict[str, Any]:
    """Everything needed to launch or AOT-compile one kernel variant.

    group: -1 (or in_features) for per channel, else a power of two >= 16. dtype: the activation (= x, y, bias)
    dtype; scale_dtype defaults to it. m: the row count if known (picks BLOCK_M; without it the variant covers
    every M up to GEMV_MAX_M when m_small, and uses 64-row tiles otherwise). block_n / block_k / num_warps /
    num_stages override the defaults (tuned on an H100 and an H200). gemv picks the small-M kernel: "units" (or
    one of UNITS_GEMVS: biased codes "_hi", software pipelined "_pf" / "_sw", fp16x2 arithmetic "_h2" / "_h2_r2"
    for 16-bit activations), "reduce" (per-group partial sums),
    "dequant" (element-wise dequantization into a 3-D accumulator) or "planes" (the tiled GEMM with a 16-row
    tile: _default_gemm's kernel, or the one gemm names). gemm picks the large-M kernel: "planes" (the codes of
    each slot of a 16-bit unit straight into tensor-core dots, scaled per group afterwards; needs planes_fit and
    2-byte aligned rows), "planes8" (the same over bytes), "scaled" / "scaled8" (the same operands dequantized in
    registers before the dot) or "dequant" (tiles dequantized and put back in k order); _default_gemm picks by
    rows. gemm applies to the tiled
    kernels only: M > 4, or gemv="planes". convention "tensorrt" gives entry points with TensorRT's AOT plugin
    argument order (input pointers, the i32 scalars, then y_ptr; the dequant GEMV and the dequant GEMM inside).
    The "_sw" GEMVs pipeline 3 stages, fixed in the kernel: num_stages reports that and may only say 3.
    split_k (planes-family GEMMs only; default 1 here, while the launcher's default is default_split) splits K
    over that many programs per tile (grid dim 2), each writing an fp32 partial to a [split_k, M, N] workspace
    passed as y_ptr (dq_linear_triton sums them).

    Returns {"kernel", "name", "signature" (every kernel argument in order, constexprs marked "constexpr", as
    Triton >= 3.2's ASTSource expects), "constexprs", "grid" (M, N) -> 3-tuple, "num_warps", "num_stages",
    "maxnreg" (a register cap per thread for the compiler, or None)}. maxnreg: None for the default (128 for W2 at
    batch 1 on the plain units GEMVs with 16-bit activations and the default tile, else none), 0 for none, or a cap
    in 24..255.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    act = _dtype_name(dtype, "activation")
    sdt = _dtype_name(scale_dtype if scale_dtype is not None else dtype, "scale")
    g = _kernel_group(group, in_features)
    if m is not None and m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    if convention not in ("triton", "tensorrt"):
        raise ValueError(f"convention must be 'triton' or 'tensorrt', got {convention!r}")
    if maxnreg is not None and maxnreg != 0 and not 24 <= maxnreg <= 255:
        raise ValueError(f"maxnreg must be 0 (no cap) or between 24 and 255, got {maxnreg}")
    if gemm is not None and gemm not in GEMM_KERNELS:
        raise ValueError(f"gemm must be one of {', '.join(GEMM_KERNELS)}, got {gemm!r}")

    default_cap = None
    if m_small:
        if m is not None and m > GEMV_MAX_M:
            raise ValueError(f"the GEMV kernel handles at most {GEMV_MAX_M} rows, got m={m}")
        if gemv not in GEMV_KERNELS:
            raise ValueError(f"gemv must be one of {', '.join(GEMV_KERNELS)}, got {gemv!r}")
    tiled = not m_small or (gemv == "planes" and convention == "triton")  # a 2-D grid of row x column tiles
    if not tiled:
        kernel = GEMV_KERNELS[gemv]
        bm = _next_pow2(m) if m is not None else GEMV_MAX_M
        min_k = 16
        default_warps, default_stages = 4, 2
        if (gemv in ("units", "units_hi", "units_h2") and bits == 2 and bm == 1 and act != "fp32"
                and convention == "triton" and block_n is None and block_k is None and num_warps is None):
            # W2 at batch 1 with the default tile: at most 128 registers, i.e. 4 programs of 4 warps per SM. Uncapped,
            # ptxas hoists every load of a step (bf16, 8192²: units_hi 154-158 registers at g32-g128, units_h2 163-166
            # at g64 and per channel: 3 programs); capped, within 1.5 % of the instructions and no spills (Triton 3.6,
            # sm_90, benchmarks/gemv_sass.py). Elsewhere the kernels stay at or below 128 uncapped, and a cap only
            # lets ptxas use more (units_h2 W4 per channel: 96 -> 125). 2-4 rows would spill; other tiles and fp32
            # activations are unmeasured: left uncapped.
            default_cap = 128
        if gemv in UNITS_GEMVS:
            # One run per thread and K step (BLOCK_K = run * threads), 8 rows per program.
            run = units_run(bits, g, act, gemv)[1]
            if g and g < run:
                raise ValueError(f"the units GEMV needs group >= {run} codes at {bits} bits, got {g}")
            bn = block_n or 8
            bk = block_k or run * 32 * (num_warps or default_warps)
            min_k = run
            if UNITS_PIPE[gemv] >= 2:  # the stages are the kernel's tl.range(num_stages=PIPE)
                if num_stages not in (None, UNITS_PIPE[gemv]):
                    raise ValueError(f"gemv={gemv!r} pipelines {UNITS_PIPE[gemv]} stages (fixed in the kernel), "
                                     f"got num_stages={num_stages}")
                default_stages = UNITS_PIPE[gemv]
        else:
            # Defaults from the H100 sweep of benchmarks/dq_kernels.py (2026-11-27, M = 1: "dequant", 16 columns,
            # 512-wide K steps were fastest for W4g128 and W2g64); the K step halves for 4 rows (registers).
            bn = block_n or 16
            # Per channel a whole K step is one sub-block ([BLOCK_M, 16, BLOCK_K / P] accumulator): halve it.
            bk = block_k or ((512 if bm <= 2 else 256) // (2 if g == 0 else 1))
    else:
        bm = 16 if m_small else min(64, max(16, _next_pow2(m))) if m is not None else 64
        if convention == "tensorrt":
            choice = "dequant"
        else:
            choice = gemm or _default_gemm(bits, g, bm)
        fp32 = act == "fp32"  # fp32 operands go through FMA ("ieee" dot) and need shorter steps
        if choice == "dequant":
            # H100 sweep: 32 columns per program (more programs than SMs at N = 4096) with 256-wide K steps at
            # 16 rows, 128-wide at 64 rows.
            bn = block_n or 32
            bk = block_k or (64 if fp32 else 256 if bm <= 16 else 128)
            default_warps, default_stages = (4 if bm <= 16 else 8), (2 if fp32 else 3)
        else:
            # H200 sweep (benchmarks/dq_kernels.py, 2026-11-28): 64 columns and 128-wide K steps, 4 stages at
            # 16 rows and 3 at 64, split into K ranges by the launcher (default_split; unsplit, 32 x 512 was the
            # faster tile at 8192², 64 x 128 at 4096 x 14336). 8 warps were always slower (H100, 2026-11-27).
            # 8 bits take these tiles too, untimed.
            bn = block_n or 64
            bk = block_k or (64 if fp32 else 128)
            default_warps, default_stages = 4, (2 if fp32 else 4 if bm <= 16 else 3)
            unit = 8 if choice.endswith("8") else 16
            if gemm is not None and block_k is None:  # a named kernel gets the shortest K step it takes, if longer
                bk = max(bk, 16 * unit // _storage_bits(bits))
            if not planes_fit(bits, g, bk, unit):
                byte_wide = choice + "8"
                if gemm is None and unit == 16 and planes_fit(bits, g, bk, 8):
                    choice = byte_wide  # half the code slots per unit: fits a shorter K step
                elif gemm is not None or m_small:
                    raise ValueError(f"the {choice} GEMM needs block_k * storage bits / {unit} >= 16 "
                                     f"({_storage_bits(bits)} storage bits for {bits}-bit codes, block_k {bk}): "
                                     f"use a larger block_k, or gemm='dequant'")
                else:
                    choice = "dequant"
        kernel = GEMM_KERNELS[choice]
        min_k = 16
    splits = 1 if split_k is None else split_k
    if not isinstance(splits, int) or isinstance(splits, bool):
        raise ValueError(f"split_k must be an integer or 'auto' (dq_linear_triton), got {split_k!r}")
    if splits != 1:
        if not tiled or kernel not in PLANES_KERNELS:
            what = f"gemv={gemv!r}" if not tiled else f"gemm={choice!r}"
            raise ValueError(f"split_k applies to the planes/scaled GEMMs only (this call uses {what}); "
                             f"leave split_k unset")
        if not 1 <= splits <= 64:
            raise ValueError(f"split_k must be between 1 and 64, got {split_k}")
    if num_warps is not None:
        if num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {num_warps}")
        nw = num_warps
    else:
        nw = default_warps
    stages = num_stages or default_stages
    min_n = 1 if (m_small and gemv in UNITS_GEMVS) else 16
    if not _is_pow2(bn) or bn < min_n:
        raise ValueError(f"block_n must be a power of two >= {min_n}, got {bn}")
    if not _is_pow2(bk) or bk < min_k:
        raise ValueError(f"block_k must be a power of two >= {min_k} for this kernel and {bits} bits, got {bk}")

    signature = {"x_ptr": f"*{act}", "packed_ptr": "*u8", "scale_ptr": f"*{sdt}", "zero_ptr": f"*{sdt}",
                 "bias_ptr": f"*{act}", "y_ptr": f"*{act}" if splits == 1 else "*fp32"}  # split: fp32 partials
    signature.update({name: "i32" for name in _INT_ARGS})
    if convention == "tensorrt":
        kernel = _dq_gemv_trt_kernel if m_small else _dq_gemm_trt_kernel
        signature["y_ptr"] = signature.pop("y_ptr")  # moved after the scalars
    constexprs = {"BITS": bits, "GROUP": g, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "HAS_BIAS": False}
    if kernel in PLANES_KERNELS:
        constexprs["SPLIT_K"] = splits
    signature.update({name: "constexpr" for name in constexprs})

    if not tiled:
        def grid(M: int, N: int) -> tuple[int, int, int]:
            return (triton.cdiv(N, bn), 1, 1)
    else:
        def grid(M: int, N: int) -> tuple[int, int, int]:
            return (triton.cdiv(M, bm), triton.cdiv(N, bn), splits)

    return {"kernel": kernel, "name": kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__,
            "signature": signature, "constexprs": constexprs, "grid": grid,
            "num_warps": nw, "num_stages": stages, "maxnreg": default_cap if maxnreg is None else (maxnreg or None)}


def launch_options(specs: dict[str, Any]) -> dict[str, Any]:
    """The compile options a kernel_specs dict sets: warps, stages and, where set, the register cap."""
    options = {"num_warps": specs["num_warps"], "num_stages": specs["num_stages"]}
    if specs.get("maxnreg"):
        options["maxnreg"] = specs["maxnreg"]
    return options


def with_bias(specs: dict[str, Any], has_bias: bool) -> dict[str, Any]:
    """`specs` with HAS_BIAS set (kernel_specs returns the no-bias variant)."""
    return {**specs, "constexprs": {**specs["constexprs"], "HAS_BIAS": bool(has_bias)}}


# ---------------------------------------------------------------------------------------
# Validation, launcher and reference
# ---------------------------------------------------------------------------------------

@dataclass
class _Checked:
    K: int
    N: int
    group: int  # resolved group size (K for per channel)
    per_channel: bool


def _check_inputs(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                  group: int, in_features: int, bias: torch.Tensor | None) -> _Checked:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    K = int(in_features)
    if K <= 0:
        raise ValueError(f"in_features must be positive, got {in_features}")
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be a float16, bfloat16 or float32 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must be [..., in_features={K}], got shape {tuple(x.shape)}")
    if group in (-1, K):
        g, per_channel = K, True
    elif group <= 0 or K % group != 0:
        raise ValueError(f"group must be -1 (per channel) or a positive divisor of in_features={K}, got {group}")
    else:
        g, per_channel = group, False
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D uint8 tensor, got {packed.dtype} with shape {tuple(packed.shape)}")
    n_bytes = math.ceil(K * _storage_bits(bits) / 8)
    if packed.shape[1] != n_bytes:
        raise ValueError(f"packed has {packed.shape[1]} bytes per row; in_features={K} at {bits} bits needs {n_bytes}")
    N = packed.shape[0]
    G = K // g
    for name, t in (("scale", scale), ("zero", zero)):
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if tuple(t.shape) != (N, G):
            raise ValueError(f"{name} must be [N={N}, K/group={G}], got shape {tuple(t.shape)}")
    if scale.dtype != zero.dtype:
        raise ValueError(f"scale and zero must share a dtype, got {scale.dtype} and {zero.dtype}")
    if bias is not None:
        if bias.dtype not in _FLOAT_DTYPES or tuple(bias.shape) != (N,):
            raise ValueError(f"bias must be a float tensor of shape [N={N}], got {bias.dtype} {tuple(bias.shape)}")
    for name, t in (("packed", packed), ("scale", scale), ("zero", zero), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    return _Checked(K=K, N=N, group=g, per_channel=per_channel)


def dq_linear_reference(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                        group: int, in_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch y = x @ Ŵᵀ (+ bias): unpack, dequantize and multiply in fp32, cast to x's dtype."""
    c = _check_inputs(x, packed, scale, zero, bits, group, in_features, bias)
    q = unpack(packed.cpu(), bits, c.K).to(device=x.device, dtype=torch.float32)  # unpack builds CPU shift tables
    w = scale.float().repeat_interleave(c.group, dim=1) * q + zero.float().repeat_interleave(c.group, dim=1)
    y = x.reshape(-1, c.K).float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], c.N)


GEMV_ENV = "GRAPHOPT_DQ_GEMV"


@functools.cache
def preferred_gemv() -> str:
    """The units GEMV the launcher tries first at M <= 4 when no gemv is given: GEMV_UNITS_DEFAULT, or the one the
    GRAPHOPT_DQ_GEMV environment variable names (e.g. units_h2, to try the fp16x2 GEMV in a whole model); where it
    does not fit (in_features, alignment, fp32 activations for the fp16x2 kernels) the launcher's usual choice.
    Read once, at the first call (reading the environment costs ~2 us, as much as 3 % of a batch-1 launch's host
    time); `preferred_gemv.cache_clear()` makes the next call read it again."""
    name = os.environ.get(GEMV_ENV, "").strip()
    if not name:
        return GEMV_UNITS_DEFAULT
    if name not in UNITS_GEMVS:
        raise ValueError(f"{GEMV_ENV}={name!r} is not a units GEMV: use one of {', '.join(UNITS_GEMVS)}, or unset it")
    return name


def _units_fit(packed: torch.Tensor, bits: int, c: _Checked, dtype: torch.dtype, gemv: str = "units") -> bool:
    """Whether a units-family GEMV can read these weights: whole runs only, rows aligned to the unit size."""
    group = 0 if c.per_channel else c.group
    if group and not _is_pow2(group):
        return False
    cpu, run = units_run(bits, group, dtype, gemv)
    unit_bytes = cpu * _storage_bits(bits) // 8
    return (c.K % run == 0 and (not group or group >= run) and packed.data_ptr() % unit_bytes == 0
            and packed.stride(0) % unit_bytes == 0)


@dataclass
class _Launch:
    specs: dict[str, Any]
    args: dict[str, Any]  # runtime (non-constexpr) arguments by name, in signature order
    y: torch.Tensor  # [M, N] output the kernel writes
    out_shape: tuple[int, ...]


_SPECS_CACHE: dict[tuple, dict[str, Any]] = {}


def _select_specs(packed: torch.Tensor, bits: int, c: _Checked, dtype: torch.dtype, scale_dtype: torch.dtype, M: int,
                  has_bias: bool, block_n: int | None, block_k: int | None, num_warps: int | None,
                  num_stages: int | None, gemv: str | None, gemm: str | None,
                  split_k: int | None = None, maxnreg: int | None = None) -> dict[str, Any]:
    """kernel_specs for one call, with the launcher's choices: the units GEMV where it fits, the byte-wide planes
    kernel or the dequant GEMM where 16-bit units would be misaligned."""
    m_small = M <= GEMV_MAX_M
    if m_small and gemv is None:
        preferred = preferred_gemv()
        if preferred in H2_WORDS and dtype == torch.float32:  # fp16x2 kernels: 16-bit activations only
            preferred = GEMV_UNITS_DEFAULT
        if _units_fit(packed, bits, c, dtype, preferred):
            gemv = preferred
    if m_small and gemv in (None, *UNITS_GEMVS):
        fits = _units_fit(packed, bits, c, dtype, gemv or GEMV_UNITS_DEFAULT)
        if gemv in UNITS_GEMVS and not fits:
            cpu, run = units_run(bits, 0 if c.per_channel else c.group, dtype, gemv)
            raise ValueError(f"gemv={gemv!r} needs in_features divisible by its run of {run} codes (got {c.K}) and "
                             f"packed rows aligned to its {cpu * _storage_bits(bits) // 8}-byte units; use gemv=None to let "
                             f"the launcher choose")
        gemv = (gemv or GEMV_UNITS_DEFAULT) if fits else GEMV_DEFAULT

    def specs_for(gemm: str | None, split: int | None = split_k, bn: int | None = block_n,
                  bk: int | None = block_k) -> dict[str, Any]:
        return kernel_specs(bits, -1 if c.per_channel else c.group, dtype, m_small, m=max(M, 1),
                            scale_dtype=scale_dtype, block_n=bn, block_k=bk, num_warps=num_warps,
                            num_stages=num_stages, gemv=gemv or GEMV_DEFAULT, gemm=gemm, split_k=split,
                            maxnreg=maxnreg)

    specs = specs_for(gemm)
    wide = {_dq_gemm_planes_kernel: "planes", _dq_gemm_scaled_kernel: "scaled"}.get(specs["kernel"])
    if wide and (packed.data_ptr() % 2 or packed.stride(0) % 2 or packed.shape[1] % 2):
        # 16-bit units need 2-byte aligned rows of whole units (an odd last byte would be read past)
        if gemm is not None:
            raise ValueError(f"the {wide} kernel reads 16-bit units and needs 2-byte aligned packed rows of an even "
                             f"byte count (gemm='{wide}8' reads bytes)")
        specs = specs_for(f"{wide}8" if m_small or split_k not in (None, 1) else "dequant")
    if split_k is None and specs["kernel"] in PLANES_KERNELS:  # the launcher's split (default_split)
        k = specs["constexprs"]
        tiles = triton.cdiv(M, k["BLOCK_M"]) * triton.cdiv(c.N, k["BLOCK_N"])
        splits = default_split(tiles, triton.cdiv(c.K, k["BLOCK_K"]), _sm_count(packed.device))
        if splits > 1:  # the same kernel and tile, named explicitly
            name = next(n for n, f in GEMM_KERNELS.items() if f is specs["kernel"])
            specs = specs_for(name, splits, k["BLOCK_N"], k["BLOCK_K"])
    return with_bias(specs, has_bias)


def _prepare(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int,
             in_features: int, bias: torch.Tensor | None, block_n: int | None, block_k: int | None,
             num_warps: int | None = None, gemv: str | None = None, gemm: str | None = None,
             num_stages: int | None = None, split_k: int | str | None = None,
             maxnreg: int | None = None) -> _Launch:
    c = _check_inputs(x, packed, scale, zero, bits, group, in_features, bias)
    interpreted = is_interpreted()
    if not interpreted and not x.is_cuda:
        raise ValueError(f"dq_linear_triton needs CUDA tensors, got {x.device} (for CPU tensors set "
                         f"TRITON_INTERPRET=1 before triton is first imported)")
    x2 = x.reshape(-1, c.K)
    M = x2.shape[0]
    # The kernels index the innermost dim with unit stride.
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    packed, scale, zero = (t if t.stride(1) == 1 else t.contiguous() for t in (packed, scale, zero))
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()
    y = torch.empty(M, c.N, dtype=x.dtype, device=x.device)
    for name, t in (("x", x2), ("packed", packed), ("y", y)):
        if t.numel() >= _I32_LIMIT:
            raise ValueError(f"{name} has {t.numel()} elements; the kernels use i32 offsets (< 2^31)")

    m_small = M <= GEMV_MAX_M
    if interpreted and (not m_small or gemv == "planes") and x.dtype == torch.bfloat16:
        raise NotImplementedError("the Triton CPU interpreter computes bf16 tl.dot on raw bit patterns; the bf16 GEMM "
                                  "kernel can only run on a GPU (M <= 4 uses the GEMV kernel, which works)")
    # Kernel choice depends on the shapes, dtypes, options and the packed rows' alignment only: cached, since at
    # batch 1 the host time of a call matters as much as the kernel's.
    bucket = _next_pow2(M) if m_small else min(64, max(16, _next_pow2(M)))
    key = (bits, c.K, c.group, c.per_channel, x.dtype, scale.dtype, bucket, bias is not None,
           packed.data_ptr() % 16, packed.stride(0) % 16, block_n, block_k, num_warps, num_stages, gemv, gemm,
           split_k, maxnreg, c.N, triton.cdiv(M, bucket), x.device,  # these three: the default split's tile count
           preferred_gemv() if m_small and gemv is None else None)
    auto = split_k == "auto"
    if auto:  # the split depends on the exact rows too
        key += (M,)
    specs = _SPECS_CACHE.get(key)
    args = {"x_ptr": x2, "packed_ptr": packed, "scale_ptr": scale, "zero_ptr": zero,
            "bias_ptr": bias if bias is not None else y,  # never read when HAS_BIAS is False
            "y_ptr": y, "M": M, "N": c.N, "K": c.K, "stride_xm": x2.stride(0), "stride_pn": packed.stride(0),
            "stride_sn": scale.stride(0), "stride_zn": zero.stride(0), "stride_ym": y.stride(0)}
    if specs is None:
        # "auto" starts unsplit (not default_split) and splits only where occupancy_split says so
        specs = _select_specs(packed, bits, c, x.dtype, scale.dtype, M, bias is not None, block_n, block_k,
                              num_warps, num_stages, gemv, gemm, 1 if auto else split_k, maxnreg)
        if auto and specs["kernel"] in PLANES_KERNELS and not interpreted:
            splits = _auto_split(specs, args)
            if splits > 1:
                specs = _select_specs(packed, bits, c, x.dtype, scale.dtype, M, bias is not None, block_n, block_k,
                                      num_warps, num_stages, gemv, gemm, splits, maxnreg)
        specs = {**specs, "launch_options": launch_options(specs)}  # once per cached choice, not per call
        if len(_SPECS_CACHE) >= 4096:
            _SPECS_CACHE.clear()
        _SPECS_CACHE[key] = specs
    return _Launch(specs=specs, args=args, y=y, out_shape=(*x.shape[:-1], c.N))


def occupancy_split(tiles: int, k_steps: int, per_sm: int, sm_count: int, min_steps: int = 4) -> int:
    """split_k="auto": how many K ranges per output tile. As many as keep the whole grid (tiles x split
    programs) resident at once (<= per_sm programs on each of sm_count SMs) with >= min_steps K steps in the
    longest range; then the fewest ranges with that longest range (ceil(k_steps / split) steps), so none is
    empty or needless. 1 when the tiles alone fill the GPU."""
    limit = max(1, min(per_sm * sm_count // max(tiles, 1), k_steps // min_steps, 64))
    return triton.cdiv(k_steps, triton.cdiv(k_steps, limit))


def _auto_split(specs: dict[str, Any], args: dict[str, Any]) -> int:
    """occupancy_split for this launch: programs per SM from the compiled kernel's registers and shared memory
    (compiled with a split, whose code differs from the unsplit kernel's) and the device's limits."""
    from triton.runtime import driver
    M, N, K = args["M"], args["N"], args["K"]
    c = specs["constexprs"]
    nw = specs["num_warps"]
    ws_args = {**args, "y_ptr": torch.float32, "stride_ym": N}  # as launched: an fp32 workspace (a dtype: no data)
    compiled = specs["kernel"].warmup(*ws_args.values(), grid=(1,), **{**c, "SPLIT_K": 2}, **launch_options(specs),
                                      enable_fp_fusion=True)
    if hasattr(compiled, "result"):  # a future under Triton's async compile mode
        compiled = compiled.result()
    if compiled is None:  # a jit_cache_hook took over compilation: nothing to measure
        return 1
    compiled._init_handles()  # loads the binary: n_regs (Triton's own occupancy tutorial does the same)
    props = driver.active.utils.get_device_properties(args["x_ptr"].device.index)
    regs = -(-compiled.n_regs // 8) * 8  # registers are allocated per thread in multiples of 8
    per_sm = min(props["max_num_regs"] // max(regs * 32 * nw, 1), 64 // nw, 32,
                 props["max_shared_mem"] // (compiled.metadata.shared + 1024))  # 1 KB reserved per block
    tiles = triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"])
    return occupancy_split(tiles, triton.cdiv(K, c["BLOCK_K"]), max(per_sm, 1), props["multiprocessor_count"])


def dq_linear_triton(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                     group: int, in_features: int, bias: torch.Tensor | None = None, *,
                     block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None, gemv: str | None = None, gemm: str | None = None,
                     split_k: int | str | None = None, maxnreg: int | None = None) -> torch.Tensor:
    """y = x @ Ŵᵀ (+ bias) with the Triton kernels: GEMV for M <= 4 rows (leading dims of x flattened), else GEMM.

    group: -1 or in_features for per channel, else a power of two >= 16 dividing in_features. Tensors must be on
    CUDA, or on CPU when the kernels run under TRITON_INTERPRET=1. block_n / block_k / num_warps override the
    default tiles and num_stages the software pipelining depth (fixed at 3 in the "_sw" GEMVs); gemv / gemm the
    kernel (see kernel_specs); split_k splits K over that many programs per tile (planes-family GEMMs; their fp32
    partials are summed here), "auto" as many as keep the whole grid resident on this GPU (occupancy_split; 1
    for the other kernels and under the interpreter); left unset, the planes-family GEMMs take default_split
    (up to 4 ranges; split_k=1 turns splitting off). maxnreg caps the registers per thread (0: no cap; unset:
    kernel_specs' default).
    """
    launch = _prepare(x, packed, scale, zero, bits, group, in_features, bias, block_n, block_k, num_warps, gemv,
                      gemm, num_stages, split_k, maxnreg)
    specs, args, y = launch.specs, launch.args, launch.y
    if y.numel() == 0:
        return y.reshape(launch.out_shape)
    grid = specs["grid"](args["M"], args["N"])
    splits = specs["constexprs"].get("SPLIT_K", 1)
    if splits > 1 and splits * y.numel() >= _I32_LIMIT:
        raise ValueError(f"split_k={splits} needs a workspace of {splits} x {y.numel()} elements; the kernels use i32 "
                         f"offsets (< 2^31): use a smaller split_k")
    if splits > 1:  # the kernel writes fp32 partials, one [M, N] slice per K range
        args = {**args, "y_ptr": torch.empty(splits, args["M"], args["N"], dtype=torch.float32, device=y.device),
                "stride_ym": args["N"]}
    # FMA contraction explicitly: the kernels are written for FFMA/HFMA2 (Triton 3.10 turns the default off)
    specs["kernel"][grid](*args.values(), **specs["constexprs"], **specs["launch_options"], enable_fp_fusion=True)
    if splits > 1:  # one small kernel rather than torch's sum + cast
        mn = args["M"] * args["N"]
        _sum_splits_kernel[(triton.cdiv(mn, 1024),)](args["y_ptr"], y, mn, SPLIT_K=splits, BLOCK=1024, num_warps=4)
    return y.reshape(launch.out_shape)
