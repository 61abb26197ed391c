"""Triton low-bit linear kernels (graphopt.kernels.dq_triton) under Triton's CPU interpreter, against the reference."""
from __future__ import annotations

import os

# Must precede the first `import triton`: kernels decorated without it are compiled for a GPU.
os.environ["TRITON_INTERPRET"] = "1"

import inspect  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from graphopt.compiler.quantize import pack  # noqa: E402
from graphopt.kernels import dq_triton as dq  # noqa: E402

if not dq.is_interpreted():
    pytest.skip("graphopt.kernels.dq_triton was imported before TRITON_INTERPRET=1 was set, so its kernels need a GPU",
                allow_module_level=True)


def _interpreter_broken() -> bool:
    """Triton 3.6's interpreter calls int() on a one-element array for `range(0, K, ...)` with a runtime K; NumPy
    2.4 refuses that (3.7 fixed it). Compilation for a GPU is unaffected."""
    import numpy
    import triton
    version = lambda v: tuple(int(p) for p in v.split("+")[0].split(".")[:2])  # noqa: E731
    return version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4)


if _interpreter_broken():
    pytest.skip("Triton < 3.7's CPU interpreter fails with NumPy >= 2.4: pip install 'numpy<2.4' (or triton>=3.7) "
                "to run these tests", allow_module_level=True)

torch.set_num_threads(1)  # other cores are busy; every problem here is tiny


def make_case(bits: int, group: int, M: int | tuple[int, ...], N: int = 64, K: int = 128, *,
              dtype: torch.dtype = torch.float32, scale_dtype: torch.dtype = torch.float32, bias: bool = False,
              seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.randint(lo, hi + 1, (N, K), generator=gen)
    G = 1 if group in (-1, K) else K // group
    lead = (M,) if isinstance(M, int) else M
    return {
        "x": torch.randn(*lead, K, generator=gen).to(dtype),
        "packed": pack(q, bits),
        "scale": (torch.rand(N, G, generator=gen) * 0.1 + 0.01).to(scale_dtype),
        "zero": (torch.randn(N, G, generator=gen) * 0.05).to(scale_dtype),
        "bits": bits, "group": group, "in_features": K,
        "bias": torch.randn(N, generator=gen).to(dtype) if bias else None,
    }


def check(case: dict, **blocks: int) -> torch.Tensor:
    y = dq.dq_linear_triton(**case, **blocks)
    ref = dq.dq_linear_reference(**case)
    assert y.dtype == case["x"].dtype and y.shape == ref.shape
    tol = 1e-5 if y.dtype == torch.float32 else 1e-2  # GEMM rounds dequantized weights to fp16/bf16
    scale = ref.float().abs().max().item() + 1e-6
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol * scale)
    return y


