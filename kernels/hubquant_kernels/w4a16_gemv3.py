"""W4A16 GEMV with rotated mantissa codes, per-row zero-point folding and deep load pipelines (small M).

Same kernel layout and split-K reduction as the other W4A16 kernels. Per packed word (8 K values of one output
column) the inner loop does 4 funnel shifts (rotates) and 8 three-input LOP3s, giving two nibbles per rotate
at the top of an fp32 mantissa: after ``rotl(w, 15 - 8i)`` nibble 2i sits on bits 15..18 and nibble 2i+1 on
bits 19..22, so ``(t & mask) | 0x3F800000`` is exactly ``1 + u/256`` (even j) or ``1 + u/16`` (odd j).
With ``x'_j = 256 x_j`` (even) or ``16 x_j`` (odd),

    sum_j x_j (u_j - z) = sum_j x'_j f_j - (sum_j x'_j + z sum_j x_j)

and the bracket depends on the row of x only (and on z), so each word's partial sum starts from it: 8 FMAs on
the codes and one FMA with the scale per word. That is 21 instructions per 8 weights against ~34 for gemv2.

The weights stream through Triton's software pipeline (``tl.range(..., num_stages=STAGES)``: cp.async into
shared memory, STAGES - 1 blocks in flight per program) or, with STAGES == 1, a register prefetch of the next
block. BM > 1 computes BM rows of x per program, so the weights are read and decoded once for all of them.
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

    # two nibbles per rotate: nibble 2i -> bits 15..18, 2i+1 -> bits 19..22 (rotl by 15, 7, 31, 23)
    _ROT_ASM = tl.constexpr("""
    {
    .reg .b32 t;
    shf.l.wrap.b32 t, $8, $8, 15;
    lop3.b32 $0, t, 0x78000, 0x43800000, 0xEA;
    lop3.b32 $1, t, 0x780000, 0x41800000, 0xEA;
    shf.l.wrap.b32 t, $8, $8, 7;
    lop3.b32 $2, t, 0x78000, 0x43800000, 0xEA;
    lop3.b32 $3, t, 0x780000, 0x41800000, 0xEA;
    shf.l.wrap.b32 t, $8, $8, 31;
    lop3.b32 $4, t, 0x78000, 0x43800000, 0xEA;
    lop3.b32 $5, t, 0x780000, 0x41800000, 0xEA;
    shf.l.wrap.b32 t, $8, $8, 23;
    lop3.b32 $6, t, 0x78000, 0x43800000, 0xEA;
    lop3.b32 $7, t, 0x780000, 0x41800000, 0xEA;
    }
    """)

    @triton.jit
    def _rot_codes_asm(pw):
        return tl.inline_asm_elementwise(_ROT_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [pw],
                                         dtype=(tl.float32,) * 8, is_pure=True, pack=1)

    @triton.jit
    def _rot_code(pw, j: tl.constexpr):
        """Nibble j as fp32 256 + u (j even) or 16 + u (j odd): what _rot_codes_asm gives, in plain Triton."""
        u = (pw >> (4 * j)) & 0xF
        if j % 2 == 0:
            return ((u << 15) | 0x43800000).to(tl.float32, bitcast=True)
        return ((u << 19) | 0x41800000).to(tl.float32, bitcast=True)

    @triton.jit
    def _codes(pw, USE_ASM: tl.constexpr):
        if USE_ASM:
            f0, f1, f2, f3, f4, f5, f6, f7 = _rot_codes_asm(pw)
        else:
            f0 = _rot_code(pw, 0)
            f1 = _rot_code(pw, 1)
            f2 = _rot_code(pw, 2)
            f3 = _rot_code(pw, 3)
            f4 = _rot_code(pw, 4)
            f5 = _rot_code(pw, 5)
            f6 = _rot_code(pw, 6)
            f7 = _rot_code(pw, 7)
        return f0, f1, f2, f3, f4, f5, f6, f7

    @triton.jit
    def _xload(x_ptrs, xmask, j: tl.constexpr, EVEN: tl.constexpr):
        """x values j of every packed row (any shape of pointers), fp32."""
        if EVEN:
            return tl.load(x_ptrs + j).to(tl.float32)
        return tl.load(x_ptrs + j, mask=xmask, other=0.0).to(tl.float32)

    @triton.jit
    def _xrows(x_ptrs, xmask, EVEN: tl.constexpr):
        """The 8 x values of every packed row, fp32, and the rows' code offsets 256 sum_even + 16 sum_odd and sums."""
        x0 = _xload(x_ptrs, xmask, 0, EVEN)
        x1 = _xload(x_ptrs, xmask, 1, EVEN)
        x2 = _xload(x_ptrs, xmask, 2, EVEN)
        x3 = _xload(x_ptrs, xmask, 3, EVEN)
        x4 = _xload(x_ptrs, xmask, 4, EVEN)
        x5 = _xload(x_ptrs, xmask, 5, EVEN)
        x6 = _xload(x_ptrs, xmask, 6, EVEN)
        x7 = _xload(x_ptrs, xmask, 7, EVEN)
        xe = (x0 + x2) + (x4 + x6)
        xo = (x1 + x3) + (x5 + x7)
        return x0, x1, x2, x3, x4, x5, x6, x7, xe * 256.0 + xo * 16.0, xe + xo

    @triton.jit
    def _params(s_ptr, z_ptr, k0, offs_r, rmask, offs_n, mask_n, stride_s,
                GS: tl.constexpr, HAS_ZP: tl.constexpr, SCALE_AFTER: tl.constexpr):
        """Scale and zero point: [1, BN] if one group covers the K block, else per packed row [R, BN]."""
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
        return s, z

    @triton.jit
    def _word_sums(pw, x0, x1, x2, x3, x4, x5, x6, x7, d, USE_ASM: tl.constexpr):
        """sum_j x_j (u_j - z) of every packed word of pw; x_j broadcastable to pw's shape, d = the offsets."""
        f0, f1, f2, f3, f4, f5, f6, f7 = _codes(pw, USE_ASM)
        part = f0 * x0 - d
        part += f1 * x1
        part += f2 * x2
        part += f3 * x3
        part += f4 * x4
        part += f5 * x5
        part += f6 * x6
        part += f7 * x7
        return part

    @triton.jit
    def _tile(qw_ptr, offs_r, rmask, offs_n, mask_n, stride_w, MASKED: tl.constexpr):
        ptrs = qw_ptr + offs_r[:, None] * stride_w + offs_n[None, :]
        if MASKED:
            return tl.load(ptrs, mask=rmask[:, None] & mask_n[None, :], other=0, eviction_policy="evict_first")
        return tl.load(ptrs, eviction_policy="evict_first")

    @triton.jit
    def _row_part(pw, x0, x1, x2, x3, x4, x5, x6, x7, cs, xs, s, z, acc, USE_ASM: tl.constexpr):
        """acc + s * (x @ W) of one [R, BN] block for one row of x (x_j, cs, xs: [R])."""
        d = cs[:, None] + z * xs[:, None]
        part = _word_sums(pw, x0[:, None], x1[:, None], x2[:, None], x3[:, None], x4[:, None], x5[:, None],
                          x6[:, None], x7[:, None], d, USE_ASM)
        return acc + part * s

    @triton.jit
    def _rows_block(pw, x_ptrs, xmask, s, z, acc, USE_ASM: tl.constexpr, EVEN: tl.constexpr):
        """The same for BM rows of x (x_ptrs [BM, R], acc [BM, R, BN]): the codes are decoded once."""
        x0, x1, x2, x3, x4, x5, x6, x7, cs, xs = _xrows(x_ptrs, xmask, EVEN)
        d = cs[:, :, None] + z[None, :, :] * xs[:, :, None]
        part = _word_sums(pw[None, :, :], x0[:, :, None], x1[:, :, None], x2[:, :, None], x3[:, :, None],
                          x4[:, :, None], x5[:, :, None], x6[:, :, None], x7[:, :, None], d, USE_ASM)
        return acc + part * s[None, :, :]

    @triton.jit
    def _w4a16_gemv3_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
        M, N, K, k_split, stride_xm, stride_ym, stride_w, stride_s,
        GS: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
        BN: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, NT: tl.constexpr, SPLIT_K: tl.constexpr,
        SCALE_AFTER: tl.constexpr, USE_ASM: tl.constexpr, EVEN: tl.constexpr, STAGES: tl.constexpr,
    ):
        # EVEN: N % (NT * BN) == 0, M % BM == 0 and every program's K range is whole blocks: no masks anywhere.
        # BM == 1: one row of x per program and NT [R, BN] tiles side by side (NT = 2: each x value feeds twice as
        # many columns); else BM rows of x, [BM, R, BN] partial sums.
        R: tl.constexpr = BK // 8
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_n = pid_n * (NT * BN) + tl.arange(0, BN)
        mask_n = offs_n < N
        offs_n2 = offs_n + BN
        mask_n2 = offs_n2 < N
        offs_m = pid_m * BM + tl.arange(0, BM)
        mask_m = offs_m < M
        k_lo = pid_k * k_split
        k_hi = tl.minimum(k_lo + k_split, K)
        ar = tl.arange(0, R)
        if BM == 1:
            acc = tl.zeros((R, BN), dtype=tl.float32)
            acc2 = tl.zeros((R, BN), dtype=tl.float32)
        else:
            acc = tl.zeros((BM, R, BN), dtype=tl.float32)
        if STAGES == 1:  # register prefetch: the first block is loaded before the loop
            pw_next = _tile(qw_ptr, k_lo // 8 + ar, k_lo // 8 + ar < k_hi // 8, offs_n, mask_n, stride_w, True)
            if NT == 2:
                pw2_next = _tile(qw_ptr, k_lo // 8 + ar, k_lo // 8 + ar < k_hi // 8, offs_n2, mask_n2, stride_w, True)
        for k0 in tl.range(k_lo, k_hi, BK, num_stages=STAGES):
            offs_r = k0 // 8 + ar
            rmask = offs_r < k_hi // 8
            if STAGES == 1:
                pw = pw_next
                pw_next = _tile(qw_ptr, offs_r + R, offs_r + R < k_hi // 8, offs_n, mask_n, stride_w, True)
                if NT == 2:
                    pw2 = pw2_next
                    pw2_next = _tile(qw_ptr, offs_r + R, offs_r + R < k_hi // 8, offs_n2, mask_n2, stride_w, True)
            else:
                pw = _tile(qw_ptr, offs_r, rmask, offs_n, mask_n, stride_w, not EVEN)
                if NT == 2:
                    pw2 = _tile(qw_ptr, offs_r, rmask, offs_n2, mask_n2, stride_w, not EVEN)
            s, z = _params(s_ptr, z_ptr, k0, offs_r, rmask, offs_n, mask_n, stride_s, GS, HAS_ZP, SCALE_AFTER)
            if BM == 1:
                x0, x1, x2, x3, x4, x5, x6, x7, cs, xs = _xrows(x_ptr + pid_m * stride_xm + offs_r * 8, rmask, EVEN)
                acc = _row_part(pw, x0, x1, x2, x3, x4, x5, x6, x7, cs, xs, s, z, acc, USE_ASM)
                if NT == 2:
                    s2, z2 = _params(s_ptr, z_ptr, k0, offs_r, rmask, offs_n2, mask_n2, stride_s, GS, HAS_ZP,
                                     SCALE_AFTER)
                    acc2 = _row_part(pw2, x0, x1, x2, x3, x4, x5, x6, x7, cs, xs, s2, z2, acc2, USE_ASM)
            else:
                acc = _rows_block(pw, x_ptr + offs_m[:, None] * stride_xm + offs_r[None, :] * 8,
                                  mask_m[:, None] & rmask[None, :], s, z, acc, USE_ASM, EVEN)
        tiles = tl.cdiv(N, BN) + 1  # counters per row of x (a last half-empty pair of tiles may use one more)
        if BM == 1:
            _finish(tl.sum(acc, axis=0), b_ptr, y_ptr + pid_m * stride_ym, ws_ptr + pid_m * N, offs_n, mask_n,
                    cnt_ptr, pid_m * tiles + pid_n * NT, SPLIT_K, HAS_BIAS)
            if NT == 2:
                _finish(tl.sum(acc2, axis=0), b_ptr, y_ptr + pid_m * stride_ym, ws_ptr + pid_m * N, offs_n2, mask_n2,
                        cnt_ptr, pid_m * tiles + pid_n * NT + 1, SPLIT_K, HAS_BIAS)
        else:
            out = tl.sum(acc, axis=1)
            bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :] if HAS_BIAS else 0.0
            _store_or_reduce(out, y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
                             ws_ptr + offs_m[:, None] * N + offs_n[None, :], mask_m[:, None] & mask_n[None, :],
                             cnt_ptr, pid_m * tiles + pid_n, bias, SPLIT_K, HAS_BIAS)

    @triton.jit
    def _finish(out, b_ptr, y_row, ws_row, offs_n, mask_n, cnt_ptr, tile, SPLIT_K: tl.constexpr,
                HAS_BIAS: tl.constexpr):
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
        _store_or_reduce(out, y_row + offs_n, ws_row + offs_n, mask_n, cnt_ptr, tile, bias, SPLIT_K, HAS_BIAS)


def gemv3(x, qweight, scales, zeros, bias, y, gs, *, bn, bk, split_k, warps=4, stages=3, bm=1, nt=1, asm=None):
    """y = x @ W (+ bias) with the rotated-code GEMV; x [M, K] contiguous rows, y [M, N] preallocated."""
    m, k = x.shape
    n = qweight.shape[1]
    nt = nt if bm == 1 else 1
    n_tiles = triton.cdiv(n, bn)
    m_tiles = triton.cdiv(m, bm)
    k_split = triton.cdiv(triton.cdiv(k, bk), split_k) * bk
    ws, cnt = workspace(x.device, m * n, m_tiles * (n_tiles + 1)) if split_k > 1 else (y, y)
    even = n % (bn * nt) == 0 and m % bm == 0 and k % bk == 0 and k_split * (split_k - 1) < k
    launch(_w4a16_gemv3_kernel, (m_tiles, triton.cdiv(n, bn * nt), split_k),
        x, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, y,
        ws, cnt, m, n, k, k_split, x.stride(0), y.stride(0), qweight.stride(0), scales.stride(0),
        GS=gs, HAS_ZP=zeros is not None, HAS_BIAS=bias is not None,
        BN=bn, BK=bk, BM=bm, NT=nt, SPLIT_K=split_k, SCALE_AFTER=gs % bk == 0 or gs == k,
        USE_ASM=not interpreting() if asm is None else asm, EVEN=even, STAGES=stages, num_warps=warps,
    )
    return y


# (BN, BK, warps, stages, NT) offered by default at M=1; stages 1 is the register prefetch, >= 2 Triton's cp.async
# pipeline (stages - 1 blocks in flight per program); NT = 2 tiles of BN columns side by side. The defaults are the
# shapes that won a cell of the H200 sweeps (bench/kernels/results/h200_sweep_gemv3.json, h200_sweep_mmv2.json);
# NT = 2 and deeper cp.async pipelines never did
M1_CONFIGS = ((64, 512, 8, 1, 1), (32, 512, 4, 1, 1), (64, 256, 4, 1, 1), (64, 128, 4, 1, 1), (256, 64, 4, 3, 1))
# (BN, BK, warps, stages) for M = 2..16 (BM = the M bucket, at most 8, and 4): none by default, since the H200 sweep
# (bench/kernels/results/h200_sweep_gemv3.json) measured them at 0.32-0.43x bf16 at M=8, far behind the tensor cores
ROWS_CONFIGS = ()
SPLITS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def sweep_configs(rows: bool) -> list[tuple[int, int, int, int, int]]:
    """The wide set one GPU sweep times (bench/kernels/sweep_gemv3.py): tiles of 2-16 KiB of packed weights."""
    if rows:
        return [(bn, bk, 4, st, 1) for bn, bk in ((32, 128), (64, 128), (32, 256), (64, 64), (128, 64))
                for st in (1, 3)]
    out = []
    for bn in (32, 64, 128, 256):
        for bk in (64, 128, 256, 512):
            for nt in (1, 2) if bn <= 128 else (1,):
                tile = nt * bn * bk // 2
                if 2048 <= tile <= 16384:
                    for warps in (4, 8) if tile >= 16384 else (4,):
                        out += [(bn, bk, warps, stages, nt) for stages in (1, 3, 5) if stages * tile <= 65536]
    return out


def enabled() -> bool:
    """HUBQUANT_GEMV3=0 leaves these candidates out (benchmarks compare with and without)."""
    return os.environ.get("HUBQUANT_GEMV3", "1") != "0"


def _splits(n: int, k: int, bn: int, bk: int, m_tiles: int, limit: int = 1056) -> list[int]:
    n_blocks, tiles = -(-k // bk), -(-n // bn) * m_tiles
    out = []
    for split in SPLITS:  # every program gets at least two blocks; not so many programs that the reduction weighs
        per = -(-n_blocks // split)
        if tiles * split < 132:  # fewer programs than an H100/H200 has SMs
            continue
        if split == 1 or (n_blocks >= 2 * split and tiles * split <= limit and per * (split - 1) < n_blocks):
            out.append(split)
    return out


def candidates(m: int, n: int, k: int, gs: int, *, configs=None) -> list[Candidate]:
    """gemv3 configurations worth timing for an [m, k] x [k, n] product (M <= 16)."""
    if m > 16 or not enabled():
        return []
    sweep = "1" in (os.environ.get("HUBQUANT_W4_SWEEP"), os.environ.get("HUBQUANT_W4_SWEEP_GEMV3"))
    if configs is None:
        configs = sweep_configs(m > 1) if sweep else (M1_CONFIGS if m == 1 else ROWS_CONFIGS)
    bucket = 1 if m <= 1 else 1 << (m - 1).bit_length()
    bms = (1,) if m == 1 else tuple(sorted({min(8, bucket), min(4, bucket)}, reverse=True))
    out = []
    for bm in bms:
        for bn, bk, warps, stages, nt in configs:
            nt = nt if bm == 1 else 1
            for split in _splits(n, k, bn * nt, bk, -(-m // bm)):
                out.append(Candidate(
                    name=f"gemv3_bn{bn}{'x2' if nt == 2 else ''}_bk{bk}_s{split}_w{warps}_st{stages}"
                         + (f"_m{bm}" if bm > 1 else ""),
                    fn=lambda *a, bn=bn, bk=bk, s=split, w=warps, st=stages, bm=bm, nt=nt:
                        gemv3(*a, bn=bn, bk=bk, split_k=s, warps=w, stages=st, bm=bm, nt=nt)))
    return out
