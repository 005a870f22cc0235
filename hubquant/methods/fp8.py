"""FP8 (e4m3) W8A8: per-channel weights, per-token dynamic or per-tensor static activations.

Math (compressed-tensors' float observer): ``scale = amax / 448`` (448 = largest finite e4m3fn),
``q = (x / scale).clamp(-448, 448).to(float8_e4m3fn)``, ``dequant = q.float() * scale``.
Weights are scaled per output channel (no calibration needed; per tensor with static activations, as
compressed-tensors' FP8 static scheme says). Activations are quantized at run
time per token (dynamic) or with one static ``input_scale`` per Linear measured on calibration text
(``job.scheme.activations.dynamic = False``).

Options (``job.options``, all need calibration): ``alpha`` / ``smooth`` / ``alpha_grid`` turn on SmoothQuant
smoothing before the FP8 rounding (the same migrations and option values as ``--method smoothquant``; the
scales are folded into norms and weights, so the checkpoint is a plain FP8 dynamic one); ``weights="gptq"``
rounds the weights to e4m3 with GPTQ error compensation (:func:`fp8_gptq_quantize`).

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


@torch.no_grad()
def fp8_gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: WeightScheme, *, block_size: int = 128,
                      damp: float = 0.01, scale_dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    """GPTQ on the e4m3 grid: per-channel scales amax/448 of the original weight, columns in decreasing diag(H)
    order, each column's rounding error pushed onto the columns not yet rounded (as int GPTQ does).

    Args:
        weight: [out, in] float weight. hessian: [in, in] 2 X^T X / n of the Linear's inputs (not changed).
        scheme: the FP8 weight scheme. block_size: columns updated lazily together. damp: fraction of mean diag H.
        scale_dtype: dtype of the stored scales (rounding uses the stored value).

    Returns:
        QuantizedWeight with float8_e4m3fn codes in the original column order and scale [out, 1].

    Raises:
        UsageError: not an FP8 per-channel scheme. CholeskyFailed: the Hessian stays singular.
    """
    from hubquant.methods.gptq import inverse_hessian_cholesky

    qw = fp8_quantize_weight(weight, scheme, scale_dtype=scale_dtype)  # checks the scheme, gives the scales
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    sc = qw.scale.float().to(w.device)  # [out, 1]
    perm = torch.argsort(torch.diag(h), descending=True)
    w, h = w[:, perm], h[perm][:, perm]
    hinv, _ = inverse_hessian_cholesky(h, damp)
    codes = torch.empty_like(w)
    n = w.shape[1]
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.empty_like(w1)
        for i in range(i2 - i1):
            c = _to_fp8(w1[:, i: i + 1], sc).float()
            codes[:, i1 + i] = c[:, 0]
            e = (w1[:, i] - c[:, 0] * sc[:, 0]) / hinv1[i, i]
            err1[:, i] = e
            w1[:, i:].addr_(e, hinv1[i, i:], alpha=-1.0)
        if i2 < n:
            w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1.0)
    qw.qweight = codes[:, torch.argsort(perm)].to(FP8_DTYPE).to(qw.qweight.device)
    return qw


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
        UsageError: wrong scheme, or static activations / smoothing / GPTQ without calibration data.
        UnsupportedError: smoothing on an architecture without a smoothing map.
    """
    from hubquant.methods.smoothquant import quantize_w8a8

    smooth = any(k in (job.options or {}) for k in ("alpha", "smooth"))
    return quantize_w8a8(model, job, smooth=smooth)
