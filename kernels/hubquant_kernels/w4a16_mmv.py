"""W4A16 for M <= 8 on the tensor cores: swapped operands, packed 16-bit dequantization, shuffled weights.

y^T [N, M] = W^T [N, K] @ x^T [K, M] as ``mma.sync.m16n8k16`` with the weights as the A operand (16 outputs x 16
inputs per instruction) and the activations as B (16 inputs x 8 rows of x: M <= 8 rows cost what M = 1 costs).
The weights are shuffled once (`shuffle`, cached per weight tensor) so that one 32-bit word holds exactly the
eight 4-bit codes one lane needs for one MMA, in the order the magic-number conversion wants: ``lop3(w >> 4i,
0x000F000F, 0x43004300)`` gives two bf16 values ``128 + u`` at once, one packed FMA subtracts ``128 + z``
(exact), and the four registers are the lane's A fragment. Per 8 weights a lane issues 3 shifts, 4 LOP3, 4 packed
FMAs and one MMA (the kernel of w4a16_gemv3 needs ~30 instructions for the same 8 weights), and x is loaded as
bf16 pairs straight into the B fragment. Accumulation is fp32 in the MMA; each group's sum is scaled in fp32.

Shuffled layout ``qs`` int32 [N/16, K/64, 32, 4]: for output tile T (outputs 16T..16T+15), K chunk C, lane
l = 4g + q and MMA step j, with n0 = 16T + g, n1 = n0 + 8 and kk = 64C + 16q + 4j, the word's nibbles at bits 0, 4,
8, 12, 16, 20, 24, 28 are the codes of (kk, n0), (kk, n1), (kk+2, n0), (kk+2, n1), (kk+1, n0), (kk+1, n1),
(kk+3, n0), (kk+3, n1). The MMA's 16 input slots are a permutation of each 16 inputs (the same for x and W), so
that lane q's activations of one chunk, x[64C + 16q .. + 15], are one contiguous 32-byte load.
"""
from __future__ import annotations

import os
import weakref

import torch

from hubquant.errors import UnsupportedError
from hubquant_kernels._common import Candidate, interpreting, launch, workspace
from hubquant_kernels.pack import unpack_kn

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


