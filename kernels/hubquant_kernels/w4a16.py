"""W4A16: 4-bit grouped weights x bf16/fp16 activations, dequantized inside the GEMM.

Weights are in the kernel layout of `hubquant_kernels.pack` (qweight int32 [K/8, N], scales [G, N],
optional unsigned zero points [G, N]; symmetric codes use zero point 8), so
``W[k, n] = (u[k, n] - z[k // gs, n]) * s[k // gs, n]`` and ``y = x @ W (+ bias)``.

Paths, chosen per shape (timed once per shape bucket on GPU):
- GEMV (M <= 4): FMA over [BK, BN] tiles, split-K across programs, no tensor cores (also w4a16_gemv's mantissa
  codes and w4a16_gemv3's rotated codes at M=1);
- tensor-core GEMV (M <= 32, w4a16_mmv): mma.sync with swapped operands, on the same packed layout;
- tiled: tl.dot on dequantized [BK, BN] tiles, optional split-K for small M;
- dequantize once into a bf16 [K, N] buffer + cuBLAS (large M, where the GEMM is compute-bound).
Split-K programs add fp32 partial sums into a shared workspace; the last program of a tile (arrival counter)
writes the output and re-zeroes the workspace, so one launch does the whole product (CUDA-graph safe).
"""
from __future__ import annotations

import os

import torch

from hubquant.errors import UnsupportedError
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
from hubquant_kernels.pack import unpack_kn

ACT_DTYPES = (torch.bfloat16, torch.float16)
SCALE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ---------------------------------------------------------------- torch reference
def dequantize_reference(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                         group_size: int) -> torch.Tensor:
    """float32 W [K, N] from the kernel layout."""
    u = unpack_kn(qweight).to(torch.float32)
    k = u.shape[0]
    gs = k if group_size == -1 else group_size
    z = 8.0 if zeros is None else zeros.to(torch.float32).repeat_interleave(gs, 0)[:k]
    return (u - z) * scales.to(torch.float32).repeat_interleave(gs, 0)[:k]