# ---------------------------------------------------------------------------------------
# Numerics against the reference
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("group", [32, 64, -1], ids=["g32", "g64", "perchan"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_reference_fp32(bits: int, group: int, M: int, bias: bool) -> None:
    check(make_case(bits, group, M, bias=bias, seed=bits * 100 + M))


@pytest.mark.parametrize("M", [1, 3, 32])
@pytest.mark.parametrize("group", [32, -1], ids=["g32", "perchan"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_matches_reference_fp16(bits: int, group: int, M: int) -> None:
    # The interpreter runs fp16 tl.dot as an fp32-accumulating numpy matmul, so the GEMM path is checked too.
    check(make_case(bits, group, M, dtype=torch.float16, scale_dtype=torch.float16, bias=True))


@pytest.mark.parametrize("M", [1, 4])
def test_bf16_gemv(M: int) -> None:
    check(make_case(4, 32, M, dtype=torch.bfloat16, scale_dtype=torch.bfloat16, bias=True))


def test_bf16_gemm_refused_by_interpreter() -> None:
    with pytest.raises(NotImplementedError, match="bf16"):
        dq.dq_linear_triton(**make_case(4, 32, 16, dtype=torch.bfloat16))


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [2, 16])
def test_scale_dtype_differs_from_activations(scale_dtype: torch.dtype, M: int) -> None:
    check(make_case(4, 64, M, scale_dtype=scale_dtype, bias=True))


@pytest.mark.parametrize("M", [1, 16])
@pytest.mark.parametrize("bits", [2, 3, 8])
def test_several_programs_and_k_steps(bits: int, M: int) -> None:
    # N=40 over 32-wide column blocks (masked tail); K=256 in 64-wide steps, groups of 32 (two groups per step).
    check(make_case(bits, 32, M, N=40, K=256, bias=True), block_n=32, block_k=64)


@pytest.mark.parametrize("M", [1, 16])
def test_group_spans_several_k_steps(M: int) -> None:
    check(make_case(4, 128, M, K=256), block_k=32 if M == 1 else 64)


@pytest.mark.parametrize("M", [3, 16])
@pytest.mark.parametrize("bits", [2, 3])
def test_per_channel_k_not_a_block_multiple(bits: int, M: int) -> None:
    # K=90: a partly filled last byte (2-bit) and a K tail inside the last block; group = K means per channel.
    case = make_case(bits, 90, M, N=48, K=90, bias=True)
    assert case["scale"].shape == (48, 1)
    check(case)


@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("group", [32, 128, -1], ids=["g32", "g128", "perchan"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequant_gemv_matches_reference(bits: int, group: int, M: int) -> None:
    # K=256 in 64-wide steps: several groups per step (g32), a group over several steps (g128), and per channel.
    check(make_case(bits, group, M, N=40, K=256, bias=True, seed=bits + M), gemv="dequant", block_n=16, block_k=64)


def test_dequant_gemv_k_tail_and_half_precision() -> None:
    check(make_case(2, 90, 2, N=48, K=90), gemv="dequant")
    check(make_case(4, 32, 1, dtype=torch.float16, scale_dtype=torch.float16, bias=True), gemv="dequant")


@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("bits,group", [(4, 128), (2, 64), (3, 32), (8, 32), (4, -1), (2, -1), (4, 16)],
                         ids=["w4g128", "w2g64", "w3g32", "w8g32", "w4pc", "w2pc", "w4g16"])
def test_units_gemv_matches_reference(bits: int, group: int, M: int) -> None:
    # One warp, 4 rows per program: K=256 is one partial K step, N=20 leaves a partial row block; M=3 pads to 4
    # activation rows. g16 at 4 bits gives runs of 2 units, the others runs of 4; x in fp16, bf16 and fp32.
    # "units_hi" reads 16-bit activations' codes biased (shifted into a high mantissa window, no subtraction per
    # code, Σ bias x removed per run): it must agree with the exact codes to well within the output rounding.
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        case = make_case(bits, group, M, N=20, K=256, dtype=dtype, scale_dtype=torch.float16, bias=True,
                         seed=bits + M)
        exact = check(case, gemv="units", block_n=4, num_warps=1)
        hi = check(case, gemv="units_hi", block_n=4, num_warps=1)
        ref = dq.dq_linear_reference(**{**case, "x": case["x"].float(), "bias": case["bias"].float()})
        err = ((hi.float() - ref).norm() / ref.norm()).item()
        assert err <= ((exact.float() - ref).norm() / ref.norm()).item() * 1.1 + 1e-6


@pytest.mark.parametrize("gemv", ["units", "units_hi"])
@pytest.mark.parametrize("bits,group,K,block_k,M", [(4, 128, 384, 128, 1), (2, 64, 320, 128, 3), (3, 32, 224, 64, 4),
                                                    (8, 32, 160, 64, 2), (4, -1, 224, 64, 1), (2, -1, 160, 64, 4)],
                         ids=["w4g128", "w2g64", "w3g32", "w8g32", "w4pc", "w2pc"])
def test_units_gemv_full_and_partial_k_steps(gemv: str, bits: int, group: int, K: int, block_k: int, M: int) -> None:
    # Full K steps load weights, scales, zeros and row 0's activations without masks; only a partial last step
    # masks them. N = 20 in blocks of 8 leaves 4 rows past N in the last program: they read row N - 1 and must
    # never be stored (the output buffer is exactly [M, N], so a stray store would corrupt the next row or fail).
    assert K > block_k
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        case = make_case(bits, group, M, N=20, K=K, dtype=dtype, scale_dtype=torch.bfloat16, bias=True,
                         seed=bits + K + M)
        y = check(case, gemv=gemv, block_n=8, block_k=block_k, num_warps=1)
        # one masked step over all of K: the same sums in another order
        masked = dq.dq_linear_triton(**case, gemv=gemv, block_n=8, block_k=1 << (K - 1).bit_length(), num_warps=1)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(y, masked, rtol=tol, atol=tol * masked.float().abs().max().item())


@pytest.mark.parametrize("hi", [False, True], ids=["exact", "hi"])
@pytest.mark.parametrize("bits,group,K", [(4, 128, 384), (2, 64, 320), (3, 32, 224), (4, -1, 224)],
                         ids=["w4g128", "w2g64", "w3g32", "w4pc"])
def test_pipelined_units_gemvs(hi: bool, bits: int, group: int, K: int) -> None:
    # Software pipelining only moves loads a K step earlier, so "_pf" (registers) and "_sw" (Triton's pipeliner)
    # must agree bit for bit (the interpreter does not run Triton's pipeliner: this checks the register prefetch and
    # the shared loop; the GPU benchmark checks "_sw" compiled). Both take runs of up to 8 units (the plain kernel
    # 4): where the run is the same (32-bit units, here 3/4 bits with 16-bit x) they must equal the plain kernel
    # bit for bit too. 128-wide K steps over K = 224..384 give 2-3 steps, and for K = 224 and 320 a partial last
    # one (the prefetch past K must load nothing); M = 3 pads to 4 rows (rows 1-3 are not prefetched).
    base = "units_hi" if hi else "units"
    for dtype, M in ((torch.bfloat16, 1), (torch.float32, 3)):
        case = make_case(bits, group, M, N=20, K=K, dtype=dtype, scale_dtype=torch.bfloat16, bias=True,
                         seed=bits + K)
        blocks = dict(block_n=4, block_k=128, num_warps=1)
        y_pf = check(case, gemv=base + "_pf", **blocks)
        assert torch.equal(y_pf, check(case, gemv=base + "_sw", **blocks))
        if dq.units_run(bits, group, dtype, base + "_pf") == dq.units_run(bits, group, dtype, base):
            assert torch.equal(y_pf, dq.dq_linear_triton(**case, gemv=base, **blocks))
    assert dq.units_run(2, 64, torch.bfloat16, "units_sw") == (8, 64)  # 8 16-bit units: one 16-byte load per row


def test_pipelined_units_gemv_refusals() -> None:
    # W2 bf16 per channel, K = 96: a multiple of the plain run (32 codes), not of the pipelined forms' 64
    case = make_case(2, -1, 1, N=8, K=96, dtype=torch.bfloat16, scale_dtype=torch.bfloat16)
    check(case, gemv="units")
    with pytest.raises(ValueError, match=r"gemv='units_sw' needs in_features divisible by its run of 64 codes"):
        dq.dq_linear_triton(**case, gemv="units_sw")
    assert dq.kernel_specs(2, 64, "bf16", True, m=1, gemv="units_sw")["num_stages"] == 3
    with pytest.raises(ValueError, match="pipelines 3 stages"):
        dq.kernel_specs(2, 64, "bf16", True, m=1, gemv="units_sw", num_stages=2)
    with pytest.raises(ValueError, match="gemv must be one of"):
        dq.units_run(2, 64, torch.bfloat16, "units_fast")


@pytest.mark.parametrize("gemv,bits,group,K,block_k,M",
                         [("units_h2", 4, 128, 384, 256, 1), ("units_h2", 2, 64, 320, 128, 1),
                          ("units_h2", 3, 32, 224, 64, 2), ("units_h2", 8, 32, 96, 64, 4),
                          ("units_h2", 4, -1, 224, 64, 1), ("units_h2", 2, 32, 96, 64, 3),
                          ("units_h2_r2", 2, 64, 320, 128, 1), ("units_h2_r2", 4, -1, 224, 64, 2)],
                         ids=["w4g128", "w2g64", "w3g32", "w8g32", "w4pc", "w2g32", "r2-w2g64", "r2-w4pc"])
def test_units_h2_gemv_matches_reference(gemv: str, bits: int, group: int, K: int, block_k: int, M: int) -> None:
    # "units_h2" computes in fp16x2 (codes dequantized exactly, products summed in fp16 per run, then fp32), so
    # it must stay within ~1e-3 of the exact "units" kernel's error. Each K here is one or more full K steps
    # (unmasked loads) and a partial last one (masked); N = 20 leaves a partial row block (rows clamped, never
    # stored); M = 2-4 pad to 2 or 4 activation rows. "units_h2_r2" takes runs of up to 2 words instead of 4.
    # The CPU interpreter runs the same arithmetic on the fp16 halves instead of the inline PTX.
    assert K > block_k and K % block_k
    for dtype in (torch.float16, torch.bfloat16):
        case = make_case(bits, group, M, N=20, K=K, dtype=dtype, scale_dtype=torch.bfloat16, bias=True,
                         seed=bits + K)
        blocks = dict(block_n=4, num_warps=1)
        y = check(case, gemv=gemv, block_k=block_k, **blocks)
        ref = dq.dq_linear_reference(**{**case, "x": case["x"].float(), "bias": case["bias"].float()})
        exact = dq.dq_linear_triton(**case, gemv="units", **blocks)
        err = lambda t: ((t.float() - ref).norm() / ref.norm()).item()  # noqa: E731
        assert err(y) <= err(exact) + 1.5e-3, (dtype, err(y), err(exact))


def test_units_h2_scales_activations_per_run() -> None:
    # fp16 lanes overflow past 65504: without the per-run power-of-two scaling, x ~ 3e4 (fp16) or 1e6 (bf16, out
    # of fp16's range altogether) times codes up to 8 would give inf (the scales keep the outputs in range). Tiny
    # activations (1e-4, some fp16 subnormals) must keep their precision too. W4g32: runs of 32 codes.
    K = 128
    for dtype, big in ((torch.float16, 3e4), (torch.bfloat16, 1e6)):
        case = make_case(4, 32, 1, N=8, K=K, dtype=dtype, scale_dtype=torch.float32, seed=7)
        case["scale"] *= 1e-3  # outputs inside fp16's range; the products q x are not
        case["zero"] *= 1e-3
        x = torch.randn(1, K, generator=torch.Generator().manual_seed(8))
        x[:, :32] *= big
        x[:, 32:64] *= 1e-6
        case["x"] = x.to(dtype)
        y = dq.dq_linear_triton(**case, gemv="units_h2", block_n=4, num_warps=1)
        assert torch.isfinite(y).all()
        exact = dq.dq_linear_triton(**case, gemv="units", block_n=4, num_warps=1)
        ref = dq.dq_linear_reference(**{**case, "x": case["x"].float()})
        err = lambda t: ((t.float() - ref).norm() / ref.norm()).item()  # noqa: E731
        assert err(y) <= err(exact) + 1.5e-3, (dtype, err(y), err(exact))
        small = make_case(4, 32, 1, N=8, K=K, dtype=dtype, scale_dtype=torch.float32, seed=9)
        tiny = torch.zeros(1, K)
        tiny[:, 32:64] = torch.randn(1, 32, generator=torch.Generator().manual_seed(10)) * 1e-4  # some subnormal
        small["x"] = tiny.to(dtype)
        ys = dq.dq_linear_triton(**small, gemv="units_h2", block_n=4, num_warps=1)
        exact = dq.dq_linear_triton(**small, gemv="units", block_n=4, num_warps=1)
        ref = dq.dq_linear_reference(**{**small, "x": small["x"].float()})
        assert err(ys) <= err(exact) + 1.5e-3, (dtype, err(ys), err(exact))
    with pytest.raises(ValueError, match="takes float16 or bfloat16 activations only"):
        dq.dq_linear_triton(**make_case(4, 128, 1, K=256), gemv="units_h2")


def test_preferred_gemv_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # GRAPHOPT_DQ_GEMV picks the units GEMV the launcher tries first (to run a whole model on units_h2); where
    # that kernel does not fit, the usual choice. The kernel choice cache must not hand out the other setting's.
    half = make_case(4, 128, 1, N=20, K=256, dtype=torch.bfloat16, scale_dtype=torch.bfloat16, seed=5)
    fp32 = make_case(4, 128, 1, K=256)
    tail = make_case(2, 90, 1, N=8, K=90, dtype=torch.bfloat16, scale_dtype=torch.bfloat16)
    name = lambda case: dq._prepare(**case, block_n=None, block_k=None).specs["name"]  # noqa: E731
    assert name(half) == "_dq_gemv_units_hi_kernel"
    monkeypatch.setenv("GRAPHOPT_DQ_GEMV", "units_h2")
    assert name(half) == "_dq_gemv_units_hi_kernel"  # read once per process
    dq.preferred_gemv.cache_clear()
    assert name(half) == "_dq_gemv_units_h2_kernel"
    assert name(fp32) == "_dq_gemv_units_hi_kernel"  # fp16x2 takes 16-bit activations only
    assert name(tail) == "_dq_gemv_dequant_kernel"  # K = 90: no whole runs
    assert dq._prepare(**half, block_n=None, block_k=None, gemv="units").specs["name"] == "_dq_gemv_units_kernel"
    monkeypatch.setenv("GRAPHOPT_DQ_GEMV", "fastest")
    dq.preferred_gemv.cache_clear()
    with pytest.raises(ValueError, match="GRAPHOPT_DQ_GEMV='fastest' is not a units GEMV: use one of units, "):
        name(half)
    monkeypatch.delenv("GRAPHOPT_DQ_GEMV")
    dq.preferred_gemv.cache_clear()
    assert name(half) == "_dq_gemv_units_hi_kernel"


def test_units_gemv_is_the_default_when_it_fits() -> None:
    fits = make_case(4, 128, 1, K=256)
    assert dq._prepare(**fits, block_n=None, block_k=None).specs["name"] == "_dq_gemv_units_hi_kernel"
    # 16-bit activations: the biased codes are what runs by default (fp32 x takes the exact ones)
    half = make_case(4, 128, 1, N=20, K=256, dtype=torch.bfloat16, scale_dtype=torch.bfloat16, seed=5)
    assert dq._prepare(**half, block_n=None, block_k=None).specs["name"] == "_dq_gemv_units_hi_kernel"
    check(half)
    assert dq.units_run(4, 128, torch.bfloat16) == (8, 32) and dq.units_run(2, 64, torch.float32) == (4, 16)
    tail = make_case(2, 90, 1, N=8, K=90)  # K not a multiple of the 32-code run: the element-wise GEMV instead
    assert dq._prepare(**tail, block_n=None, block_k=None).specs["name"] == "_dq_gemv_dequant_kernel"
    check(tail)
    with pytest.raises(ValueError, match="gemv='units' needs in_features divisible by its run of 16 codes"):
        dq.dq_linear_triton(**tail, gemv="units")


def test_unknown_gemv_kernel_refused() -> None:
    with pytest.raises(ValueError, match="gemv must be one of"):
        dq.dq_linear_triton(**make_case(4, 32, 1), gemv="fast")


@pytest.mark.parametrize("lead", [(1, 2), (2, 3)])
def test_leading_dims_flattened(lead: tuple[int, ...]) -> None:
    y = check(make_case(4, 32, lead))
    assert y.shape == (*lead, 64)


def test_strided_activations_and_cast_bias() -> None:
    case = make_case(4, 32, 3)
    wide = torch.randn(3, 2 * 128)
    wide[:, :128] = case["x"]
    case["x"] = wide[:, :128]  # row stride 256, unit column stride: launched without a copy
    case["bias"] = torch.randn(64).half()  # cast to x's dtype, as F.linear's callers do
    y = dq.dq_linear_triton(**case)
    ref = dq.dq_linear_reference(**{**case, "bias": case["bias"].float()})
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_no_rows() -> None:
    case = make_case(4, 32, 1)
    case["x"] = case["x"][:0]
    assert dq.dq_linear_triton(**case).shape == (0, 64)


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------

def _broken(**changes) -> dict:
    case = make_case(4, 32, 2, bias=True)
    case.update(changes)
    return case


@pytest.mark.parametrize("changes, message", [
    ({"bits": 5}, "bits must be one of"),
    ({"x": torch.zeros(2, 128, dtype=torch.int32)}, "x must be a float16"),
    ({"x": torch.zeros(2, 96)}, "x must be"),
    ({"in_features": 0}, "in_features must be positive"),
    ({"group": 48}, "positive divisor of in_features"),
    ({"packed": torch.zeros(64, 64, dtype=torch.int8)}, "packed must be a 2-D uint8"),
    ({"packed": torch.zeros(64, 32, dtype=torch.uint8)}, "bytes per row"),
    ({"scale": torch.ones(64, 2)}, "scale must be"),
    ({"zero": torch.zeros(64, 4, dtype=torch.int32)}, "zero must be"),
    ({"zero": torch.zeros(64, 4, dtype=torch.float16)}, "share a dtype"),
    ({"bias": torch.zeros(63)}, "bias must be"),
])
def test_validation_errors(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dq.dq_linear_triton(**_broken(**changes))
    with pytest.raises(ValueError, match=message):
        dq.dq_linear_reference(**_broken(**changes))


def test_triton_only_group_restriction() -> None:
    case = make_case(4, 96, 1, K=192)  # a valid layout for the reference, not for the kernels
    dq.dq_linear_reference(**case)
    with pytest.raises(ValueError, match="power of two"):
        dq.dq_linear_triton(**case)


def test_cpu_tensors_need_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dq, "is_interpreted", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        dq.dq_linear_triton(**make_case(4, 32, 1))


def test_register_cap_for_w2_at_batch_1() -> None:
    # W2 at batch 1 with 16-bit activations and the default tile on the plain units GEMVs: 128 registers (4 programs
    # of 4 warps per SM); elsewhere no cap, since it would spill (2-4 rows), let ptxas use more than it does
    # uncapped (W4), or is unmeasured (named tiles, fp32 activations, TensorRT's kernel). maxnreg=0 turns it off, N
    # sets it.
    cap = lambda bits, dt="bf16", **kw: dq.kernel_specs(bits, 64, dt, True, **kw)["maxnreg"]  # noqa: E731
    for gemv in ("units", "units_hi", "units_h2"):
        assert cap(2, m=1, gemv=gemv) == 128 and cap(2, "fp16", m=1, gemv=gemv) == 128
        assert cap(2, m=2, gemv=gemv) is None and cap(4, m=1, gemv=gemv) is None
        assert cap(2, m=1, gemv=gemv, block_n=8) is None and cap(2, m=1, gemv=gemv, num_warps=4) is None
        assert cap(2, m=1, gemv=gemv, maxnreg=0) is None and cap(4, m=1, gemv=gemv, maxnreg=96) == 96
    assert cap(2, "fp32", m=1, gemv="units_hi") is None and cap(2, m=1, gemv="units_hi", convention="tensorrt") is None
    assert cap(2, m=1, gemv="units_h2_r2") is None and cap(2, m=1, gemv="dequant") is None
    assert cap(2, m=None, gemv="units_hi") is None  # the GEMV for any M <= 4: compiled for 4 rows
    assert dq.launch_options(dq.kernel_specs(2, 64, "bf16", True, m=1, gemv="units_hi"))["maxnreg"] == 128
    assert "maxnreg" not in dq.launch_options(dq.kernel_specs(4, 128, "bf16", True, m=1, gemv="units_hi"))
    # the launcher's choice, cached per option (the interpreter ignores the cap, so only the specs can tell)
    case = make_case(2, 64, 1, N=20, K=256, dtype=torch.bfloat16, scale_dtype=torch.bfloat16)
    specs = lambda **kw: dq._prepare(**case, block_n=None, block_k=None, **kw).specs  # noqa: E731
    assert specs()["maxnreg"] == 128 and specs(maxnreg=0)["maxnreg"] is None and specs()["maxnreg"] == 128
    assert specs(maxnreg=64)["maxnreg"] == 64
    check(case, maxnreg=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"m_small": True, "m": 5}, "at most 4 rows"),
    ({"m_small": False, "block_k": 8}, "block_k must be"),  # tensor-core dots need K >= 16
    ({"m_small": True, "block_n": 48}, "block_n must be"),
    ({"m_small": True, "group": 48}, "power of two"),
    ({"m_small": True, "dtype": torch.float64}, "activation dtype"),
    ({"m_small": True, "maxnreg": 8}, "maxnreg must be"),
])
def test_kernel_specs_errors(kwargs: dict, message: str) -> None:
    args = {"bits": 2, "group": 32, "dtype": torch.float16, **kwargs}
    with pytest.raises(ValueError, match=message):
        dq.kernel_specs(**args)


# ---------------------------------------------------------------------------------------
# kernel_specs: the AOT description matches the kernels and the launch path
# ---------------------------------------------------------------------------------------

def _params(kernel) -> tuple[list[str], list[str]]:
    params = inspect.signature(kernel.fn).parameters.values()  # .fn: the Python function under the decorator
    return [p.name for p in params], [p.name for p in params if "constexpr" in str(p.annotation)]


@pytest.mark.parametrize("m_small", [True, False])
def test_kernel_specs_signature_lists_kernel_arguments(m_small: bool) -> None:
    specs = dq.kernel_specs(3, -1, torch.bfloat16, m_small, scale_dtype=torch.float32)
    names, constexprs = _params(specs["kernel"])
    assert list(specs["signature"]) == names
    assert [n for n, t in specs["signature"].items() if t == "constexpr"] == constexprs
    assert set(specs["constexprs"]) == set(constexprs)
    assert specs["signature"]["x_ptr"] == specs["signature"]["y_ptr"] == "*bf16"
    assert specs["signature"]["scale_ptr"] == "*fp32" and specs["signature"]["packed_ptr"] == "*u8"
    assert specs["constexprs"]["GROUP"] == 0 and specs["constexprs"]["BITS"] == 3
    assert specs["name"] == ("_dq_gemv_dequant_kernel" if m_small else "_dq_gemm_scaled_kernel")
    grid = specs["grid"](100, 1000)
    c = specs["constexprs"]
    assert grid == ((math.ceil(1000 / c["BLOCK_N"]), 1, 1) if m_small
                    else (math.ceil(100 / c["BLOCK_M"]), math.ceil(1000 / c["BLOCK_N"]), 1))


@pytest.mark.parametrize("M, bias", [(2, True), (20, False)])
def test_launch_path_matches_kernel_specs(M: int, bias: bool) -> None:
    case = make_case(2, 64, M, dtype=torch.float16, scale_dtype=torch.float32, bias=bias)
    launch = dq._prepare(**case, block_n=None, block_k=None)
    # K=128 is a multiple of the units GEMV's 32-code run, so the launcher picks that kernel at M <= 4; at M = 20
    # K=128 is one K step, so the launcher's default split is 1, as kernel_specs has it
    expected = dq.with_bias(dq.kernel_specs(2, 64, torch.float16, M <= dq.GEMV_MAX_M, m=M,
                                            scale_dtype=torch.float32, gemv=dq.GEMV_UNITS_DEFAULT), bias)
    assert launch.specs["kernel"] is expected["kernel"]
    assert launch.specs["constexprs"] == expected["constexprs"]
    assert launch.specs["signature"] == expected["signature"]
    runtime = [n for n, t in expected["signature"].items() if t != "constexpr"]
    assert list(launch.args) == runtime
    type_names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.uint8: "u8"}
    for name in runtime:
        value = launch.args[name]
        sig_type = expected["signature"][name]
        if isinstance(value, torch.Tensor):
            assert sig_type == "*" + type_names[value.dtype], name
        else:
            assert sig_type == "i32" and isinstance(value, int), name


def test_aot_compiles_to_ptx(tmp_path) -> None:
    """Both kernels go through Triton's real compiler to sm_90 PTX via kernel_specs (no GPU needed)."""
    pytest.importorskip("triton.backends.nvidia")
    script = textwrap.dedent("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from graphopt.kernels.dq_triton import kernel_specs, launch_options, with_bias
        for m_small in (True, False):
            sp = with_bias(kernel_specs(4, 32, "fp16", m_small), True)
            k = triton.compile(ASTSource(sp["kernel"], sp["signature"], sp["constexprs"]),
                               target=GPUTarget("cuda", 90, 32),
                               options=launch_options(sp))
            ptx = k.asm["ptx"]
            assert ".entry " + sp["name"] in ptx, sp["name"]
            assert m_small or "mma" in ptx  # fp16 GEMM tiles use tensor cores
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_every_kernel_form_compiles_for_sm90(tmp_path) -> None:
    """The interpreter runs Python, not Triton's compiler: a form it accepts can still fail to compile (e.g. constexpr
    branches whose returns differ in shape). Each units GEMV at runs of 2 units (4 rows), of 4-8 units with 16-bit x
    (1 row) and with fp32 x (3 rows), and each planes GEMM, through the real compiler to sm_90 (no GPU needed),
    with the 16-byte alignment facts a GPU launch passes (they enable vector loads and cp.async)."""
    pytest.importorskip("triton.backends.nvidia")
    script = textwrap.dedent("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from graphopt.kernels.dq_triton import GEMM_KERNELS, UNITS_GEMVS, kernel_specs, launch_options
        forms = [(2, 16, "bf16", True, dict(m=3, gemv=g)) for g in UNITS_GEMVS]
        forms += [(2, 64, "bf16", True, dict(m=1, gemv=g, num_warps=1)) for g in UNITS_GEMVS]
        forms += [(4, 128, "fp32", True, dict(m=3, gemv=g, num_warps=1))
                  for g in UNITS_GEMVS[2:] if not g.startswith("units_h2")]
        forms += [(b, g, "fp16", True, dict(m=m, gemv="units_h2")) for b, g, m in ((4, 128, 1), (3, -1, 3), (8, 32, 2))]
        forms += [(2, 64, "bf16", True, dict(m=1, gemv=g)) for g in ("units_hi", "units_h2")]  # default tile: capped
        forms += [(4, 128, "bf16", False, dict(m=16, gemm=g)) for g in GEMM_KERNELS]
        forms += [(2, 64, "bf16", False, dict(m=16, gemm=g, split_k=4, block_n=64, block_k=128))
                  for g in ("planes", "scaled")]
        aligned = ("x_ptr", "packed_ptr", "scale_ptr", "zero_ptr", "bias_ptr", "y_ptr", "N", "K", "stride_xm",
                   "stride_pn", "stride_sn", "stride_zn", "stride_ym")
        for bits, group, dt, m_small, kw in forms:
            sp = kernel_specs(bits, group, dt, m_small, **kw)
            names = list(sp["signature"])
            attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
            k = triton.compile(ASTSource(sp["kernel"], sp["signature"], sp["constexprs"], attrs),
                               target=GPUTarget("cuda", 90, 32),
                               options=launch_options(sp))
            assert ".entry " + sp["name"] in k.asm["ptx"], sp["name"]
            # W2 at batch 1 with 16-bit x and the default tile on the plain units GEMVs: capped at 128 registers
            capped = (bits == 2 and dt != "fp32" and kw.get("m") == 1
                      and kw.get("gemv") in ("units", "units_hi", "units_h2")
                      and not {"block_n", "block_k", "num_warps"} & set(kw))
            assert (".maxnreg 128" in k.asm["ptx"]) == capped, sp["name"]
        from graphopt.kernels.dq_triton import _sum_splits_kernel
        k = triton.compile(ASTSource(_sum_splits_kernel, {"ws_ptr": "*fp32", "y_ptr": "*bf16", "MN": "i32",
                                                          "SPLIT_K": "constexpr", "BLOCK": "constexpr"},
                                     {"SPLIT_K": 5, "BLOCK": 1024}), target=GPUTarget("cuda", 90, 32))
        assert ".entry _sum_splits_kernel" in k.asm["ptx"]
        print("ok", len(forms))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


# ---------------------------------------------------------------------------------------
# The planes GEMM (codes of each unit slot straight into tensor-core dots)
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("gemm", ["planes", "planes8", "scaled", "scaled8"])
@pytest.mark.parametrize("bits,group", [(2, 64), (2, 16), (3, 32), (4, 128), (4, 16), (8, 32), (2, -1), (4, -1)],
                         ids=["w2g64", "w2g16", "w3g32", "w4g128", "w4g16", "w8g32", "w2pc", "w4pc"])
def test_planes_gemm_matches_reference(gemm: str, bits: int, group: int) -> None:
    # K=256 in the least K step each kernel takes: with 16-bit units W2 g16 puts 8 groups in one sub-block (masked
    # partials per group); M=20 pads a 32-row tile, N=40 a partial column block; fp32 (exact) and fp16.
    # "scaled": the operand dequantized in registers, several groups per K step (scales broadcast per unit).
    block_k = max(32, 16 * (8 if gemm.endswith("8") else 16) // (4 if bits == 3 else bits))  # the least that fits
    for dtype in (torch.float32, torch.float16):
        case = make_case(bits, group, 20, N=40, K=256, dtype=dtype, scale_dtype=torch.float16, bias=True, seed=bits)
        launch = dq._prepare(**case, block_n=16, block_k=block_k, gemm=gemm)
        assert launch.specs["name"] == f"_dq_gemm_{gemm}_kernel"
        check(case, gemm=gemm, block_n=16, block_k=block_k)


def test_planes_gemv_and_k_tail() -> None:
    check(make_case(4, 128, 3, N=40, K=256, dtype=torch.float16, bias=True), gemv="planes")
    tail = make_case(2, 90, 20, N=48, K=90, bias=True)  # per channel, K ends inside a byte and a sub-block
    check(tail, gemm="planes8", block_k=64)


def test_gemm_defaults_by_rows_and_group() -> None:
    def name(bits: int, group: int, M: int, K: int = 512) -> str:
        case = make_case(bits, group, M, N=40, K=K, dtype=torch.float16, scale_dtype=torch.float16)
        return dq._prepare(**case, block_n=None, block_k=None).specs["name"]
    assert name(4, 128, 16) == "_dq_gemm_planes_kernel"
    assert name(4, 32, 16) == "_dq_gemm_scaled_kernel"  # 16-bit units split its groups by masking: cheapest scaled
    assert name(2, 64, 16) == "_dq_gemm_scaled_kernel" and name(3, 128, 16) == "_dq_gemm_planes_kernel"
    assert name(4, 128, 64) == "_dq_gemm_scaled_kernel" and name(2, 64, 64) == "_dq_gemm_scaled_kernel"
    assert name(8, 128, 16) == "_dq_gemm_planes_kernel" and name(8, 128, 64) == "_dq_gemm_kernel"  # 8 bits: untimed
    assert name(2, -1, 16, K=90) == "_dq_gemm_kernel"  # 23-byte rows: no 16-bit units, M > 4 falls back to dequant
    check(make_case(2, 64, 16, N=40, K=512, dtype=torch.float16, scale_dtype=torch.float16, bias=True))


@pytest.mark.parametrize("tiles,k_steps,sms,expected", [
    (128, 64, 132, 4),   # 8192² at 64-column tiles: 4 ranges (the H200 sweep's best at 16 rows)
    (224, 32, 132, 4),   # 4096 x 14336: 6 x 132 / 224 = 3.5 ranges wanted, rounds to 4
    (448, 32, 132, 2),   # twice the columns: 2
    (1200, 64, 132, 1),  # the tiles alone give 6 per SM
    (2, 8, 132, 2),      # at least 4 K steps per range
    (2, 7, 132, 1),
])
def test_default_split(tiles: int, k_steps: int, sms: int, expected: int) -> None:
    assert dq.default_split(tiles, k_steps, sms) == expected


def test_default_gemm_splits_k_by_the_tiles() -> None:
    # K = 2048 at 128-wide steps: 16 steps, one 16 x 64 tile -> 4 K ranges; the launcher's split matches the
    # unsplit kernel and the reference
    case = make_case(4, 128, 16, N=64, K=2048, dtype=torch.float16, scale_dtype=torch.float16, bias=True, seed=11)
    launch = dq._prepare(**case, block_n=None, block_k=None)
    assert launch.specs["name"] == "_dq_gemm_planes_kernel" and launch.specs["constexprs"]["SPLIT_K"] == 4
    assert launch.specs["constexprs"]["BLOCK_N"] == 64 and launch.specs["constexprs"]["BLOCK_K"] == 128
    parts = check(case)
    whole = dq.dq_linear_triton(**case, split_k=1)
    torch.testing.assert_close(parts.float(), whole.float(), rtol=2e-3, atol=2e-3 * whole.abs().max().item())
    # explicit split_k=1 or a short K: no split
    assert dq._prepare(**case, block_n=None, block_k=None, split_k=1).specs["constexprs"]["SPLIT_K"] == 1
    short = make_case(4, 128, 16, N=64, K=256, dtype=torch.float16, scale_dtype=torch.float16)
    assert dq._prepare(**short, block_n=None, block_k=None).specs["constexprs"]["SPLIT_K"] == 1
    # the cached choice keys on the tiles: 448 column tiles (N = 28672) want 2 ranges, the same K at N = 64 wants 4
    wide = make_case(4, 128, 16, N=28672, K=2048, dtype=torch.float16, scale_dtype=torch.float16)
    assert dq._prepare(**wide, block_n=None, block_k=None).specs["constexprs"]["SPLIT_K"] == 2
    assert dq._prepare(**case, block_n=None, block_k=None).specs["constexprs"]["SPLIT_K"] == 4
    # "auto" starts from one range (the interpreter has no occupancy to fill), not from the default split
    assert dq._prepare(**case, block_n=None, block_k=None, split_k="auto").specs["constexprs"]["SPLIT_K"] == 1


def test_planes_refuses_what_it_cannot_take() -> None:
    with pytest.raises(ValueError, match="planes GEMM needs"):
        dq.kernel_specs(2, 64, torch.float16, False, m=16, gemm="planes", block_k=64)
    with pytest.raises(ValueError, match="gemm must be one of"):
        dq.kernel_specs(2, 64, torch.float16, False, m=16, gemm="fast")
    odd = make_case(2, 90, 20, N=48, K=90)  # 23-byte rows
    with pytest.raises(ValueError, match="2-byte aligned"):
        dq.dq_linear_triton(**odd, gemm="planes", block_k=128)


def test_kernel_choice_cache_keys_on_alignment() -> None:
    # The launcher caches its kernel choice per shape/dtype/options; the packed rows' alignment is part of the key,
    # so the same shapes at an odd address must not reuse the 16-bit-unit kernel.
    case = make_case(4, 128, 16, N=40, K=512, dtype=torch.float16, scale_dtype=torch.float16, bias=True)
    first = dq._prepare(**case, block_n=None, block_k=None)
    assert first.specs["name"] == "_dq_gemm_planes_kernel"
    assert dq._prepare(**case, block_n=None, block_k=None).specs is first.specs  # cached
    buf = torch.empty(case["packed"].numel() + 1, dtype=torch.uint8)
    odd = buf[1:].view(case["packed"].shape)
    odd.copy_(case["packed"])
    assert odd.data_ptr() % 2 == 1
    shifted = {**case, "packed": odd}
    assert dq._prepare(**shifted, block_n=None, block_k=None).specs["name"] == "_dq_gemm_kernel"
    check(shifted)


@pytest.mark.parametrize("gemm", [None, "planes", "planes8", "scaled", "scaled8"])
@pytest.mark.parametrize("bits,group,K,block_k", [(2, 16, 80, 128), (4, 32, 96, 64), (4, 128, 384, 256)],
                         ids=["w2g16-K80", "w4g32-K96", "w4g128-K384"])
def test_planes_k_tail_on_a_group_boundary(gemm: str | None, bits: int, group: int, K: int, block_k: int) -> None:
    # K a multiple of the group but not of the sub-block / K step: the last step holds fewer groups. x is followed
    # by NaN in memory, so a read past its rows would poison the output (it did before the masks covered this).
    case = make_case(bits, group, 16, N=32, K=K, dtype=torch.float16, scale_dtype=torch.float16, bias=True, seed=7)
    padded = torch.full((16 * K + 64,), float("nan"), dtype=torch.float16)
    padded[:16 * K] = case["x"].reshape(-1)
    case["x"] = padded[:16 * K].view(16, K)
    kw = {} if gemm is None else {"gemm": gemm, "block_k": block_k}
    check(case, **kw)


def test_a_named_gemm_gets_a_k_step_it_takes() -> None:
    # fp32's default 64-wide K step gives 2-bit codes in 16-bit units 8 codes per slot; a named kernel without a
    # block_k gets the shortest step that fits (128) instead of an error
    for gemm, block_k in (("planes", 128), ("scaled", 128), ("planes8", 64), ("scaled8", 64)):
        specs = dq.kernel_specs(2, 64, torch.float32, False, m=16, gemm=gemm)
        assert specs["name"] == f"_dq_gemm_{gemm}_kernel" and specs["constexprs"]["BLOCK_K"] == block_k
    check(make_case(2, 64, 16, N=32, K=256, seed=3), gemm="planes")


def test_planes_error_messages_and_fallbacks() -> None:
    with pytest.raises(ValueError, match="4 storage bits for 3-bit codes"):
        dq.kernel_specs(3, 128, torch.float16, False, m=16, gemm="planes", block_k=32)
    # 16-bit units do not fit a 64-wide fp32 step at 2 bits; the byte-wide kernel does
    specs = dq.kernel_specs(2, 128, torch.float32, True, m=1, gemv="planes")
    assert specs["name"] == "_dq_gemm_scaled8_kernel"
    odd = make_case(2, 90, 20, N=48, K=90)  # 23-byte rows
    with pytest.raises(ValueError, match="gemm='scaled8'"):
        dq.dq_linear_triton(**odd, gemm="scaled", block_k=128)
    # even stride but an odd row length (a view): 16-bit units would read the byte after each row
    wide = torch.zeros(48, 24, dtype=torch.uint8)
    wide[:, :23] = odd["packed"]
    view = {**odd, "packed": wide[:, :23]}
    for dtype in (torch.float16, torch.float32):  # fp32's 64-wide step is already too short for 16-bit units
        case16 = {**view, "x": torch.randn(16, 90).to(dtype)}
        name = dq._prepare(**case16, block_n=None, block_k=None, gemm=None).specs["name"]
        assert name == ("_dq_gemm_kernel" if dtype == torch.float16 else "_dq_gemm_scaled8_kernel")
        check(case16)


# ---------------------------------------------------------------------------------------
# Split K (planes-family GEMMs): K ranges per output tile, fp32 partials summed by the launcher
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("gemm", ["planes", "planes8", "scaled", "scaled8"])
@pytest.mark.parametrize("bits,group,K,split", [(4, 128, 1024, 2), (2, 64, 1024, 4), (4, -1, 1000, 3),
                                                (2, 32, 768, 3), (3, 128, 512, 4)],
                         ids=["w4g128-s2", "w2g64-s4", "w4pc-K1000-s3", "w2g32-s3", "w3g128-s4-empty"])
def test_split_k_matches_reference(gemm: str, bits: int, group: int, K: int, split: int) -> None:
    # 256-wide K steps: K = 1000 per channel ends inside a step (ranges 512 + 488 + an empty third); K = 512 in 4
    # ranges of one step leaves two ranges empty (they must add zeros, and the bias only once).
    case = make_case(bits, group, 20, N=48, K=K, dtype=torch.float16, scale_dtype=torch.float16, bias=True,
                     seed=split)
    launch = dq._prepare(**case, block_n=16, block_k=256, gemm=gemm, split_k=split)
    assert launch.specs["constexprs"]["SPLIT_K"] == split and launch.specs["grid"](20, 48) == (1, 3, split)
    whole = dq.dq_linear_triton(**case, block_n=16, block_k=256, gemm=gemm, split_k=1)
    parts = check(case, block_n=16, block_k=256, gemm=gemm, split_k=split)
    # the same products summed in another order: fp16 outputs within a rounding of each other
    torch.testing.assert_close(parts.float(), whole.float(), rtol=2e-3, atol=2e-3 * whole.abs().max().item())
    fp32 = {**case, "x": case["x"].float(), "bias": case["bias"].float()}
    fit = 16 * (8 if gemm.endswith("8") else 16) // (4 if bits == 3 else bits)  # least K step the kernel takes
    check(fp32, block_n=16, block_k=max(64, fit), gemm=gemm, split_k=split)


def test_split_k_auto_and_refusals() -> None:
    case = make_case(4, 128, 20, N=48, K=512, dtype=torch.float16, scale_dtype=torch.float16, bias=True)
    # the interpreter has no occupancy to fill: "auto" keeps one range
    assert dq._prepare(**case, block_n=None, block_k=None, split_k="auto").specs["constexprs"]["SPLIT_K"] == 1
    check(case, split_k="auto")
    check({**case, "x": case["x"][:3]}, split_k="auto")  # GEMV rows: "auto" means no split
    with pytest.raises(ValueError, match="planes/scaled GEMMs only .*gemm='dequant'"):
        dq.dq_linear_triton(**case, gemm="dequant", split_k=2)
    with pytest.raises(ValueError, match="planes/scaled GEMMs only .*gemv='units_hi'"):
        dq.dq_linear_triton(**{**case, "x": case["x"][:2]}, split_k=2)
    for bad, message in ((0, "between 1 and 64"), (65, "between 1 and 64"), ("many", "integer or 'auto'"),
                         (2.0, "integer or 'auto'")):
        with pytest.raises(ValueError, match=message):
            dq.dq_linear_triton(**case, split_k=bad)
    assert "SPLIT_K" not in dq.kernel_specs(4, 128, "fp16", True, m=1, gemv="units")["constexprs"]
    with pytest.raises(ValueError, match="split_k applies"):
        dq.kernel_specs(4, 128, "fp16", False, m=16, convention="tensorrt", split_k=2)


@pytest.mark.parametrize("tiles,k_steps,per_sm,sms,expected", [
    (128, 64, 4, 132, 4),    # 8192² at 64-column tiles, 4 programs per SM: 512 of 528 slots
    (128, 64, 6, 132, 6),    # ranges of 11 steps (the last 9)
    (256, 16, 2, 132, 1),    # the tiles already fill every slot
    (224, 32, 4, 132, 2),
    (16, 8, 8, 132, 2),      # at least 4 K steps per range
    (1, 13, 16, 132, 3),     # 5 + 5 + 3 steps
    (100, 16, 8, 132, 4),    # slots for 10, but 4 steps per range at most allow 4
    (10, 40, 8, 132, 10),    # 4 steps each
    (60, 64, 1, 132, 2),
])
def test_occupancy_split(tiles: int, k_steps: int, per_sm: int, sms: int, expected: int) -> None:
    split = dq.occupancy_split(tiles, k_steps, per_sm, sms)
    assert split == expected
    assert tiles * split <= max(per_sm * sms, tiles)
    steps = -(-k_steps // split)
    assert split == 1 or (steps >= 4 and (split - 1) * steps < k_steps)  # no empty range
    assert -(-k_steps // (split - 1)) > steps if split > 1 else True  # one range fewer would be slower
