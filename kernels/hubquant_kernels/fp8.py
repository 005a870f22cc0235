"""FP8 W8A8 (float8_e4m3fn weights and activations, per-channel x per-token scales).

Activations are quantized per token (``s = amax / 448``) by the fused kernel of hubquant_kernels.w8a8, or with
a static per-tensor ``input_scale``. The product runs through the Triton scaled-GEMM kernel shared with int8
(fp32 accumulation) or ``torch._scaled_mm`` (cuBLASLt, row-wise scales), whichever is faster for the shape.
"""
from __future__ import annotations

import torch

from hubquant_kernels._common import check_dtype
from hubquant_kernels.w8a8 import (
    FP8_MAX,
    _quantized_linear,
    quantize_act_reference,
    scaled_mm_reference,
)

__all__ = ["FP8_MAX", "fp8_matmul", "fp8_reference", "quantize_weight_fp8"]


def quantize_weight_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel FP8 weights: (float8_e4m3fn [N, K], fp32 scale [N]) with scale = amax / 448."""
    s = w.float().abs().amax(dim=1) / FP8_MAX
    s = torch.where(s > 0, s, torch.full_like(s, 1e-8))
    return (w.float() / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), s


def fp8_reference(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                  *, static_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The torch reference: per-token FP8 activations, float64 product with both scales, x's dtype."""
    qa, sa = quantize_act_reference(x, fp8=True, static_scale=static_scale)
    return scaled_mm_reference(qa, sa, qweight, w_scale, bias, x.dtype)


def fp8_matmul(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
               *, static_scale: torch.Tensor | None = None, impl: str | None = None) -> torch.Tensor:
    """y = fp8(x) @ qweight.T * scales (+ bias), [..., N] in x's dtype.

    Args:
        x: [..., K] bf16/fp16 activations. qweight: float8_e4m3fn [N, K]. w_scale: [N] (or [N, 1]) scales;
            a per-tensor scale must be expanded to [N] at load time.
        bias: optional [N]. static_scale: one-element input scale for FP8-static checkpoints.
        impl: force a GEMM candidate by name ("cublas_scaled_mm" or a Triton config).

    Raises:
        UsageError: mismatched shapes or devices. UnsupportedError: wrong dtypes.
    """
    check_dtype("qweight", qweight, (torch.float8_e4m3fn,))
    return _quantized_linear(x, qweight, w_scale, bias, static_scale, fp8=True, impl=impl)