def w4a16_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequant(W) in x's dtype (weights rounded to x's dtype first, as a float model would hold them)."""
    w = dequantize_reference(qweight, scales, zeros, group_size).to(x.dtype)
    y = x @ w
    return y + bias.to(y.dtype) if bias is not None else y


# ---------------------------------------------------------------- Triton kernels
try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    from hubquant_kernels.splitk import store_or_reduce as _store_or_reduce

    @triton.jit
    def _codes(pw, j: tl.constexpr):
        """Nibble j of every word as fp32 2^23 + u (exact; avoids the slow int->float conversion)."""
        return (((pw >> (4 * j)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)

    @triton.jit
    def _block_params(s_ptr, z_ptr, k0, offs_r, rmask, offs_n, mask_n, stride_s,
                      GS: tl.constexpr, HAS_ZP: tl.constexpr, SCALE_AFTER: tl.constexpr):
        """Scale and (2^23 + zero point) for the rows of a K block: [1, BN] if one group covers it, else [R, BN]."""
        if SCALE_AFTER:
            g = k0 // GS
            s = tl.load(s_ptr + g * stride_s + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            if HAS_ZP:
                z = tl.load(z_ptr + g * stride_s + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
            else:
                z = tl.full((1, offs_n.shape[0]), 8.0, tl.float32)
        else:
            g = (offs_r * 8) // GS
            m2 = rmask[:, None] & mask_n[None, :]
            s = tl.load(s_ptr + g[:, None] * stride_s + offs_n[None, :], mask=m2, other=0.0).to(tl.float32)
            if HAS_ZP:
                z = tl.load(z_ptr + g[:, None] * stride_s + offs_n[None, :], mask=m2, other=0).to(tl.float32)
            else:
                z = tl.full(s.shape, 8.0, tl.float32)
        return s, z + 8388608.0

    @triton.jit
    def _w4a16_gemv_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
        M, N, K, G, k_split, stride_xm, stride_ym, stride_w, stride_s,
        GS: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
        BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, SCALE_AFTER: tl.constexpr,
    ):
        # y[m, n] = sum over K blocks of s * sum_j x[8r + j] * (u_j[r, n] - z): FMAs on whole packed words
        R: tl.constexpr = BK // 8
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_n = pid_n * BN + tl.arange(0, BN)
        mask_n = offs_n < N
        k_lo = pid_k * k_split
        k_hi = tl.minimum(k_lo + k_split, K)
        acc = tl.zeros((R, BN), dtype=tl.float32)
        x_row = x_ptr + pid_m * stride_xm
        # software prefetch: the next block's packed words are in flight while this block is computed
        offs_r = k_lo // 8 + tl.arange(0, R)
        rmask = (offs_r < K // 8) & (offs_r < k_hi // 8)
        pw = tl.load(qw_ptr + offs_r[:, None] * stride_w + offs_n[None, :], mask=rmask[:, None] & mask_n[None, :],
                     other=0)
        for k0 in range(k_lo, k_hi, BK):
            nxt_r = offs_r + R
            nmask = (nxt_r < K // 8) & (nxt_r < k_hi // 8)
            pw_next = tl.load(qw_ptr + nxt_r[:, None] * stride_w + offs_n[None, :],
                              mask=nmask[:, None] & mask_n[None, :], other=0)
            s, zc = _block_params(s_ptr, z_ptr, k0, offs_r, rmask, offs_n, mask_n, stride_s, GS, HAS_ZP, SCALE_AFTER)
            part = tl.zeros((R, BN), dtype=tl.float32)
            for j in tl.static_range(8):
                xj = tl.load(x_row + offs_r * 8 + j, mask=rmask, other=0.0).to(tl.float32)
                part += xj[:, None] * (_codes(pw, j) - zc)
            acc += part * s
            pw, offs_r, rmask = pw_next, nxt_r, nmask
        out = tl.sum(acc, axis=0)
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
        _store_or_reduce(out, y_ptr + pid_m * stride_ym + offs_n, ws_ptr + pid_m * N + offs_n, mask_n,
                         cnt_ptr, pid_m * tl.num_programs(1) + pid_n, bias, SPLIT_K, HAS_BIAS)

    @triton.jit
    def _w4a16_mm_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
        M, N, K, G, k_split, stride_xm, stride_ym, stride_w, stride_s,
        GS: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
        SCALE_AFTER: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        # 8 dots per K block, one per nibble j: A columns 8r + j (a strided gather) x W rows 8r + j (nibble j of
        # the packed rows), so no register reshuffle is needed. With one group per block the weights enter the
        # dot as exact small integers and the scale multiplies the block's result.
        R: tl.constexpr = BK // 8
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
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BK):
            offs_r = k0 // 8 + tl.arange(0, R)
            rmask = offs_r < K // 8
            pw = tl.load(qw_ptr + offs_r[:, None] * stride_w + offs_n[None, :], mask=rmask[:, None] & mask_n[None, :],
                         other=0)
            s, zc = _block_params(s_ptr, z_ptr, k0, offs_r, rmask, offs_n, mask_n, stride_s, GS, HAS_ZP, SCALE_AFTER)
            blk = tl.zeros((BM, BN), dtype=tl.float32)
            for j in tl.static_range(8):
                a = tl.load(x_ptr + offs_m[:, None] * stride_xm + (offs_r * 8 + j)[None, :],
                            mask=mask_m[:, None] & rmask[None, :], other=0.0)
                w = _codes(pw, j) - zc
                if not SCALE_AFTER:
                    w = w * s
                if DOT_F32:  # the CPU interpreter mis-multiplies bf16 dots: same values, fp32 operands
                    blk = tl.dot(a.to(tl.float32), w.to(a.dtype).to(tl.float32), blk)
                else:
                    blk = tl.dot(a, w.to(a.dtype), blk)
            if SCALE_AFTER:
                acc += blk * s
            else:
                acc += blk
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :] if HAS_BIAS else 0.0
        mask = mask_m[:, None] & mask_n[None, :]
        _store_or_reduce(acc, y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
                         ws_ptr + offs_m[:, None] * N + offs_n[None, :], mask, cnt_ptr, pid, bias,
                         SPLIT_K, HAS_BIAS)

    @triton.jit
    def _w4_dequant_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, N, K, G, stride_w, stride_s,
                           GS: tl.constexpr, HAS_ZP: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
                           SCALE_AFTER: tl.constexpr):
        R: tl.constexpr = BK // 8
        k0 = tl.program_id(0) * BK
        offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
        mask_n = offs_n < N
        offs_r = k0 // 8 + tl.arange(0, R)
        rmask = offs_r < K // 8
        m2 = rmask[:, None] & mask_n[None, :]
        pw = tl.load(qw_ptr + offs_r[:, None] * stride_w + offs_n[None, :], mask=m2, other=0)
        s, zc = _block_params(s_ptr, z_ptr, k0, offs_r, rmask, offs_n, mask_n, stride_s, GS, HAS_ZP, SCALE_AFTER)
        for j in tl.static_range(8):
            w = (_codes(pw, j) - zc) * s
            tl.store(w_ptr + (offs_r * 8 + j)[:, None] * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=m2)


# ---------------------------------------------------------------- wrappers
def _check(x, qweight, scales, zeros, group_size, bias):
    check_dtype("x", x, ACT_DTYPES)
    check_dtype("qweight", qweight, (torch.int32,))
    check_dtype("scales", scales, SCALE_DTYPES)
    check_same_device(x=x, qweight=qweight, scales=scales, zeros=zeros, bias=bias)
    check(qweight.dim() == 2 and scales.dim() == 2, "qweight and scales must be 2-D ([K/8, N] and [G, N])",
          hint="repack the checkpoint with hubquant_kernels.pack (kernel layout)")
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    gs = k if group_size == -1 else group_size
    g = -(-k // gs)
    check(scales.shape == (g, n), f"scales have shape {tuple(scales.shape)}, expected {(g, n)} for K={k}, "
          f"N={n}, group size {group_size}", hint="scales are [K/group_size, N] (transpose [N, G] checkpoints)")
    if zeros is not None:
        check(zeros.shape == (g, n), f"zeros have shape {tuple(zeros.shape)}, expected {(g, n)}",
              hint="zero points are unsigned [G, N]")
    if bias is not None:
        check(bias.shape == (n,), f"bias has shape {tuple(bias.shape)}, expected ({n},)", hint="bias is [N]")
    # rows may be longer than N (column slices of a fused q/k/v or gate/up weight share its memory)
    check(qweight.stride(1) == 1 and scales.stride(1) == 1 and (zeros is None or zeros.stride(1) == 1)
          and qweight.stride(0) >= n and scales.stride(0) >= n,
          "qweight, scales and zeros need unit stride along N", hint="call .contiguous() once at load time")
    check(zeros is None or zeros.stride(0) == scales.stride(0), "zeros and scales must have the same row stride",
          hint="slice both from tensors of the same width, or call .contiguous() on both")
    if gs != k and (gs & (gs - 1) or gs < 16):
        raise UnsupportedError(f"group size {gs} is not supported by the W4A16 kernels",
                               hint="use a power-of-two group size >= 16, or -1")
    return k, n, gs, g


def _fits(gs: int, k: int, bk: int) -> bool:
    return gs % bk == 0 or bk % gs == 0 or gs == k


def _scale_after(gs: int, k: int, bk: int) -> bool:
    """One group covers every K block: scale the block's sum instead of each weight."""
    return gs % bk == 0 or gs == k


