"""W4A16 on the tensor cores for small M (1..64): one dequantizing instruction per weight, MMA for the rest.

The FMA GEMVs (hubquant_kernels.w4a16, .w4a16_gemv) spend ~3.7 instructions per weight (shift, mask, FMA plus
activation loads and the block epilogue); at H100/H200 bandwidth that is most of the SM's issue rate, so they
stall on instructions before the weights stop streaming. Here the multiply-adds go to the tensor cores (M is
padded to 16 rows; the extra rows are free), and a weight costs about one integer instruction:

- each 4-bit code u becomes the 16-bit float ``B + u`` (B = 128 in bf16, 1024 in fp16) by or-ing it into the
  mantissa of B, exact; on the GPU one `prmt` + `lop3` pair turns two packed words into two such pairs
  (inline PTX, two weights per 32-bit lane), elsewhere the same bits are built with plain shifts;
- the zero point and scale leave the inner loop when one group covers the K block:
  ``sum_k x_k (u_k - z) s = s * (sum_k x_k (B + u_k) - (B + z) * sum_k x_k)``;
  the dot runs on exact small integers and the correction costs one FMA per output per block. With smaller
  groups each code is dequantized to ``(u - z) * s`` before the dot (slower, still exact in fp32 then rounded).
- the packed rows of a K block give 8 dots of [BM, BK/8] x [BK/8, BN], one per nibble j (x columns 8r + j), so
  no register shuffles are needed; split-K programs reduce through the shared workspace in one launch.

SWAP computes y^T = W^T x^T instead (the weight tile is the MMA's A operand, M's 16 rows its N side), which lets
Triton use Hopper's wgmma for BN >= 64.
"""
from __future__ import annotations

import torch