# ---------------------------------------------------------------- layout
def shuffle(qweight: torch.Tensor) -> torch.Tensor:
    """Kernel layout int32 [K/8, N] -> the MMA layout int32 [N/16, K/64, 32, 4] (N % 16 == 0, K % 64 == 0)."""
    u = unpack_kn(qweight).to(torch.int64)  # [K, N]
    k, n = u.shape
    if n % 16 or k % 64:
        raise UnsupportedError(f"the MMA GEMV needs N % 16 == 0 and K % 64 == 0 (got N={n}, K={k})",
                               hint="other W4A16 kernels handle this shape")
    # k = 64C + 16q + 4j + 2r + p, n = 16T + 8v + g; lane = 4g + q; bit = 16p + 8r + 4v
    v = u.reshape(k // 64, 4, 4, 2, 2, n // 16, 2, 8)  # C, q, j, r, p, T, v, g
    v = v.permute(5, 0, 7, 1, 2, 4, 3, 6)  # T, C, g, q, j, p, r, v
    shifts = (16 * torch.arange(2).view(2, 1, 1) + 8 * torch.arange(2).view(1, 2, 1)
              + 4 * torch.arange(2).view(1, 1, 2)).to(u.device)
    words = (v << shifts).reshape(n // 16, k // 64, 8, 4, 4, 8).sum(-1)
    words = words & 0xFFFFFFFF
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return words.reshape(n // 16, k // 64, 32, 4).contiguous()


def unshuffle(qs: torch.Tensor) -> torch.Tensor:
    """Codes [K, N] (int64) from the MMA layout (inverse of `shuffle`; tests)."""
    t, c = qs.shape[0], qs.shape[1]
    w = qs.to(torch.int64).reshape(t, c, 8, 4, 4, 1) & 0xFFFFFFFF
    shifts = (16 * torch.arange(2).view(2, 1, 1) + 8 * torch.arange(2).view(1, 2, 1)
              + 4 * torch.arange(2).view(1, 1, 2)).to(qs.device).reshape(8)
    nib = (w >> shifts) & 0xF  # T, C, g, q, j, (p, r, v)
    nib = nib.reshape(t, c, 8, 4, 4, 2, 2, 2).permute(1, 3, 4, 6, 5, 0, 7, 2)  # C, q, j, r, p, T, v, g
    return nib.reshape(c * 64, t * 16)


_SHUFFLED: dict[tuple, tuple] = {}


def shuffled(qweight: torch.Tensor) -> torch.Tensor:
    """`shuffle(qweight)`, made once per weight tensor and freed with it (one more copy of its packed bytes)."""
    key = (qweight.data_ptr(), tuple(qweight.shape), qweight.stride(0), qweight.device)
    hit = _SHUFFLED.get(key)
    if hit is not None and hit[0]() is qweight and hit[2] == qweight._version:
        return hit[1]
    qs = shuffle(qweight)

    def _forget(ref, key=key):
        if _SHUFFLED.get(key, (None,))[0] is ref:
            del _SHUFFLED[key]

    _SHUFFLED[key] = (weakref.ref(qweight, _forget), qs, qweight._version)
    return qs


def held() -> list[torch.Tensor]:
    """The shuffled copies alive now (bound launch plans may read them)."""
    return [v[1] for v in _SHUFFLED.values() if v[0]() is not None]


def mmv_reference(x: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  gs: int, bias: torch.Tensor | None) -> torch.Tensor:
    """What the kernel computes, from the shuffled layout, in float32 (the portable path)."""
    u = unshuffle(qs).to(torch.float32)
    k = u.shape[0]
    z = 8.0 if zeros is None else zeros.to(torch.float32).repeat_interleave(gs, 0)[:k]
    w = (u - z) * scales.to(torch.float32).repeat_interleave(gs, 0)[:k]
    y = x.to(torch.float32) @ w
    return y + bias.to(torch.float32) if bias is not None else y


# ---------------------------------------------------------------- kernel
if triton is not None:
    from hubquant_kernels.splitk import store_or_reduce as _store_or_reduce

    def _asm(fp16: bool) -> str:
        magic, one = ("0x64006400", "0x3C003C00") if fp16 else ("0x43004300", "0x3F803F80")
        ty = "f16" if fp16 else "bf16"
        lines = ["{", ".reg .b32 a0, a1, a2, a3, t, one;", f"mov.b32 one, {one};",
                 "mov.b32 $0, $16;", "mov.b32 $1, $17;", "mov.b32 $2, $18;", "mov.b32 $3, $19;"]
        for j in range(4):
            w, xlo, xhi = f"${4 + j}", f"${8 + j}", f"${12 + j}"
            lines += [f"lop3.b32 a0, {w}, 0x000F000F, {magic}, 0xEA;"]
            for i, sh in ((1, 4), (2, 8), (3, 12)):
                lines += [f"shr.u32 t, {w}, {sh};", f"lop3.b32 a{i}, t, 0x000F000F, {magic}, 0xEA;"]
            lines += [f"fma.rn.{ty}x2 a0, a0, one, $20;", f"fma.rn.{ty}x2 a1, a1, one, $21;",
                      f"fma.rn.{ty}x2 a2, a2, one, $20;", f"fma.rn.{ty}x2 a3, a3, one, $21;",
                      f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {{$0, $1, $2, $3}}, "
                      f"{{a0, a1, a2, a3}}, {{{xlo}, {xhi}}}, {{$0, $1, $2, $3}};"]
        return "\n".join(lines + ["}"])

    _ASM_BF16 = tl.constexpr(_asm(False))
    _ASM_FP16 = tl.constexpr(_asm(True))

    @triton.jit
    def _mma4(w0, w1, w2, w3, l0, l1, l2, l3, h0, h1, h2, h3, c0, c1, c2, c3, za, zb, FP16: tl.constexpr):
        """Four m16n8k16 MMAs (one 64-input chunk) on the lane's fragments; returns the new C fragment."""
        if FP16:
            return tl.inline_asm_elementwise(
                _ASM_FP16, "=&r,=&r,=&r,=&r" + ",r" * 18,
                [w0, w1, w2, w3, l0, l1, l2, l3, h0, h1, h2, h3, c0, c1, c2, c3, za, zb],
                dtype=(tl.float32,) * 4, is_pure=True, pack=1)
        return tl.inline_asm_elementwise(
            _ASM_BF16, "=&r,=&r,=&r,=&r" + ",r" * 18,
            [w0, w1, w2, w3, l0, l1, l2, l3, h0, h1, h2, h3, c0, c1, c2, c3, za, zb],
            dtype=(tl.float32,) * 4, is_pure=True, pack=1)

    @triton.jit
    def _zbias(z_ptr, g, stride_s, n, HAS_ZP: tl.constexpr, FP16: tl.constexpr):
        """-(magic + z) for outputs n, as two equal 16-bit halves of an int32."""
        if HAS_ZP:
            z = tl.load(z_ptr + g * stride_s + n).to(tl.float32)
        else:
            z = tl.full(n.shape, 8.0, tl.float32)
        if FP16:
            h = (-(1024.0 + z)).to(tl.float16).to(tl.int16, bitcast=True)
        else:
            h = (-(128.0 + z)).to(tl.bfloat16).to(tl.int16, bitcast=True)
        h = h.to(tl.int32) & 0xFFFF
        return h | (h << 16)

    @triton.jit
    def _x_pairs(x32, xo, xm, e4, MASK_X: tl.constexpr):
        """Four consecutive bf16 pairs per thread (one 16-byte load), [T, 4] int32."""
        if MASK_X:
            return tl.load(x32 + xo[:, None] + e4[None, :], mask=xm[:, None], other=0)
        return tl.load(x32 + xo[:, None] + e4[None, :])

    @triton.jit
    def _quarters(v):
        """The 4 columns of a [T, 4] tensor as 4 [T] tensors (each thread keeps its own row)."""
        a, b = tl.split(tl.reshape(v, (v.shape[0], 2, 2)))  # columns (0, 2) and (1, 3)
        c0, c2 = tl.split(a)
        c1, c3 = tl.split(b)
        return c0, c1, c2, c3

    @triton.jit
    def _w4a16_mmv_kernel(
        x_ptr, qs_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
        M, N, K, k_split, stride_xm, stride_ym, stride_s,
        GS: tl.constexpr, GB: tl.constexpr, ONE_GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
        W: tl.constexpr, SPLIT_K: tl.constexpr, FP16: tl.constexpr, MASK_X: tl.constexpr, STAGES: tl.constexpr,
    ):
        # one warp per 16-output tile, W tiles per program; every tensor is [32 W]: element i lives in thread i
        # (lane i % 32 of warp i // 32), which is what the MMA fragments in the inline assembly assume.
        # GB: K block per step (a whole group, or 256 inputs with one group); k_split is a multiple of GB.
        T: tl.constexpr = 32 * W
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        t = tl.arange(0, T)
        lane = t % 32
        g = lane // 4
        q = lane % 4
        tile = pid_n * W + t // 32
        n0 = tile * 16 + g
        n1 = n0 + 8
        kc_n = K // 64
        wrow = (tile * kc_n * 32 + lane) * 4  # word offset of chunk 0, step 0 for this lane
        x32 = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        xb = g * (stride_xm // 2) + 8 * q  # lane q's first bf16 pair of row g in a chunk (int32 units)
        xm = g < M
        e4 = tl.arange(0, 4)
        acc0 = tl.zeros((T,), tl.float32)
        acc1 = tl.zeros((T,), tl.float32)
        acc2 = tl.zeros((T,), tl.float32)
        acc3 = tl.zeros((T,), tl.float32)
        k_lo = pid_k * k_split
        k_hi = tl.minimum(k_lo + k_split, K)
        za = _zbias(z_ptr, k_lo // GS, stride_s, n0, HAS_ZP, FP16)
        zb = _zbias(z_ptr, k_lo // GS, stride_s, n1, HAS_ZP, FP16)
        for k0 in tl.range(k_lo, k_hi, GB, num_stages=STAGES):
            if not ONE_GROUP:
                za = _zbias(z_ptr, k0 // GS, stride_s, n0, HAS_ZP, FP16)
                zb = _zbias(z_ptr, k0 // GS, stride_s, n1, HAS_ZP, FP16)
            c0 = tl.zeros((T,), tl.float32)
            c1 = tl.zeros((T,), tl.float32)
            c2 = tl.zeros((T,), tl.float32)
            c3 = tl.zeros((T,), tl.float32)
            for c in tl.static_range(GB // 64):
                kc = k0 + 64 * c
                wv = tl.load(qs_ptr + (wrow + (kc // 64) * 128)[:, None] + e4[None, :],
                             eviction_policy="evict_first")
                w0, w1, w2, w3 = _quarters(wv)
                # B fragments: step j takes pairs 2j (slots 2q, 2q+1) and 2j + 1 (slots 2q+8, 2q+9) of the lane's 8
                xa = _x_pairs(x32, xb + kc // 2, xm, e4, MASK_X)
                xc = _x_pairs(x32, xb + kc // 2 + 4, xm, e4, MASK_X)
                l0, h0, l1, h1 = _quarters(xa)
                l2, h2, l3, h3 = _quarters(xc)
                c0, c1, c2, c3 = _mma4(w0, w1, w2, w3, l0, l1, l2, l3, h0, h1, h2, h3, c0, c1, c2, c3, za, zb, FP16)
            if ONE_GROUP:
                acc0 += c0
                acc1 += c1
                acc2 += c2
                acc3 += c3
            else:
                s0 = tl.load(s_ptr + (k0 // GS) * stride_s + n0).to(tl.float32)
                s1 = tl.load(s_ptr + (k0 // GS) * stride_s + n1).to(tl.float32)
                acc0 += c0 * s0
                acc1 += c1 * s0
                acc2 += c2 * s1
                acc3 += c3 * s1
        if ONE_GROUP:
            s0 = tl.load(s_ptr + n0).to(tl.float32)
            s1 = tl.load(s_ptr + n1).to(tl.float32)
            acc0 *= s0
            acc1 *= s0
            acc2 *= s1
            acc3 *= s1
        # C fragment: c0 = (row 2q, n0), c1 = (2q + 1, n0), c2 = (2q, n1), c3 = (2q + 1, n1)
        m0 = 2 * q
        m1 = m0 + 1
        acc = tl.join(tl.join(acc0, acc1), tl.join(acc2, acc3))  # [T, 2, 2]
        mm = tl.join(tl.join(m0, m1), tl.join(m0, m1))
        nn = tl.join(tl.join(n0, n0), tl.join(n1, n1))
        if HAS_BIAS:
            b0 = tl.load(b_ptr + n0).to(tl.float32)
            b1 = tl.load(b_ptr + n1).to(tl.float32)
            bias = tl.join(tl.join(b0, b0), tl.join(b1, b1))
        else:
            bias = 0.0
        _store_or_reduce(acc, y_ptr + mm * stride_ym + nn, ws_ptr + mm * N + nn, (mm < M) & (nn < N), cnt_ptr,
                         pid_n, bias, SPLIT_K, HAS_BIAS)


def _group_block(gs: int, k: int) -> tuple[int, bool]:
    """(K block per loop step, whether one group covers K)."""
    if gs >= k:
        return (256 if k % 256 == 0 else 64), True
    return gs, False


_CHECKED: dict[int, bool] = {}


def _self_check(device: torch.device) -> bool:
    """Run the kernel once per device on small random problems against float64 (its fragments assume a register
    layout that Triton chooses; a different choice would give wrong sums, so the candidates then stay out)."""
    from hubquant_kernels import pack

    g = torch.Generator(device=device).manual_seed(1)
    ok = True
    for m, n, k, gs, asym, dt, w, s, st in ((1, 256, 1024, 128, False, torch.bfloat16, 4, 2, 1),
                                            (5, 128, 512, 64, True, torch.float16, 2, 1, 3),
                                            (8, 256, 512, 512, False, torch.bfloat16, 8, 1, 1)):
        qw = pack.pack_kn(torch.randint(0, 16, (k, n), device=device, generator=g))
        sc = (torch.rand(k // gs, n, device=device, generator=g) * 0.02 + 1e-3).to(dt)
        z = torch.randint(0, 16, (k // gs, n), device=device, generator=g).to(torch.uint8) if asym else None
        x = torch.randn(m, k, device=device, generator=g).to(dt)
        y = torch.full((m, n), float("nan"), dtype=dt, device=device)
        _launch(x, qw, sc, z, None, y, gs, w, s, st)
        ref = mmv_reference(x.double(), shuffle(qw), sc.double(), z, gs, None)
        err = float((y.double() - ref).norm() / ref.norm())
        ok = ok and err < 1e-2
    return ok


def mmv(x, qweight, scales, zeros, bias, y, gs, *, warps=4, split_k=1, stages=1):
    """y = x @ W (+ bias) on the tensor cores for M <= 8; x [M, K] contiguous rows, y [M, N] preallocated."""
    m, k = x.shape
    n = qweight.shape[1]
    if (m > 8 or x.dtype not in (torch.bfloat16, torch.float16) or n % 16 or k % 64 or (gs < k and gs % 64)
            or x.data_ptr() % 16 or x.stride(0) % 8):
        raise UnsupportedError("the MMA GEMV takes M <= 8 rows of bf16/fp16 x (16-byte aligned), N % 16 == 0, "
                               "K % 64 == 0 and groups of a multiple of 64 inputs",
                               hint="other W4A16 kernels handle this case")
    if interpreting() or not x.is_cuda:  # the inline assembly runs on NVIDIA GPUs only
        y.copy_(mmv_reference(x, shuffled(qweight), scales, zeros, gs, bias).to(y.dtype))
        return y
    dev = x.device.index or 0
    if dev not in _CHECKED:
        _CHECKED[dev] = _self_check(x.device)
    if not _CHECKED[dev]:
        raise UnsupportedError("the MMA GEMV failed its check on this GPU", hint="other W4A16 kernels are used")
    return _launch(x, qweight, scales, zeros, bias, y, gs, warps, split_k, stages)


def _launch(x, qweight, scales, zeros, bias, y, gs, warps, split_k, stages):
    m, k = x.shape
    n = qweight.shape[1]
    gb, one = _group_block(gs, k)
    n_blocks = k // gb
    split_k = max(1, min(split_k, n_blocks))
    k_split = -(-n_blocks // split_k) * gb
    tiles = n // 16
    progs = triton.cdiv(tiles, warps)
    if tiles % warps:
        raise UnsupportedError(f"{tiles} output tiles do not divide into programs of {warps} warps",
                               hint="use a warp count that divides N / 16")
    ws, cnt = workspace(x.device, m * n, progs) if split_k > 1 else (y, y)
    launch(_w4a16_mmv_kernel, (progs, split_k),
        x, shuffled(qweight), scales, zeros if zeros is not None else scales, bias if bias is not None else scales,
        y, ws, cnt, m, n, k, k_split, x.stride(0), y.stride(0), scales.stride(0),
        GS=min(gs, k), GB=gb, ONE_GROUP=one, HAS_ZP=zeros is not None, HAS_BIAS=bias is not None,
        W=warps, SPLIT_K=split_k, FP16=x.dtype == torch.float16, MASK_X=m < 8, STAGES=stages, num_warps=warps,
    )
    return y


# (warps, split-K ways, stages); the chooser keeps the fastest per shape. The H200 sweep
# (bench/kernels/results/h200_sweep_mmv2.json) timed 2/4/8 warps, splits 1-16 and stages 1/3: Triton's cp.async
# pipeline (stages 3) lost everywhere, 2 warps never won alone, and the winners used splits of 4-16 (the largest
# offered on most shapes, so 24 and 32 are offered too)
CONFIGS = tuple((w, s, 1) for w in (4, 8) for s in (1, 2, 4, 6, 8, 12, 16, 24, 32))
SWEEP_CONFIGS = tuple((w, s, st) for w in (2, 4, 8) for s in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32) for st in (1, 3))


def enabled() -> bool:
    """HUBQUANT_MMV=1 offers these candidates; off by default, as each weight they run on keeps a shuffled copy
    (one more copy of its packed bytes on the GPU)."""
    return os.environ.get("HUBQUANT_MMV", "0") == "1"


def candidates(m: int, n: int, k: int, gs: int) -> list[Candidate]:
    """MMA GEMV configurations for an [m, k] x [k, n] product with m <= 8."""
    if m > 8 or not enabled() or n % 16 or k % 64 or (gs < k and gs % 64):
        return []
    gb, _ = _group_block(gs, k)
    out = []
    sweep = "1" in (os.environ.get("HUBQUANT_W4_SWEEP"), os.environ.get("HUBQUANT_W4_SWEEP_MMV"))
    for warps, split, stages in SWEEP_CONFIGS if sweep else CONFIGS:
        progs = (n // 16) // warps
        if (n // 16) % warps or split > k // gb or progs * split > 4096 or (split > 1 and progs * split < 132):
            continue
        if split > 1 and -(-(k // gb) // split) * (split - 1) >= k // gb:  # a program would get no block
            continue
        out.append(Candidate(name=f"mmv_w{warps}_s{split}_st{stages}",
                             fn=lambda *a, w=warps, s=split, st=stages: mmv(*a, warps=w, split_k=s, stages=st)))
    return out
