"""Weight-only quantization of one linear layer: round-to-nearest, GPTQ and decoupleQ.

A linear layer's weight W0 is [N, K] (N output channels, K input features). Calibration
inputs x give H = mean(x xᵀ) (float64, damped), and every method targets the layer's
output error

    L(Ŵ) = trace((W0 − Ŵ) H (W0 − Ŵ)ᵀ) = Σ_rows (w0 − ŵ) H (w0 − ŵ)ᵀ.

Quantized form: Ŵ = s ⊙ W_int + z with signed integers W_int in [−2^(b−1), 2^(b−1)−1]
and a float scale s and float zero z (an additive offset, not an integer zero point) per
output channel and group of `group` consecutive input columns, so s, z are [N, G] with
G = K / group (group = -1 means one group spanning all K, i.e. per channel).
With zero="int" every method keeps z an integer multiple of s, z = c·s with c in
[2^(sb−1) − (2^sb − 1), 2^(sb−1)] (sb the storage bits), i.e. a classic integer zero point
zp = 2^(sb−1) − c on the stored unsigned codes: the form ONNX Runtime's MatMulNBits runs on
its fast int8 path, at some cost in accuracy (decoupleQ's float zero is a free parameter).

Methods
  rtn        min/max grid, round to nearest.
  gptq       GPTQ column sweep: quantize one column at a time and push its H-weighted
             error onto the columns not yet quantized (lazy block updates).
  decoupleq  decoupleQ: alternate an exact least-squares solve of (s, z) with W_int fixed
             and an integer solve (GPTQ sweep or projected gradient + rounding) with
             (s, z) fixed, keeping per channel only the steps that lower the loss. A step
             solves only the channels whose input to it changed since it last ran for them
             (the others would get the same result again).

Device: the solvers run where H is (a GPU if H is there; rtn without H where the weight is), in float64
(the shrink search ranks its candidates in float32; the rare min-norm fallback solve runs on the CPU, gelsd
being CPU-only). Results (QuantResult) always come back on the CPU.

Packed layout (`pack` / `unpack`)
  Values are stored unsigned: u = v + 2^(b−1). Each byte holds 8 // b values, the first
  value in the lowest bits ("little end first"):
    b = 2: 4 values per byte, value j of the byte in bits 2j..2j+1;
    b = 4: 2 values per byte, low nibble first;
    b = 8: 1 value per byte;
    b = 3: stored exactly like b = 4 (offset 8, two nibbles per byte), so 3-bit weights
           can be consumed by a 4-bit kernel unchanged.
  Rows are packed independently; a row of K values takes ceil(K * storage_bits / 8) bytes
  (storage_bits = 4 for b = 3), and the unused high bits of a row's last byte are zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
_PGD_STEPS = 300  # accelerated projected-gradient steps of decoupleQ's "pgd" integer step
_SOLVE_CHUNK_ELEMS = 1 << 24  # bound on the elements of one batch of normal matrices
_NORMAL_ROWS = 256  # rows per batch of the normal matrices' products on a CPU (see `_normal_equations`)
_DTYPE = torch.float64  # all fitting is done in float64; results are stored as float32


# ---------------------------------------------------------------------------------------
# Calibration statistics
# ---------------------------------------------------------------------------------------

class HessianAccumulator:
    """Accumulates Σ x xᵀ (float64) over calibration rows of one linear layer's input, on `device`."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        if in_features <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}")
        self.in_features = in_features
        self.count = 0
        self._sum = torch.zeros(in_features, in_features, dtype=_DTYPE, device=device)

    def add(self, x: torch.Tensor) -> None:
        """Add calibration inputs of shape [..., K] (any leading dims)."""
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"expected inputs [..., {self.in_features}], got {tuple(x.shape)}")
        rows = x.detach().reshape(-1, self.in_features).to(device=self._sum.device, dtype=_DTYPE)
        if not torch.isfinite(rows).all():
            raise ValueError("calibration inputs contain NaN or inf")
        self._sum += rows.T @ rows
        self.count += rows.shape[0]

    def hessian(self, damp: float = 0.01) -> torch.Tensor:
        """Mean x xᵀ [K, K] float64, plus `damp` × mean diagonal on the diagonal."""
        if self.count == 0:
            raise ValueError("no calibration inputs were added")
        H = self._sum / self.count
        return _add_damping(H, damp)


def _add_damping(H: torch.Tensor, damp: float) -> torch.Tensor:
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    damped = H.clone()
    damped.diagonal().add_(damp * H.diagonal().mean())
    return damped


# ---------------------------------------------------------------------------------------
# Result and shared helpers
# ---------------------------------------------------------------------------------------

@dataclass
class QuantResult:
    """Quantized weight: Ŵ = scale ⊙ w_int + zero, with scale/zero repeated over each group."""

    w_int: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # float32 [N, G]
    zero: torch.Tensor  # float32 [N, G]
    bits: int
    group: int  # columns per group; == K for per-channel
    loss: float | None  # trace((W0 − Ŵ) H (W0 − Ŵ)ᵀ) for the W0, H it was fitted with

    def dequantize(self) -> torch.Tensor:
        """The quantized weight as float32 [N, K]."""
        return _dequantize(self.w_int.float(), self.scale, self.zero, self.group)


