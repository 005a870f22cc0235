"""FP8 (e4m3) W8A8: per-channel weights, per-token dynamic or per-tensor static activations.

Math (compressed-tensors' float observer): ``scale = amax / 448`` (448 = largest finite e4m3fn),
``q = (x / scale).clamp(-448, 448).to(float8_e4m3fn)``, ``dequant = q.float() * scale``.
Weights are scaled per output channel (no calibration needed; per tensor with static activations, as
compressed-tensors' FP8 static scheme says). Activations are quantized at run
time per token (dynamic) or with one static ``input_scale`` per Linear measured on calibration text
(``job.scheme.activations.dynamic = False``).

The returned model behaves like the quantized one: every Linear's weight holds its dequantized
value and a forward pre-hook fake-quantizes its input (see
:func:`hubquant.methods.actquant.attach_activation_quant`).
"""
from __future__ import annotations

import torch
from torch import nn

from hubquant.errors import UsageError
from hubquant.quant import QuantizedWeight, WeightScheme

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0


def _to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fp8_scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """amax / 448 in `dtype`, with zero ranges mapped to the smallest safe scale."""
    scale = amax.float() / FP8_MAX
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
    return QuantizedWeight(qweight=_to_fp8(w, scale), scale=scale, zero_point=None, scheme=scheme)


def fp8_fake_quant_per_token(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token e4m3 quantize -> dequantize along the last dim, in x's dtype."""
    scale = fp8_scale(x.float().abs().amax(dim=-1, keepdim=True), torch.float32)
    return (_to_fp8(x, scale).float() * scale).to(x.dtype)


def fp8_fake_quant_static(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor e4m3 quantize -> dequantize with a calibrated `input_scale`."""
    s = input_scale.float().reshape(())
    return (_to_fp8(x, s).float() * s).to(x.dtype)


def run(model: nn.Module, job) -> dict[str, QuantizedWeight]:
    """FP8 e4m3 W8A8 (``--method fp8``): see the module docstring.

    Args:
        model: a causal LM, quantized in place.
        job: a QuantJob; `job.scheme.weights.type` must be "float". With static activations
            (`job.scheme.activations.dynamic` False) `job.calib` is required.

    Returns:
        Quantized weights keyed by Linear module name (`input_scale` set for static activations).

    Raises:
        UsageError: wrong scheme, or static activations without calibration data.
    """
    from hubquant.methods.smoothquant import quantize_w8a8

    return quantize_w8a8(model, job, smooth=False)
