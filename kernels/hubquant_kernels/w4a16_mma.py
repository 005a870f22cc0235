"""W4A16 for larger M: whole [BK, BN] weight tiles dequantized in registers and fed to one tensor-core dot.

The other tensor-core path (hubquant_kernels.w4a16_tc) issues eight narrow dots per K block (one per nibble) so
that no register shuffle is needed; that suits M <= 16 but starves Hopper's wgmma, which wants K = 64+ per
instruction group and a [BK, BN] operand in shared memory. Here each packed word is loaded once per input it
holds (``qweight[k // 8, n]``: eight loads of the same line, served by L1, the HBM traffic is unchanged), shifted
by its nibble, turned into ``(2^23 + u) - (2^23 + z)`` by an integer or (exact) and one subtraction, scaled, and
rounded to the activations' dtype; ``tl.dot`` then runs one [BM, BK] x [BK, BN] product per block (wgmma on
Hopper, with Triton's software pipelining of the loads). The dequantization costs ~5 instructions a weight per
program, amortized over BM rows: small next to the MMA work for BM >= 64.

This replaces dequantize-to-bf16 + cuBLAS, which writes and re-reads a bf16 copy of the weight every call.
Tiles are walked in groups of GROUP_M rows of tiles so that a weight tile is reused from L2 by neighbouring M
tiles. Optional split-K (small M) reduces through the shared workspace in the same launch.
"""
from __future__ import annotations