def layer_loss(w0: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """trace((w0 − w_hat) H (w0 − w_hat)ᵀ), computed in float64."""
    return float(_row_losses(w0.to(_DTYPE), w_hat.to(_DTYPE), H.to(_DTYPE)).sum())


def _row_losses(w0: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per output channel (w0 − ŵ) H (w0 − ŵ)ᵀ, shape [N]; the objective is their sum."""
    return _error_losses(w0 - w_hat, H)


def _error_losses(err: torch.Tensor, H: torch.Tensor, blocks: int = 8) -> torch.Tensor:
    """Per row e H eᵀ of an error matrix [N, K], for a symmetric H.

    By blocks of columns, from H's upper block triangle only (off-diagonal blocks counted twice): (B + 1) / 2B of
    the multiply-adds of `(err @ H) * err`, 56 % at B = 8. The losses are what every solver step is judged by.
    """
    K = err.shape[1]
    width = -(-K // blocks)
    losses = err.new_zeros(err.shape[0])
    for start in range(0, K, width):
        stop = min(start + width, K)
        head = err[:, start:stop]
        product = head @ H[start:stop, start:]  # [N, K - start]
        losses += (product[:, :stop - start] * head).sum(dim=1)
        if stop < K:
            losses += 2 * (product[:, stop - start:] * err[:, stop:]).sum(dim=1)
    return losses


def _int_range(bits: int) -> tuple[int, int]:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def zero_multiple_range(bits: int) -> tuple[int, int]:
    """Range of c in z = c·s that an unsigned integer zero point on the stored codes can express."""
    half = 1 << (_storage_bits(bits) - 1)
    return half - (2 * half - 1), half


def _check_zero_mode(zero: str) -> bool:
    if zero not in ("float", "int"):
        raise ValueError(f"zero must be 'float' or 'int', got {zero!r}")
    return zero == "int"


def _zero_multiple(scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer c, within the zero-point range, for which c·scale is nearest to `zero`."""
    safe_scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.round(zero / safe_scale), *zero_multiple_range(bits))


def _resolve_group(group: int, K: int) -> int:
    """Columns per group; -1 (or K) means per channel."""
    if group == -1:
        return K
    if group <= 0:
        raise ValueError(f"group must be -1 (per channel) or a positive size, got {group}")
    if K % group != 0:
        raise ValueError(f"in_features K={K} is not divisible by group size g={group}")
    return group


def _check_weight(w0: torch.Tensor) -> torch.Tensor:
    """The weight as float64, where it is."""
    if w0.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(w0.shape)}")
    w = w0.detach().to(dtype=_DTYPE)
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or inf")
    return w


def _check_hessian(H: torch.Tensor, K: int) -> torch.Tensor:
    if H.shape != (K, K):
        raise ValueError(f"H must be [{K}, {K}] to match the weight, got {tuple(H.shape)}")
    H = H.detach().to(dtype=_DTYPE)
    if not torch.isfinite(H).all():
        raise ValueError("H contains NaN or inf")
    return H


def _per_column(t: torch.Tensor, group: int) -> torch.Tensor:
    """[N, G] per-group values repeated to [N, K]."""
    return t.repeat_interleave(group, dim=1)


def _dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    n, G = scale.shape
    # broadcast over a [N, G, group] view: no [N, K] copies of scale and zero
    return (q.reshape(n, G, group) * scale[..., None] + zero[..., None]).reshape(n, G * group)


def _round_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Nearest integer code of w on the grid s·q + z (shapes broadcast)."""
    # s == 0 makes every code decode to z, so any finite code is right; avoid 0/0.
    return _round_on(w, torch.where(scale == 0, torch.ones_like(scale), scale), zero, qmin, qmax)


def _round_on(w: torch.Tensor, safe_scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """`_round_to_grid` with the scale's zeros already replaced (one temporary, rounded in place)."""
    codes = w - zero
    return codes.div_(safe_scale).round_().clamp_(qmin, qmax)


def _grid_from_range(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, int_zero: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, z) mapping qmin to lo and qmax to hi; a constant group gets s = 1 so z alone decodes it.
    With int_zero, z is then rounded to a multiple of s (the classic asymmetric integer zero point). Such a grid
    always contains 0, so the range is first widened to include it: a group on one side of zero would otherwise
    have its zero clamped and its grid shifted off its values."""
    if int_zero:
        lo, hi = torch.clamp(lo, max=0), torch.clamp(hi, min=0)
    scale = (hi - lo) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = lo - scale * qmin
    if int_zero:
        zero = scale * _zero_multiple(scale, zero, (qmax - qmin + 1).bit_length() - 1)
    return scale, zero


def _minmax_grid(w: torch.Tensor, group: int, qmin: int, qmax: int, int_zero: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max (s, z) per row and group of `w` [N, K']; returns [N, K'/group]."""
    groups = w.reshape(w.shape[0], -1, group)
    return _grid_from_range(groups.amin(dim=2), groups.amax(dim=2), qmin, qmax, int_zero)