from hubquant_kernels._common import Candidate, interpreting, launch, workspace

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    from hubquant_kernels.splitk import store_or_reduce as _store_or_reduce

    # prmt selectors: byte i of the first word -> byte 0, byte i of the second word -> byte 2
    _ASM_BODY = """
    {
    .reg .b32 t;
    prmt.b32 t, $8, $9, 0x4400;
    lop3.b32 $0, t, 0x000F000F, MAGIC, 0xEA;
    shr.u32 t, t, 4;
    lop3.b32 $1, t, 0x000F000F, MAGIC, 0xEA;
    prmt.b32 t, $8, $9, 0x5511;
    lop3.b32 $2, t, 0x000F000F, MAGIC, 0xEA;
    shr.u32 t, t, 4;
    lop3.b32 $3, t, 0x000F000F, MAGIC, 0xEA;
    prmt.b32 t, $8, $9, 0x6622;
    lop3.b32 $4, t, 0x000F000F, MAGIC, 0xEA;
    shr.u32 t, t, 4;
    lop3.b32 $5, t, 0x000F000F, MAGIC, 0xEA;
    prmt.b32 t, $8, $9, 0x7733;
    lop3.b32 $6, t, 0x000F000F, MAGIC, 0xEA;
    shr.u32 t, t, 4;
    lop3.b32 $7, t, 0x000F000F, MAGIC, 0xEA;
    }
    """
    _ASM_BF16 = tl.constexpr(_ASM_BODY.replace("MAGIC", "0x43004300"))
    _ASM_FP16 = tl.constexpr(_ASM_BODY.replace("MAGIC", "0x64006400"))

    @triton.jit
    def _codes16_asm(pw, FP16: tl.constexpr):
        """The 8 nibbles of every word as 16-bit floats B + u (two words per PTX call, 1 instruction a weight)."""
        if FP16:
            return tl.inline_asm_elementwise(_ASM_FP16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [pw],
                                             dtype=(tl.float16,) * 8, is_pure=True, pack=2)
        else:
            return tl.inline_asm_elementwise(_ASM_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [pw],
                                             dtype=(tl.bfloat16,) * 8, is_pure=True, pack=2)

    @triton.jit
    def _code16(pw, j: tl.constexpr, FP16: tl.constexpr):
        """Nibble j of every word as the 16-bit float B + u (plain Triton: runs under the interpreter)."""
        if FP16:
            v = ((pw >> (4 * j)) & 0xF) | 0x6400
            return v.to(tl.int16).to(tl.float16, bitcast=True)
        else:
            v = ((pw >> (4 * j)) & 0xF) | 0x4300
            return v.to(tl.int16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _tc_step(blk, xs, x_ptr, offs_m, mask_m, stride_xm, offs_r, rmask, j: tl.constexpr, w, s, zc,
                 SCALE_AFTER: tl.constexpr, SWAP: tl.constexpr, DOT_F32: tl.constexpr):
        """blk += x[:, 8r + j] @ w_j (w_j: [R, BN] codes B + u), and the block's activation sums."""
        xj = tl.load(x_ptr + offs_m[:, None] * stride_xm + (offs_r * 8 + j)[None, :],
                     mask=mask_m[:, None] & rmask[None, :], other=0.0)
        if SCALE_AFTER:
            xs += tl.sum(xj.to(tl.float32), axis=1)
        else:  # groups smaller than the block: dequantize each weight
            w = ((w.to(tl.float32) - zc) * s).to(xj.dtype)
        if DOT_F32:  # the CPU interpreter mis-multiplies 16-bit dots: same values, fp32 operands
            xj = xj.to(tl.float32)
            w = w.to(tl.float32)
        if SWAP:
            blk = tl.dot(tl.trans(w), tl.trans(xj), blk)
        else:
            blk = tl.dot(xj, w, blk)
        return blk, xs

    @triton.jit
    def _w4a16_tc_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
        M, N, K, k_split, stride_xm, stride_ym, stride_w, stride_s,
        GS: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
        SCALE_AFTER: tl.constexpr, SWAP: tl.constexpr, USE_ASM: tl.constexpr, FP16: tl.constexpr,
        DOT_F32: tl.constexpr, PREFETCH: tl.constexpr,
    ):
        R: tl.constexpr = BK // 8
        BIAS16: tl.constexpr = 1024.0 if FP16 else 128.0
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        mask_m = offs_m < M
        mask_n = offs_n < N
        k_lo = pid_k * k_split
        k_hi = tl.minimum(k_lo + k_split, K)
        if SWAP:
            acc = tl.zeros((BN, BM), dtype=tl.float32)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        offs_r = k_lo // 8 + tl.arange(0, R)
        if PREFETCH:  # the next block's packed words are in flight while this block is dequantized and multiplied
            rmask = offs_r < k_hi // 8
            pw_next = tl.load(qw_ptr + offs_r[:, None] * stride_w + offs_n[None, :],
                              mask=rmask[:, None] & mask_n[None, :], other=0, eviction_policy="evict_first")
        for k0 in range(k_lo, k_hi, BK):
            rmask = offs_r < k_hi // 8
            if PREFETCH:
                pw = pw_next
                nxt = offs_r + R
                pw_next = tl.load(qw_ptr + nxt[:, None] * stride_w + offs_n[None, :],
                                  mask=(nxt < k_hi // 8)[:, None] & mask_n[None, :], other=0,
                                  eviction_policy="evict_first")
            else:
                pw = tl.load(qw_ptr + offs_r[:, None] * stride_w + offs_n[None, :],
                             mask=rmask[:, None] & mask_n[None, :], other=0, eviction_policy="evict_first")
            if SCALE_AFTER:  # one group covers the block: [BN] scale and B + zero point
                g = k0 // GS
                s = tl.load(s_ptr + g * stride_s + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                if HAS_ZP:
                    zc = tl.load(z_ptr + g * stride_s + offs_n, mask=mask_n, other=0).to(tl.float32) + BIAS16
                else:
                    zc = tl.full((BN,), 8.0 + BIAS16, tl.float32)
            else:  # per packed row [R, BN]
                g2 = ((offs_r * 8) // GS)[:, None] * stride_s + offs_n[None, :]
                m2 = rmask[:, None] & mask_n[None, :]
                s = tl.load(s_ptr + g2, mask=m2, other=0.0).to(tl.float32)
                if HAS_ZP:
                    zc = tl.load(z_ptr + g2, mask=m2, other=0).to(tl.float32) + BIAS16
                else:
                    zc = tl.full((R, BN), 8.0 + BIAS16, tl.float32)
            if SWAP:
                blk = tl.zeros((BN, BM), dtype=tl.float32)
            else:
                blk = tl.zeros((BM, BN), dtype=tl.float32)
            xs = tl.zeros((BM,), dtype=tl.float32)
            if USE_ASM:
                c0, c1, c2, c3, c4, c5, c6, c7 = _codes16_asm(pw, FP16)
            else:
                c0 = _code16(pw, 0, FP16)
                c1 = _code16(pw, 1, FP16)
                c2 = _code16(pw, 2, FP16)
                c3 = _code16(pw, 3, FP16)
                c4 = _code16(pw, 4, FP16)
                c5 = _code16(pw, 5, FP16)
                c6 = _code16(pw, 6, FP16)
                c7 = _code16(pw, 7, FP16)
            blk, xs = _tc_step(blk, xs, x_ptr, offs_m, mask_m, stride_xm, offs_r, rmask, 0, c0, s, zc, SCALE_AFTER, SWAP, DOT_F32)
            blk, xs = _tc_step(blk, xs, x_ptr, offs_m, mask_m, stride_xm, offs_r, rmask, 1, c1, s, zc, SCALE_AFTER, SWAP, DOT_F32)
            blk, xs = _tc_step(blk, xs, x_ptr, offs_m, mask_m, stride_xm, offs_r, rmask, 2, c2, s, zc, SCALE_AFTER, SWAP, DOT_F32)
            blk, xs = _tc_step(blk, xs, x_ptr, offs_m, mask_m, stride_xm, offs_r, rmask, 3, c3, s, zc, SCALE_AFTER, SWAP, DOT_F32)
            blk, xs = _tc_step(blk, xs, x_ptr, offs_m, mask_m, stride_xm, offs_r, rmask, 4, c4, s, zc, SCALE_AFTER, SWAP, DOT_F32)
            blk, xs = _tc_step(blk, xs, x_ptr, offs_m, mask_m, stride_xm, offs_r, rmask, 5, c5, s, zc, SCALE_AFTER, SWAP, DOT_F32)
            blk, xs = _tc_step(blk, xs, x_ptr, offs_m, mask_m, stride_xm, offs_r, rmask, 6, c6, s, zc, SCALE_AFTER, SWAP, DOT_F32)
            blk, xs = _tc_step(blk, xs, x_ptr, offs_m, mask_m, stride_xm, offs_r, rmask, 7, c7, s, zc, SCALE_AFTER, SWAP, DOT_F32)
            if SCALE_AFTER:
                if SWAP:
                    acc += (blk - zc[:, None] * xs[None, :]) * s[:, None]
                else:
                    acc += (blk - xs[:, None] * zc[None, :]) * s[None, :]
            else:
                acc += blk
            offs_r += R
        if SWAP:
            mask = mask_n[:, None] & mask_m[None, :]
            y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
            ws_ptrs = ws_ptr + offs_m[None, :] * N + offs_n[:, None]
            bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None] if HAS_BIAS else 0.0
        else:
            mask = mask_m[:, None] & mask_n[None, :]
            y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
            ws_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
            bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :] if HAS_BIAS else 0.0
        _store_or_reduce(acc, y_ptrs, ws_ptrs, mask, cnt_ptr, pid_m * tl.num_programs(0) + pid_n, bias,
                         SPLIT_K, HAS_BIAS)


def use_asm() -> bool:
    """The PTX dequantization runs on NVIDIA GPUs only (not under the CPU interpreter)."""
    return not interpreting()


def tc(x, qweight, scales, zeros, bias, y, gs, *, bm=16, bn=64, bk=128, split_k=1, warps=4, stages=2,
       swap=False, asm=None, prefetch=False):
    """y = x @ W (+ bias) on the tensor cores; x [M, K] contiguous rows, y [M, N] preallocated."""
    m, k = x.shape
    n = qweight.shape[1]
    asm = use_asm() if asm is None else asm
    n_tiles, m_tiles = triton.cdiv(n, bn), triton.cdiv(m, bm)
    k_split = triton.cdiv(triton.cdiv(k, bk), split_k) * bk
    ws, cnt = workspace(x.device, m * n, m_tiles * n_tiles) if split_k > 1 else (y, y)
    launch(_w4a16_tc_kernel, (n_tiles, m_tiles, split_k),
        x, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, y,
        ws, cnt, m, n, k, k_split, x.stride(0), y.stride(0), qweight.stride(0), scales.stride(0),
        GS=gs, HAS_ZP=zeros is not None, HAS_BIAS=bias is not None,
        BM=bm, BN=bn, BK=bk, SPLIT_K=split_k, SCALE_AFTER=gs % bk == 0 or gs == k, SWAP=swap, USE_ASM=asm,
        FP16=x.dtype == torch.float16, DOT_F32=interpreting(), PREFETCH=prefetch, num_warps=warps,
        num_stages=stages,
    )
    return y


# (BN, BK, warps, swap): first guesses for the sweep on the GPU (bench/kernels/sweep_w4.py). The SASS of the
# K loop (bench/kernels/sass_report.py) costs ~7 instructions a weight at BN=64 and ~3.8 at BN=256 (fixed
# per-block work: activation loads, sums, correction), against ~11 for the FMA GEMV gemv2.
CONFIGS = ((64, 128, 4, False), (128, 128, 4, False), (256, 128, 4, False), (256, 128, 8, False),
           (256, 256, 8, False), (64, 128, 4, True), (128, 128, 4, True), (256, 128, 4, True), (256, 256, 8, True))
SPLITS = (1, 2, 4, 8, 16, 32)
# offered by the chooser for M = 2..16: the H200 sweep's winner at M=16 on 8192x8192 and 4096x4096 (128x256, 8 warps:
# bench/kernels/results/h200_sweepH.json) and the H100 sweep's (h100_sweep_w4_run1.json); the swapped variant and the
# prefetching one ("_p") never won there and are left to sweeps
SMALL_M_CONFIGS = ((128, 256, 8, False), (128, 128, 4, False), (256, 128, 8, False), (64, 128, 4, False))


def candidates(m: int, n: int, k: int, gs: int, configs=CONFIGS, splits=SPLITS,
               prefetch: tuple[bool, ...] = (False,)) -> list[Candidate]:
    """Tensor-core configurations worth timing for an [m, k] x [k, n] product with m <= 64 (``_p``: the packed
    words of the next K block are loaded while this one is computed)."""
    if m > 64:
        return []
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    out = []
    for bn, bk, warps, swap in configs:
        if bk > k or (gs != k and gs % bk and bk % gs):
            continue
        n_blocks, tiles = -(-k // bk), -(-n // bn)
        for split in splits:  # not so many programs that the reduction dominates (narrow N needs big splits)
            if split == 1 or (n_blocks >= 2 * split and tiles * split <= 2112):
                for pf in prefetch:
                    out.append(Candidate(
                        name=f"tc{'T' if swap else ''}_{bm}x{bn}x{bk}_s{split}_w{warps}" + ("_p" if pf else ""),
                        fn=lambda *a, bn=bn, bk=bk, s=split, w=warps, sw=swap, pf=pf:
                            tc(*a, bm=bm, bn=bn, bk=bk, split_k=s, warps=w, swap=sw, prefetch=pf)))
    return out


def filling_splits(m: int, n: int, k: int, bm: int, bn: int, bk: int, sms: int = 132) -> tuple[int, ...]:
    """Split-K counts whose grid gives every SM at least one and at most ~8 programs (whole waves preferred)."""
    tiles = -(-m // bm) * -(-n // bn)
    n_blocks = -(-k // bk)
    out = tuple(s for s in (1, 2, 3, 4, 6, 8, 12, 16) if (s == 1 or n_blocks >= 2 * s) and sms <= tiles * s <= 8 * sms)
    return out or (1,)


# (BN, BK, warps, swap) of the wide sweep (HUBQUANT_W4_SWEEP=1, bench/kernels/h200.py)
SWEEP_CONFIGS = ((64, 128, 4, False), (128, 128, 4, False), (256, 128, 8, False), (128, 256, 8, False),
                 (128, 128, 4, True), (256, 128, 4, True))


def sweep_candidates(m: int, n: int, k: int, gs: int) -> list[Candidate]:
    """Every SWEEP_CONFIGS configuration at the split counts that fill the GPU, with and without prefetch."""
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    out = []
    for cfg in SWEEP_CONFIGS:
        out += candidates(m, n, k, gs, configs=(cfg,), splits=filling_splits(m, n, k, bm, cfg[0], cfg[1]),
                          prefetch=(False, True))
    return out
