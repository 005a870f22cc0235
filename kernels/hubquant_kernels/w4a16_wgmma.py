"""W4A16 for M >= 64 with the weight as the tensor cores' register operand ("swap AB").

The kernel computes the transposed output tile ``y^T[BN, BM] = W^T[BN, BK] @ x^T[BK, BM]``. On Hopper the left
operand of wgmma may live in registers while the right one is read from shared memory, so the dequantized weight
tile goes straight from the dequantizing instructions into the MMA (no shared-memory store, no wait for the
previous MMA to finish reading a weight buffer), while the activation tile streams into shared memory through
Triton's pipelined asynchronous copies (num_stages deep). This is the layout mixed-input GEMMs use on Hopper
(M, the token count, becomes the MMA's N side: 64..256 columns).

Dequantization, per packed word ``qweight[r, n]`` (8 codes of inputs 8r..8r+7, kernel layout of
hubquant_kernels.pack):

- on the GPU, inline PTX turns two words into eight bf16x2 (or f16x2) registers: one ``prmt`` + ``lop3`` pair
  makes the exact 16-bit floats ``B + u`` (B = 128 in bf16, 1024 in fp16), then two packed FMAs give
  ``((B + u) - (B + z)) * s``: the subtraction is exact (small integers) and the product is rounded once, so
  the weight equals the reference's ``(u - z) * s`` rounded to the activations' dtype; about two instructions
  per weight;
- elsewhere (Triton's CPU interpreter) the same values through fp32: ``((2^23 + u) - (2^23 + z)) * s``.

The eight nibble tiles [BN, BK/8] are interleaved into K order with joins and one reshape (the join order is
chosen so that no permute is needed). The grid walks output tiles N-fastest inside groups of GROUP_N tiles, so
that programs running together share an activation tile from L2 (the packed weights are small enough to stay
in L2 at these sizes). Optional split-K reduces through the shared workspace in the same launch.
"""
from __future__ import annotations

import torch

from hubquant_kernels._common import Candidate, interpreting, launch, workspace

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def _asm_body(magic: str, one: str, ftype: str) -> str:
    """PTX: words $8, $9 -> outputs $0..$7 (nibble j of both words, dequantized); $10 = s pair, $11 = -(B + z)."""
    lines = ["{", ".reg .b32 t, v, one, nz;", f"mov.b32 one, {one};", "mov.b32 nz, 0x80008000;"]
    for b in range(4):
        lines.append(f"prmt.b32 t, $8, $9, 0x{4 + b}{4 + b}{b}{b};")
        for half in range(2):
            if half:
                lines.append("shr.u32 t, t, 4;")
            lines.append(f"lop3.b32 v, t, 0x000F000F, {magic}, 0xEA;")
            lines.append(f"fma.rn.{ftype} v, v, one, $11;")
            lines.append(f"fma.rn.{ftype} ${2 * b + half}, v, $10, nz;")
    lines.append("}")
    return "\n".join(lines)


