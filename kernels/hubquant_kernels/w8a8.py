"""W8A8 int8: dynamic per-token activation quantization + int8 GEMM with the scales in the epilogue.

``y[m, n] = (sum_k qa[m, k] * qw[n, k]) * sa[m] * sw[n] (+ bias)`` with int32 accumulation.
Weights stay in the checkpoint's [N, K] int8 layout (K-major, what the int8 tensor-core path wants).
Activations: per token ``sa = amax(|x|) / 127.5`` (hubquant's and compressed-tensors' symmetric min-max),
``qa = clamp(round_half_even(x / sa), -128, 127)``; or a static per-tensor scale.

The quantization kernel takes BM rows per program (whole rows in registers, or two passes over K in chunks for long
rows) and divides without IEEE division's per-element branch (reciprocal + two exact corrections, same codes).
The GEMM kernel is shared with FP8 (hubquant_kernels.fp8): the operand type decides the accumulator.
Per shape the chooser picks a Triton config or cuBLAS (`torch._int_mm` + a one-pass Triton epilogue, or
`torch._scaled_mm` with row-wise scales). hubquant_kernels.fused quantizes straight out of RMSNorm and SiLU * up;
hubquant_kernels.quant_mm quantizes inside the GEMM (one launch) at M <= 4, where the chooser finds it faster.
int8 sums are exact in any order (split-K reduces int32), so every int8 configuration gives the same output; FP8
sums in fp32, and under torch.use_deterministic_algorithms only unsplit Triton configurations are offered.
"""
from __future__ import annotations

import torch

from hubquant_kernels._common import (
    Candidate,
    as_2d,
    check,
    check_dtype,
    check_same_device,
    choose_lazy,
    interpreting,
    launch,
    m_bucket,
    require_triton,
    use_triton,
    workspace,
)
from hubquant_kernels.bound import Bound

ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INT8_QMAX = 127.5  # (2^8 - 1) / 2: the symmetric min-max divisor of hubquant.quant
FP8_MAX = 448.0
MAX_ONE_LAUNCH_M = 4  # = hubquant_kernels.quant_mm.MAX_M (at M = 16 one launch measured 1.5-2.5x slower than two)


