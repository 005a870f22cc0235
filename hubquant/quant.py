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
        scale = torch.maximum(lo.abs(), hi) / (levels / 2)
        scale = _safe_scale(scale, scale_dtype)
        return scale, None
    scale = _safe_scale((hi - lo) / levels, scale_dtype)
    zp = torch.round(scheme.qmin - lo / scale.float()).clamp(scheme.qmin, scheme.qmax).to(torch.int8)
    return scale, zp


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