def _gemv(x, qweight, scales, zeros, bias, y, gs, *, bn, bk, split_k, warps=4):
    m, k = x.shape
    n = qweight.shape[1]
    g = scales.shape[0]
    n_tiles = triton.cdiv(n, bn)
    k_split = triton.cdiv(triton.cdiv(k, bk), split_k) * bk
    ws, cnt = workspace(x.device, m * n, m * n_tiles) if split_k > 1 else (y, y)
    launch(_w4a16_gemv_kernel, (m, n_tiles, split_k),
        x, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, y,
        ws, cnt, m, n, k, g, k_split, x.stride(0), y.stride(0), qweight.stride(0), scales.stride(0),
        GS=gs, HAS_ZP=zeros is not None, HAS_BIAS=bias is not None,
        BN=bn, BK=bk, SPLIT_K=split_k, SCALE_AFTER=_scale_after(gs, k, bk), num_warps=warps,
    )
    return y


def _mm(x, qweight, scales, zeros, bias, y, gs, *, bm, bn, bk, split_k, warps, stages):
    m, k = x.shape
    n = qweight.shape[1]
    g = scales.shape[0]
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    k_split = triton.cdiv(triton.cdiv(k, bk), split_k) * bk
    ws, cnt = workspace(x.device, m * n, tiles) if split_k > 1 else (y, y)
    launch(_w4a16_mm_kernel, (tiles, split_k),
        x, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, y,
        ws, cnt, m, n, k, g, k_split, x.stride(0), y.stride(0), qweight.stride(0), scales.stride(0),
        GS=gs, HAS_ZP=zeros is not None, HAS_BIAS=bias is not None,
        BM=bm, BN=bn, BK=bk, SPLIT_K=split_k, GROUP_M=8, SCALE_AFTER=_scale_after(gs, k, bk),
        DOT_F32=interpreting() and x.dtype == torch.bfloat16,
        num_warps=warps, num_stages=stages,
    )
    return y


