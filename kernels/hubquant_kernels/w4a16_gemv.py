"""A leaner W4A16 GEMV (small M): 3 instructions per weight instead of ~5.

The first GEMV (hubquant_kernels.w4a16) turns every nibble into ``fp32(2^23 + u) - (2^23 + z)`` and multiplies
it by x: shift, mask, or, subtract, FMA. Here the nibble is moved to the top of an fp32 mantissa, so that one
shift and one mask|or give ``f = 1 + u/16`` exactly, and the zero point leaves the inner loop:

    sum_k x_k (u_k - z) = 16 * sum_k x_k f_k - (16 + z) * sum_k x_k

(per row of 8 K values, which always lie in one group). The inner loop is then shift, mask|or, FMA; the
correction costs one FMA per packed word. Same kernel layout and split-K reduction as the first GEMV.
"""
from __future__ import annotations

import os

from hubquant_kernels._common import Candidate, interpreting, launch, workspace

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    from hubquant_kernels.splitk import store_or_reduce as _store_or_reduce

    @triton.jit
    def _mantissa_code(pw, j: tl.constexpr):
        """Nibble j of every word as fp32 1 + u/16 (exact): the nibble lands on mantissa bits 19..22."""
        if j <= 4:
            t = pw << (19 - 4 * j)
        else:
            t = pw >> (4 * j - 19)
        return ((t & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)

    # the same codes in PTX: one shift and one 3-input lop3 per nibble (Triton's and|or becomes two LOP3s, since
    # a LOP3 takes one immediate; here ptxas keeps 0x3F800000 in a register): 2 instructions a weight, not 3
    _MANTISSA_ASM = tl.constexpr("""
    {
    .reg .b32 t;
    shl.b32 t, $8, 19;
    lop3.b32 $0, t, 0x780000, 0x3F800000, 0xEA;
    shl.b32 t, $8, 15;
    lop3.b32 $1, t, 0x780000, 0x3F800000, 0xEA;
    shl.b32 t, $8, 11;
    lop3.b32 $2, t, 0x780000, 0x3F800000, 0xEA;
    shl.b32 t, $8, 7;
    lop3.b32 $3, t, 0x780000, 0x3F800000, 0xEA;
    shl.b32 t, $8, 3;
    lop3.b32 $4, t, 0x780000, 0x3F800000, 0xEA;
    shr.u32 t, $8, 1;
    lop3.b32 $5, t, 0x780000, 0x3F800000, 0xEA;
    shr.u32 t, $8, 5;
    lop3.b32 $6, t, 0x780000, 0x3F800000, 0xEA;
    shr.u32 t, $8, 9;
    lop3.b32 $7, t, 0x780000, 0x3F800000, 0xEA;
    }
    """)

    @triton.jit
    def _mantissa_codes_asm(pw):
        """All 8 nibbles of every word as fp32 1 + u/16 (what _mantissa_code gives), on NVIDIA GPUs."""
        return tl.inline_asm_elementwise(_MANTISSA_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [pw],
                                         dtype=(tl.float32,) * 8, is_pure=True, pack=1)

    @triton.jit
    def _fma_codes(part, xs, x_row, offs_r, rmask, j: tl.constexpr, f, EVEN: tl.constexpr):
        if EVEN:
            xj = tl.load(x_row + offs_r * 8 + j).to(tl.float32)
        else:
            xj = tl.load(x_row + offs_r * 8 + j, mask=rmask, other=0.0).to(tl.float32)
        return part + xj[:, None] * f, xs + xj

    @triton.jit
    def _decode_codes_kernel(pw_ptr, out_ptr, n: tl.constexpr):
        """out[j, i] = _mantissa_code(pw[i], j) (for tests)."""
        offs = tl.arange(0, n)
        pw = tl.load(pw_ptr + offs)
        for j in tl.static_range(8):
            tl.store(out_ptr + j * n + offs, _mantissa_code(pw, j))

    @triton.jit
    def _row_params(s_ptr, z_ptr, k0, offs_r, rmask, offs_n, mask_n, stride_s,
                    GS: tl.constexpr, HAS_ZP: tl.constexpr, SCALE_AFTER: tl.constexpr):
        """Scale and 16 + zero point, [1, BN] if one group covers the K block, else per packed row [R, BN]."""
        if SCALE_AFTER:
            g = k0 // GS
            s = tl.load(s_ptr + g * stride_s + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            if HAS_ZP:
                c = tl.load(z_ptr + g * stride_s + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :] + 16.0
            else:
                c = tl.full((1, offs_n.shape[0]), 24.0, tl.float32)
        else:
            g = (offs_r * 8) // GS
            m2 = rmask[:, None] & mask_n[None, :]
            s = tl.load(s_ptr + g[:, None] * stride_s + offs_n[None, :], mask=m2, other=0.0).to(tl.float32)
            if HAS_ZP:
                c = tl.load(z_ptr + g[:, None] * stride_s + offs_n[None, :], mask=m2, other=0).to(tl.float32) + 16.0
            else:
                c = tl.full(s.shape, 24.0, tl.float32)
        return s, c

    @triton.jit
    def _w4a16_gemv2_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
        M, N, K, k_split, stride_xm, stride_ym, stride_w, stride_s,
        GS: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
        BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, SCALE_AFTER: tl.constexpr,
        USE_ASM: tl.constexpr, EVEN: tl.constexpr, DEPTH: tl.constexpr,
    ):
        # EVEN: N % BN == 0 and every program's K range is whole blocks: no masks (and no masked-load zeroing)
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
        offs_r = k_lo // 8 + tl.arange(0, R)
        rmask = offs_r < k_hi // 8
        if EVEN:
            pw = tl.load(qw_ptr + offs_r[:, None] * stride_w + offs_n[None, :], eviction_policy="evict_first")
            if DEPTH == 2:  # two blocks in flight: the next one is loaded before the loop
                r1 = offs_r + tl.where(k_lo + BK < k_hi, R, 0)
                pw1 = tl.load(qw_ptr + r1[:, None] * stride_w + offs_n[None, :], eviction_policy="evict_first")
        else:
            pw = tl.load(qw_ptr + offs_r[:, None] * stride_w + offs_n[None, :], mask=rmask[:, None] & mask_n[None, :],
                         other=0, eviction_policy="evict_first")
        for k0 in range(k_lo, k_hi, BK):
            if EVEN:  # prefetch DEPTH blocks ahead (past the end, re-read the current block: in bounds, cached)
                nmask = rmask
                if DEPTH == 2:
                    r2 = offs_r + tl.where(k0 + 2 * BK < k_hi, 2 * R, 0)
                    pw2 = tl.load(qw_ptr + r2[:, None] * stride_w + offs_n[None, :], eviction_policy="evict_first")
                    nxt_r = offs_r + R
                else:
                    nxt_r = offs_r + tl.where(k0 + BK < k_hi, R, 0)
                    pw_next = tl.load(qw_ptr + nxt_r[:, None] * stride_w + offs_n[None, :],
                                      eviction_policy="evict_first")
            else:
                nxt_r = offs_r + R  # prefetch the next block while this one is computed
                nmask = nxt_r < k_hi // 8
                pw_next = tl.load(qw_ptr + nxt_r[:, None] * stride_w + offs_n[None, :],
                                  mask=nmask[:, None] & mask_n[None, :], other=0, eviction_policy="evict_first")
            s, c = _row_params(s_ptr, z_ptr, k0, offs_r, rmask, offs_n, mask_n, stride_s, GS, HAS_ZP, SCALE_AFTER)
            part = tl.zeros((R, BN), dtype=tl.float32)
            xs = tl.zeros((R,), dtype=tl.float32)
            if USE_ASM:
                f0, f1, f2, f3, f4, f5, f6, f7 = _mantissa_codes_asm(pw)
                part, xs = _fma_codes(part, xs, x_row, offs_r, rmask, 0, f0, EVEN)
                part, xs = _fma_codes(part, xs, x_row, offs_r, rmask, 1, f1, EVEN)
                part, xs = _fma_codes(part, xs, x_row, offs_r, rmask, 2, f2, EVEN)
                part, xs = _fma_codes(part, xs, x_row, offs_r, rmask, 3, f3, EVEN)
                part, xs = _fma_codes(part, xs, x_row, offs_r, rmask, 4, f4, EVEN)
                part, xs = _fma_codes(part, xs, x_row, offs_r, rmask, 5, f5, EVEN)
                part, xs = _fma_codes(part, xs, x_row, offs_r, rmask, 6, f6, EVEN)
                part, xs = _fma_codes(part, xs, x_row, offs_r, rmask, 7, f7, EVEN)
            else:
                for j in tl.static_range(8):
                    part, xs = _fma_codes(part, xs, x_row, offs_r, rmask, j, _mantissa_code(pw, j), EVEN)
            acc += (part * 16.0 - c * xs[:, None]) * s
            if EVEN and DEPTH == 2:
                pw, pw1 = pw1, pw2
                offs_r = nxt_r
            else:
                pw, offs_r, rmask = pw_next, nxt_r, nmask
        out = tl.sum(acc, axis=0)
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
        _store_or_reduce(out, y_ptr + pid_m * stride_ym + offs_n, ws_ptr + pid_m * N + offs_n, mask_n,
                         cnt_ptr, pid_m * tl.num_programs(1) + pid_n, bias, SPLIT_K, HAS_BIAS)


def gemv2(x, qweight, scales, zeros, bias, y, gs, *, bn, bk, split_k, warps=4, asm=None, depth=1):
    """y = x @ W (+ bias) with the mantissa-code GEMV; x [M, K] contiguous rows, y [M, N] preallocated."""
    m, k = x.shape
    n = qweight.shape[1]
    n_tiles = triton.cdiv(n, bn)
    k_split = triton.cdiv(triton.cdiv(k, bk), split_k) * bk
    ws, cnt = workspace(x.device, m * n, m * n_tiles) if split_k > 1 else (y, y)
    # mask-free when N and K divide into whole tiles and blocks (a shorter last K range is still whole blocks;
    # candidates() never offers a split that leaves a program without a block)
    even = n % bn == 0 and k % bk == 0 and k_split * (split_k - 1) < k
    launch(_w4a16_gemv2_kernel, (m, n_tiles, split_k),
        x, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, y,
        ws, cnt, m, n, k, k_split, x.stride(0), y.stride(0), qweight.stride(0), scales.stride(0),
        GS=gs, HAS_ZP=zeros is not None, HAS_BIAS=bias is not None,
        BN=bn, BK=bk, SPLIT_K=split_k, SCALE_AFTER=gs % bk == 0 or gs == k,
        USE_ASM=not interpreting() if asm is None else asm, EVEN=even, DEPTH=depth if even else 1, num_warps=warps,
    )
    return y


# (BN, BK, warps). Run C (H200) tried BN=256 too (BK 64/128): always slower; BN=64, BK=256 won on the large shapes;
# BN=32 won 4096x4096 in the H200 sweep (bench/kernels/results/h200_sweepH.json: 1.62x bf16 against 1.43x)
CONFIGS = ((64, 256, 4), (128, 128, 4), (128, 256, 8), (64, 128, 4), (32, 256, 4), (32, 512, 4))
# 3, 6 and 12 besides the powers of two: the grid (N tiles x split) can then fill the 132 SMs' resident slots in
# whole waves more often (e.g. 4096x4096 at BN=64: 64 tiles x 6 = 384 programs instead of 256 or 512)
SPLITS = (1, 2, 3, 4, 6, 8, 12, 16)
SWEEP_CONFIGS = ((64, 512, 8), (64, 256, 2))


def enabled() -> bool:
    """HUBQUANT_GEMV2=0 leaves these candidates out (benchmarks compare with and without)."""
    return os.environ.get("HUBQUANT_GEMV2", "1") != "0"


def candidates(m: int, n: int, k: int, gs: int) -> list[Candidate]:
    """gemv2 configurations worth timing for an [m, k] x [k, n] product.

    Offered at M=1 only: it beat the first GEMV at M=1 on every Llama shape measured on an H200 and (with the
    PTX dequantization) on an H100, and lost at M=2..8 (it re-reads the weights once per row); docs/kernels.md.
    """
    if m > 1 or not enabled():
        return []
    out = []
    sweep = os.environ.get("HUBQUANT_W4_SWEEP") == "1"  # one wide GPU sweep: narrower and deeper tiles too
    for bn, bk, warps in CONFIGS + (SWEEP_CONFIGS if sweep else ()):
        n_blocks, tiles = -(-k // bk), -(-n // bn)
        for split in SPLITS:  # not so many programs that the reduction dominates (narrow N needs big splits)
            per = -(-n_blocks // split)  # blocks per program; every program must get at least one
            if split == 1 or (n_blocks >= 2 * split and tiles * split <= 2112 and per * (split - 1) < n_blocks):
                for depth in (1, 2) if n_blocks >= 3 * split else (1,):  # depth 2: two blocks in flight
                    out.append(Candidate(name=f"gemv2_bn{bn}_bk{bk}_s{split}_w{warps}" + ("_d2" if depth == 2 else ""),
                                         fn=lambda *a, bn=bn, bk=bk, s=split, w=warps, d=depth:
                                         gemv2(*a, bn=bn, bk=bk, split_k=s, warps=w, depth=d)))
    return out