from hubquant_kernels._common import Candidate, interpreting, launch, workspace

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    from hubquant_kernels.splitk import store_or_reduce as _store_or_reduce

    @triton.jit
    def _params(s_ptr, z_ptr, k0, rows_k, m2, offs_n, mask_n, stride_s, GS: tl.constexpr, HAS_ZP: tl.constexpr,
                ONE_GROUP: tl.constexpr, ROWS: tl.constexpr, BN: tl.constexpr):
        """Scale and 2^23 + zero point: [1, BN] when one group covers the block, else per row (input rows_k)."""
        if ONE_GROUP:
            g = k0 // GS
            s = tl.load(s_ptr + g * stride_s + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            if HAS_ZP:
                z = tl.load(z_ptr + g * stride_s + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
            else:
                z = tl.full((1, BN), 8.0, tl.float32)
        else:
            g2 = (rows_k // GS)[:, None] * stride_s + offs_n[None, :]
            s = tl.load(s_ptr + g2, mask=m2, other=0.0).to(tl.float32)
            if HAS_ZP:
                z = tl.load(z_ptr + g2, mask=m2, other=0).to(tl.float32)
            else:
                z = tl.full((ROWS, BN), 8.0, tl.float32)
        return s, z + 8388608.0

    @triton.jit
    def _dq(pw, j: tl.constexpr, zc, s, dtype: tl.constexpr):
        """Nibble j of every word, dequantized: ((2^23 + u) - (2^23 + z)) * s, rounded to dtype."""
        f = (((pw >> (4 * j)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
        return ((f - zc) * s).to(dtype)

    @triton.jit
    def _interleave8(w0, w1, w2, w3, w4, w5, w6, w7, BK: tl.constexpr, BN: tl.constexpr):
        """[R, BN] tiles of nibbles 0..7 -> [8R, BN] with row 8r + j = w_j[r] (joins, one permute, one reshape)."""
        c = tl.join(tl.join(tl.join(w0, w1), tl.join(w2, w3)), tl.join(tl.join(w4, w5), tl.join(w6, w7)))
        return tl.reshape(tl.permute(c, (0, 4, 3, 2, 1)), (BK, BN))

    @triton.jit
    def _w4a16_mma_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
        M, N, K, k_split, stride_xm, stride_ym, stride_w, stride_s,
        GS: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
        ONE_GROUP: tl.constexpr, DOT_F32: tl.constexpr, JOIN: tl.constexpr, PREFETCH: tl.constexpr,
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
        R: tl.constexpr = BK // 8
        shift = (tl.arange(0, BK) % 8) * 4
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if PREFETCH:  # JOIN only: the next block's packed words are loaded while this block is computed
            offs_r = k_lo // 8 + tl.arange(0, R)
            pw_next = tl.load(qw_ptr + offs_r[:, None] * stride_w + offs_n[None, :],
                              mask=(offs_r < k_hi // 8)[:, None] & mask_n[None, :], other=0)
        for k0 in range(k_lo, k_hi, BK):
            offs_k = k0 + tl.arange(0, BK)
            kmask = offs_k < k_hi
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & kmask[None, :],
                        other=0.0)
            if JOIN:  # each word loaded once; its 8 nibbles interleaved into K order in registers
                offs_r = k0 // 8 + tl.arange(0, R)
                m2 = (offs_r < k_hi // 8)[:, None] & mask_n[None, :]
                if PREFETCH:
                    pw = pw_next
                    nxt = offs_r + R
                    pw_next = tl.load(qw_ptr + nxt[:, None] * stride_w + offs_n[None, :],
                                      mask=(nxt < k_hi // 8)[:, None] & mask_n[None, :], other=0)
                else:
                    pw = tl.load(qw_ptr + offs_r[:, None] * stride_w + offs_n[None, :], mask=m2, other=0)
                s, zc = _params(s_ptr, z_ptr, k0, offs_r * 8, m2, offs_n, mask_n, stride_s, GS, HAS_ZP, ONE_GROUP,
                                R, BN)
                w = _interleave8(_dq(pw, 0, zc, s, a.dtype), _dq(pw, 1, zc, s, a.dtype), _dq(pw, 2, zc, s, a.dtype),
                                 _dq(pw, 3, zc, s, a.dtype), _dq(pw, 4, zc, s, a.dtype), _dq(pw, 5, zc, s, a.dtype),
                                 _dq(pw, 6, zc, s, a.dtype), _dq(pw, 7, zc, s, a.dtype), BK, BN)
            else:  # each word loaded once per input it holds (8x, from L1), shifted by its nibble
                m2 = kmask[:, None] & mask_n[None, :]
                pw = tl.load(qw_ptr + (offs_k // 8)[:, None] * stride_w + offs_n[None, :], mask=m2, other=0)
                f = (((pw >> shift[:, None]) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + u, exact
                s, zc = _params(s_ptr, z_ptr, k0, offs_k, m2, offs_n, mask_n, stride_s, GS, HAS_ZP, ONE_GROUP, BK, BN)
                w = ((f - zc) * s).to(a.dtype)
            if DOT_F32:  # the CPU interpreter mis-multiplies 16-bit dots: same rounded values, fp32 operands
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc)
            else:
                acc = tl.dot(a, w, acc)
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :] if HAS_BIAS else 0.0
        _store_or_reduce(acc, y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
                         ws_ptr + offs_m[:, None] * N + offs_n[None, :], mask_m[:, None] & mask_n[None, :],
                         cnt_ptr, pid, bias, SPLIT_K, HAS_BIAS)


def mma(x, qweight, scales, zeros, bias, y, gs, *, bm, bn, bk, split_k=1, warps=8, stages=3, join=True,
        prefetch=False):
    """y = x @ W (+ bias); x [M, K] contiguous rows, y [M, N] preallocated."""
    m, k = x.shape
    n = qweight.shape[1]
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    k_split = triton.cdiv(triton.cdiv(k, bk), split_k) * bk
    ws, cnt = workspace(x.device, m * n, tiles) if split_k > 1 else (y, y)
    launch(_w4a16_mma_kernel, (tiles, split_k),
        x, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, y,
        ws, cnt, m, n, k, k_split, x.stride(0), y.stride(0), qweight.stride(0), scales.stride(0),
        GS=gs, HAS_ZP=zeros is not None, HAS_BIAS=bias is not None, BM=bm, BN=bn, BK=bk, SPLIT_K=split_k,
        GROUP_M=8, ONE_GROUP=gs % bk == 0 or gs == k, DOT_F32=interpreting(), JOIN=join,
        PREFETCH=prefetch and join, num_warps=warps,
        num_stages=stages,
    )
    return y


# (BM, BN, BK, split, warps, stages) per M range: few per range, since each compiles on first use
CONFIGS = {
    16: ((16, 64, 256, 1, 4, 3), (16, 64, 256, 2, 4, 3), (16, 128, 128, 2, 4, 3), (16, 64, 128, 4, 4, 4)),
    # M=64: the H200 sweep's best (bench/kernels/results/h200_sweepH.json) split K 3-4 ways
    64: ((64, 128, 128, 4, 8, 3), (64, 64, 128, 4, 4, 3), (64, 64, 128, 3, 4, 3), (64, 64, 128, 2, 4, 3)),
    256: ((128, 128, 64, 1, 8, 4), (64, 128, 128, 1, 4, 3), (128, 64, 128, 1, 4, 3), (64, 256, 64, 1, 8, 3)),
    None: ((128, 128, 64, 1, 8, 4), (128, 256, 64, 1, 8, 2), (128, 128, 128, 1, 8, 3), (256, 128, 64, 1, 8, 3)),
}


def _candidate(bm, bn, bk, split, warps, stages, join=True, prefetch=False) -> Candidate:
    name = f"mma{'' if join else 'dup'}_{bm}x{bn}x{bk}_s{split}_w{warps}_st{stages}" + ("_p" if prefetch else "")
    return Candidate(name=name, fn=lambda *a: mma(*a, bm=bm, bn=bn, bk=bk, split_k=split, warps=warps, stages=stages,
                                                  join=join, prefetch=prefetch))


def _fits(k: int, gs: int, bk: int, split: int) -> bool:
    return bk <= k and (gs == k or gs % bk == 0 or bk % gs == 0) and (split == 1 or -(-k // bk) >= 2 * split)


def candidates(m: int, n: int, k: int, gs: int) -> list[Candidate]:
    """Configurations worth timing for an [m, k] x [k, n] product with m >= 2."""
    if m < 2:
        return []
    cfgs = next(v for lim, v in CONFIGS.items() if lim is None or m <= lim)
    out = []
    for i, (bm, bn, bk, split, warps, stages) in enumerate(cfgs):
        if not _fits(k, gs, bk, split):
            continue
        # joined nibbles everywhere; the 8x-load variant ("mmadup") of the first configuration, for comparison
        for join in (True, False) if i == 0 else (True,):
            out.append(_candidate(bm, bn, bk, split, warps, stages, join))
    return out


def sweep_candidates(m: int, n: int, k: int, gs: int) -> list[Candidate]:
    """A wide set for one GPU sweep per shape (HUBQUANT_W4_SWEEP=1): block shapes x filling split-K counts x
    prefetch."""
    from hubquant_kernels.w4a16_tc import filling_splits

    if m <= 16:
        return candidates(m, n, k, gs)
    bms = (64,) if m <= 64 else (64, 128)
    cfgs = ((64, 128, 4), (128, 128, 4), (128, 64, 4), (128, 128, 8)) + (((256, 64, 8),) if m > 64 else ())
    out = []
    for bm in bms:
        for bn, bk, warps in cfgs:
            for split in filling_splits(m, n, k, bm, bn, bk) if m <= 64 else (1,):
                if _fits(k, gs, bk, split):
                    out += [_candidate(bm, bn, bk, split, warps, 3, prefetch=p) for p in (False, True)]
    return out
