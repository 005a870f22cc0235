"""Quantization schemes and the pure tensor math every method and format shares.

Conventions (the same as compressed-tensors, so formats convert losslessly):
- integer codes are *signed*: q in [-2^(b-1), 2^(b-1) - 1], stored in int8 tensors;
- zero points are signed in the same range (None for symmetric schemes);
- dequantization is ``(q - zero_point) * scale`` per group of ``group_size`` input columns;
- ``scale`` has shape [out, n_groups] (n_groups = 1 for per-channel) and is kept in the
  dtype the checkpoint stores (so our dequantization equals every loader's exactly).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from hubquant.errors import UsageError
from hubquant.schemes import SCHEME_VERSION, ActivationScheme, QuantScheme, WeightScheme  # noqa: F401

PACK_INT8 = "pack_int8"  # QuantizedWeight.extra key: write these 8-bit codes packed (`pack-quantized`)


@dataclass
class QuantizedWeight:
    """A quantized Linear weight, independent of any file format.

    qweight: int8 codes [out, in] (or float8_e4m3fn for FP8), scale: [out, n_groups] in the
    storage dtype, zero_point: int8 [out, n_groups] or None. `extra` carries tensors only some
    formats need (bitsandbytes state, static input scales, ...).
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    scheme: WeightScheme
    input_scale: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qweight, self.scale, self.zero_point, self.scheme.group_size).to(dtype)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, n_groups, gs]."""
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    if in_f % gs:
        raise UsageError(
            f"input size {in_f} is not a multiple of group size {gs}",
            hint=f"use a group size that divides {in_f}: {', '.join(map(str, valid_group_sizes(in_f)))} or -1",
        )
    return w.reshape(out_f, in_f // gs, gs)


def valid_group_sizes(in_features: int) -> list[int]:
    return [g for g in (32, 64, 128, 256) if in_features % g == 0]


def minmax_qparams(
    w: torch.Tensor, scheme: WeightScheme, *, scale_dtype: torch.dtype = torch.float32,
    clip_ratio: torch.Tensor | float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point from each group's range (compressed-tensors' min-max observer).

    Returns scale [out, n_groups] in `scale_dtype` and a signed int8 zero point (None if symmetric).
    `clip_ratio` shrinks the range (AWQ/GPTQ clip search); broadcastable to [out, n_groups].
    """
    g = _grouped(w.float(), scheme.group_size)
    lo = g.amin(dim=-1).clamp(max=0) * clip_ratio
    hi = g.amax(dim=-1).clamp(min=0) * clip_ratio
    levels = float(2**scheme.bits - 1)
    if scheme.symmetric:
        scale = _div(torch.maximum(lo.abs(), hi), levels / 2)
        scale = _safe_scale(scale, scale_dtype)
        return scale, None
    scale = _safe_scale(_div(hi - lo, levels), scale_dtype)
    zp = torch.round(scheme.qmin - lo / scale.float()).clamp(scheme.qmin, scheme.qmax).to(torch.int8)
    return scale, zp


def _div(x: torch.Tensor, c: float) -> torch.Tensor:
    """x / c, correctly rounded on every device: CUDA divides by a Python scalar as a multiplication by its
    reciprocal (an ulp off for some x), which would make GPU scales, and the codes of each group's extreme
    weight, differ from the CPU's."""
    return x / torch.full_like(x, c)


def _safe_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    tiny = torch.finfo(dtype).tiny if dtype.is_floating_point else 1e-12
    scale = torch.where(scale > 0, scale, torch.full_like(scale, max(tiny, 1e-8)))
    return scale.to(dtype)


