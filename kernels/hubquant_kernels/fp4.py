"""Weight-only FP4 (NVFP4 / MXFP4) x bf16/fp16 activations, dequantized in registers (Hopper and older GPUs).

Layout: compressed-tensors' `nvfp4-pack-quantized` and `mxfp4-pack-quantized` checkpoints, used as stored.

- ``weight_packed`` uint8 [N, K/2]: two FP4 (E2M1) codes a byte, input k = 2b in the low nibble of byte b and
  k = 2b + 1 in the high nibble (compressed-tensors' ``pack_fp4_to_uint8``). A code is ``s e1 e0 m`` (bit 3 the
  sign): magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 for codes 0..7.
- NVFP4: ``weight_scale`` float8_e4m3fn [N, K/16] (one scale per 16 inputs) and ``weight_global_scale`` fp32 [1];
  ``W[n, k] = e2m1(code) * (weight_scale[n, k // 16] / weight_global_scale)`` (compressed-tensors divides the
  block scale by the global scale when it dequantizes).
- MXFP4: ``weight_scale`` uint8 [N, K/32] holding E8M0 exponents, ``W[n, k] = e2m1(code) * 2^(e - 127)``; no global
  scale.

``y = x @ W.T (+ bias)``. The kernels read the packed bytes as int32 words (8 codes, input 8c + j in nibble j)
transposed once to [K/8, N] (`repack`; the scales to [K/block, N]), the layout of hubquant_kernels.pack's W4A16
weights, and never materialize W. `fp4_linear` takes the checkpoint layout and repacks each weight tensor once
(remembered while the tensor lives); a loader calls `repack` itself and `fp4_linear_kn`, keeping one copy.

- M <= 2: an FMA GEMV over [BK/8, BN] tiles (coalesced along N), split-K across programs, fp32 accumulation;
  each code becomes an fp16 by moving its three magnitude bits under the fp16 exponent/mantissa boundary and its
  sign to bit 15 (exact, subnormals included), so E2M1 decoding costs a few integer ops and one conversion; the
  constant factors of that trick (2^14, and 2^8 for the E4M3 scales decoded the same way) fold into the scale.
- M > 2 (and M = 2 where faster): the same decoding into 16-bit tiles, the 8 nibbles interleaved into K order in
  registers (join/permute/reshape), one tensor-core dot per [BM, BK] x [BK, BN] block.

`fp4_reference` (plain torch) is the test oracle and the CPU fallback.
"""
from __future__ import annotations

import weakref

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

KINDS = {"nvfp4": 16, "mxfp4": 32}  # kind -> inputs per block scale
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
ACT_DTYPES = (torch.bfloat16, torch.float16)


# ---------------------------------------------------------------- torch reference
def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> FP4 codes uint8 [N, K] (low nibble first)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def e2m1_to_float(codes: torch.Tensor) -> torch.Tensor:
    """FP4 E2M1 codes (0..15) -> float32 values."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    mag = table[(codes & 0x7).long()]
    return torch.where((codes & 0x8) != 0, -mag, mag)


def block_scales(block_scale: torch.Tensor, global_scale: torch.Tensor | None, kind: str) -> torch.Tensor:
    """float32 [N, K / block] scales as compressed-tensors dequantizes them."""
    if kind == "mxfp4":
        return torch.pow(2.0, block_scale.to(torch.int32).float() - 127.0)
    s = block_scale.float()
    return s / global_scale.float().reshape(()) if global_scale is not None else s


def fp4_dequantize_reference(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor | None,
                             kind: str = "nvfp4") -> torch.Tensor:
    """float32 W [N, K] from the packed codes and scales."""
    vals = e2m1_to_float(unpack_codes(packed))
    s = block_scales(block_scale, global_scale, kind)
    return vals * s.repeat_interleave(KINDS[kind], dim=1)[:, : vals.shape[1]]


def fp4_reference(x: torch.Tensor, packed: torch.Tensor, block_scale: torch.Tensor,
                  global_scale: torch.Tensor | None, kind: str = "nvfp4",
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T (+ bias) in x's dtype (W rounded to x's dtype first, as a float model would hold it)."""
    w = fp4_dequantize_reference(packed, block_scale, global_scale, kind).to(x.dtype)
    y = x @ w.t()
    return y + bias.to(y.dtype) if bias is not None else y


