"""4-bit packing: the kernels' weight layout, compressed-tensors' layout, and an RTN quantize+pack kernel.

Kernel layout ("KN8"): ``qweight`` int32 [K/8, N]; nibble j (bits 4j..4j+3, low first) of row r holds the
*unsigned* code u = q + 8 of input k = 8r + j for output n. It is GPTQ's qweight layout, and compressed-tensors'
``weight_packed`` [N, K/8] transposed, so both repack with one transpose; loads along N are coalesced.
Scales are [G, N] (transposed from the checkpoints' [N, G]) and zero points, when present, unsigned [G, N].

compressed-tensors layout (``pack_rows``): int32 [R, ceil(C/8)], element c of a row at bit 4(c % 8) of word
c // 8, stored as q + 8 (signed codes offset to unsigned).
"""
from __future__ import annotations

import torch

from hubquant.errors import UnsupportedError, UsageError
from hubquant_kernels._common import check, check_dtype, require_triton, use_triton

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


# ---------------------------------------------------------------- torch references
def pack_rows(q: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Signed int8 codes [R, C] -> int32 [R, ceil(C/8)] (compressed-tensors `pack_to_int32`, dim 1)."""
    if bits != 4:
        raise UnsupportedError(f"{bits}-bit packing is not implemented", hint="hubquant packs 4-bit codes only")
    check_dtype("q", q, (torch.int8,))
    r, c = q.shape
    u = (q.to(torch.int32) + 8) & 0xF
    pad = (-c) % 8
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.reshape(r, -1, 8) << _SHIFTS.to(q.device)
    return _or_reduce(u)


def unpack_rows(packed: torch.Tensor, cols: int, bits: int = 4) -> torch.Tensor:
    """int32 [R, ceil(C/8)] -> signed int8 codes [R, C] (inverse of `pack_rows`)."""
    if bits != 4:
        raise UnsupportedError(f"{bits}-bit packing is not implemented", hint="hubquant packs 4-bit codes only")
    check_dtype("packed", packed, (torch.int32,))
    u = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF
    return (u.reshape(packed.shape[0], -1)[:, :cols] - 8).to(torch.int8)


def _or_reduce(u: torch.Tensor) -> torch.Tensor:
    """OR the last dim (disjoint bit fields) into int32, wrapping like the hardware does."""
    return _wrap32(u.to(torch.int64).sum(-1))


def _wrap32(v: torch.Tensor) -> torch.Tensor:
    v = v & 0xFFFFFFFF
    return torch.where(v >= (1 << 31), v - (1 << 32), v).to(torch.int32)


def pack_kn(u: torch.Tensor) -> torch.Tensor:
    """Unsigned codes [K, N] in 0..15 -> kernel layout int32 [K/8, N]."""
    k, n = u.shape
    check(k % 8 == 0, f"input size {k} is not a multiple of 8", hint="4-bit kernels need K % 8 == 0")
    u = (u.to(torch.int64) & 0xF).reshape(k // 8, 8, n) << _SHIFTS.to(u.device, torch.int64).view(1, 8, 1)
    return _wrap32(u.sum(1))


def unpack_kn(qweight: torch.Tensor) -> torch.Tensor:
    """Kernel layout int32 [K/8, N] -> unsigned codes uint8 [K, N]."""
    check_dtype("qweight", qweight, (torch.int32,))
    r, n = qweight.shape
    u = (qweight.unsqueeze(1) >> _SHIFTS.to(qweight.device).view(1, 8, 1)) & 0xF
    return u.reshape(r * 8, n).to(torch.uint8)


def rtn_pack_reference(
    w: torch.Tensor, group_size: int, symmetric: bool = True, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """hubquant.quant's 4-bit RTN (min-max) + compressed-tensors packing, in plain torch.

    Returns (weight_packed int32 [N, K/8], scale [N, G], zero_point int8 [N, G] or None).
    """
    from hubquant.quant import WeightScheme, rtn_quantize

    qw = rtn_quantize(w, WeightScheme(bits=4, group_size=group_size, symmetric=symmetric),
                      scale_dtype=scale_dtype or w.dtype)
    return pack_rows(qw.qweight), qw.scale, qw.zero_point


# ---------------------------------------------------------------- Triton: RTN quantize + pack
try:
    import triton
    import triton.language as tl
except ImportError:  # the references above still work
    triton = None

if triton is not None:

    @triton.jit
    def _round_even(v):
        # round half to even, like torch.round, for |v| < 2^22 (adding 1.5 * 2^23 leaves no fraction bits)
        return (v + 12582912.0) - 12582912.0

    @triton.jit
    def _round_to_bf16(v):
        # fp32 -> nearest bf16 value (ties to even), kept in fp32; exact on GPU and in the CPU interpreter
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _rtn_pack_kernel(
        w_ptr, p_ptr, s_ptr, z_ptr, N, K, G, stride_wn,
        GS: tl.constexpr, SYM: tl.constexpr, BN: tl.constexpr, SCALE_BF16: tl.constexpr, SCALE_F16: tl.constexpr,
    ):
        # one program: BN rows x one group of GS columns
        pid_n = tl.program_id(0)
        g = tl.program_id(1)
        rows = pid_n * BN + tl.arange(0, BN)
        cols = g * GS + tl.arange(0, GS)
        rmask = rows < N
        w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        lo = tl.minimum(tl.min(w, axis=1), 0.0)
        hi = tl.maximum(tl.max(w, axis=1), 0.0)
        if SYM:
            scale = tl.math.div_rn(tl.maximum(-lo, hi), 7.5)
        else:
            scale = tl.math.div_rn(hi - lo, 15.0)
        scale = tl.where(scale > 0, scale, 1e-8)
        # the scale is stored in the checkpoint dtype; codes are computed from the stored value
        if SCALE_BF16:
            scale = _round_to_bf16(scale)
        if SCALE_F16:
            scale = scale.to(tl.float16).to(tl.float32)
        q = _round_even(tl.math.div_rn(w, scale[:, None]))
        if SYM:
            q = tl.minimum(tl.maximum(q, -8.0), 7.0)
        else:
            zp = tl.minimum(tl.maximum(_round_even(-8.0 - tl.math.div_rn(lo, scale)), -8.0), 7.0)
            q = tl.minimum(tl.maximum(q + zp[:, None], -8.0), 7.0)
            tl.store(z_ptr + rows * G + g, zp.to(tl.int8), mask=rmask)
        u = (q.to(tl.int32) + 8) << ((tl.arange(0, GS) % 8) * 4)[None, :]
        words = tl.sum(tl.reshape(u, (BN, GS // 8, 8)), axis=2)  # disjoint nibbles: sum == OR
        wcols = g * (GS // 8) + tl.arange(0, GS // 8)
        tl.store(p_ptr + rows[:, None] * (K // 8) + wcols[None, :], words, mask=rmask[:, None])
        tl.store(s_ptr + rows * G + g, scale.to(s_ptr.dtype.element_ty), mask=rmask)


def rtn_pack(
    w: torch.Tensor, group_size: int, symmetric: bool = True, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """4-bit RTN quantize + pack in one pass (Triton on GPU; the torch reference elsewhere).

    Args:
        w: float weight [N, K] (fp32, fp16 or bf16).
        group_size: input columns per scale (power of two >= 8, or -1 for one group per row).
        symmetric: symmetric codes (no zero point) or asymmetric min-max with an int8 zero point.
        scale_dtype: dtype the scales are stored in (default: w's dtype).

    Returns:
        (weight_packed int32 [N, K/8], scale [N, G], zero_point int8 [N, G] or None), bit-identical to
        `rtn_pack_reference` (hubquant.quant.rtn_quantize + compressed-tensors packing).

    Raises:
        UsageError: w is not 2-D, or K is not a multiple of 8 and of the group size.
        UnsupportedError: w's dtype is not floating point.
    """
    check(w.dim() == 2, f"w must be [out, in], got shape {tuple(w.shape)}", hint="pass one Linear weight at a time")
    check_dtype("w", w, (torch.float32, torch.float16, torch.bfloat16))
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    check(k % 8 == 0 and k % gs == 0, f"input size {k} must be a multiple of 8 and of the group size {gs}",
          hint="choose a group size that divides the input size")
    scale_dtype = scale_dtype or w.dtype
    pow2 = gs & (gs - 1) == 0
    if not use_triton(w) or not pow2 or gs < 8 or gs > 8192:
        return rtn_pack_reference(w, group_size, symmetric, scale_dtype)
    require_triton()
    w = w.contiguous()
    g = k // gs
    packed = torch.empty(n, k // 8, dtype=torch.int32, device=w.device)
    scale = torch.empty(n, g, dtype=scale_dtype, device=w.device)
    zp = None if symmetric else torch.empty(n, g, dtype=torch.int8, device=w.device)
    bn = max(1, min(64, 4096 // gs))
    _rtn_pack_kernel[(triton.cdiv(n, bn), g)](
        w, packed, scale, zp if zp is not None else scale, n, k, g, w.stride(0),
        GS=gs, SYM=symmetric, BN=bn, SCALE_BF16=scale_dtype == torch.bfloat16,
        SCALE_F16=scale_dtype == torch.float16,
    )
    return packed, scale, zp


def ct_to_kernel_layout(weight_packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """compressed-tensors weight_packed [N, K/8] -> kernel layout [K/8, N] (the same nibbles, transposed)."""
    check_dtype("weight_packed", weight_packed, (torch.int32,))
    if in_features % 8:
        raise UsageError(f"input size {in_features} is not a multiple of 8", hint="4-bit kernels need K % 8 == 0")
    return weight_packed[:, : in_features // 8].t().contiguous()
