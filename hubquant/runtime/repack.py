"""Checkpoint tensors -> the kernels' layout (pure tensor functions, one per format; see shared FORMATS.md).

Every function returns the keyword arguments of a module in hubquant.runtime.modules, or raises
UnsupportedError for a variant the kernels do not run (the loader then dequantizes it to a float Linear).
"""
from __future__ import annotations

import torch

from hubquant.errors import CorruptFileError, UnsupportedError
from hubquant_kernels.pack import pack_kn, unpack_rows

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column 8c + AWQ_ORDER[i]
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def _group_size(in_f: int, n_groups: int) -> int:
    if n_groups == 1:
        return -1
    if in_f % n_groups:
        raise CorruptFileError(f"{n_groups} scale groups do not divide {in_f} input features",
                               hint="the checkpoint's scales do not match its weights")
    return in_f // n_groups


def _unpack_cols(packed: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """int32 [R, C/8] packed along columns (nibble i -> column 8c + order[i]) -> unsigned codes [R, C]."""
    u = (packed.unsqueeze(-1) >> _SHIFTS) & 0xF  # [R, C/8, 8] by nibble
    inv = [order.index(j) for j in range(8)]
    return u[:, :, inv].reshape(packed.shape[0], -1)


def _zeros_or_none(z: torch.Tensor) -> torch.Tensor | None:
    """Unsigned zero points, or None when all are 8 (symmetric codes)."""
    return None if bool((z == 8).all()) else z.to(torch.uint8).contiguous()


def compressed_tensors_w4(t: dict[str, torch.Tensor], in_f: int, out_f: int) -> dict:
    """pack-quantized 4-bit: weight_packed [N, K/8] -> [K/8, N]; scale [N, G] -> [G, N]; zero point -> [G, N]."""
    packed = t["weight_packed"]
    if packed.shape != (out_f, -(-in_f // 8)):
        raise UnsupportedError(f"weight_packed has shape {tuple(packed.shape)}; 4-bit packing of [{out_f}, {in_f}] "
                               f"is [{out_f}, {-(-in_f // 8)}]", hint="only 4-bit pack-quantized runs on the kernels")
    if in_f % 8:
        raise UnsupportedError(f"input size {in_f} is not a multiple of 8", hint="4-bit kernels need K % 8 == 0")
    scale = t["weight_scale"]
    gs = _group_size(in_f, scale.shape[1])
    zeros = None
    if "weight_zero_point" in t:
        zp = t["weight_zero_point"]
        if zp.dtype == torch.int32:  # packed along the output dim: [ceil(N/8), G]
            zp = unpack_rows(zp.t().contiguous(), out_f)  # [G, N] signed
        else:  # an unpacked int8 [N, G] zero point
            zp = zp.reshape(out_f, -1).t()
        zeros = _zeros_or_none(zp.to(torch.int32) + 8)
    return {"qweight": packed.t().contiguous(), "scales": scale.t().contiguous(), "zeros": zeros, "group_size": gs}


def gptq_w4(t: dict[str, torch.Tensor], in_f: int, out_f: int, *, bits: int, group_size: int, v1: bool) -> dict:
    """GPTQ qweight [K/8, N] is already the kernel layout; qzeros [G, N/8] (v1 stores z - 1); g_idx -> perm."""
    if bits != 4:
        raise UnsupportedError(f"{bits}-bit GPTQ does not run on hubquant's kernels", hint="use 4-bit GPTQ")
    qweight, scales = t["qweight"], t["scales"]
    if qweight.shape != (in_f // 8, out_f):
        raise CorruptFileError(f"qweight has shape {tuple(qweight.shape)}, expected {(in_f // 8, out_f)}",
                               hint="the GPTQ checkpoint does not match config.json")
    n_groups = scales.shape[0]
    gs = in_f if group_size == -1 else group_size
    z = _unpack_cols(t["qzeros"])[:, :out_f].to(torch.int32)
    if v1:
        z = (z + 1) & 0xF  # v1 stores z - 1 in 4 bits (a zero point of 0 is written as 15)
    perm = None
    g_idx = t.get("g_idx")
    if g_idx is not None:
        g_idx = g_idx.to(torch.int64)
        if not torch.equal(g_idx, torch.arange(in_f) // gs):
            perm = torch.argsort(g_idx, stable=True)
            counts = torch.bincount(g_idx, minlength=n_groups)
            if not bool((counts == gs).all()):
                raise UnsupportedError("g_idx assigns unequal numbers of inputs to groups",
                                       hint="only GPTQ act-order permutations of equal groups are supported")
            u = _unpack_cols(qweight.t().contiguous()).t()  # [K, N] codes along K
            qweight = pack_kn(u[perm])
    return {"qweight": qweight.contiguous(), "scales": scales.contiguous(), "zeros": _zeros_or_none(z),
            "group_size": -1 if n_groups == 1 else gs, "perm": perm}


def gptq_dequantize(t: dict[str, torch.Tensor], in_f: int, out_f: int, *, bits: int, v1: bool) -> torch.Tensor:
    """Float32 [N, K] weight of a GPTQ Linear of any bit width (dense bitstreams, as FORMATS.md describes)."""
    from hubquant.formats.compressed_tensors import unpack_int32

    q = unpack_int32(t["qweight"], bits, in_f, dim=0).to(torch.float32)  # [K, N] signed (u - 2^(b-1))
    z = unpack_int32(t["qzeros"], bits, out_f, dim=1).to(torch.float32)  # [G, N] signed, v1 stores z - 1
    if v1:
        z = z + 1
    n_groups = t["scales"].shape[0]
    g_idx = t.get("g_idx")
    g = g_idx.long() if g_idx is not None else torch.arange(in_f) // max(1, in_f // n_groups)
    return ((q - z[g]) * t["scales"].float()[g]).t().contiguous()


def awq_gemm_w4(t: dict[str, torch.Tensor], in_f: int, out_f: int, *, bits: int, group_size: int) -> dict:
    """AWQ GEMM: qweight [K, N/8] interleaved along N -> codes [K, N] -> kernel layout; qzeros likewise."""
    if bits != 4:
        raise UnsupportedError(f"{bits}-bit AWQ does not run on hubquant's kernels", hint="use 4-bit AWQ")
    qweight = t["qweight"]
    if qweight.shape != (in_f, out_f // 8):
        raise CorruptFileError(f"qweight has shape {tuple(qweight.shape)}, expected {(in_f, out_f // 8)}",
                               hint="the AWQ checkpoint does not match config.json (AWQ GEMM layout)")
    u = _unpack_cols(qweight, AWQ_ORDER)
    z = _unpack_cols(t["qzeros"], AWQ_ORDER).to(torch.int32)
    scales = t["scales"]
    return {"qweight": pack_kn(u), "scales": scales.contiguous(), "zeros": _zeros_or_none(z),
            "group_size": _group_size(in_f, scales.shape[0])}


def dequantize_w4(kw: dict, in_f: int) -> torch.Tensor:
    """Float32 [N, K] weight from repacked 4-bit tensors (for the float fallback and tests)."""
    from hubquant_kernels.w4a16 import dequantize_reference

    w = dequantize_reference(kw["qweight"], kw["scales"], kw["zeros"], kw["group_size"]).t()
    if kw.get("perm") is not None:
        w = torch.empty_like(w).index_copy_(1, kw["perm"], w)
    return w.contiguous()