def _result(w0: torch.Tensor, H: torch.Tensor | None, q: torch.Tensor, scale: torch.Tensor,
            zero: torch.Tensor, bits: int, group: int) -> QuantResult:
    """Package float64 working tensors (on the CPU, wherever they were solved); the loss is that of the stored
    float32 grid."""
    result = QuantResult(w_int=q.to(torch.int8), scale=scale.float(), zero=zero.float(),
                         bits=bits, group=group, loss=None)
    if H is not None:
        result.loss = layer_loss(w0, result.dequantize(), H)
    result.w_int, result.scale, result.zero = result.w_int.cpu(), result.scale.cpu(), result.zero.cpu()
    return result


# ---------------------------------------------------------------------------------------
# Round to nearest
# ---------------------------------------------------------------------------------------

def rtn(w0: torch.Tensor, bits: int, group: int = -1, H: torch.Tensor | None = None,
        zero: str = "float") -> QuantResult:
    """Min/max round-to-nearest per channel (group=-1) or per group of `group` columns.

    The grid maps each group's min to the lowest code and its max to the highest (with
    zero="int", up to rounding the zero to a multiple of the scale). With H given, the
    result's `loss` is the H-weighted output error; otherwise it is None.
    """
    int_zero = _check_zero_mode(zero)
    w = _check_weight(w0)
    K = w.shape[1]
    group = _resolve_group(group, K)
    qmin, qmax = _int_range(bits)
    if H is not None:
        H = _check_hessian(H, K)
        w = w.to(H.device)
    scale, z = _minmax_grid(w, group, qmin, qmax, int_zero)
    q = _round_to_grid(w, _per_column(scale, group), _per_column(z, group), qmin, qmax)
    return _result(w, H, q, scale, z, bits, group)


# ---------------------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------------------

def _inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Upper Cholesky factor U of (H + damping)⁻¹, the matrix the GPTQ sweep propagates with, and the diagonal
    `shift` [K] with (UᵀU)⁻¹ = H + diag(shift) (None if H had to change off its diagonal; see `_sweep_losses`).

    Features that never fired (zero diagonal) get H_ii = 1 so H stays invertible; their
    weights cannot change the output, so their error is never propagated. If H is still
    not positive definite, the damping grows tenfold until it is.
    """
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    original = H
    H = H.clone()
    dead = H.diagonal() == 0
    only_diagonal = not bool(original[dead].any())  # a dead feature's row (and column) was already zero
    H[dead, :] = 0
    H[:, dead] = 0
    H.diagonal()[dead] = 1
    mean_diag = H.diagonal().mean()
    extra = damp
    for _ in range(8):
        # With P the order reversal and P (H + d) P = L Lᵀ, H + d = R Rᵀ for the upper triangular R = P L P, so
        # (H + d)⁻¹ = R⁻ᵀ R⁻¹ and U = R⁻¹ is the upper Cholesky factor of the inverse: one factorization and one
        # triangular inverse (K³/3 each) instead of factorizing, inverting and factorizing the inverse (4K³/3).
        flipped = H.flip(0, 1)  # a copy
        flipped.diagonal().add_(extra * mean_diag)
        lower, info = torch.linalg.cholesky_ex(flipped)
        if info == 0:
            upper = _upper_inverse(lower.flip(0, 1))
            if torch.isfinite(upper).all():
                shift = dead.to(H.dtype) + extra * mean_diag if only_diagonal else None
                return upper, shift
        extra = max(10 * extra, 1e-6)
    raise ValueError("H is not positive definite even after heavy damping")


def _upper_inverse(R: torch.Tensor) -> torch.Tensor:
    """R⁻¹ of an upper triangular R (which may be overwritten). On the CPU by LAPACK's trtri (K³/3; torch has no
    binding, and a triangular solve against the identity costs K³) on Rᵀ, whose Fortran order is R's C order:
    its inverse (R⁻¹)ᵀ comes back in Fortran order, i.e. R⁻¹ in C order, as the GPTQ sweep reads it. Elsewhere
    by torch's triangular solve."""
    if R.device.type != "cpu" or R.dtype != torch.float64:
        return torch.linalg.solve_triangular(R, torch.eye(R.shape[0], dtype=R.dtype, device=R.device), upper=True)
    from scipy.linalg import lapack
    from threadpoolctl import threadpool_limits

    with threadpool_limits(torch.get_num_threads(), user_api="blas"):  # SciPy's own BLAS: torch's thread count
        inverse_t, info = lapack.dtrtri(R.contiguous().numpy().T, lower=1, overwrite_c=1)
    if info != 0:
        return torch.full_like(R, math.nan)
    return torch.from_numpy(inverse_t.T)