# ---------------------------------------------------------------- torch references
def quantize_act_reference(x: torch.Tensor, *, fp8: bool = False, static_scale: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (or static per-tensor) symmetric quantization: (q [M, K], scale fp32 [M])."""
    xf = x.float()
    if static_scale is not None:
        s = static_scale.float().reshape(1).expand(x.shape[0]).contiguous()
    else:
        s = xf.abs().amax(dim=1) / (FP8_MAX if fp8 else INT8_QMAX)
        s = torch.where(s > 0, s, torch.full_like(s, 1e-8))
    v = xf / s[:, None]
    if fp8:
        return v.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), s
    return torch.round(v).clamp(-128, 127).to(torch.int8), s


def scaled_mm_reference(qa: torch.Tensor, sa: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
                        bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """(qa @ qw.T) * sa[:, None] * sw[None, :] (+ bias) in float64 accumulation, cast to out_dtype."""
    acc = qa.double() @ qw.double().t()
    y = acc * sa.double()[:, None] * sw.double().reshape(-1)[None, :]
    if bias is not None:
        y = y + bias.double()
    return y.to(out_dtype)


def w8a8_reference(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                   *, static_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize x per token, then the int8 product with both scales, in x's dtype."""
    qa, sa = quantize_act_reference(x, fp8=qweight.dtype == torch.float8_e4m3fn, static_scale=static_scale)
    return scaled_mm_reference(qa, sa, qweight, w_scale, bias, x.dtype)


# ---------------------------------------------------------------- Triton kernels
try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    from hubquant_kernels.pack import _round_even
    from hubquant_kernels.splitk import store_or_reduce as _store_or_reduce
    from hubquant_kernels.w8_tiles import _int_split_epilogue, _quant_tile, _row_scale

    @triton.jit
    def _act_quant_kernel(x_ptr, q_ptr, s_ptr, static_ptr, K, stride_xm, stride_qm,
                          FP8: tl.constexpr, STATIC: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < K
        x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
        if STATIC:
            s = tl.load(static_ptr).to(tl.float32)
        else:
            amax = tl.max(tl.abs(x), axis=0)
            s = tl.math.div_rn(amax, 448.0 if FP8 else 127.5)
            s = tl.where(s > 0, s, 1e-8)
        v = tl.math.div_rn(x, s)
        if FP8:
            q = tl.minimum(tl.maximum(v, -448.0), 448.0).to(q_ptr.dtype.element_ty)
        else:
            q = tl.minimum(tl.maximum(_round_even(v), -128.0), 127.0).to(tl.int8)
        tl.store(q_ptr + row * stride_qm + offs, q, mask=mask)
        tl.store(s_ptr + row, s)

    @triton.jit
    def _act_quant_rows_kernel(x_ptr, q_ptr, s_ptr, static_ptr, M, K, stride_xm, stride_qm,
                               FP8: tl.constexpr, STATIC: tl.constexpr, DIV: tl.constexpr,
                               BM: tl.constexpr, BK: tl.constexpr, ONE_PASS: tl.constexpr):
        # BM rows per program. ONE_PASS: the rows (BK >= K) stay in registers; otherwise one pass over K for the
        # row maxima (kept in L2 for the second pass) and one that quantizes.
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        rmask = rows < M
        cols = tl.arange(0, BK)
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
        q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_qm
        if STATIC:
            s = tl.zeros([BM], dtype=tl.float32) + tl.load(static_ptr).to(tl.float32)
        if ONE_PASS:
            mask = rmask[:, None] & (cols < K)[None, :]
            x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if not STATIC:
                s = _row_scale(tl.max(tl.abs(x), axis=1), FP8)
            tl.store(q_rows + cols[None, :], _quant_tile(x, s, FP8, DIV), mask=mask)
        else:
            if not STATIC:
                amax = tl.zeros([BM], dtype=tl.float32)
                for k0 in range(0, K, BK):
                    mask = rmask[:, None] & (k0 + cols < K)[None, :]
                    x = tl.load(x_rows + k0 + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_last")
                    amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
                s = _row_scale(amax, FP8)
            for k0 in range(0, K, BK):
                mask = rmask[:, None] & (k0 + cols < K)[None, :]
                x = tl.load(x_rows + k0 + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
                tl.store(q_rows + k0 + cols[None, :], _quant_tile(x.to(tl.float32), s, FP8, DIV), mask=mask)
        tl.store(s_ptr + rows, s, mask=rmask)

    @triton.jit
    def _int8_epilogue_kernel(acc_ptr, sa_ptr, sw_ptr, b_ptr, y_ptr, M, N, stride_am, stride_ym,
                              HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        # y = acc * sa[:, None] * sw[None, :] (+ bias), fp32 math in that order, one pass over the int32 product
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        rmask, cmask = rows < M, cols < N
        mask = rmask[:, None] & cmask[None, :]
        acc = tl.load(acc_ptr + rows.to(tl.int64)[:, None] * stride_am + cols[None, :], mask=mask, other=0)
        sa = tl.load(sa_ptr + rows, mask=rmask, other=0.0)
        sw = tl.load(sw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        out = acc.to(tl.float32) * sa[:, None] * sw[None, :]
        if HAS_BIAS:
            out = out + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :], out.to(y_ptr.dtype.element_ty),
                 mask=mask)

    @triton.jit
    def _scaled_mm_kernel(
        a_ptr, w_ptr, sa_ptr, sw_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
        M, N, K, k_split, stride_am, stride_wn, stride_ym,
        FP8: tl.constexpr, HAS_BIAS: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        n_m = tl.cdiv(M, BM)
        n_n = tl.cdiv(N, BN)
        width = GROUP_M * n_n
        first_m = (pid // width) * GROUP_M
        size_m = tl.minimum(n_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        mask_m = offs_m < M
        mask_n = offs_n < N
        k_lo = pid_k * k_split
        k_hi = tl.minimum(k_lo + k_split, K)
        acc = tl.zeros((BM, BN), dtype=tl.float32 if FP8 else tl.int32)
        for k0 in range(k_lo, k_hi, BK):
            offs_k = k0 + tl.arange(0, BK)
            kmask = offs_k < K
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :], mask=mask_m[:, None] & kmask[None, :],
                        other=0.0)
            b = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None], mask=kmask[:, None] & mask_n[None, :],
                        other=0.0)
            acc = tl.dot(a, b, acc, out_dtype=tl.float32 if FP8 else tl.int32)
        sa = tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0)
        sw = tl.load(sw_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :] if HAS_BIAS else 0.0
        mask = mask_m[:, None] & mask_n[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        if FP8 or SPLIT_K == 1:
            out = acc.to(tl.float32) * sa[:, None] * sw[None, :]
            _store_or_reduce(out, y_ptrs, ws_ptr + offs_m[:, None] * N + offs_n[None, :], mask, cnt_ptr, pid, bias,
                             SPLIT_K, HAS_BIAS)
        else:
            _int_split_epilogue(acc, sa, sw, bias, y_ptrs, ws_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
                                + offs_m[:, None] * N + offs_n[None, :], mask, cnt_ptr + pid, SPLIT_K, HAS_BIAS)


# ---------------------------------------------------------------- wrappers
def _act_quant_v1(x, q, s, static, *, fp8):
    """The first kernel: one program per row, the whole row in registers (kept for comparison)."""
    block = triton.next_power_of_2(x.shape[1])
    launch(_act_quant_kernel, (x.shape[0],), x, q, s, static if static is not None else s, x.shape[1], x.stride(0),
                                     q.stride(0), FP8=fp8, STATIC=static is not None, BLOCK=block,
                                     num_warps=min(16, max(4, block // 1024)))


def _act_quant_rows(x, q, s, static, *, fp8, bm, bk, warps, div=1):
    m, k = x.shape
    launch(_act_quant_rows_kernel, (triton.cdiv(m, bm),),
        x, q, s, static if static is not None else s, m, k, x.stride(0), q.stride(0),
        FP8=fp8, STATIC=static is not None, DIV=0 if static is not None and div == 1 else div, BM=bm, BK=bk,
        ONE_PASS=bk >= k, num_warps=warps)


def _tile_warps(elems: int) -> int:
    # ~32 values per thread: 4 16-byte loads of bf16 each
    return max(4, min(16, elems // 1024))


def _act_quant_cfgs(k: int) -> list[tuple[str, int, int, int]]:
    """(name, BM, BK, warps) of the row-tile kernel for rows of k values; the first is the default."""
    block = 1 << max(0, k - 1).bit_length()
    cfgs = []
    if block <= 16384:  # whole rows in registers: tiles of 8K and 16K values (4K with BM=1 is `row_v1`)
        for tile in (8192, 16384):
            bm = max(1, tile // block)
            cfgs.append((f"rows{bm}_full_w{_tile_warps(bm * block)}", bm, block, _tile_warps(bm * block)))
        # fewer threads per value (more independent loads per thread), and one row of <= 4K values per program
        for tile, warps in ((8192, 4), (16384, 8), (4096, 4)):
            bm = max(1, tile // block)
            if bm * block >= tile and bm * block <= warps * 32 * 64:  # <= 64 values per thread
                cfgs.append((f"rows{bm}_full_w{warps}", bm, block, warps))
    for bm, bk in ((4, 1024), (2, 4096)):  # two passes over K in chunks
        if bk < k:
            cfgs.append((f"rows{bm}_bk{bk}_w{_tile_warps(bm * bk)}", bm, bk, _tile_warps(bm * bk)))
    return list({c[0]: c for c in cfgs}.values())


DIV_SUFFIX = {1: "", 0: "_div", 2: "_rcp"}


def act_quant_candidates(m: int, k: int, fp8: bool, *, div: int = 1) -> list[Candidate]:
    """Per-token quantization kernels worth timing for [m, k]; the first is the default (and the choice at small m).

    Names: ``rows{BM}_full_w{W}`` keeps BM whole rows in registers; ``rows{BM}_bk{BK}_w{W}`` reads each row twice
    in BK chunks (row maxima, then codes); ``row_v1`` is the first kernel (one program per row, div_rn).
    ``div`` picks the arithmetic (see `_quant_tile`): 1 (default) reciprocal + corrections, codes identical to the
    reference; 0 (``_div`` names) IEEE division, identical too; 2 (``_rcp`` names) a bare reciprocal multiply,
    never chosen automatically (codes may differ by one step next to ties). Static scales always divide.
    """
    out = [Candidate(name=name + DIV_SUFFIX[div],
                     fn=lambda x, q, s, st, bm=bm, bk=bk, w=w: _act_quant_rows(x, q, s, st, fp8=fp8, bm=bm, bk=bk,
                                                                               warps=w, div=div))
           for name, bm, bk, w in _act_quant_cfgs(k)]
    if div == 1:
        out.append(Candidate(name="row_v1", fn=lambda x, q, s, st: _act_quant_v1(x, q, s, st, fp8=fp8)))
    return out


def _check_static(static_scale: torch.Tensor | None) -> None:
    if static_scale is not None:
        check(static_scale.numel() == 1, "a static activation scale must hold one value",
              hint="per-tensor input_scale [1] (per-token static scales are not supported)")


def quantize_act(x: torch.Tensor, *, fp8: bool = False, static_scale: torch.Tensor | None = None,
                 impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused per-token activation quantization (Triton on GPU; the torch reference elsewhere).

    Args:
        x: [M, K] bf16/fp16/fp32 activations.
        fp8: float8_e4m3fn codes (scale amax/448) instead of int8 (scale amax/127.5).
        static_scale: a one-element per-tensor scale (static schemes) instead of per-token scales.
        impl: force a kernel configuration by name (see `act_quant_candidates`; ``_div`` / ``_rcp`` names too).

    Returns:
        (codes [M, K] int8 or float8_e4m3fn, scales fp32 [M]).
    """
    check_dtype("x", x, ACT_DTYPES)
    check(x.dim() == 2, f"x must be [M, K], got {tuple(x.shape)}", hint="flatten leading dims first")
    _check_static(static_scale)
    if not use_triton(x):
        return quantize_act_reference(x, fp8=fp8, static_scale=static_scale)
    require_triton()
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return q, s
    args = (x, q, s, static_scale)
    if impl is not None:
        every = [c for d in (1, 0, 2) for c in act_quant_candidates(m, k, fp8, div=d)]
        cands = [c for c in every if c.name == impl]
        check(bool(cands), f"no activation-quantization kernel named {impl!r} for K={k}",
              hint="see hubquant_kernels.w8a8.act_quant_candidates(...)")
        cands[0].fn(*args)
        return q, s
    key = ("act_quant", "fp8" if fp8 else "int8", static_scale is not None, m_bucket(m), k, x.dtype)
    make = lambda: act_quant_candidates(m, k, fp8)[:1 if m < 64 else None]
    choose_lazy(key, make, args, on_gpu=x.is_cuda).fn(*args)
    return q, s


def _triton_mm(qa, sa, qw, sw, bias, y, *, bm, bn, bk, split_k, warps, stages):
    m, k = qa.shape
    n = qw.shape[0]
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    k_split = triton.cdiv(triton.cdiv(k, bk), split_k) * bk
    ws, cnt = workspace(qa.device, m * n, tiles) if split_k > 1 else (y, y)
    launch(_scaled_mm_kernel, (tiles, split_k),
        qa, qw, sa, sw, bias if bias is not None else sw, y, ws, cnt, m, n, k, k_split,
        qa.stride(0), qw.stride(0), y.stride(0), FP8=qa.dtype == torch.float8_e4m3fn, HAS_BIAS=bias is not None,
        BM=bm, BN=bn, BK=bk, SPLIT_K=split_k, GROUP_M=8, num_warps=warps, num_stages=stages,
    )
    return y


def _cublas_int8(qa, sa, qw, sw, bias, y):
    # cuBLAS int8 GEMM (torch._scaled_mm takes no int8), then one Triton pass: int32 -> scales (+ bias) -> y
    acc = torch._int_mm(qa, qw.t())
    m, n = acc.shape
    launch(_int8_epilogue_kernel, (triton.cdiv(m, 32), triton.cdiv(n, 128)),
        acc, sa, sw, bias if bias is not None else sw, y, m, n, acc.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BM=32, BN=128, num_warps=4)
    return y


def _cublas_fp8(qa, sa, qw, sw, bias, y):
    # row-wise scales as cuBLASLt wants them: fp32 [M, 1] and [1, N], contiguous views (no copy when sw is fp32).
    # Returns cuBLAS's own output, not y (callers use the return value); writing into y with out= did not
    # measure faster on an H200, and a copy into y would cost a pass over y
    return torch._scaled_mm(qa, qw.t(), scale_a=sa.reshape(-1, 1), scale_b=sw.float().reshape(1, -1), bias=bias,
                            out_dtype=y.dtype)


def mm_candidates(m: int, n: int, k: int, fp8: bool, out_dtype: torch.dtype) -> list[Candidate]:
    """Implementations worth timing for an [m, k] x [n, k]^T scaled int8/fp8 product; the first is the default."""
    if m <= 16:
        cfgs = [(16, 64, 128, s, 4, 4) for s in (1, 2, 4, 8)] + [(16, 128, 128, s, 4, 4) for s in (1, 2, 4)] + \
               [(16, 64, 256, s, 4, 3) for s in (1, 2, 4)]
    elif m <= 64:
        cfgs = [(bm, 64, 128, s, 4, 4) for bm in (32, 64) for s in (1, 2, 4)] + [(64, 128, 128, 1, 4, 4)]
    elif m <= 256:
        cfgs = [(64, 128, 128, 1, 4, 4), (128, 128, 128, 1, 8, 3), (64, 64, 128, 2, 4, 4), (128, 64, 128, 1, 4, 4)]
    else:
        cfgs = [(128, 128, 128, 1, 8, 3), (128, 256, 128, 1, 8, 3), (256, 128, 128, 1, 8, 3), (128, 128, 64, 1, 4, 4)]
    if fp8 and torch.are_deterministic_algorithms_enabled():
        # FP8 sums in fp32: split-K atomics add in any order and cuBLAS picks its algorithm per shape, so only the
        # unsplit Triton kernels with one K block size give every shape (a fused q/k/v and its parts) the same sums
        cfgs = [c for c in cfgs if c[3] == 1 and c[2] == 128] or [(64, 128, 128, 1, 4, 4)]
        return [Candidate(name=f"triton_{bm}x{bn}x{bk}_s1_w{warps}",
                          fn=lambda *a, bm=bm, bn=bn, bk=bk, w=warps, st=stages:
                          _triton_mm(*a, bm=bm, bn=bn, bk=bk, split_k=1, warps=w, stages=st))
                for bm, bn, bk, _, warps, stages in cfgs]
    out = []
    for bm, bn, bk, split, warps, stages in cfgs:
        if split == 1 or k // bk >= 2 * split:
            out.append(Candidate(name=f"triton_{bm}x{bn}x{bk}_s{split}_w{warps}",
                                 fn=lambda *a, bm=bm, bn=bn, bk=bk, s=split, w=warps, st=stages:
                                 _triton_mm(*a, bm=bm, bn=bn, bk=bk, split_k=s, warps=w, stages=st)))
    if not out:
        out.append(Candidate(name="triton_16x32x32_s1_w4",
                             fn=lambda *a: _triton_mm(*a, bm=16, bn=32, bk=32, split_k=1, warps=4, stages=2)))
    if not fp8 and m > 16 and k % 8 == 0 and n % 8 == 0:
        out.append(Candidate(name="cublas_int_mm", fn=_cublas_int8, pure=False))
    if fp8 and k % 16 == 0 and n % 16 == 0 and out_dtype == torch.bfloat16:
        cublas = Candidate(name="cublas_scaled_mm", fn=_cublas_fp8, pure=False)
        if m > 256 and not interpreting():  # cuBLASLt's FP8 GEMM is the fastest large-M path measured on H100/H200
            return [cublas]
        out.append(cublas)
    return out


def scaled_mm(qa: torch.Tensor, sa: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None = None, *, out_dtype: torch.dtype = torch.bfloat16,
              impl: str | None = None) -> torch.Tensor:
    """y = (qa @ qweight.T) * sa[:, None] * w_scale[None, :] (+ bias), for int8 or float8_e4m3fn operands.

    Args:
        qa: [M, K] codes (int8 or float8_e4m3fn), sa: fp32 [M] per-token scales.
        qweight: [N, K] codes of the same type, w_scale: [N] per-channel scales (any float dtype).
        bias: optional [N]. out_dtype: bf16 or fp16 (fp32 on CPU). impl: force a candidate by name.

    Raises:
        UsageError: shapes or devices do not match. UnsupportedError: wrong dtypes.
    """
    fp8 = qa.dtype == torch.float8_e4m3fn
    code_types = (torch.float8_e4m3fn,) if fp8 else (torch.int8,)
    check_dtype("qa", qa, (torch.int8, torch.float8_e4m3fn))
    check_dtype("qweight", qweight, code_types)
    check_dtype("sa", sa, (torch.float32,))
    check_same_device(qa=qa, sa=sa, qweight=qweight, w_scale=w_scale, bias=bias)
    m, k = qa.shape
    n = qweight.shape[0]
    check(qweight.dim() == 2 and qweight.shape[1] == k, f"qweight has shape {tuple(qweight.shape)}, expected "
          f"[N, {k}]", hint="int8/fp8 weights are [out_features, in_features]")
    check(sa.shape == (m,), f"sa has shape {tuple(sa.shape)}, expected ({m},)", hint="one scale per token")
    check(w_scale.numel() == n, f"w_scale has {w_scale.numel()} values, expected {n}",
          hint="per-channel weight scales [N] (expand a per-tensor scale at load time)")
    check(qweight.stride(1) == 1 and qa.stride(1) == 1, "qa and qweight need unit stride along K",
          hint="call .contiguous() on them")
    w_scale = w_scale.reshape(n)
    if not use_triton(qa):
        return scaled_mm_reference(qa, sa, qweight, w_scale, bias, out_dtype)
    require_triton()
    y = torch.empty(m, n, dtype=out_dtype, device=qa.device)
    return _mm_into(qa, sa, qweight, w_scale, bias, y, impl)[0]


def _mm_into(qa, sa, qweight, w_scale, bias, y, impl=None) -> tuple[torch.Tensor, Candidate | None]:
    """(y, the candidate that ran): the chooser's pick (or `impl`) for qa [M, K] x qweight [N, K]^T."""
    (m, k), n, fp8, out_dtype = qa.shape, qweight.shape[0], qa.dtype == torch.float8_e4m3fn, y.dtype
    if m == 0:
        return y, None
    args = (qa, sa, qweight, w_scale, bias, y)
    if impl is not None:
        cands = [c for c in mm_candidates(m, n, k, fp8, out_dtype) if c.name == impl]
        check(bool(cands), f"no scaled-mm implementation named {impl!r} for this shape",
              hint="see hubquant_kernels.w8a8.mm_candidates(...)")
        return cands[0].fn(*args), cands[0]
    key = ("fp8" if fp8 else "int8", m_bucket(m), n, k, out_dtype, bias is not None) + _det(fp8)
    c = choose_lazy(key, lambda: mm_candidates(m, n, k, fp8, out_dtype), args, on_gpu=qa.is_cuda)
    return c.fn(*args), c


def bind(qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None, *,
         static_scale: torch.Tensor | None = None) -> Bound:
    """`w8a8_matmul` / `fp8_matmul` for one layer's fixed tensors (by qweight's dtype), as ``op(x) -> y`` that
    replays the activation quantization and the GEMM as one recorded plan per M once the shape is decided
    (hubquant_kernels.bound); cuBLAS-backed picks and CPU tensors take the normal path on every call."""
    fp8 = qweight.dtype == torch.float8_e4m3fn
    check_dtype("qweight", qweight, (torch.int8, torch.float8_e4m3fn))
    n, k = qweight.shape
    check(w_scale.numel() == n, f"w_scale has {w_scale.numel()} values, expected {n}",
          hint="per-channel weight scales [N] (expand a per-tensor scale at load time)")
    ws = w_scale.reshape(n)

    def run(x2: torch.Tensor, y: torch.Tensor):
        if not use_triton(x2) or x2.dtype == torch.float32:  # fp32 on the GPU: bf16 output, converted
            y.copy_(_quantized_linear(x2, qweight, w_scale, bias, static_scale, fp8=fp8, impl=None))
            return None
        check_dtype("x", x2, ACT_DTYPES)
        _check_static(static_scale)
        # the argument checks, on no rows
        scaled_mm(x2.new_empty(0, k, dtype=qweight.dtype), x2.new_empty(0, dtype=torch.float32), qweight, ws, bias,
                  out_dtype=y.dtype)
        return _linear_into(x2, qweight, ws, bias, static_scale, y)

    return Bound(k, n, run, (qweight, ws, bias, static_scale))


def w8a8_matmul(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                *, static_scale: torch.Tensor | None = None, impl: str | None = None) -> torch.Tensor:
    """Quantize x per token (or with a static scale) and multiply by int8 weights: y [..., N] in x's dtype.

    Args:
        x: [..., K] activations. qweight: int8 [N, K]. w_scale: [N] or [N, 1] per-channel scales.
        bias: optional [N]. static_scale: optional one-element activation scale (static schemes).
        impl: force a GEMM candidate by name (benchmarks).

    Raises:
        UsageError / UnsupportedError: see `quantize_act` and `scaled_mm`.
    """
    check_dtype("qweight", qweight, (torch.int8,))
    return _quantized_linear(x, qweight, w_scale, bias, static_scale, fp8=False, impl=impl)


def _quantized_linear(x, qweight, w_scale, bias, static_scale, *, fp8, impl):
    k = qweight.shape[1]
    lead = x.shape[:-1]
    x2 = as_2d(x, k)
    if impl is None and use_triton(x2) and x2.dtype != torch.float32 and x2.shape[0] <= MAX_ONE_LAUNCH_M:
        check_dtype("x", x2, ACT_DTYPES)
        _check_static(static_scale)
        check(w_scale.numel() == qweight.shape[0], f"w_scale has {w_scale.numel()} values, expected "
              f"{qweight.shape[0]}", hint="per-channel weight scales [N] (expand a per-tensor scale at load time)")
        scaled_mm(x2.new_empty(0, k, dtype=qweight.dtype), x2.new_empty(0, dtype=torch.float32), qweight, w_scale,
                  bias, out_dtype=x.dtype)  # the argument checks, on no rows
        y = torch.empty(x2.shape[0], qweight.shape[0], dtype=x.dtype, device=x.device)
        out = _linear_into(x2, qweight, w_scale.reshape(-1), bias, static_scale, y)
        return (out if isinstance(out, torch.Tensor) else y).reshape(*lead, qweight.shape[0])
    qa, sa = quantize_act(x2, fp8=fp8, static_scale=static_scale)
    out_dtype = x.dtype if x.dtype != torch.float32 or not x.is_cuda else torch.bfloat16
    y = scaled_mm(qa, sa, qweight, w_scale, bias, out_dtype=out_dtype, impl=impl)
    return y.to(x.dtype).reshape(*lead, qweight.shape[0])


def _two_launch(x2, qweight, ws, bias, static, y) -> list | torch.Tensor | None:
    """quantize_act, then the chooser's GEMM into y. Returns the scratch a bound plan may keep, None (y written,
    not replayable) or the output when the GEMM returned its own tensor (cuBLAS FP8) instead of writing y."""
    qa, sa = quantize_act(x2, fp8=qweight.dtype == torch.float8_e4m3fn, static_scale=static)
    out, c = _mm_into(qa, sa, qweight, ws, bias, y)
    if out is not y:
        return out
    return [qa, sa] if c is not None and c.pure else None


def _det(fp8: bool) -> tuple:
    """A chooser-key suffix: FP8 choices made under torch.use_deterministic_algorithms are kept apart."""
    return ("deterministic",) if fp8 and torch.are_deterministic_algorithms_enabled() else ()


def linear_candidates(m: int, k: int, *, deterministic: bool = False) -> list[Candidate]:
    """Ways to compute a quantized layer on x [m, k] (bf16/fp16): the one-launch kernels (hubquant_kernels.quant_mm,
    first: the default off the GPU) and ``two_launch`` (quantize_act + the GEMM chooser's pick). deterministic:
    unsplit one-launch kernels only (FP8 under torch.use_deterministic_algorithms, see `mm_candidates`)."""
    from hubquant_kernels.quant_mm import one_launch_candidates

    one = [c for c in one_launch_candidates(m, k) if not deterministic or "_s1_" in c.name]
    return one + [Candidate(name="two_launch", fn=_two_launch, pure=False)]


def _linear_into(x2, qweight, ws, bias, static, y) -> list | torch.Tensor | None:
    """y = the quantized layer of x2 [M, K]; returns what `_two_launch` returns (scratch, None or a new output).
    Up to MAX_ONE_LAUNCH_M rows the chooser times the one-launch kernels against two launches."""
    m, k = x2.shape
    if m == 0:
        return None
    if m > MAX_ONE_LAUNCH_M or x2.dtype == torch.float32:
        return _two_launch(x2, qweight, ws, bias, static, y)
    fp8 = qweight.dtype == torch.float8_e4m3fn
    key = ("w8_linear", "fp8" if fp8 else "int8", m_bucket(m), qweight.shape[0], k, x2.dtype, bias is not None,
           static is not None) + _det(fp8)
    # timed as CUDA-graph replays: eager timing would count the host cost of the second launch as GPU time
    c = choose_lazy(key, lambda: linear_candidates(m, k, deterministic=bool(_det(fp8))),
                    (x2, qweight, ws, bias, static, y), on_gpu=x2.is_cuda, graph=True)
    if c.name == "two_launch":
        return _two_launch(x2, qweight, ws, bias, static, y)
    c.fn(x2, qweight, ws, bias, static, y)
    return []