# ---------------------------------------------------------------- Triton kernels
try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    from hubquant_kernels.splitk import store_or_reduce as _store_or_reduce
    from hubquant_kernels.w4a16_mma import _interleave8

    @triton.jit
    def _e2m1_f32(t):
        """The low nibble of every int32 in t as float32 E2M1 value / 2^14 (fp16 bit trick, exact)."""
        h = ((t & 0x7) << 9) | ((t & 0x8) << 12)
        return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _scale_f32(b, MX: tl.constexpr):
        """Block-scale bytes -> float32 scale * 2^14 (undoing _e2m1_f32's factor): E8M0 2^(e-127) or E4M3."""
        b = b.to(tl.int32) & 0xFF
        if MX:
            return (b << 23).to(tl.float32, bitcast=True) * 16384.0
        h = ((b & 0x7F) << 7) | ((b & 0x80) << 8)  # E4M3 bits into fp16: value / 2^8 (subnormals too)
        return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 4194304.0  # 2^8 * 2^14

    @triton.jit
    def _fp4_gemv_kernel(x_ptr, w_ptr, s_ptr, g_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
                         N, K, k_split, stride_xm, stride_ym, stride_w, stride_s,
                         GS: tl.constexpr, MX: tl.constexpr, HAS_G: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr):
        # [R, BN] tiles of the [K/8, N] words (coalesced along N); one activation load serves a thread's columns
        R: tl.constexpr = BK // 8
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_n = pid_n * BN + tl.arange(0, BN)
        mask_n = offs_n < N
        k_lo = pid_k * k_split
        k_hi = tl.minimum(k_lo + k_split, K)
        x_row = x_ptr + pid_m * stride_xm
        acc = tl.zeros((R, BN), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BK):
            offs_r = k0 // 8 + tl.arange(0, R)
            rmask = offs_r < k_hi // 8
            m2 = rmask[:, None] & mask_n[None, :]
            pw = tl.load(w_ptr + offs_r[:, None] * stride_w + offs_n[None, :], mask=m2, other=0,
                         eviction_policy="evict_first")
            sb = tl.load(s_ptr + (offs_r * 8 // GS)[:, None] * stride_s + offs_n[None, :], mask=m2, other=0)
            part = tl.zeros((R, BN), dtype=tl.float32)
            for j in tl.static_range(8):
                xj = tl.load(x_row + offs_r * 8 + j, mask=rmask, other=0.0).to(tl.float32)
                part += _e2m1_f32(pw >> (4 * j)) * xj[:, None]
            acc += part * _scale_f32(sb, MX)
        out = tl.sum(acc, axis=0)
        if HAS_G:
            out = out / tl.load(g_ptr).to(tl.float32)
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
        _store_or_reduce(out, y_ptr + pid_m * stride_ym + offs_n, ws_ptr + pid_m * N + offs_n, mask_n,
                         cnt_ptr, pid_m * tl.num_programs(1) + pid_n, bias, SPLIT_K, HAS_BIAS)

    @triton.jit
    def _dq4(pw, j: tl.constexpr, s, dtype: tl.constexpr):
        return (_e2m1_f32(pw >> (4 * j)) * s).to(dtype)

    @triton.jit
    def _fp4_mm_kernel(x_ptr, w_ptr, s_ptr, g_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
                       M, N, K, k_split, stride_xm, stride_ym, stride_w, stride_s,
                       GS: tl.constexpr, MX: tl.constexpr, HAS_G: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
                       DOT_F32: tl.constexpr):
        # each word loaded once, its 8 codes decoded and scaled, interleaved into K order, one dot per block
        R: tl.constexpr = BK // 8
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        mask_m = offs_m < M
        mask_n = offs_n < N
        k_lo = pid_k * k_split
        k_hi = tl.minimum(k_lo + k_split, K)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BK):
            offs_k = k0 + tl.arange(0, BK)
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & (offs_k < k_hi)[None, :], other=0.0)
            offs_r = k0 // 8 + tl.arange(0, R)
            m2 = (offs_r < k_hi // 8)[:, None] & mask_n[None, :]
            pw = tl.load(w_ptr + offs_r[:, None] * stride_w + offs_n[None, :], mask=m2, other=0)
            s = _scale_f32(tl.load(s_ptr + (offs_r * 8 // GS)[:, None] * stride_s + offs_n[None, :], mask=m2,
                                   other=0), MX)
            w = _interleave8(_dq4(pw, 0, s, a.dtype), _dq4(pw, 1, s, a.dtype), _dq4(pw, 2, s, a.dtype),
                             _dq4(pw, 3, s, a.dtype), _dq4(pw, 4, s, a.dtype), _dq4(pw, 5, s, a.dtype),
                             _dq4(pw, 6, s, a.dtype), _dq4(pw, 7, s, a.dtype), BK, BN)
            if DOT_F32:  # the CPU interpreter mis-multiplies 16-bit dots: same rounded values, fp32 operands
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc)
            else:
                acc = tl.dot(a, w, acc)
        if HAS_G:
            acc = acc / tl.load(g_ptr).to(tl.float32)
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :] if HAS_BIAS else 0.0
        _store_or_reduce(acc, y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
                         ws_ptr + offs_m[:, None] * N + offs_n[None, :], mask_m[:, None] & mask_n[None, :],
                         cnt_ptr, pid_m * tl.num_programs(0) + pid_n, bias, SPLIT_K, HAS_BIAS)


