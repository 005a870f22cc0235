"""Activation fake-quantization for evaluating W8A8 variants on any device (shared by smoothquant, fp8, bnb).

A quantized Linear of a W8A8 variant holds its dequantized weight; a forward pre-hook quantizes and
dequantizes its input the way the serving engine does: int8 per token (scale = amax / 127.5, codes in
[-128, 127], compressed-tensors' convention), FP8 e4m3 per token (amax / 448), or one static calibrated
``input_scale``. transformers + compressed-tensors computes exactly the same on CPU
(tests/formats/test_w8a8_loaders.py). The hooks live on the modules (attribute ``_hubquant_act_quant``)
until :func:`detach_activation_quant`.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hubquant.errors import UsageError
from hubquant.quant import FP8_MAX, ActivationScheme, QuantizedWeight, fp8_fake_quant_per_token, fp8_fake_quant_static

INT8_HALF_RANGE = 127.5  # compressed-tensors' symmetric scale: amax / ((2^8 - 1) / 2)


def int8_fake_quant_per_token(x: torch.Tensor) -> torch.Tensor:
    """Dynamic symmetric int8 per token (last dim): scale = amax / 127.5, codes in [-128, 127]."""
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / INT8_HALF_RANGE).clamp(min=1e-8)
    return (torch.round(x.float() / scale).clamp(-128, 127) * scale).to(x.dtype)


def int8_fake_quant_static(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """Static symmetric int8 with one calibrated scale."""
    s = input_scale.float().reshape(())
    return (torch.round(x.float() / s).clamp(-128, 127) * s).to(x.dtype)


def activation_fake_quant(x: torch.Tensor, act: ActivationScheme,
                          input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize -> dequantize activations as `act` says (int8 or fp8; per token or static per tensor)."""
    if act.bits != 8 or not act.symmetric:
        raise UsageError(f"activation scheme {act} is not supported", hint="use 8-bit symmetric activations")
    if act.dynamic:
        return int8_fake_quant_per_token(x) if act.type == "int" else fp8_fake_quant_per_token(x)
    if input_scale is None:
        raise UsageError("static activations need an input_scale", hint="calibrate (pass calibration data)")
    return int8_fake_quant_static(x, input_scale) if act.type == "int" else fp8_fake_quant_static(x, input_scale)


def static_input_scale(amax: torch.Tensor, act: ActivationScheme, dtype: torch.dtype) -> torch.Tensor:
    """Per-tensor static scale [1] from the calibration amax (int8: /127.5, fp8: /448)."""
    div = INT8_HALF_RANGE if act.type == "int" else FP8_MAX
    return (amax.float().max().clamp(min=1e-8) / div).reshape(1).to(dtype)


def attach_hook(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace `module`'s input with fn(input) on every forward (one such hook per module)."""
    old = module.__dict__.pop("_hubquant_act_quant", None)
    if old is not None:
        old.remove()
    module._hubquant_act_quant = module.register_forward_pre_hook(lambda m, args: (fn(args[0]),) + tuple(args[1:]))


def attach_input_hooks(model: nn.Module, quantized: dict[str, QuantizedWeight], act: ActivationScheme) -> None:
    """Hook the Linears in `quantized` (keeping hooks on other modules)."""
    for name, qw in quantized.items():
        attach_hook(model.get_submodule(name), lambda x, _s=qw.input_scale: activation_fake_quant(x, act, _s))


def attach_activation_quant(model: nn.Module, quantized: dict[str, QuantizedWeight], act: ActivationScheme) -> int:
    """Make `model` quantize the inputs of every Linear in `quantized` as `act` says.

    A forward pre-hook per Linear fake-quantizes its input (per token, or with the Linear's
    static `input_scale`). Hooks stay on the modules (an evaluator running `model` sees them) until
    :func:`detach_activation_quant`. Returns the number of hooks attached.
    """
    detach_activation_quant(model)
    attach_input_hooks(model, quantized, act)
    return len(quantized)


def detach_activation_quant(model: nn.Module) -> int:
    """Remove the hooks :func:`attach_activation_quant` added; returns how many were removed."""
    n = 0
    for mod in model.modules():
        handle = mod.__dict__.pop("_hubquant_act_quant", None)
        if handle is not None:
            handle.remove()
            n += 1
    return n
