"""Triton building blocks of the 8-bit kernels: activation codes of a tile, per-row scales, the exact int8
split-K epilogue. Shared by w8a8 (two launches), quant_mm (one launch) and fused (RMSNorm -> codes)."""
from __future__ import annotations

import triton
import triton.language as tl

from hubquant_kernels.pack import _round_even


@triton.jit
def _quant_tile(v, s, FP8: tl.constexpr, DIV: tl.constexpr):
    """Codes of an fp32 tile v [BM, BK] with per-row scales s [BM].

    DIV 0: IEEE division (div_rn: per element a range check and a slow-path branch).
    DIV 1: the same quotient without the branch: q = v * RN(1/s), then two Markstein corrections
    q += fma(-q, s, v) * RN(1/s) (the remainder is exact, and the second correction rounds correctly), for
    rows whose scale is a normal float (otherwise div_rn); codes identical to x / s for |x / s| <= 448 and
    normal x.
    DIV 2: v * RN(1/s) only (may differ by one step where v / s is within an ulp of a rounding tie).
    """
    if DIV == 0:
        t = tl.math.div_rn(v, s[:, None])
    else:
        r = tl.math.div_rn(1.0, s)[:, None]
        t = v * r
        if DIV == 1:
            if tl.min(s, axis=0) < 4.7e-38:  # 2^-124: 1/s would not be a normal float
                t = tl.math.div_rn(v, s[:, None])
            else:
                t = tl.fma(tl.fma(-t, s[:, None], v), r, t)
                t = tl.fma(tl.fma(-t, s[:, None], v), r, t)
    if FP8:
        q = tl.minimum(tl.maximum(t, -448.0), 448.0).to(tl.float8e4nv)
    else:
        q = tl.minimum(tl.maximum(_round_even(t), -128.0), 127.0).to(tl.int8)
    return q


@triton.jit
def _row_scale(amax, FP8: tl.constexpr):
    s = tl.math.div_rn(amax, 448.0 if FP8 else 127.5)
    return tl.where(s > 0, s, 1e-8)


@triton.jit
def _int_split_epilogue(acc, sa, sw, bias, y_ptrs, ws_ptrs, mask, cnt_ptr,
                        SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """int8 split-K: the int32 partial sums meet in the workspace (integer atomics: exact, any order) and the
    tile's last program scales the total once, so every split count gives the unsplit kernel's output bit for
    bit. The workspace is left zeroed, as the fp32 reduction leaves it."""
    tl.atomic_add(ws_ptrs, acc, mask=mask)
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr, 1)
    if arrived == SPLIT_K - 1:
        total = tl.atomic_add(ws_ptrs, tl.zeros_like(acc), mask=mask)  # read through L2
        tl.store(ws_ptrs, tl.zeros_like(acc), mask=mask)
        out = total.to(tl.float32) * sa[:, None] * sw[None, :]
        if HAS_BIAS:
            out = out + bias
        tl.store(y_ptrs, out.to(y_ptrs.dtype.element_ty), mask=mask)
        tl.store(cnt_ptr, 0)