def w4a16_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                     dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W [K, N] in `dtype` (Triton on GPU, the torch reference elsewhere)."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    if not use_triton(qweight):
        return dequantize_reference(qweight, scales, zeros, group_size).to(dtype)
    gs = k if group_size == -1 else group_size
    bk = 64
    w = torch.empty(k, n, dtype=dtype, device=qweight.device)
    launch(_w4_dequant_kernel, (triton.cdiv(k, bk), triton.cdiv(n, 128)),
        qweight, scales, zeros if zeros is not None else scales, w, n, k, scales.shape[0], qweight.stride(0),
        scales.stride(0),
        GS=gs, HAS_ZP=zeros is not None, BK=bk, BN=128, SCALE_AFTER=_scale_after(gs, k, bk),
    )
    return w


def _dequant_cublas(x, qweight, scales, zeros, bias, y, gs):
    w = w4a16_dequantize(qweight, scales, zeros, gs, x.dtype)
    torch.matmul(x, w, out=y)
    if bias is not None:
        y += bias.to(y.dtype)
    return y


def candidates(m: int, n: int, k: int, gs: int) -> list[Candidate]:
    """Implementations worth timing for an [m, k] x [k, n] W4A16 product; the first is the default."""
    from hubquant_kernels import w4a16_gemv, w4a16_gemv3, w4a16_mma, w4a16_mmv, w4a16_tc, w4a16_wgmma

    out = []
    n_blocks = lambda bk: -(-k // bk)
    if m <= 4:  # at M=1 gemv2 won the H100 shapes but 4096x28672 and 4096x1024 (first GEMV bn32/bn64 there)
        gemv_cfgs = ((64, 256, 4), (128, 128, 4), (32, 512, 4), (128, 256, 8), (64, 512, 8))
        if m == 1 and w4a16_gemv.enabled():
            gemv_cfgs = ((32, 512, 4), (64, 256, 4))
        for bn, bk, warps in gemv_cfgs:
            for split in (1, 2, 4, 8, 16):
                if split == 1 or (n_blocks(bk) >= 2 * split and -(-n // bn) * split <= 4096):
                    out.append(Candidate(name=f"gemv_bn{bn}_bk{bk}_s{split}_w{warps}",
                                         fn=lambda *a, bn=bn, bk=bk, s=split, w=warps:
                                         _gemv(*a, bn=bn, bk=bk, split_k=s, warps=w)))
    if m == 1 and w4a16_gemv.enabled():
        mm_cfgs = []
    elif m <= 16:
        mm_cfgs = [(16, 64, 128, s, 4, 3) for s in (1, 2, 4, 8)] + [(16, 128, 128, s, 4, 3) for s in (1, 2, 4)] + \
                  [(16, 64, 256, s, 4, 3) for s in (1, 2, 4)]
    elif m <= 64:
        mm_cfgs = [(bm, 64, 128, s, 4, 3) for bm in (32, 64) for s in (1, 2, 4)] + [(64, 128, 128, 1, 4, 3)]
    else:  # larger M: whole-tile tensor-core dots (w4a16_mma) instead of eight narrow ones
        mm_cfgs = []
    for bm, bn, bk, split, warps, stages in mm_cfgs:
        if split == 1 or n_blocks(bk) >= 2 * split:
            out.append(Candidate(
                name=f"mm_{bm}x{bn}x{bk}_s{split}_w{warps}",
                fn=lambda *a, bm=bm, bn=bn, bk=bk, s=split, w=warps, st=stages:
                    _mm(*a, bm=bm, bn=bn, bk=bk, split_k=s, warps=w, stages=st)))
    out += w4a16_gemv.candidates(m, n, k, gs)  # M=1: the only candidates
    out += w4a16_gemv3.candidates(m, n, k, gs)  # M=1 by default: rotated codes (BM rows per program in sweeps)
    # M = 2..32: tensor-core GEMV on the stored layout. Not at M=1 when the FMA GEMVs run: they were 5-30% faster
    # there on every measured shape (docs/kernels-h200.md runs K and L), yet close enough in the chooser's
    # cold-L2 timings that a decode process picked the MMA GEMV and ran 1.49x bf16 instead of 1.56x
    if m > 1 or not w4a16_gemv.enabled():
        out += w4a16_mmv.candidates(m, n, k, gs)
    if os.environ.get("HUBQUANT_W4_SWEEP") == "1":  # one wide GPU sweep (bench/kernels/h200.py --sweep)
        out += w4a16_tc.sweep_candidates(m, n, k, gs) if m <= 64 else []
        out += w4a16_mma.sweep_candidates(m, n, k, gs)
    else:
        if 2 <= m <= 16:  # tensor cores: won some M=16 shapes (docs/kernels.md); few configs, tuning is slow
            out += w4a16_tc.candidates(m, n, k, gs, configs=w4a16_tc.SMALL_M_CONFIGS)
        out += w4a16_mma.candidates(m, n, k, gs)
    out += w4a16_wgmma.candidates(m, n, k, gs)  # M > 32: weight as the register operand (swapped AB)
    if m > 16:
        out.append(Candidate(name="dequant+cublas", fn=_dequant_cublas, pure=False))
    return out


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 group_size: int, bias: torch.Tensor | None = None, *, impl: str | None = None) -> torch.Tensor:
    """y = x @ W (+ bias) for 4-bit grouped W in the kernel layout.

    Args:
        x: activations [..., K], bf16 or fp16.
        qweight: int32 [K/8, N] (see hubquant_kernels.pack).
        scales: [G, N] bf16/fp16/fp32, G = K / group_size.
        zeros: unsigned zero points [G, N] (any integer or float dtype), or None for symmetric (zero point 8).
        group_size: input rows per scale (power of two >= 16), or -1 for one group.
        bias: optional [N].
        impl: force one candidate by name (benchmarks); default: the fastest for this shape.

    Returns:
        y [..., N] in x's dtype.

    Raises:
        UsageError: shapes do not match or tensors are on different devices.
        UnsupportedError: wrong dtypes, or a group size the kernels do not handle.
    """
    k, n, gs, _ = _check(x, qweight, scales, zeros, group_size, bias)
    lead = x.shape[:-1]
    x2 = as_2d(x, k)
    if not use_triton(x2):
        return w4a16_reference(x2, qweight, scales, zeros, group_size, bias).reshape(*lead, n)
    y = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    _compute(x2, qweight, scales, zeros, gs, bias, y, impl)
    return y.reshape(*lead, n)


def _compute(x2, qweight, scales, zeros, gs, bias, y, impl=None) -> Candidate | None:
    """y = x2 @ W on the kernels (the chooser's pick, or `impl`); the candidate that ran (None for M=0)."""
    require_triton()
    m, k = x2.shape
    n = y.shape[1]
    if m == 0:
        return None
    args = (x2, qweight, scales, zeros, bias, y, gs)
    if impl is not None:
        cands = [c for c in candidates(m, n, k, gs) if c.name == impl]
        check(bool(cands), f"no W4A16 implementation named {impl!r} for this shape",
              hint="see hubquant_kernels.w4a16.candidates(m, n, k, group_size)")
        _run_into(cands[0], args, y)
        return cands[0]
    key = ("w4a16", m_bucket(m), n, k, gs, zeros is not None, x2.dtype, bias is not None)
    c = choose_lazy(key, lambda: candidates(m, n, k, gs), args, on_gpu=x2.is_cuda)
    _run_into(c, args, y)
    return c


def _run_into(c: Candidate, args: tuple, y: torch.Tensor) -> None:
    """Run candidate c; its result ends in y (callers and bound plans hold y, not the return value)."""
    out = c.fn(*args)
    if out is not y:
        y.copy_(out)


def bind(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
         bias: torch.Tensor | None = None) -> Bound:
    """`w4a16_matmul` for one layer's fixed tensors, as a callable ``op(x) -> y`` that replays a recorded launch
    plan per M once the shape is decided (hubquant_kernels.bound): the eager call costs the output allocation
    and the C launch. Off the GPU it computes what `w4a16_matmul` computes."""
    k, n, gs, _ = _check(qweight.new_empty(0, qweight.shape[0] * 8, dtype=torch.bfloat16), qweight, scales, zeros,
                         group_size, bias)

    def run(x2: torch.Tensor, y: torch.Tensor):
        check_dtype("x", x2, ACT_DTYPES)
        check_same_device(x=x2, qweight=qweight)
        if not use_triton(x2):
            y.copy_(w4a16_reference(x2, qweight, scales, zeros, group_size, bias))
            return None
        c = _compute(x2, qweight, scales, zeros, gs, bias, y)
        return [] if c is not None and c.pure else None

    return Bound(k, n, run, (qweight, scales, zeros, bias))
