"""W8A8 / FP8 at small M in one launch: per-token activation quantization inside the GEMM kernel.

The two-launch path (hubquant_kernels.w8a8: `quantize_act`, then the scaled GEMM) costs two kernel launches per
layer call, which on the host is most of an eager call at M <= 4. Here every program of the GEMM first reads
its rows of x once over the whole K (bf16/fp16, four 2K-value loads in flight per row, so one memory round trip
per row of up to 8K values) for the row maxima, then quantizes each [BM, BK] tile of x in registers right before
the dot. The scale, codes, int32/fp32
accumulation and epilogue are those of the two-launch path (same helpers, same order), so the output is the
two-launch output with the same GEMM configuration bit for bit. The chooser (`linear_candidates`) times these
configurations against the two-launch path per shape bucket as CUDA-graph replays (GPU time, no host cost) and
keeps the faster; on an H200 at M = 1 the two were within 3-10% of each other, at M = 16 one launch lost 1.5-2.5x.
"""
from __future__ import annotations

import torch

from hubquant_kernels._common import Candidate, launch, workspace

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MAX_M = 4  # one-launch candidates up to this many rows (the row maxima cost one memory round trip per row)

if triton is not None:
    from hubquant_kernels.splitk import store_or_reduce as _store_or_reduce
    from hubquant_kernels.w8_tiles import _int_split_epilogue, _quant_tile, _row_scale

    @triton.jit
    def _row_maxima(x_ptr, row0, M, K, stride_xm, BM: tl.constexpr, BKA: tl.constexpr = 2048):
        """max |x| of rows row0 .. row0 + BM - 1 (0 past M): one real row at a time, four [BKA] loads in flight, so
        a row of up to 8K values costs one memory round trip (a [BM, BK] tile loop would cost K / BK of them, most
        of its lanes masked at M = 1)."""
        amax = tl.zeros([BM], dtype=tl.float32)
        idx = tl.arange(0, BM)
        ka = tl.arange(0, BKA)
        for r in range(0, tl.minimum(BM, M - row0)):
            row = x_ptr + (row0 + r).to(tl.int64) * stride_xm
            m = tl.zeros([BKA], dtype=tl.float32)
            for k0 in range(0, K, 4 * BKA):
                v0 = tl.load(row + k0 + ka, mask=k0 + ka < K, other=0.0)
                v1 = tl.load(row + k0 + BKA + ka, mask=k0 + BKA + ka < K, other=0.0)
                v2 = tl.load(row + k0 + 2 * BKA + ka, mask=k0 + 2 * BKA + ka < K, other=0.0)
                v3 = tl.load(row + k0 + 3 * BKA + ka, mask=k0 + 3 * BKA + ka < K, other=0.0)
                m = tl.maximum(tl.maximum(m, tl.maximum(tl.abs(v0.to(tl.float32)), tl.abs(v1.to(tl.float32)))),
                               tl.maximum(tl.abs(v2.to(tl.float32)), tl.abs(v3.to(tl.float32))))
            amax = tl.where(idx == r, tl.max(m, axis=0), amax)
        return amax

    @triton.jit
    def _quant_mm_kernel(
        x_ptr, w_ptr, sw_ptr, b_ptr, st_ptr, y_ptr, ws_ptr, cnt_ptr,
        M, N, K, k_split, stride_xm, stride_wn, stride_ym,
        FP8: tl.constexpr, STATIC: tl.constexpr, HAS_BIAS: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        n_n = tl.cdiv(N, BN)
        pid_m = pid // n_n
        pid_n = pid % n_n
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        mask_m = offs_m < M
        mask_n = offs_n < N
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        cols = tl.arange(0, BK)
        if STATIC:
            s = tl.zeros([BM], dtype=tl.float32) + tl.load(st_ptr).to(tl.float32)
        else:  # the row maxima over the whole K, as `quantize_act` takes them (max is exact in any order)
            s = _row_scale(_row_maxima(x_ptr, pid_m * BM, M, K, stride_xm, BM), FP8)
        k_lo = pid_k * k_split
        k_hi = tl.minimum(k_lo + k_split, K)
        acc = tl.zeros((BM, BN), dtype=tl.float32 if FP8 else tl.int32)
        for k0 in range(k_lo, k_hi, BK):
            offs_k = k0 + cols
            kmask = offs_k < K
            xt = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & kmask[None, :], other=0.0)
            a = _quant_tile(xt.to(tl.float32), s, FP8, 0 if STATIC else 1)
            b = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None], mask=kmask[:, None] & mask_n[None, :],
                        other=0.0)
            acc = tl.dot(a, b, acc, out_dtype=tl.float32 if FP8 else tl.int32)
        sw = tl.load(sw_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :] if HAS_BIAS else 0.0
        mask = mask_m[:, None] & mask_n[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        if FP8 or SPLIT_K == 1:
            out = acc.to(tl.float32) * s[:, None] * sw[None, :]
            _store_or_reduce(out, y_ptrs, ws_ptr + offs_m[:, None] * N + offs_n[None, :], mask, cnt_ptr, pid, bias,
                             SPLIT_K, HAS_BIAS)
        else:
            _int_split_epilogue(acc, s, sw, bias, y_ptrs, ws_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
                                + offs_m[:, None] * N + offs_n[None, :], mask, cnt_ptr + pid, SPLIT_K, HAS_BIAS)


def quant_mm(x, qw, sw, bias, static, y, *, bm, bn, bk, split_k, warps, stages):
    """y = quantize(x) @ qw.T * scales (+ bias) in one launch; x [M, K] bf16/fp16 with unit stride along K."""
    m, k = x.shape
    n = qw.shape[0]
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    k_split = triton.cdiv(triton.cdiv(k, bk), split_k) * bk
    ws, cnt = workspace(x.device, m * n, tiles) if split_k > 1 else (y, y)
    launch(_quant_mm_kernel, (tiles, split_k),
        x, qw, sw, bias if bias is not None else sw, static if static is not None else sw, y, ws, cnt,
        m, n, k, k_split, x.stride(0), qw.stride(0), y.stride(0),
        FP8=qw.dtype == torch.float8_e4m3fn, STATIC=static is not None, HAS_BIAS=bias is not None,
        BM=bm, BN=bn, BK=bk, SPLIT_K=split_k, num_warps=warps, num_stages=stages)
    return y


def one_launch_cfgs(m: int, k: int) -> list[tuple[int, int, int, int, int, int]]:
    """(BM, BN, BK, split-K, warps, stages) of the one-launch kernel worth timing at m <= MAX_M rows."""
    cfgs = [(16, 64, 128, s, 4, 4) for s in (1, 2, 4, 8)] + [(16, 128, 128, s, 4, 4) for s in (1, 2)]
    return [c for c in cfgs if c[3] == 1 or k // c[2] >= 2 * c[3]] if m <= MAX_M else []


def one_launch_candidates(m: int, k: int) -> list[Candidate]:
    """Candidates ``fn(x, qw, sw, bias, static, y) -> y`` named ``q1_{BM}x{BN}x{BK}_s{split}_w{warps}``."""
    return [Candidate(name=f"q1_{bm}x{bn}x{bk}_s{s}_w{w}",
                      fn=lambda x, qw, sw, b, st, y, bm=bm, bn=bn, bk=bk, s=s, w=w, sg=sg:
                      quant_mm(x, qw, sw, b, st, y, bm=bm, bn=bn, bk=bk, split_k=s, warps=w, stages=sg))
            for bm, bn, bk, s, w, sg in one_launch_cfgs(m, k)]
