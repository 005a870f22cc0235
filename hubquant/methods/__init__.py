"""Quantization methods: a small explicit registry keyed by the --method string.

Every method is a function with the signature of `MethodFn`:

    run(model, job: QuantJob) -> dict[str, QuantizedWeight]

It quantizes `model` in place (transforms such as AWQ/SmoothQuant scales are folded into the
float weights; every quantized Linear's weight is replaced by its dequantized value so the model
can be evaluated as is) and returns the quantized tensors keyed by Linear module name
(e.g. "model.layers.0.self_attn.q_proj"). Formats turn that dict into files.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from typing import TYPE_CHECKING

from hubquant.errors import UsageError
from hubquant.schemes import ActivationScheme, QuantScheme, WeightScheme

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, kw_only=True)
class QuantJob:
    """Everything a method needs. `calib` is a LongTensor [n_samples, seq_len] of token ids or None."""

    scheme: QuantScheme
    ignore: tuple[str, ...] = ("lm_head",)
    calib: torch.Tensor | None = None
    options: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    progress: bool = True


MethodFn = Callable[["torch.nn.Module", QuantJob], dict]


@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    name: str
    module: str  # "hubquant.methods.rtn:run"
    needs_calibration: bool
    default_scheme: QuantScheme
    formats: tuple[str, ...] = ("compressed-tensors",)
    summary: str = ""

    def load(self) -> MethodFn:
        mod, fn = self.module.split(":")
        return getattr(importlib.import_module(mod), fn)


_W4 = WeightScheme(bits=4, group_size=128, symmetric=True)
_INT8_DYN = ActivationScheme(bits=8, type="int", dynamic=True, strategy="token")
_FP8_DYN = ActivationScheme(bits=8, type="float", dynamic=True, strategy="token")

METHODS: dict[str, MethodSpec] = {
    "rtn": MethodSpec(
        name="rtn", module="hubquant.methods.rtn:run", needs_calibration=False,
        default_scheme=QuantScheme(weights=_W4), formats=("compressed-tensors", "gptq", "awq"),
        summary="round-to-nearest, min-max ranges (baseline)"),
    "gptq": MethodSpec(
        name="gptq", module="hubquant.methods.gptq:run", needs_calibration=True,
        default_scheme=QuantScheme(weights=_W4), formats=("compressed-tensors", "gptq"),
        summary="Hessian-based error compensation (W4A16)"),
    "awq": MethodSpec(
        name="awq", module="hubquant.methods.awq:run", needs_calibration=True,
        default_scheme=QuantScheme(weights=WeightScheme(bits=4, group_size=128, symmetric=False)),
        formats=("compressed-tensors", "awq"), summary="activation-aware per-channel scaling (W4A16 asym)"),
    "smoothquant": MethodSpec(
        name="smoothquant", module="hubquant.methods.smoothquant:run", needs_calibration=True,
        default_scheme=QuantScheme(weights=WeightScheme(bits=8, group_size=-1), activations=_INT8_DYN),
        summary="outlier migration into weights, then W8A8 int8"),
    "w8a8": MethodSpec(
        name="w8a8", module="hubquant.methods.smoothquant:run_naive", needs_calibration=False,
        default_scheme=QuantScheme(weights=WeightScheme(bits=8, group_size=-1), activations=_INT8_DYN),
        summary="naive W8A8 int8 (no smoothing), the SmoothQuant baseline"),
    "fp8": MethodSpec(
        name="fp8", module="hubquant.methods.fp8:run", needs_calibration=False,
        default_scheme=QuantScheme(weights=WeightScheme(bits=8, group_size=-1, type="float"), activations=_FP8_DYN),
        summary="FP8 e4m3 weights and activations"),
    "bnb-int8": MethodSpec(
        name="bnb-int8", module="hubquant.methods.bnb:run_int8", needs_calibration=False,
        default_scheme=QuantScheme(weights=WeightScheme(bits=8, group_size=-1)), formats=("bitsandbytes",),
        summary="LLM.int8 (bitsandbytes), outliers kept in fp16"),
    "bnb-nf4": MethodSpec(
        name="bnb-nf4", module="hubquant.methods.bnb:run_nf4", needs_calibration=False,
        default_scheme=QuantScheme(weights=WeightScheme(bits=4, group_size=64)), formats=("bitsandbytes",),
        summary="NF4 with double quantization (bitsandbytes)"),
}


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown method '{name}'", hint=f"choose one of: {', '.join(METHODS)}") from None