def quantize(
    w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, scheme: WeightScheme
) -> torch.Tensor:
    """Codes q = clamp(round(w / scale) + zp) as int8 [out, in]."""
    g = _grouped(w.float(), scheme.group_size)
    s = scale.float().unsqueeze(-1)
    q = torch.round(g / s)
    if zero_point is not None:
        q = q + zero_point.float().unsqueeze(-1)
    return q.clamp(scheme.qmin, scheme.qmax).to(torch.int8).reshape(w.shape)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """(q - zp) * scale in float32, [out, in]."""
    out_f, in_f = q.shape
    n_groups = scale.shape[1]
    gs = in_f // n_groups if group_size == -1 or n_groups == 1 else group_size
    g = q.float().reshape(out_f, in_f // gs, gs)
    if zero_point is not None:
        g = g - zero_point.float().unsqueeze(-1)
    return (g * scale.float().unsqueeze(-1)).reshape(out_f, in_f)


def fake_quantize(w: torch.Tensor, scheme: WeightScheme, **kw) -> torch.Tensor:
    """quantize -> dequantize with min-max parameters, in w's dtype."""
    scale, zp = minmax_qparams(w, scheme, **kw)
    return dequantize(quantize(w, scale, zp, scheme), scale, zp, scheme.group_size).to(w.dtype)


def rtn_quantize(w: torch.Tensor, scheme: WeightScheme, *, scale_dtype: torch.dtype | None = None) -> QuantizedWeight:
    """Round-to-nearest with min-max ranges: the baseline every method must beat."""
    scale, zp = minmax_qparams(w, scheme, scale_dtype=scale_dtype or w.dtype)
    return QuantizedWeight(qweight=quantize(w, scale, zp, scheme), scale=scale, zero_point=zp, scheme=scheme)


# ---------------------------------------------------------------- FP8 (e4m3)
# compressed-tensors' float observer: scale = amax / 448 (448 = largest finite e4m3fn),
# q = (x / scale).clamp(-448, 448).to(float8_e4m3fn), dequant = q.float() * scale.
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 codes of x / scale (clamped to the finite range)."""
    return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fp8_scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """amax / 448 in `dtype`, with zero ranges mapped to the smallest safe scale."""
    scale = _div(amax.float(), FP8_MAX)
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 1e-8))
    return scale.to(dtype)


def fp8_quantize_weight(w: torch.Tensor, scheme: WeightScheme, *, scale_dtype: torch.dtype | None = None,
                        per_tensor: bool = False) -> QuantizedWeight:
    """e4m3 codes of `w` [out, in]: qweight float8_e4m3fn, scale [out, 1] (per channel) or [1, 1] (per tensor).

    compressed-tensors' FP8 static scheme uses per-tensor weight scales; the dynamic one per channel.
    """
    if scheme.type != "float" or scheme.bits != 8 or scheme.group_size != -1:
        raise UsageError(
            f"FP8 needs 8-bit float per-channel weights, got {scheme}",
            hint="use the fp8 method's default scheme (--bits 8, no --group-size)",
        )
    amax = w.float().abs().amax(dim=1, keepdim=True)
    if per_tensor:
        amax = amax.amax().reshape(1, 1)
    scale = fp8_scale(amax, scale_dtype or w.dtype)
    return QuantizedWeight(qweight=to_fp8(w, scale), scale=scale, zero_point=None, scheme=scheme)


def fp8_fake_quant_per_token(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token e4m3 quantize -> dequantize along the last dim, in x's dtype."""
    scale = fp8_scale(x.float().abs().amax(dim=-1, keepdim=True), torch.float32)
    return (to_fp8(x, scale).float() * scale).to(x.dtype)


def fp8_fake_quant_static(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor e4m3 quantize -> dequantize with a calibrated `input_scale`."""
    s = input_scale.float().reshape(())
    return (to_fp8(x, s).float() * s).to(x.dtype)


def per_channel_quantize(w: torch.Tensor, scheme: WeightScheme, dtype: torch.dtype, *,
                         per_tensor: bool = False) -> QuantizedWeight:
    """Per-channel RTN weights: int codes, or e4m3 for float schemes (optionally one per-tensor scale)."""
    if scheme.type == "float":
        return fp8_quantize_weight(w, scheme, scale_dtype=dtype, per_tensor=per_tensor)
    return rtn_quantize(w, scheme, scale_dtype=dtype)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better)."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


def matches_any(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """An ignore pattern matches a module name exactly, by suffix ('lm_head'), or as a regex ('re:.*gate$')."""
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False