# ---------------------------------------------------------------- wrappers
def repack(packed: torch.Tensor, block_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Checkpoint layout -> kernel layout, once at load time: (int32 [K/8, N] words, uint8 [K/block, N] scales).

    Word c of row n holds codes 8c..8c+7 (nibble j = input 8c + j, compressed-tensors' byte order read as a
    little-endian int32); transposing the words puts N along the contiguous axis, as in hubquant_kernels.pack's
    W4A16 layout, so a GEMV thread's activation loads serve several output columns.
    """
    return packed.contiguous().view(torch.int32).t().contiguous(), block_scale.view(torch.uint8).t().contiguous()


_REPACKED: dict[int, tuple] = {}  # id(packed) -> (weakref to packed, block_scale pointer, qweight, scales)


def _repacked(packed, block_scale):
    """`repack`, remembered per weight tensor while it lives (for callers passing the checkpoint layout)."""
    hit = _REPACKED.get(id(packed))
    if hit is None or hit[0]() is not packed or hit[1] != block_scale.data_ptr():
        hit = (weakref.ref(packed), block_scale.data_ptr(), *repack(packed, block_scale))
        _REPACKED[id(packed)] = hit
        weakref.finalize(packed, _REPACKED.pop, id(packed), None)
    return hit[2], hit[3]


def _gemv(x, qw, s8, g, bias, y, gs, mx, *, bn, bk, split_k, warps):
    m, k = x.shape
    n = qw.shape[1]
    n_tiles = triton.cdiv(n, bn)
    k_split = triton.cdiv(triton.cdiv(k, bk), split_k) * bk
    ws, cnt = workspace(x.device, m * n, m * n_tiles) if split_k > 1 else (y, y)
    launch(_fp4_gemv_kernel, (m, n_tiles, split_k),
           x, qw, s8, g if g is not None else s8, bias if bias is not None else s8, y, ws, cnt,
           n, k, k_split, x.stride(0), y.stride(0), qw.stride(0), s8.stride(0),
           GS=gs, MX=mx, HAS_G=g is not None, HAS_BIAS=bias is not None, BN=bn, BK=bk, SPLIT_K=split_k,
           num_warps=warps)
    return y


def _mm(x, qw, s8, g, bias, y, gs, mx, *, bm, bn, bk, split_k, warps, stages):
    m, k = x.shape
    n = qw.shape[1]
    n_tiles, m_tiles = triton.cdiv(n, bn), triton.cdiv(m, bm)
    k_split = triton.cdiv(triton.cdiv(k, bk), split_k) * bk
    ws, cnt = workspace(x.device, m * n, m_tiles * n_tiles) if split_k > 1 else (y, y)
    launch(_fp4_mm_kernel, (n_tiles, m_tiles, split_k),
           x, qw, s8, g if g is not None else s8, bias if bias is not None else s8, y, ws, cnt,
           m, n, k, k_split, x.stride(0), y.stride(0), qw.stride(0), s8.stride(0),
           GS=gs, MX=mx, HAS_G=g is not None, HAS_BIAS=bias is not None, BM=bm, BN=bn, BK=bk, SPLIT_K=split_k,
           DOT_F32=interpreting(), num_warps=warps, num_stages=stages)
    return y


def candidates(m: int, n: int, k: int) -> list[Candidate]:
    """FP4 implementations worth timing for an [m, k] x [n, k]^T product; the first is the default."""
    out = []
    if m <= 2:  # the W4A16 GEMV's block shapes (gemv2: BN=64, BK=256 won on the H200)
        for bn, bk, warps in ((64, 256, 4), (128, 128, 4), (128, 256, 8), (32, 512, 4)):
            for split in (1, 2, 4, 6, 8, 16):
                per = -(-(-(-k // bk)) // split)
                if split == 1 or (-(-k // bk) >= 2 * split and per * (split - 1) < -(-k // bk)
                                  and -(-n // bn) * split <= 2112):
                    out.append(Candidate(name=f"fp4gemv_bn{bn}_bk{bk}_s{split}_w{warps}",
                                         fn=lambda *a, bn=bn, bk=bk, s=split, w=warps:
                                         _gemv(*a, bn=bn, bk=bk, split_k=s, warps=w)))
    bm = 16 if m <= 16 else (32 if m <= 32 else (64 if m <= 64 else 128))
    cfgs = [(64, 128, s, 4, 3) for s in (1, 2, 4, 8)] + [(128, 128, s, 4, 3) for s in (1, 2, 4)] if m <= 64 else \
        [(128, 64, 1, 8, 4), (128, 128, 1, 8, 3), (256, 64, 1, 8, 3)]
    for bn, bk, split, warps, stages in cfgs:
        if split == 1 or -(-k // bk) >= 2 * split:
            out.append(Candidate(name=f"fp4mm_{bm}x{bn}x{bk}_s{split}_w{warps}",
                                 fn=lambda *a, bn=bn, bk=bk, s=split, w=warps, st=stages:
                                 _mm(*a, bm=bm, bn=bn, bk=bk, split_k=s, warps=w, stages=st)))
    return out


def _check(x, packed, block_scale, global_scale, kind, bias):
    check(kind in KINDS, f"unknown FP4 kind {kind!r}", hint="kind is 'nvfp4' or 'mxfp4'")
    check_dtype("x", x, ACT_DTYPES)
    check_dtype("packed", packed, (torch.uint8,))
    scale_types = (torch.float8_e4m3fn,) if kind == "nvfp4" else (torch.uint8,)
    check_dtype("block_scale", block_scale, scale_types)
    check_same_device(x=x, packed=packed, block_scale=block_scale, global_scale=global_scale, bias=bias)
    check(packed.dim() == 2, f"packed must be [N, K/2], got {tuple(packed.shape)}",
          hint="pass compressed-tensors' weight_packed as stored")
    n, k = packed.shape[0], packed.shape[1] * 2
    gs = KINDS[kind]
    check(k % 32 == 0, f"input size {k} is not a multiple of 32", hint="FP4 kernels need K % 32 == 0")
    check(block_scale.shape == (n, k // gs), f"block_scale has shape {tuple(block_scale.shape)}, expected "
          f"{(n, k // gs)} for {kind}", hint=f"{kind} has one scale per {gs} inputs, [N, K/{gs}]")
    if kind == "mxfp4":
        check(global_scale is None, "MXFP4 has no global scale", hint="pass global_scale=None for mxfp4")
    if global_scale is not None:
        check(global_scale.numel() == 1, "the global scale must hold one value",
              hint="weight_global_scale is [1]")
    if bias is not None:
        check(bias.shape == (n,), f"bias has shape {tuple(bias.shape)}, expected ({n},)", hint="bias is [N]")
    check(packed.stride(1) == 1 and block_scale.stride(1) == 1 and packed.stride(0) % 4 == 0,
          "packed and block_scale need unit stride along K (rows of whole int32 words)",
          hint="call .contiguous() once at load time")
    return n, k, gs


def fp4_linear_kn(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor | None,
                  kind: str = "nvfp4", bias: torch.Tensor | None = None, *, impl: str | None = None) -> torch.Tensor:
    """`fp4_linear` on weights already in the kernel layout (`repack`): qweight int32 [K/8, N], scales uint8
    [K/block, N] (E4M3 bytes for nvfp4, E8M0 for mxfp4)."""
    check(kind in KINDS, f"unknown FP4 kind {kind!r}", hint="kind is 'nvfp4' or 'mxfp4'")
    check_dtype("qweight", qweight, (torch.int32,))
    check_dtype("scales", scales, (torch.uint8,))
    k, n, gs = qweight.shape[0] * 8, qweight.shape[1], KINDS[kind]
    check(scales.shape == (k // gs, n), f"scales have shape {tuple(scales.shape)}, expected {(k // gs, n)}",
          hint="use hubquant_kernels.fp4.repack on the checkpoint tensors")
    lead = x.shape[:-1]
    x2 = as_2d(x, k)
    if not use_triton(x2):
        raw = qweight.t().contiguous().view(torch.uint8)
        bs = scales.t().contiguous()
        bs = bs.view(torch.float8_e4m3fn) if kind == "nvfp4" else bs
        return fp4_reference(x2, raw, bs, global_scale, kind, bias).reshape(*lead, n)
    return _run(x2, qweight, scales, global_scale, kind, bias, impl).reshape(*lead, n)


def _run(x2, qw, s8, global_scale, kind, bias, impl):
    require_triton()
    m, n = x2.shape[0], qw.shape[1]
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    if m == 0:
        return y
    k, gs = x2.shape[1], KINDS[kind]
    g = None if global_scale is None else global_scale.float().reshape(1)
    args = (x2, qw, s8, g, bias, y, gs, kind == "mxfp4")
    if impl is not None:
        cands = [c for c in candidates(m, n, k) if c.name == impl]
        check(bool(cands), f"no FP4 implementation named {impl!r} for this shape",
              hint="see hubquant_kernels.fp4.candidates(m, n, k)")
        return cands[0].fn(*args)
    key = ("fp4", kind, m_bucket(m), n, k, x2.dtype, bias is not None, g is not None)
    return choose_lazy(key, lambda: candidates(m, n, k), args, on_gpu=x2.is_cuda).fn(*args)


def fp4_linear(x: torch.Tensor, packed: torch.Tensor, block_scale: torch.Tensor,
               global_scale: torch.Tensor | None, kind: str = "nvfp4", bias: torch.Tensor | None = None, *,
               impl: str | None = None) -> torch.Tensor:
    """y = x @ W.T (+ bias) for FP4 weights in compressed-tensors' layout (see the module docstring).

    Args:
        x: activations [..., K], bf16 or fp16.
        packed: ``weight_packed`` uint8 [N, K/2].
        block_scale: ``weight_scale``: float8_e4m3fn [N, K/16] (nvfp4) or uint8 E8M0 [N, K/32] (mxfp4).
        global_scale: ``weight_global_scale`` [1] (nvfp4; None means 1), None for mxfp4.
        kind: "nvfp4" or "mxfp4". bias: optional [N]. impl: force a candidate by name (benchmarks).

    Returns:
        y [..., N] in x's dtype (Triton on CUDA or under TRITON_INTERPRET=1, `fp4_reference` elsewhere).

    Raises:
        UsageError: shapes, kind or devices do not match. UnsupportedError: wrong dtypes.
    """
    n, k, gs = _check(x, packed, block_scale, global_scale, kind, bias)
    lead = x.shape[:-1]
    x2 = as_2d(x, k)
    if not use_triton(x2):
        return fp4_reference(x2, packed, block_scale, global_scale, kind, bias).reshape(*lead, n)
    qw, s8 = _repacked(packed, block_scale)
    return _run(x2, qw, s8, global_scale, kind, bias, impl).reshape(*lead, n)
