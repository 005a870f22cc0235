"""Quantization schemes: what a variant stores, as frozen dataclasses (no torch import, so the CLI starts fast)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hubquant.errors import UsageError

SCHEME_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class WeightScheme:
    """How weights are quantized. group_size -1 means one group per output channel."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    type: Literal["int", "float"] = "int"

    def __post_init__(self):
        if self.type == "int" and self.bits not in (2, 3, 4, 8):
            raise UsageError(f"--bits {self.bits} is not supported", hint="use --bits 2, 3, 4 or 8")
        if self.group_size != -1 and self.group_size <= 0:
            raise UsageError(f"--group-size {self.group_size} is invalid", hint="use a positive size or -1")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1


@dataclass(frozen=True, kw_only=True)
class ActivationScheme:
    """How activations are quantized at inference (None on QuantScheme = weight-only)."""

    bits: int = 8
    type: Literal["int", "float"] = "int"
    dynamic: bool = True
    strategy: Literal["token", "tensor", "tensor_group"] = "token"  # tensor_group: NVFP4 (static global scale,
    # dynamic e4m3 scales per 16 inputs)
    symmetric: bool = True


@dataclass(frozen=True, kw_only=True)
class QuantScheme:
    weights: WeightScheme
    activations: ActivationScheme | None = None
    version: int = SCHEME_VERSION

    @property
    def name(self) -> str:
        """Short, repo-name friendly: W4A16-G64, W4A16-ASYM-G128, W8A8, FP8, FP8-STATIC, NVFP4A16, NVFP4, MXFP4A16."""
        w = self.weights
        if w.type == "float" and w.bits == 4:
            kind = "NVFP4" if w.group_size == 16 else "MXFP4"
            return kind if self.activations is not None else f"{kind}A16"
        if w.type == "float":
            static = self.activations is not None and not self.activations.dynamic
            return "FP8-STATIC" if static else "FP8"
        a = self.activations.bits if self.activations else 16
        out = f"W{w.bits}A{a}"
        if not w.symmetric:
            out += "-ASYM"
        if self.activations is not None and not self.activations.dynamic:
            out += "-STATIC"
        if w.group_size != -1 and self.activations is None:
            out += f"-G{w.group_size}"
        return out
