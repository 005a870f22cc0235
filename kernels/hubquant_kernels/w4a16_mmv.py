"""W4A16 for M <= 32 on the tensor cores, reading the stored kernel layout: swapped operands, packed 16-bit codes.

y^T [N, M] = W^T [N, K] @ x^T [K, M] as ``mma.sync.m16n8k16`` with the weights as the A operand (16 outputs x 16
inputs per instruction) and x as B (16 inputs x 8 rows of x): M <= 8 costs one B tile, M <= 16 two (MB), and
M <= 32 two launches of up to 16 rows.

The weights are read in the layout every W4A16 path uses (qweight int32 [K/8, N], `hubquant_kernels.pack`): no
second copy. A warp owns 32 outputs; lane l = 4g + q loads, per 32-input chunk, one 16-byte vector: packed row
k/8 + q, outputs nb .. nb + 3 (nb = 32 * warp + 4g), i.e. four words, each the codes of inputs 8q .. 8q + 7 of the
chunk for one output. Words nb and nb + 1 are rows g and g + 8 of MMA tile 0, nb + 2 and nb + 3 of tile 1.
``lop3(w >> 4s, 0x000F000F, 0x43004300)`` puts codes s and s + 4 of a word into one register as two bf16 values
``128 + u`` (s = 0..3); one packed FMA subtracts ``128 + z`` (exact). Pairs (0, 4) and (1, 5) are the lane's A
slots (2q, 2q+1) and (2q+8, 2q+9) of the chunk's first MMA, (2, 6) and (3, 7) of the second; the lane's 8
activations of the same inputs (one 16-byte load) are put into the same pairs with ``prmt``. So the MMA's input
slots are a permutation of the chunk's inputs, the same for W and x. Per 32 weights a lane issues 3 shifts, 4 LOP3
and 4 packed FMAs a word (4 words), 4 PRMT and 4 MMAs (8 with two B tiles); groups are scaled in fp32.

A program is WN x WK warps: WN side by side along N (32 outputs each), WK taking every WK-th 128-input step of the
program's K range; the WK partial sums are added in shared memory at the end, and SPLIT_K programs share K through
the fp32 workspace of `hubquant_kernels.splitk`. With register prefetch (PF) the next step's 64 bytes a lane are
in flight while the current step computes.

C fragment of a tile: (row g, x row 2q + e) and (row g + 8, x row 2q + e), e = 0, 1; kept as one joined tensor
[T, 2 (h), 2 (e), 2 (tile)] (and a last axis for the B tile): output nb + 2 tile + h, x row 2q + e + 8 bt.
Under TRITON_INTERPRET=1 the same kernel runs with the two MMAs of a tile computed across lanes in plain Triton
(EMUL), so the CPU tests check its indexing, grouping, split-K and stores; the inline PTX is checked on the GPU.
"""
from __future__ import annotations

import os

import torch

from hubquant.errors import UnsupportedError
from hubquant_kernels._common import Candidate, interpreting, launch, workspace
from hubquant_kernels.pack import unpack_kn

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

KB = 128  # inputs per loop step (4 chunks of 32)


def mmv_reference(x, qweight, scales, zeros, gs, bias):
    """What the kernel computes, in float32 (the portable path off the GPU)."""
    u = unpack_kn(qweight).to(torch.float32)
    k = u.shape[0]
    z = 8.0 if zeros is None else zeros.to(torch.float32).repeat_interleave(gs, 0)[:k]
    y = x.to(torch.float32) @ ((u - z) * scales.to(torch.float32).repeat_interleave(gs, 0)[:k])
    return y + bias.to(torch.float32) if bias is not None else y