def _gptq_sweep(w: torch.Tensor, U: torch.Tensor, bits: int, group: int, block: int,
                scale: torch.Tensor | None = None, zero: torch.Tensor | None = None, int_zero: bool = False,
                order: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One GPTQ pass over the columns of w [N, K] (float64), returning (codes, scale, zero, err_sq).

    With `order` (fixed grids only) the columns are swept in that order and U must come from H with its rows and
    columns in that order; codes come back in the stored order.

    err_sq [N] is each row's Σ of squared scaled errors; with U from `_inverse_cholesky` it is the row's loss on
    H + diag(shift), because w − ŵ = err U and U (H + diag(shift)) Uᵀ = I (see `_sweep_losses`).

    With scale/zero given ([N, G]) the grid is fixed; otherwise each group's grid is set from
    the min/max of its current, error-compensated weights when the sweep reaches its first
    column. Errors are accumulated per block of `block` columns and applied to the columns
    after the block in one matmul (lazy batch update).
    """
    qmin, qmax = _int_range(bits)
    N, K = w.shape
    # Work transposed, [K, N]: the sweep touches one column of every row at a time (a strided column of the [N, K]
    # layout), and the lazy update then rewrites contiguous rows (on the [N, K] layout it streamed strided column
    # slices, most of the sweep's time at large K).
    if order is None:
        W_t = w.T.clone(memory_format=torch.contiguous_format)  # a copy even where w.T is contiguous (N or K = 1)
        col_group = [col // group for col in range(K)]
    else:
        if scale is None:
            raise ValueError("a sweep in another column order needs a fixed grid")
        W_t = w.T.contiguous()[order]  # row i = column order[i] (a gather of whole rows: 1.5x faster than of w.T's)
        col_group = (order // group).tolist()
    if scale is not None:
        scale_t, zero_t = scale.T.contiguous(), zero.T.contiguous()
        safe_t = torch.where(scale_t == 0, torch.ones_like(scale_t), scale_t)  # see _round_to_grid
    else:  # min/max grids never have a zero scale
        scale_t, zero_t = W_t.new_zeros(K // group, N), W_t.new_zeros(K // group, N)
        safe_t = scale_t
    codes_t = W_t.new_zeros(K, N)
    err_sq = W_t.new_zeros(N)
    for start in range(0, K, block):
        stop = min(start + block, K)
        block_t = W_t[start:stop]  # [b, N], a view: row i is swept column start + i
        err_t = torch.empty_like(block_t)
        U_block = U[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            g = col_group[col]
            if scale is None and col % group == 0:
                end = col + group
                current = block_t[i:min(end, stop) - start]
                if end > stop:  # the group runs past this block: include its pending updates
                    pending = W_t[stop:end] - U[start:col, stop:end].T @ err_t[:i]
                    current = torch.cat([current, pending], dim=0)
                s_g, z_g = _minmax_grid(current.T, group, qmin, qmax, int_zero)
                scale_t[g], zero_t[g] = s_g[:, 0], z_g[:, 0]
            q = _round_on(block_t[i], safe_t[g], zero_t[g], qmin, qmax)
            codes_t[col] = q
            err = (block_t[i] - (q * scale_t[g] + zero_t[g])) / U_block[i, i]
            err_t[i] = err
            if i + 1 < stop - start:
                block_t[i + 1:].addr_(U_block[i, i + 1:], err, alpha=-1)
        err_sq += (err_t * err_t).sum(dim=0)
        if stop < K:
            W_t[stop:].addmm_(U[start:stop, stop:].T, err_t, alpha=-1)
    if order is not None:
        codes_t = codes_t.index_copy(0, order, codes_t)  # swept row i is column order[i]
    return codes_t.T.contiguous(), scale_t.T.contiguous(), zero_t.T.contiguous(), err_sq


def gptq(w0: torch.Tensor, H: torch.Tensor, bits: int, group: int = -1,
         damp: float = 0.01, block: int = 128, zero: str = "float", act_order: bool = False) -> QuantResult:
    """GPTQ: sequential column quantization with H-weighted error compensation.

    `damp` (× mean diagonal) is added to H only to invert it for the sweep; the reported
    loss uses H as given. act_order sweeps the columns by descending H_ii with "static groups": every group's
    min/max grid is set from the original weights first (a group's columns are no longer swept together, so its
    grid cannot wait for their compensated values).
    """
    int_zero = _check_zero_mode(zero)
    w = _check_weight(w0)
    K = w.shape[1]
    group = _resolve_group(group, K)
    _int_range(bits)
    H = _check_hessian(H, K)
    w = w.to(H.device)  # solved where H is
    if block <= 0:
        raise ValueError(f"block must be positive, got {block}")
    order = _column_order(H, act_order)
    if order is not None:
        scale, z = _minmax_grid(w, group, *_int_range(bits), int_zero)
        U, _ = _sweep_factor(H, damp, order)
        q, _, _, _ = _gptq_sweep(w, U, bits, group, block, scale=scale, zero=z, order=order)
        return _result(w, H, q, scale, z, bits, group)
    U, _ = _inverse_cholesky(H, damp)
    q, scale, z, _ = _gptq_sweep(w, U, bits, group, block, int_zero=int_zero)
    return _result(w, H, q, scale, z, bits, group)


# ---------------------------------------------------------------------------------------
# decoupleQ
# ---------------------------------------------------------------------------------------

def _shrunk_grid(w: torch.Tensor, H: torch.Tensor, group: int, qmin: int, qmax: int,
                 shrink_grid: int, max_shrink: float, int_zero: bool, rerank: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max grid with each channel's range shrunk by the factor that minimizes its loss.

    Shrinking keeps each group's center and scales its half-range (clipping both tails
    alike). All groups of a channel share one factor, judged on the channel's H-weighted
    round-to-nearest loss e H eᵀ. The losses only rank the factors, so the candidates are rounded and judged in
    float32, in place on [N, G, group] views (in float64 with [N, K] copies the elementwise work took longer than
    the matmuls).

    rerank = r > 0 (and < shrink_grid): each channel's factors are first ranked by the diagonal part of the loss,
    Σ_i H_ii e_i² (O(NK) per factor), and only its r best are judged on the full loss, r products with H instead of
    `shrink_grid` (per-channel factors: the r-th best of every channel in one product). The full loss's best
    factor is among the diagonal's best 3 for ~90-95 % of channels, and a miss costs ~1e-3 of the init's loss on
    average, which the alternation then refines (see `decoupleq`).
    """
    N, K = w.shape
    H32 = H.float()
    groups = w.reshape(N, -1, group)
    groups32 = groups.float()
    lo, hi = groups.amin(dim=2), groups.amax(dim=2)
    center, half_range = (hi + lo) / 2, (hi - lo) / 2

    def grid(factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # factor [N, 1] or a scalar tensor
        return _grid_from_range(center - factor * half_range, center + factor * half_range, qmin, qmax, int_zero)

    def errors(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:  # w − RTN(w) on the grid, float32 [N, K]
        s32, z32 = scale.float()[..., None], zero.float()[..., None]
        err = torch.sub(groups32, z32).div_(s32).round_().clamp_(qmin, qmax).mul_(s32).add_(z32)
        return torch.sub(groups32, err, out=err).view(N, K)

    factors = torch.linspace(1.0, max_shrink, shrink_grid, dtype=w.dtype, device=w.device)
    if 0 < rerank < shrink_grid:
        diagonal = H32.diagonal()
        proxy = torch.stack([errors(*grid(f)).square_() @ diagonal for f in factors], dim=1)  # [N, shrink_grid]
        candidates = factors[proxy.topk(rerank, dim=1, largest=False).indices]  # [N, rerank], best first
    else:
        candidates = factors.expand(N, shrink_grid)
    best_loss = torch.full((N,), math.inf, dtype=w.dtype, device=w.device)
    best_scale, best_zero = grid(torch.ones((), dtype=w.dtype, device=w.device))  # scale > 0 always
    for c in range(candidates.shape[1]):
        scale, zero = grid(candidates[:, c:c + 1])
        loss = _error_losses(errors(scale, zero), H32).to(w.dtype)
        better = loss < best_loss
        best_loss = torch.where(better, loss, best_loss)
        best_scale = torch.where(better[:, None], scale, best_scale)
        best_zero = torch.where(better[:, None], zero, best_zero)
    return best_scale, best_zero


def _normal_equations(w0H: torch.Tensor, q: torch.Tensor, H: torch.Tensor, group: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row normal equations M θ = r of min_θ (w0 − θB) H (w0 − θB)ᵀ, given w0H = w0 @ H.

    θ = (s_1..s_G, z_1..z_G); row g of B is the integer row masked to group g, row G+g is
    the indicator of group g. Returns M [n, 2G, 2G] and r [n, 2G].
    """
    n, K = q.shape
    G = K // group
    q_groups = q.view(n, G, group)
    w0H = w0H.reshape(n, G, group)
    rhs = torch.cat([(q_groups * w0H).sum(-1), w0H.sum(-1)], dim=1)
    H_rows = H.view(G, group, K)
    # entry (s_g, z_h) = Σ_{i∈g} a_i Σ_{j∈h} H_ij: one batched product with H's group column sums
    scale_zero = torch.bmm(q_groups.transpose(0, 1), H.view(K, G, group).sum(-1).view(G, group, G)).transpose(0, 1)
    # entry (s_g, s_h) = Σ_{i∈g, j∈h} a_i H_ij a_j, symmetric: the upper triangle h ≥ g, then mirrored.
    # Rows go in batches (256 measured best on a 2-core EPYC: larger is little faster and needs more memory).
    scale_scale = q.new_empty(n, G, G)
    batch = _NORMAL_ROWS if q.device.type == "cpu" else n  # on a GPU, fewer and larger launches
    for start in range(0, n, batch):
        rows = slice(start, min(start + batch, n))
        a, a_flat = q_groups[rows], q[rows]
        for g in range(G):
            aH = a[:, g, :] @ H_rows[g, :, g * group:]
            # in place, then per-group sums: ~20 % faster than einsum's batched dot products here
            scale_scale[rows, g, g:] = aH.mul_(a_flat[:, g * group:]).view(-1, G - g, group).sum(-1)
    upper = torch.ones(G, G, dtype=torch.bool, device=q.device).triu()
    scale_scale = torch.where(upper, scale_scale, scale_scale.transpose(1, 2))
    zero_zero = H.view(G, group, G, group).sum(dim=(1, 3)).expand(n, G, G)
    M = torch.cat([torch.cat([scale_scale, scale_zero], dim=2),
                   torch.cat([scale_zero.transpose(1, 2), zero_zero], dim=2)], dim=1)
    return M, rhs


def _solve_rows(M: torch.Tensor, rhs: torch.Tensor, degenerate: torch.Tensor) -> torch.Tensor:
    """Batched solve of M θ = rhs; singular or degenerate rows fall back to min-norm lstsq.

    Cholesky, not LU: the normal matrices are symmetric positive definite unless degenerate, and torch's batched
    CPU LU can hang in MKL (DLASWP errors) once the thread count has been set, pytorch#142815.
    """
    chol, info = torch.linalg.cholesky_ex(M)
    theta = torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)
    bad = (info != 0) | ~torch.isfinite(theta).all(dim=1) | degenerate
    if bad.any():
        # gelsd truncates tiny singular values, so a group whose codes are all equal
        # (s and z not separable) gets the minimum-norm (s, z) instead of ±huge values.
        # (gelsd is CPU-only in torch; these rows are rare, so they are solved there.)
        fallback = torch.linalg.lstsq(M[bad].cpu(), rhs[bad].unsqueeze(-1).cpu(), rcond=1e-12, driver="gelsd")
        theta[bad] = fallback.solution.squeeze(-1).to(theta.device)
    return theta


def _quadratic_losses(w0Hw0: torch.Tensor, theta: torch.Tensor, M: torch.Tensor, rhs: torch.Tensor
                      ) -> torch.Tensor:
    """Per-row loss w0Hw0 − 2 θ·r + θᵀMθ of the normal equations' quadratic: (w0 − θB) H (w0 − θB)ᵀ
    in O(G²) per row instead of a [K, K] product. Float64 keeps the cancellation harmless: even at
    8 bits the loss is ~1e-5 of w0Hw0, far above its ~1e-16 rounding."""
    return w0Hw0 - 2 * (theta * rhs).sum(1) + (torch.einsum("ri,rij->rj", theta, M) * theta).sum(1)


def _fit_scale_zero(w0H: torch.Tensor, w0Hw0: torch.Tensor, q: torch.Tensor, H: torch.Tensor, group: int,
                    int_zero_bits: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float step: exact least-squares (s, z) [N, G] for fixed integer codes q [N, K], and the per-row loss [N]
    they reach, given w0H = w0 @ H and w0Hw0 = per-row w0 H w0ᵀ (the same for every float step of a layer, so
    computed once).

    int_zero_bits > 0: z must be c·s with integer c (see `zero_multiple_range`). c is the rounded
    unconstrained z/s, and s is then the exact least-squares scale of the codes q + c.
    """
    N, K = q.shape
    G = K // group
    rows_per_chunk = max(1, _SOLVE_CHUNK_ELEMS // (4 * G * G))
    scale, zero, loss = q.new_empty(N, G), q.new_empty(N, G), q.new_empty(N)
    for start in range(0, N, rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, N))
        M, rhs = _normal_equations(w0H[rows], q[rows], H, group)
        q_groups = q[rows].view(-1, G, group)
        degenerate = (q_groups.amax(dim=2) == q_groups.amin(dim=2)).any(dim=1)
        theta = _solve_rows(M, rhs, degenerate)
        scale[rows], zero[rows] = theta[:, :G], theta[:, G:]
        if not int_zero_bits:
            loss[rows] = _quadratic_losses(w0Hw0[rows], theta, M, rhs)
        else:
            c = _zero_multiple(scale[rows], zero[rows], int_zero_bits)
            shifted = q[rows] + _per_column(c, group)  # Ŵ = s ⊙ (q + c): linear in s alone
            M, rhs = _normal_equations(w0H[rows], shifted, H, group)
            all_zero = (shifted.view(-1, G, group) == 0).all(dim=2).any(dim=1)
            s = _solve_rows(M[:, :G, :G], rhs[:, :G], all_zero)
            scale[rows], zero[rows] = s, s * c
            loss[rows] = _quadratic_losses(w0Hw0[rows], s, M[:, :G, :G], rhs[:, :G])
    return scale, zero, loss


def _box_projected_solve(w0: torch.Tensor, H: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                         steps: int) -> torch.Tensor:
    """min over lower ≤ w ≤ upper of Σ_rows (w − w0) H (w − w0)ᵀ by accelerated projected gradient.

    Step 1/L with L = 2 λ_max(H), the gradient's Lipschitz constant, so it converges without
    tuning and uses no randomness.
    """
    lipschitz = 2 * torch.linalg.eigvalsh(H)[-1].clamp_min(1e-30)
    w = torch.clamp(w0, lower, upper)
    momentum_point, t = w, 1.0
    for _ in range(steps):
        grad = 2 * (momentum_point - w0) @ H
        w_next = torch.clamp(momentum_point - grad / lipschitz, lower, upper)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        momentum_point = w_next + ((t - 1) / t_next) * (w_next - w)
        w, t = w_next, t_next
    return w


def _sweep_losses(w0: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                  H: torch.Tensor, err_sq: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """Per-row loss (w0 − ŵ) H (w0 − ŵ)ᵀ of a GPTQ sweep on w0 itself: its err_sq minus the shift's share,
    Σ_i shift_i e_i², in O(NK) instead of a [K, K] product (falls back to that product when shift is None)."""
    e = w0 - _dequantize(q, scale, zero, group)
    if shift is None:
        return _error_losses(e, H)
    return err_sq - (e * e) @ shift


def _column_order(H: torch.Tensor, act_order: bool) -> torch.Tensor | None:
    """The order of a fixed-grid sweep's columns: descending H_ii with act_order (the features with the most
    output energy are rounded first, while the most columns are left to absorb their error), else None (as
    stored)."""
    if not act_order:
        return None
    return torch.argsort(H.diagonal(), descending=True, stable=True)


def _sweep_factor(H: torch.Tensor, damp: float, order: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`_inverse_cholesky` of H with its rows and columns in `order` (the sweep's), and the diagonal shift mapped
    back to the stored order, where `_sweep_losses` uses it."""
    if order is None:
        return _inverse_cholesky(H, damp)
    U, shift_perm = _inverse_cholesky(H[order[:, None], order], damp)
    if shift_perm is None:
        return U, None
    shift = torch.empty_like(shift_perm)
    shift[order] = shift_perm
    return U, shift


def _integer_step(w0: torch.Tensor, H: torch.Tensor, U: torch.Tensor, shift: torch.Tensor | None,
                  scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int, integer: str,
                  order: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes for a fixed grid and their per-row loss: a GPTQ sweep on w0, or on the box-relaxed optimum,
    over the columns in `order` (see `_gptq_sweep`)."""
    target = w0
    if integer == "pgd":
        qmin, qmax = _int_range(bits)
        low_end = _per_column(scale * qmin + zero, group)
        high_end = _per_column(scale * qmax + zero, group)
        # the least-squares scale may be negative, which flips the box's ends
        lower, upper = torch.minimum(low_end, high_end), torch.maximum(low_end, high_end)
        target = _box_projected_solve(w0, H, lower, upper, _PGD_STEPS)
    q, _, _, err_sq = _gptq_sweep(target, U, bits, group, 128, scale=scale, zero=zero, order=order)
    if integer == "pgd":  # swept on the relaxed target, not w0: err_sq is not w0's loss
        return q, _row_losses(w0, _dequantize(q, scale, zero, group), H)
    return q, _sweep_losses(w0, q, scale, zero, group, H, err_sq, shift)


def decoupleq(w0: torch.Tensor, H: torch.Tensor, bits: int, group: int = -1, iters: int = 4,
              integer: str = "gptq", damp: float = 0.01, shrink_grid: int = 20,
              max_shrink: float = 0.8, seed: int = 0, zero: str = "float", shrink_rerank: int = 3,
              act_order: bool = True) -> QuantResult:
    """decoupleQ: alternate exact (s, z) least squares and integer solves.

    init: min/max grid shrunk per channel (see `_shrunk_grid`: `shrink_grid` factors from 1 down to
    `max_shrink`, pre-ranked on H's diagonal, the `shrink_rerank` best judged on the full H; 0 judges all on the
    full H, ~45 % of a solve at K = 5504), codes from a GPTQ sweep with that grid fixed. Then `iters` rounds of
    (float step, integer step) and a final float step, so the returned (s, z) are least-squares optimal for the
    returned codes.
    Each step is kept per channel only where that channel's loss fell.

    integer: "gptq" (GPTQ sweep on w0 with the grid fixed) or "pgd" (accelerated projected
    gradient on the relaxed weights in the grid's box, then a fixed-grid GPTQ sweep to round).
    `damp` only regularizes the inverse of H for the sweeps; the objective uses H as given.
    zero="int" keeps every zero an integer multiple of its scale (see the module docstring).
    act_order (default): every sweep (init and integer steps) rounds the columns by descending H_ii (the grid
    is fixed in each, so groups need no change); False sweeps them in stored order.
    `seed` is accepted for API stability: no step draws random numbers, so the result is
    deterministic for any seed.
    """
    del seed  # nothing random; see docstring
    int_zero = _check_zero_mode(zero)
    if integer not in ("gptq", "pgd"):
        raise ValueError(f"integer must be 'gptq' or 'pgd', got {integer!r}")
    if iters < 0 or shrink_grid < 1 or not 0 < max_shrink <= 1 or shrink_rerank < 0:
        raise ValueError("need iters >= 0, shrink_grid >= 1, 0 < max_shrink <= 1 and shrink_rerank >= 0")
    w = _check_weight(w0)
    K = w.shape[1]
    group = _resolve_group(group, K)
    qmin, qmax = _int_range(bits)
    H = _check_hessian(H, K)
    w = w.to(H.device)  # solved where H is
    order = _column_order(H, act_order)
    U, shift = _sweep_factor(H, damp, order)

    scale, zero = _shrunk_grid(w, H, group, qmin, qmax, shrink_grid, max_shrink, int_zero, shrink_rerank)
    q, _, _, err_sq = _gptq_sweep(w, U, bits, group, 128, scale=scale, zero=zero, order=order)
    loss = _sweep_losses(w, q, scale, zero, group, H, err_sq, shift)
    wH = w @ H
    wHw = (wH * w).sum(1)

    # A step's output for a row depends only on that row's input to it (codes for the float step, the grid for
    # the integer step), so a row whose input has not changed since the step last ran for it would get the same
    # result and loss again, which cannot beat its current loss: only rows with a new input are solved. (The
    # same in exact arithmetic; BLAS may round a subset's products differently, ~1e-14, which only matters at a
    # tie.) After a few rounds most rows have stopped improving (on a 1024 x 2048 layer at w2g64: 61, 25, 9, 2 %
    # of the rows in rounds 2-5). The init's sweep is the gptq integer step on the shrunk grid; pgd's is not.
    codes_new = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)  # codes changed since their float step
    grid_new = torch.full_like(codes_new, integer == "pgd")  # grid changed since its integer step

    def float_step() -> None:
        rows = codes_new.nonzero().squeeze(1)
        codes_new.fill_(False)
        if not len(rows):
            return
        new_scale, new_zero, new_loss = _fit_scale_zero(wH[rows], wHw[rows], q[rows], H, group,
                                                        bits if int_zero else 0)
        kept = new_loss < loss[rows]
        improved = rows[kept]
        scale[improved], zero[improved], loss[improved] = new_scale[kept], new_zero[kept], new_loss[kept]
        grid_new[improved] = True

    def integer_step() -> None:
        rows = grid_new.nonzero().squeeze(1)
        grid_new.fill_(False)
        if not len(rows):
            return
        new_q, new_loss = _integer_step(w[rows], H, U, shift, scale[rows], zero[rows], bits, group, integer, order)
        kept = new_loss < loss[rows]
        improved = rows[kept]
        codes_new[improved] = (new_q[kept] != q[improved]).any(dim=1)  # same codes: same float step
        q[improved], loss[improved] = new_q[kept], new_loss[kept]

    for _ in range(iters):
        float_step()
        integer_step()
    float_step()
    return _result(w, H, q, scale, zero, bits, group)


# ---------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------

def _storage_bits(bits: int) -> int:
    _int_range(bits)
    return 4 if bits == 3 else bits  # 3-bit codes use the 4-bit layout


def pack(w_int: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed codes [N, K] into uint8 [N, ceil(K·storage_bits/8)] (layout: module docstring)."""
    qmin, qmax = _int_range(bits)
    if w_int.dim() != 2:
        raise ValueError(f"w_int must be 2-D [N, K], got shape {tuple(w_int.shape)}")
    if w_int.is_floating_point():
        raise ValueError("w_int must be an integer tensor")
    if w_int.numel() and (int(w_int.min()) < qmin or int(w_int.max()) > qmax):
        raise ValueError(f"w_int values must lie in [{qmin}, {qmax}] for {bits} bits")
    storage = _storage_bits(bits)
    per_byte = 8 // storage
    N, K = w_int.shape
    n_bytes = math.ceil(K / per_byte)
    unsigned = w_int.to(torch.int32) + (1 << (storage - 1))
    padded = torch.zeros(N, n_bytes * per_byte, dtype=torch.int32)
    padded[:, :K] = unsigned
    slots = padded.view(N, n_bytes, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32) * storage
    return (slots << shifts).sum(dim=2).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 [N, ceil(K·storage_bits/8)] -> int8 [N, K]."""
    storage = _storage_bits(bits)
    per_byte = 8 // storage
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError("packed must be a 2-D uint8 tensor")
    if packed.shape[1] != math.ceil(K / per_byte):
        raise ValueError(f"packed has {packed.shape[1]} bytes per row; K={K} at {bits} bits needs "
                         f"{math.ceil(K / per_byte)}")
    shifts = torch.arange(per_byte, dtype=torch.int32) * storage
    slots = (packed.to(torch.int32)[:, :, None] >> shifts) & ((1 << storage) - 1)
    values = slots.reshape(packed.shape[0], -1)[:, :K] - (1 << (storage - 1))
    return values.to(torch.int8)
