"""FP8 (e4m3) W8A8: per-channel weights, per-token dynamic or per-tensor static activations.

Math (compressed-tensors' float observer): ``scale = amax / 448`` (448 = largest finite e4m3fn),
``q = (x / scale).clamp(-448, 448).to(float8_e4m3fn)``, ``dequant = q.float() * scale``.
Weights are scaled per output channel (no calibration needed; per tensor with static activations, as
compressed-tensors' FP8 static scheme says). Activations are quantized at run
time per token (dynamic) or with one static ``input_scale`` per Linear measured on calibration text
(``job.scheme.activations.dynamic = False``).

Options (:class:`hubquant.methods.smoothing.Fp8Options`; those below need calibration): ``alpha`` or ``smooth``
turn on SmoothQuant smoothing before the FP8 rounding (the same migrations and option values as
``--method smoothquant``, tuned by ``alpha_grid`` and the other SmoothQuant options; the scales are folded into
norms and weights, so the checkpoint is a plain FP8 dynamic one); ``weights="gptq"`` rounds the weights to e4m3
with GPTQ error compensation (:func:`hubquant.methods.gptq.fp8_gptq_quantize`).

The returned model behaves like the quantized one: every Linear's weight holds its dequantized
value and a forward pre-hook fake-quantizes its input (see
:func:`hubquant.methods.actquant.attach_activation_quant`).
"""
from __future__ import annotations

from torch import nn

from hubquant.methods.gptq import fp8_gptq_quantize  # noqa: F401  (FP8 GPTQ rounding, re-exported)
from hubquant.methods.smoothing import Fp8Options
from hubquant.methods.smoothquant import quantize_w8a8
from hubquant.quant import (  # noqa: F401  (the FP8 numerics live in hubquant.quant; re-exported)
    FP8_DTYPE,
    FP8_MAX,
    QuantizedWeight,
    fp8_fake_quant_per_token,
    fp8_fake_quant_static,
    fp8_quantize_weight,
    fp8_scale,
)


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
    options = job.options_as(Fp8Options, "fp8")
    return quantize_w8a8(model, job, options=options, smooth=options.smoothing)