if triton is not None:
    from hubquant_kernels.splitk import store_or_reduce as _store_or_reduce

    _ASM_BF16 = tl.constexpr(_asm_body("0x43004300", "0x3F803F80", "bf16x2"))
    _ASM_FP16 = tl.constexpr(_asm_body("0x64006400", "0x3C003C00", "f16x2"))

    @triton.jit
    def _params_t(s_ptr, z_ptr, k0, offs_r, m2, offs_n, mask_n, stride_s, GS: tl.constexpr, HAS_ZP: tl.constexpr,
                  ONE_GROUP: tl.constexpr, BN: tl.constexpr, R: tl.constexpr):
        """Scale and zero point (fp32) of the block's weights: [BN, 1] for one group, else [BN, R]."""
        if ONE_GROUP:
            g = k0 // GS
            s = tl.load(s_ptr + g * stride_s + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
            if HAS_ZP:
                z = tl.load(z_ptr + g * stride_s + offs_n, mask=mask_n, other=0).to(tl.float32)[:, None]
            else:
                z = tl.full((BN, 1), 8.0, tl.float32)
        else:
            idx = offs_n[:, None] + ((offs_r * 8) // GS)[None, :] * stride_s
            s = tl.load(s_ptr + idx, mask=m2, other=0.0).to(tl.float32)
            if HAS_ZP:
                z = tl.load(z_ptr + idx, mask=m2, other=0).to(tl.float32)
            else:
                z = tl.full((BN, R), 8.0, tl.float32)
        return s, z

    @triton.jit
    def _nib(pw, j: tl.constexpr, z, s, dtype: tl.constexpr):
        """Nibble j of every word, dequantized in fp32 and rounded to dtype (portable: runs in the interpreter)."""
        f = (((pw >> (4 * j)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
        return ((f - (z + 8388608.0)) * s).to(dtype)

    @triton.jit
    def _interleave(w0, w1, w2, w3, w4, w5, w6, w7, BN: tl.constexpr, BK: tl.constexpr):
        """[BN, R] tiles of nibbles 0..7 -> [BN, 8R] with column 8r + j = w_j[:, r] (joins + reshape only)."""
        c = tl.join(tl.join(tl.join(w0, w4), tl.join(w2, w6)), tl.join(tl.join(w1, w5), tl.join(w3, w7)))
        return tl.reshape(c, (BN, BK))

    @triton.jit
    def _dequant_t(pw, s, z, dtype: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, R: tl.constexpr,
                   USE_ASM: tl.constexpr, FP16: tl.constexpr):
        """Packed words [BN, R] -> dequantized W^T tile [BN, BK] in dtype."""
        if USE_ASM:
            s16 = tl.broadcast_to(s, (BN, R)).to(dtype)
            nz16 = tl.broadcast_to(-(z + (1024.0 if FP16 else 128.0)), (BN, R)).to(dtype)
            if FP16:
                w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                    _ASM_FP16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [pw, s16, nz16], dtype=(tl.float16,) * 8,
                    is_pure=True, pack=2)
            else:
                w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                    _ASM_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [pw, s16, nz16], dtype=(tl.bfloat16,) * 8,
                    is_pure=True, pack=2)
        else:
            w0, w1, w2, w3 = _nib(pw, 0, z, s, dtype), _nib(pw, 1, z, s, dtype), _nib(pw, 2, z, s, dtype), \
                _nib(pw, 3, z, s, dtype)
            w4, w5, w6, w7 = _nib(pw, 4, z, s, dtype), _nib(pw, 5, z, s, dtype), _nib(pw, 6, z, s, dtype), \
                _nib(pw, 7, z, s, dtype)
        return _interleave(w0, w1, w2, w3, w4, w5, w6, w7, BN, BK)

    @triton.jit
    def _w4a16_wgmma_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
        M, N, K, k_split, stride_xm, stride_ym, stride_w, stride_s,
        GS: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_N: tl.constexpr,
        ONE_GROUP: tl.constexpr, USE_ASM: tl.constexpr, FP16: tl.constexpr, DOT_F32: tl.constexpr,
        TMA: tl.constexpr,
    ):
        # K and k_split are multiples of BK (the wrapper checks): the K loop needs no mask, so the activation
        # loads stay 16 bytes wide
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        n_m = tl.cdiv(M, BM)
        n_n = tl.cdiv(N, BN)
        width = GROUP_N * n_m
        first_n = (pid // width) * GROUP_N
        size_n = tl.minimum(n_n - first_n, GROUP_N)
        pid_n = first_n + (pid % width) % size_n
        pid_m = (pid % width) // size_n
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_m = pid_m * BM + tl.arange(0, BM)
        mask_n = offs_n < N
        mask_m = offs_m < M
        R: tl.constexpr = BK // 8
        dtype = x_ptr.dtype.element_ty
        k_lo = pid_k * k_split
        k_hi = tl.minimum(k_lo + k_split, K)
        acc = tl.zeros((BN, BM), dtype=tl.float32)
        if TMA:  # bulk tensor copies (rows past M and columns past N arrive as zeros)
            x_desc = tl.make_tensor_descriptor(x_ptr, [M, K], [stride_xm, 1], [BM, BK])
            w_desc = tl.make_tensor_descriptor(qw_ptr, [K // 8, N], [stride_w, 1], [R, BN])
        for k0 in range(k_lo, k_hi, BK):
            offs_r = k0 // 8 + tl.arange(0, R)
            m2 = mask_n[:, None] & (offs_r < K // 8)[None, :]
            if TMA:
                pw = tl.trans(w_desc.load([k0 // 8, pid_n * BN]))
                xt = tl.trans(x_desc.load([pid_m * BM, k0]))
            else:
                offs_k = k0 + tl.arange(0, BK)
                pw = tl.load(qw_ptr + offs_n[:, None] + offs_r[None, :] * stride_w, mask=m2, other=0)
                xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None], mask=mask_m[None, :], other=0.0)
            s, z = _params_t(s_ptr, z_ptr, k0, offs_r, m2, offs_n, mask_n, stride_s, GS, HAS_ZP, ONE_GROUP, BN, R)
            w = _dequant_t(pw, s, z, dtype, BN, BK, R, USE_ASM, FP16)
            if DOT_F32:  # the CPU interpreter mis-multiplies 16-bit dots: same rounded values, fp32 operands
                acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc)
            else:
                acc = tl.dot(w, xt, acc)
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None] if HAS_BIAS else 0.0
        _store_or_reduce(acc, y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None],
                         ws_ptr + offs_m[None, :] * N + offs_n[:, None], mask_n[:, None] & mask_m[None, :],
                         cnt_ptr, pid, bias, SPLIT_K, HAS_BIAS)


def fits(k: int, gs: int, bk: int, split: int = 1) -> bool:
    """Whether a configuration handles this K and group size: whole K blocks (split evenly), and one group per
    block or whole groups inside it."""
    blocks = k // bk
    return (k % bk == 0 and (gs == k or gs % bk == 0 or bk % gs == 0)
            and (split == 1 or (blocks % split == 0 and blocks >= 2 * split)))


USE_PTX = True  # the PTX dequantization where it applies (a benchmark may turn it off to compare)


def _tma_ready(x, qweight) -> bool:
    """Bulk tensor copies need 16-byte aligned bases and row strides (and a Triton that has them)."""
    return (hasattr(tl, "make_tensor_descriptor") and x.data_ptr() % 16 == 0 and qweight.data_ptr() % 16 == 0
            and (x.stride(0) * x.element_size()) % 16 == 0 and (qweight.stride(0) * 4) % 16 == 0)


def _alloc(size: int, alignment: int, stream):
    """Global scratch for device-side tensor descriptors (Triton asks for it at launch)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def wgmma(x, qweight, scales, zeros, bias, y, gs, *, bm, bn, bk, split_k=1, warps=8, stages=3, group_n=64,
          asm=None, tma=False):
    """y = x @ W (+ bias); x [M, K] contiguous rows, y [M, N] preallocated; K % bk == 0 (see `fits`)."""
    m, k = x.shape
    n = qweight.shape[1]
    if not fits(k, gs, bk, split_k):
        raise ValueError(f"wgmma block K {bk} / split {split_k} does not fit K={k}, group size {gs}")
    # the PTX path rounds the scale to x's dtype: only where the scales already are in it
    asm = (USE_PTX and not interpreting() and scales.dtype == x.dtype) if asm is None else asm
    tma = tma and _tma_ready(x, qweight)
    if tma and x.is_cuda:
        triton.set_allocator(_alloc)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    k_split = k // split_k
    ws, cnt = workspace(x.device, m * n, tiles) if split_k > 1 else (y, y)
    launch(_w4a16_wgmma_kernel, (tiles, split_k),
        x, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, y,
        ws, cnt, m, n, k, k_split, x.stride(0), y.stride(0), qweight.stride(0), scales.stride(0),
        GS=gs, HAS_ZP=zeros is not None, HAS_BIAS=bias is not None, BM=bm, BN=bn, BK=bk, SPLIT_K=split_k,
        GROUP_N=group_n, ONE_GROUP=gs % bk == 0 or gs == k, USE_ASM=asm, FP16=x.dtype == torch.float16,
        DOT_F32=interpreting(), TMA=tma, num_warps=warps, num_stages=stages,
    )
    return y


# (BM, BN, BK, split, warps, stages[, tma]) per M bucket. BN is the wgmma M side (64 rows per warpgroup), BM its
# N side; tma: activation and weight tiles by bulk tensor copies instead of Triton's pointer loads (timed in
# bench/kernels/large_m.py, never offered: one TMA configuration wrote NaN on an odd fp16 shape there).
# The chooser gets each bucket's single-split H200 winners (bench/kernels/results/h200_large_m_ptx.json): at
# M <= 64 they beat the earlier kernels on 8192x8192 and 14336x4096, at M <= 256 on the same two shapes; above
# 256 dequantize + cuBLAS stays ahead on all four shapes, so nothing is offered there. Split-K configurations are
# left to the sweep (SWEEP_CONFIGS): one of them (64x128x128, split 4, 8 warps) returned a wrong product once on
# the GPU (8192x8192, M=64) while passing every other check, so they are not offered until that is understood.
CONFIGS = {
    64: ((64, 64, 128, 1, 4, 4), (64, 128, 128, 1, 4, 4)),
    256: ((128, 128, 128, 1, 8, 3), (256, 128, 64, 1, 8, 3), (256, 64, 64, 1, 4, 3), (128, 64, 128, 1, 4, 4)),
}
SWEEP_CONFIGS = {
    64: ((64, 128, 128, 2, 4, 4), (64, 128, 128, 1, 4, 4), (64, 64, 128, 2, 4, 4), (64, 64, 128, 1, 4, 4),
         (64, 128, 64, 2, 4, 4), (64, 128, 128, 4, 8, 3), (64, 256, 64, 1, 8, 4), (64, 64, 128, 4, 4, 4),
         (64, 128, 128, 2, 4, 4, True), (64, 64, 128, 2, 4, 4, True)),
    256: ((128, 128, 64, 1, 8, 4), (128, 128, 64, 2, 8, 4), (64, 128, 128, 1, 4, 4), (128, 64, 128, 1, 4, 4),
          (256, 128, 64, 1, 8, 3), (128, 128, 128, 1, 8, 3), (64, 256, 64, 1, 8, 4), (128, 128, 64, 1, 4, 4),
          (256, 64, 64, 1, 4, 3), (256, 64, 64, 2, 4, 3),
          (128, 128, 64, 1, 8, 4, True), (128, 64, 128, 1, 4, 4, True)),
    1024: ((256, 128, 64, 1, 8, 3), (128, 128, 64, 1, 8, 4), (128, 256, 64, 1, 8, 3), (256, 64, 64, 1, 4, 3),
           (256, 64, 64, 2, 4, 3), (256, 128, 64, 1, 8, 4), (128, 128, 128, 1, 8, 3), (128, 64, 128, 1, 4, 4),
           (256, 128, 64, 1, 8, 3, True), (128, 256, 64, 1, 8, 3, True)),
    None: ((256, 128, 64, 1, 8, 3), (256, 128, 64, 1, 8, 4), (128, 256, 64, 1, 8, 3), (128, 128, 64, 1, 8, 4),
           (256, 128, 128, 1, 8, 2), (256, 64, 64, 1, 4, 3), (128, 128, 128, 1, 8, 3),
           (256, 128, 64, 1, 8, 3, True), (256, 128, 64, 1, 8, 4, True), (128, 256, 64, 1, 8, 3, True)),
}


def config_name(bm, bn, bk, split, warps, stages, tma=False) -> str:
    return f"wgmma_{bm}x{bn}x{bk}_s{split}_w{warps}_st{stages}" + ("_tma" if tma else "")


def candidate(bm, bn, bk, split, warps, stages, tma=False) -> Candidate:
    return Candidate(name=config_name(bm, bn, bk, split, warps, stages, tma),
                     fn=lambda *a: wgmma(*a, bm=bm, bn=bn, bk=bk, split_k=split, warps=warps, stages=stages, tma=tma))


def configs_for(m: int, table=None) -> tuple:
    """The configurations of m's bucket in `table` (default CONFIGS); () above the table's largest bucket."""
    table = CONFIGS if table is None else table
    return next((v for lim, v in table.items() if lim is None or m <= lim), ())


def candidates(m: int, n: int, k: int, gs: int, configs=None) -> list[Candidate]:
    """Configurations worth timing for an [m, k] x [k, n] product with 33 <= m <= 256 (M is the MMA's N side);
    `configs` overrides the chooser's shortlist (benchmarks pass SWEEP_CONFIGS buckets)."""
    if m < 33:
        return []
    return [candidate(*c) for c in (configs_for(m) if configs is None else configs) if fits(k, gs, c[2], c[3])]