# ---------------------------------------------------------------- kernel
if triton is not None:
    from hubquant_kernels.splitk import store_or_reduce as _store_or_reduce

    def _tile_asm(fp16: bool, mb: int) -> str:
        """Dequantize two words (rows g, g + 8) and run the tile's 2 MMAs per B tile: $0.. are the C fragments
        (4 per B tile), then wa, wb, the B pairs (4 per B tile), the C inputs, za, zb."""
        magic, one = ("0x64006400", "0x3C003C00") if fp16 else ("0x43004300", "0x3F803F80")
        ty = "f16" if fp16 else "bf16"
        nc = 4 * mb
        wa, wb = nc, nc + 1
        bx, cin = nc + 2, nc + 2 + 4 * mb
        za, zb = cin + nc, cin + nc + 1
        lines = ["{", ".reg .b32 a<8>, t, one;", f"mov.b32 one, {one};"]
        lines += [f"mov.b32 ${i}, ${cin + i};" for i in range(nc)]
        for w, base, z in ((wa, 0, za), (wb, 4, zb)):
            lines += [f"lop3.b32 a{base}, ${w}, 0x000F000F, {magic}, 0xEA;"]
            for i, sh in ((1, 4), (2, 8), (3, 12)):
                lines += [f"shr.u32 t, ${w}, {sh};", f"lop3.b32 a{base + i}, t, 0x000F000F, {magic}, 0xEA;"]
            lines += [f"fma.rn.{ty}x2 a{base + i}, a{base + i}, one, ${z};" for i in range(4)]
        for b in range(mb):
            c = ", ".join(f"${4 * b + i}" for i in range(4))
            x = bx + 4 * b
            for step, (r0, r1) in enumerate(((0, 1), (2, 3))):
                lines += [f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {{{c}}}, "
                          f"{{a{r0}, a{4 + r0}, a{r1}, a{4 + r1}}}, {{${x + 2 * step}, ${x + 2 * step + 1}}}, {{{c}}};"]
        return "\n".join(lines + ["}"])

    _T1_BF16, _T1_FP16 = tl.constexpr(_tile_asm(False, 1)), tl.constexpr(_tile_asm(True, 1))
    _T2_BF16, _T2_FP16 = tl.constexpr(_tile_asm(False, 2)), tl.constexpr(_tile_asm(True, 2))
    # x pairs (0,1) (2,3) (4,5) (6,7) -> (0,4) (1,5) (2,6) (3,7)
    _XPERM = tl.constexpr("prmt.b32 $0, $4, $6, 0x5410;\nprmt.b32 $1, $4, $6, 0x7632;\n"
                          "prmt.b32 $2, $5, $7, 0x5410;\nprmt.b32 $3, $5, $7, 0x7632;")

    @triton.jit
    def _quarters(v):
        """The 4 columns of a [T, 4] tensor as 4 [T] tensors (each thread keeps its own row)."""
        a, b = tl.split(tl.reshape(v, (v.shape[0], 2, 2)))  # columns (0, 2) and (1, 3)
        c0, c2 = tl.split(a)
        c1, c3 = tl.split(b)
        return c0, c1, c2, c3

    @triton.jit
    def _join4(c00, c01, c10, c11):
        """[T] x 4 -> [T, 2 (h), 2 (e)] (c_he)."""
        return tl.join(tl.join(c00, c10), tl.join(c01, c11))

    @triton.jit
    def _split4(c):
        e0, e1 = tl.split(c)
        c00, c10 = tl.split(e0)
        c01, c11 = tl.split(e1)
        return c00, c01, c10, c11

    @triton.jit
    def _per_output(v4, MB: tl.constexpr):
        """[T, 4] values of outputs nb .. nb + 3 -> the C-fragment shape [T, 2, 2, 2 (, 2)]."""
        v0, v1, v2, v3 = _quarters(v4)
        out = tl.join(_join4(v0, v0, v1, v1), _join4(v2, v2, v3, v3))
        if MB == 2:
            out = tl.join(out, out)
        return out

    @triton.jit
    def _xperm(xa):
        p0, p1, p2, p3 = _quarters(xa)
        return tl.inline_asm_elementwise(_XPERM, "=r,=r,=r,=r,r,r,r,r", [p0, p1, p2, p3],
                                         dtype=(tl.int32,) * 4, is_pure=True, pack=1)

    @triton.jit
    def _tile_ptx(wa, wb, xa, xb, c, za, zb, MB: tl.constexpr, FP16: tl.constexpr):
        """One A tile's MMAs on the GPU; c is [T, 2, 2] (MB = 1) or [T, 2, 2, 2] (last axis: B tile)."""
        b0, b1, b2, b3 = _xperm(xa)
        if MB == 1:
            c00, c01, c10, c11 = _split4(c)
            r0, r1, r2, r3 = tl.inline_asm_elementwise(
                _T1_FP16 if FP16 else _T1_BF16, "=&r,=&r,=&r,=&r" + ",r" * 12,
                [wa, wb, b0, b1, b2, b3, c00, c01, c10, c11, za, zb], dtype=(tl.float32,) * 4, is_pure=True, pack=1)
            out = _join4(r0, r1, r2, r3)
        else:
            d0, d1, d2, d3 = _xperm(xb)
            ca, cb = tl.split(c)
            a00, a01, a10, a11 = _split4(ca)
            e00, e01, e10, e11 = _split4(cb)
            r0, r1, r2, r3, r4, r5, r6, r7 = tl.inline_asm_elementwise(
                _T2_FP16 if FP16 else _T2_BF16, "=&r,=&r,=&r,=&r,=&r,=&r,=&r,=&r" + ",r" * 20,
                [wa, wb, b0, b1, b2, b3, d0, d1, d2, d3, a00, a01, a10, a11, e00, e01, e10, e11, za, zb],
                dtype=(tl.float32,) * 8, is_pure=True, pack=1)
            out = tl.join(_join4(r0, r1, r2, r3), _join4(r4, r5, r6, r7))
        return out

    @triton.jit
    def _emul_dot(d, xf, W: tl.constexpr):
        """What a tile's two MMAs give lane (g, q) for one of its rows: sum over the warp's 4 lanes of row g of
        codes x activations of x row 2q + e (e = 0, 1); d, xf [T, 8] (the lane's 8 inputs of the chunk)."""
        d3 = tl.reshape(d, (W, 8, 32))
        x3 = tl.reshape(xf, (W, 8, 32))
        p = tl.sum(d3[:, :, None, :] * x3[:, None, :, :], axis=3)  # [W, g, x row]
        e0, e1 = tl.split(tl.reshape(p, (W, 8, 4, 2)))
        return tl.reshape(e0, (32 * W,)), tl.reshape(e1, (32 * W,))

    @triton.jit
    def _tile_emul(wa, wb, xa, xb, c, za, zb, MB: tl.constexpr, W: tl.constexpr):
        """_tile_ptx in plain Triton (interpreter): xa, xb [T, 8] float activations, za, zb float zero points."""
        j = tl.arange(0, 8)
        da = ((wa[:, None] >> (4 * j[None, :])) & 0xF).to(tl.float32) - za[:, None]
        db = ((wb[:, None] >> (4 * j[None, :])) & 0xF).to(tl.float32) - zb[:, None]
        a0, a1 = _emul_dot(da, xa, W)
        b0, b1 = _emul_dot(db, xa, W)
        if MB == 1:
            out = c + _join4(a0, a1, b0, b1)
        else:
            a2, a3 = _emul_dot(da, xb, W)
            b2, b3 = _emul_dot(db, xb, W)
            out = c + tl.join(_join4(a0, a1, b0, b1), _join4(a2, a3, b2, b3))
        return out

    @triton.jit
    def _chunk(wv, xa, xb, c, zq, MB: tl.constexpr, FP16: tl.constexpr, EMUL: tl.constexpr, W: tl.constexpr):
        """One 32-input chunk: the lane's 4 words (tiles 0 and 1) into c [T, 2, 2, 2 (, 2)]."""
        w0, w1, w2, w3 = _quarters(wv)
        z0, z1, z2, z3 = _quarters(zq)
        if MB == 1:
            c0, c1 = tl.split(c)
        else:
            ca, cb = tl.split(c)  # B tiles
            a0, a1 = tl.split(ca)
            b0, b1 = tl.split(cb)
            c0 = tl.join(a0, b0)
            c1 = tl.join(a1, b1)
        if EMUL:
            c0 = _tile_emul(w0, w1, xa, xb, c0, z0, z1, MB, W)
            c1 = _tile_emul(w2, w3, xa, xb, c1, z2, z3, MB, W)
        else:
            c0 = _tile_ptx(w0, w1, xa, xb, c0, z0, z1, MB, FP16)
            c1 = _tile_ptx(w2, w3, xa, xb, c1, z2, z3, MB, FP16)
        if MB == 1:
            out = tl.join(c0, c1)
        else:
            a0, b0 = tl.split(c0)
            a1, b1 = tl.split(c1)
            out = tl.join(tl.join(a0, a1), tl.join(b0, b1))
        return out

    @triton.jit
    def _zq(z_ptr, grp, stride_s, nb, e4, HAS_ZP: tl.constexpr, FP16: tl.constexpr, EMUL: tl.constexpr):
        """[T, 4] zero points of outputs nb .. nb + 3: floats (EMUL) or -(magic + z) as two equal 16-bit halves."""
        if HAS_ZP:
            z = tl.load(z_ptr + (grp * stride_s + nb)[:, None] + e4[None, :]).to(tl.float32)
        else:
            z = tl.full((nb.shape[0], 4), 8.0, tl.float32)
        if EMUL:
            out = z
        else:
            if FP16:
                h = (-(1024.0 + z)).to(tl.float16).to(tl.int16, bitcast=True)
            else:
                h = (-(128.0 + z)).to(tl.bfloat16).to(tl.int16, bitcast=True)
            h = h.to(tl.int32) & 0xFFFF
            out = h | (h << 16)
        return out

    @triton.jit
    def _x(x_ptr, xo, kc, e4, EMUL: tl.constexpr):
        """The lane's 8 activations of a chunk: [T, 4] bf16 pairs (one 16-byte load), or [T, 8] floats (EMUL)."""
        if EMUL:
            e8 = tl.arange(0, 8)
            out = tl.load(x_ptr + (xo + kc)[:, None] + e8[None, :]).to(tl.float32)
        else:
            x32 = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
            out = tl.load(x32 + ((xo + kc) // 2)[:, None] + e4[None, :])
        return out

    @triton.jit
    def _xs(x_ptr, xo, k0, e4, EMUL: tl.constexpr):
        """The lane's activations of the 4 chunks of the step at k0 (rows of x past M read row M - 1)."""
        return (_x(x_ptr, xo, k0, e4, EMUL), _x(x_ptr, xo, k0 + 32, e4, EMUL), _x(x_ptr, xo, k0 + 64, e4, EMUL),
                _x(x_ptr, xo, k0 + 96, e4, EMUL))

    @triton.jit
    def _step(c, zq, wv0, wv1, wv2, wv3, xa0, xa1, xa2, xa3, xb0, xb1, xb2, xb3,
              MB: tl.constexpr, FP16: tl.constexpr, EMUL: tl.constexpr, W: tl.constexpr):
        """The 4 chunks of one 128-input step (words and activations already loaded) into c."""
        c = _chunk(wv0, xa0, xb0, c, zq, MB, FP16, EMUL, W)
        c = _chunk(wv1, xa1, xb1, c, zq, MB, FP16, EMUL, W)
        c = _chunk(wv2, xa2, xb2, c, zq, MB, FP16, EMUL, W)
        return _chunk(wv3, xa3, xb3, c, zq, MB, FP16, EMUL, W)

    @triton.jit
    def _words(qw_ptr, wo, k0, stride_w, ok):
        """The lane's 4 x 16 bytes of the step at k0 (rows k0/8 + q + 4i; none where ok is false)."""
        p = qw_ptr + wo + (k0 // 8) * stride_w
        if ok is None:
            w0 = tl.load(p, eviction_policy="evict_first")
            w1 = tl.load(p + 4 * stride_w, eviction_policy="evict_first")
            w2 = tl.load(p + 8 * stride_w, eviction_policy="evict_first")
            w3 = tl.load(p + 12 * stride_w, eviction_policy="evict_first")
        else:
            w0 = tl.load(p, mask=ok, other=0, eviction_policy="evict_first")
            w1 = tl.load(p + 4 * stride_w, mask=ok, other=0, eviction_policy="evict_first")
            w2 = tl.load(p + 8 * stride_w, mask=ok, other=0, eviction_policy="evict_first")
            w3 = tl.load(p + 12 * stride_w, mask=ok, other=0, eviction_policy="evict_first")
        return w0, w1, w2, w3

    @triton.jit
    def _out_index(pid_n, WN: tl.constexpr, MB: tl.constexpr):
        """(output, x row) of every C-fragment element of a program's 32 WN outputs (one warp per 32)."""
        t = tl.arange(0, 32 * WN)
        q = t % 4
        nb = pid_n * (32 * WN) + 4 * (t // 4)  # warp t // 32, lane group (t % 32) // 4
        nn = _per_output(nb[:, None] + tl.arange(0, 4)[None, :], MB)
        m0 = 2 * q
        mm = tl.join(_join4(m0, m0 + 1, m0, m0 + 1), _join4(m0, m0 + 1, m0, m0 + 1))
        if MB == 2:
            mm = tl.join(mm, mm + 8)
        return nn, mm

    @triton.jit
    def _w4a16_mmv_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
        M, N, K, k_split, stride_xm, stride_ym, stride_w, stride_s,
        GS: tl.constexpr, ONE_GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
        WN: tl.constexpr, WK: tl.constexpr, SPLIT_K: tl.constexpr, FP16: tl.constexpr, MB: tl.constexpr,
        PF: tl.constexpr, EMUL: tl.constexpr,
    ):
        # WN x WK warps: warp w owns outputs 32 (w % WN) .. + 31 of the program and every WK-th 128-input step
        # (w // WN) of its K range; the WK partial sums meet in shared memory at the end. Every [T] tensor holds
        # element i in thread i (lane i % 32 of warp i // 32), which the MMA fragments in the inline assembly
        # assume; [T, 4] loads keep a thread's 4 words in that thread.
        T: tl.constexpr = 32 * WN * WK
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        t = tl.arange(0, T)
        g = (t % 32) // 4
        q = t % 4
        wk = t // (32 * WN)
        nb = pid_n * (32 * WN) + ((t // 32) % WN) * 32 + 4 * g
        e4 = tl.arange(0, 4)
        wo = (q * stride_w + wk * 16 * stride_w + nb)[:, None] + e4[None, :]
        xo = tl.minimum(g, M - 1) * stride_xm + 8 * q + 128 * wk  # rows past M repeat row M - 1 (not stored)
        xo2 = tl.minimum(g + 8, M - 1) * stride_xm + 8 * q + 128 * wk
        k_lo = pid_k * k_split
        k_hi = tl.minimum(k_lo + k_split, K)
        zero = tl.zeros((T,), tl.float32)
        acc = tl.join(_join4(zero, zero, zero, zero), _join4(zero, zero, zero, zero))
        if MB == 2:
            acc = tl.join(acc, acc)
        zc = acc
        zq = _zq(z_ptr, 0, stride_s, nb, e4, HAS_ZP, FP16, EMUL)
        S: tl.constexpr = 128 * WK
        if PF >= 1:  # register prefetch: words PF steps ahead (x one step) load while this step computes
            wv0, wv1, wv2, wv3 = _words(qw_ptr, wo, k_lo, stride_w, None)
            xa0, xa1, xa2, xa3 = _xs(x_ptr, xo, k_lo, e4, EMUL)
            xb0, xb1, xb2, xb3 = xa0, xa1, xa2, xa3
            if MB == 2:
                xb0, xb1, xb2, xb3 = _xs(x_ptr, xo2, k_lo, e4, EMUL)
        if PF == 2:
            v0, v1, v2, v3 = _words(qw_ptr, wo, k_lo + S, stride_w, wo * 0 + k_lo + S < k_hi)
        for k0 in range(k_lo, k_hi, S):
            if PF >= 1:
                kn = tl.minimum(k0 + S, k_hi - S)  # past the range: the current step's x again
                n0, n1, n2, n3 = _words(qw_ptr, wo, k0 + PF * S, stride_w, wo * 0 + k0 + PF * S < k_hi)
                na0, na1, na2, na3 = _xs(x_ptr, xo, kn, e4, EMUL)
                nb0, nb1, nb2, nb3 = na0, na1, na2, na3
                if MB == 2:
                    nb0, nb1, nb2, nb3 = _xs(x_ptr, xo2, kn, e4, EMUL)
            else:
                wv0, wv1, wv2, wv3 = _words(qw_ptr, wo, k0, stride_w, None)
                xa0, xa1, xa2, xa3 = _xs(x_ptr, xo, k0, e4, EMUL)
                xb0, xb1, xb2, xb3 = xa0, xa1, xa2, xa3
                if MB == 2:
                    xb0, xb1, xb2, xb3 = _xs(x_ptr, xo2, k0, e4, EMUL)
            grp = (k0 + 128 * wk) // GS
            if not ONE_GROUP:
                zq = _zq(z_ptr, grp, stride_s, nb, e4, HAS_ZP, FP16, EMUL)
            part = _step(zc, zq, wv0, wv1, wv2, wv3, xa0, xa1, xa2, xa3, xb0, xb1, xb2, xb3, MB, FP16, EMUL, WN * WK)
            if ONE_GROUP:
                acc += part
            else:
                s4 = tl.load(s_ptr + (grp * stride_s + nb)[:, None] + e4[None, :]).to(tl.float32)
                acc += part * _per_output(s4, MB)
            if PF == 1:
                wv0, wv1, wv2, wv3 = n0, n1, n2, n3
            if PF == 2:
                wv0, wv1, wv2, wv3 = v0, v1, v2, v3
                v0, v1, v2, v3 = n0, n1, n2, n3
            if PF >= 1:
                xa0, xa1, xa2, xa3 = na0, na1, na2, na3
                xb0, xb1, xb2, xb3 = nb0, nb1, nb2, nb3
        if ONE_GROUP:
            acc *= _per_output(tl.load(s_ptr + nb[:, None] + e4[None, :]).to(tl.float32), MB)
        if WK > 1:
            if MB == 1:
                acc = tl.sum(tl.reshape(acc, (WK, 32 * WN, 2, 2, 2)), axis=0)
            else:
                acc = tl.sum(tl.reshape(acc, (WK, 32 * WN, 2, 2, 2, 2)), axis=0)
        nn, mm = _out_index(pid_n, WN, MB)
        bias = tl.load(b_ptr + nn).to(tl.float32) if HAS_BIAS else 0.0
        _store_or_reduce(acc, y_ptr + mm * stride_ym + nn, ws_ptr + mm * N + nn, mm < M, cnt_ptr,
                         pid_n, bias, SPLIT_K, HAS_BIAS)


_CHECKED: dict[int, bool] = {}


def _self_check(device: torch.device) -> bool:
    """Run the kernel once per device on small random problems against float64 (its fragments assume a register
    layout that Triton chooses; a different choice would give wrong sums, so the candidates then stay out)."""
    from hubquant_kernels import pack

    g = torch.Generator(device=device).manual_seed(1)
    ok = True
    for m, n, k, gs, asym, dt, cfg in ((1, 256, 1024, 128, False, torch.bfloat16, (4, 1, 2, 2)),
                                       (5, 128, 1024, 256, True, torch.float16, (2, 4, 1, 0)),
                                       (13, 256, 2048, 2048, False, torch.bfloat16, (1, 8, 2, 1)),
                                       (3, 256, 4096, 128, True, torch.bfloat16, (2, 4, 1, 2))):
        qw = pack.pack_kn(torch.randint(0, 16, (k, n), device=device, generator=g))
        sc = (torch.rand(k // gs, n, device=device, generator=g) * 0.02 + 1e-3).to(dt)
        z = torch.randint(0, 16, (k // gs, n), device=device, generator=g).to(torch.uint8) if asym else None
        x = torch.randn(m, k, device=device, generator=g).to(dt)
        y = torch.full((m, n), float("nan"), dtype=dt, device=device)
        _launch(x, qw, sc, z, None, y, gs, *cfg)
        ref = mmv_reference(x.double(), qw, sc.double(), z, gs, None)
        err = float((y.double() - ref).norm() / ref.norm())
        ok = ok and err < 1e-2
    return ok


def supports(m: int, n: int, k: int, gs: int, wn: int = 1, wk: int = 1, split_k: int = 1) -> bool:
    """Shapes the kernel takes: M <= 32 (two launches above 16), N a multiple of 32 wn, K of 128 wk split_k, groups
    of 128 * 2^i or one."""
    return (m <= 32 and n % (32 * wn) == 0 and k % (KB * wk * split_k) == 0 and (gs >= k or gs % KB == 0))


def mmv(x, qweight, scales, zeros, bias, y, gs, *, wn=4, wk=1, split_k=1, prefetch=1):
    """y = x @ W (+ bias) on the tensor cores for M <= 32; x [M, K] contiguous rows, y [M, N] preallocated.
    A program is wn x wk warps (32 wn outputs; K steps dealt out to wk warps), split_k programs share K; one
    launch takes up to 16 rows of x (M > 16: two launches, each reading the weights)."""
    m, k = x.shape
    n = qweight.shape[1]
    if (not supports(m, n, k, gs, wn, wk, split_k) or x.dtype not in (torch.bfloat16, torch.float16)
            or x.data_ptr() % 16 or x.stride(0) % 8 or x.stride(1) != 1):
        raise UnsupportedError(f"the MMA GEMV takes M <= 32 rows of bf16/fp16 x (16-byte aligned), N a multiple "
                               f"of {32 * wn}, K of {KB * wk * split_k} and groups of a multiple of 128 inputs",
                               hint="other W4A16 kernels handle this case")
    if not x.is_cuda and not interpreting():
        y.copy_(mmv_reference(x, qweight, scales, zeros, gs, bias).to(y.dtype))
        return y
    if x.is_cuda:
        dev = x.device.index or 0
        if dev not in _CHECKED:
            _CHECKED[dev] = _self_check(x.device)
        if not _CHECKED[dev]:
            raise UnsupportedError("the MMA GEMV failed its check on this GPU", hint="other W4A16 kernels are used")
    if m > 16:
        _launch(x[:16], qweight, scales, zeros, bias, y[:16], gs, wn, wk, split_k, prefetch)
        _launch(x[16:], qweight, scales, zeros, bias, y[16:], gs, wn, wk, split_k, prefetch)
        return y
    return _launch(x, qweight, scales, zeros, bias, y, gs, wn, wk, split_k, prefetch)


def _launch(x, qweight, scales, zeros, bias, y, gs, wn, wk, split_k, prefetch):
    m, k = x.shape
    n = qweight.shape[1]
    progs = n // (32 * wn)
    mb = 1 if m <= 8 else 2
    ws, cnt = workspace(x.device, m * n, progs) if split_k > 1 else (y, y)
    launch(_w4a16_mmv_kernel, (progs, split_k),
        x, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales,
        y, ws, cnt, m, n, k, k // split_k, x.stride(0), y.stride(0), qweight.stride(0), scales.stride(0),
        GS=min(gs, k), ONE_GROUP=gs >= k, HAS_ZP=zeros is not None, HAS_BIAS=bias is not None,
        WN=wn, WK=wk, SPLIT_K=split_k, FP16=x.dtype == torch.float16, MB=mb,
        PF=int(prefetch), EMUL=interpreting(), num_warps=wn * wk,
    )
    return y


# (warps along N, warps along K, split-K programs, register prefetch depth in steps); the chooser keeps the fastest
# per shape.
# Warps along K add their partial sums in shared memory; split-K programs through the fp32 workspace (atomics).
CONFIGS = tuple((wn, wk, s, pf) for wn, wk in ((1, 8), (1, 16), (2, 4), (2, 8), (4, 2), (4, 4))
                for s in (1, 2, 4, 8) for pf in (1, 2)) + tuple(
                (wn, 1, s, pf) for wn in (4, 8) for s in (4, 8, 16) for pf in (1, 2))
SWEEP_CONFIGS = tuple((wn, wk, s, pf) for wn in (1, 2, 4, 8) for wk in (1, 2, 4, 8, 16) if 2 <= wn * wk <= 16
                      for s in (1, 2, 4, 8, 16, 32) for pf in (0, 1, 2))


def enabled() -> bool:
    """On by default (it reads the stored layout); HUBQUANT_MMV=0 leaves these candidates out."""
    return os.environ.get("HUBQUANT_MMV", "1") != "0"


def candidates(m: int, n: int, k: int, gs: int) -> list[Candidate]:
    """MMA GEMV configurations for an [m, k] x [k, n] product with m <= 32."""
    if not enabled() or not supports(m, n, k, gs):
        return []
    out = []
    sweep = "1" in (os.environ.get("HUBQUANT_W4_SWEEP"), os.environ.get("HUBQUANT_W4_SWEEP_MMV"))
    cfgs = SWEEP_CONFIGS if sweep else CONFIGS
    if n % 128:  # narrow layers: one warp along N
        cfgs = tuple(dict.fromkeys((1, wk, s, pf) for _, wk, s, pf in cfgs))
    for wn, wk, split, pf in cfgs:
        progs = n // (32 * wn)
        if not supports(m, n, k, gs, wn, wk, split) or progs * split > 4096 or (split > 1 and progs * split < 132):
            continue
        out.append(Candidate(name=f"mmv_n{wn}k{wk}_s{split}_p{int(pf)}",
                             fn=lambda *a, wn=wn, wk=wk, s=split, p=pf: mmv(*a, wn=wn, wk=wk, split_k=s, prefetch=p)))
    return out
