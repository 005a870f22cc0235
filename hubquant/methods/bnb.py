"""bitsandbytes methods: LLM.int8 (``--method bnb-int8``) and NF4 with double quantization (``--method bnb-nf4``).

The tensors come from the bitsandbytes library itself (its CPU backend), exactly as transformers
produces them when it quantizes on load, so :mod:`hubquant.formats.bnb` can write pre-quantized
checkpoints that transformers + bitsandbytes load unchanged.

- bnb-int8: per-row absmax int8 (``CB``, ``SCB`` = row absmax; dequant ``CB * SCB / 127``) from the
  weight in float16, as bitsandbytes' ``Int8Params`` does. At inference LLM.int8 quantizes activations
  per token to int8, except columns holding a value >= ``threshold`` (default 6.0), which stay in float.
- bnb-nf4: blockwise NF4 (block 64) with the absmax themselves quantized to 8 bit (block 256) when
  ``double_quant`` (default True); the matmul runs in ``compute_dtype`` (default bfloat16).

After ``run_int8``/``run_nf4`` the model behaves like the quantized one: weights hold their dequantized
values and a forward pre-hook on each quantized Linear simulates the run-time part (LLM.int8's
activation quantization with outlier columns; NF4's cast of inputs to the compute dtype). The hooks
are removed by :func:`hubquant.methods.actquant.detach_activation_quant`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from hubquant.errors import UsageError, missing_dependency
from hubquant.methods.actquant import attach_hook
from hubquant.methods.options import MethodOptions, parse_float, parse_options
from hubquant.modeling import quantizable_linears
from hubquant.quant import QuantizedWeight, WeightScheme

INT8_SCHEME = WeightScheme(bits=8, group_size=-1)
NF4_SCHEME = WeightScheme(bits=4, group_size=64)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _bnb():
    try:
        import bitsandbytes as bnb  # noqa: F401
        import bitsandbytes.functional as F
    except ImportError as e:
        raise missing_dependency("bitsandbytes", "bnb", why="for --method bnb-int8 / bnb-nf4") from e
    return F


def _compute_dtype(v: Any) -> str:
    cd = str(v).removeprefix("torch.")
    if cd not in _DTYPES:
        raise ValueError(f"compute_dtype {cd} is not supported: use one of {', '.join(_DTYPES)}")
    return cd


def _threshold(v: Any) -> float:
    x = parse_float(v)
    if x < 0:
        raise ValueError("use a number >= 0 (0 turns the outlier columns off)")
    return x


@dataclass(frozen=True, kw_only=True)
class BnbConfig(MethodOptions):
    """bitsandbytes settings: threshold (int8 outlier columns), compute_dtype and double_quant (NF4)."""

    threshold: float = field(default=6.0, metadata={"parse": _threshold})
    compute_dtype: str = field(default="bfloat16", metadata={"parse": _compute_dtype})
    double_quant: bool = True
    blocksize: ClassVar[int] = 64

    @classmethod
    def from_options(cls, opts: dict) -> BnbConfig:
        return parse_options(cls, opts, method="bnb")


class Nf4Weight(QuantizedWeight):
    """A QuantizedWeight whose codes are bitsandbytes' packed NF4 bytes; ``extra["quant_state"]`` is the
    bitsandbytes QuantState (absmax, code book, nested statistics, shape, dtype)."""

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.extra["quant_state"].shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        F = _bnb()
        return F.dequantize_4bit(self.qweight, self.extra["quant_state"]).to(dtype)


# ---------------------------------------------------------------- tensor math
def int8_quantize(w: torch.Tensor) -> QuantizedWeight:
    """LLM.int8 weight codes: row-wise absmax int8 of `w` in float16 (as bitsandbytes' Int8Params)."""
    F = _bnb()
    cb, scb, _ = F.int8_vectorwise_quant(w.detach().to(torch.float16).contiguous())
    scale = (scb.float() / 127.0).reshape(-1, 1)
    return QuantizedWeight(qweight=cb, scale=scale, zero_point=None, scheme=INT8_SCHEME, extra={"SCB": scb.float()})


def nf4_quantize(w: torch.Tensor, cfg: BnbConfig) -> Nf4Weight:
    """NF4 codes (packed uint8 [out*in/2, 1]) and quant state of `w`, from bitsandbytes' quantize_4bit."""
    F = _bnb()
    q, state = F.quantize_4bit(w.detach().contiguous(), blocksize=cfg.blocksize, compress_statistics=cfg.double_quant,
                               quant_type="nf4", quant_storage=torch.uint8)
    scheme = WeightScheme(bits=4, group_size=cfg.blocksize)
    return Nf4Weight(qweight=q, scale=state.absmax, zero_point=None, scheme=scheme, extra={"quant_state": state})


def llm_int8_fake_quant(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """The activation side of LLM.int8 as bitsandbytes computes it, quantize -> dequantize.

    Columns with any |x| >= threshold (over all tokens of the call) pass through in float; the rest is
    int8 per token with scale = absmax / 127, the absmax taken after zeroing the outlier values.
    """
    shape = x.shape
    a = x.reshape(-1, shape[-1]).float()
    outliers = a.abs() >= threshold if threshold > 0 else torch.zeros_like(a, dtype=torch.bool)
    cols = outliers.any(dim=0)
    rows = a.masked_fill(outliers, 0.0).abs().amax(dim=1, keepdim=True).clamp(min=1e-8)
    fq = torch.round(a * (127.0 / rows)).clamp(-127, 127) * (rows / 127.0)
    out = torch.where(cols[None, :], a, fq)
    return out.reshape(shape).to(x.dtype)


# ---------------------------------------------------------------- methods
@torch.no_grad()
def run_int8(model: nn.Module, job) -> dict[str, QuantizedWeight]:
    """LLM.int8 weights (``--method bnb-int8``); options: threshold (default 6.0).

    Args:
        model: a causal LM, changed in place (dequantized weights, activation hooks).
        job: a QuantJob (no calibration needed).

    Returns:
        {Linear name: QuantizedWeight} with int8 codes, scale = SCB / 127 and ``extra["SCB"]``.

    Raises:
        UnsupportedError: bitsandbytes is not installed. UsageError: bad options.
    """
    cfg = job.options_as(BnbConfig, "bnb-int8")
    out = {}
    for name, lin in tqdm(quantizable_linears(model, job.ignore).items(), desc="bnb int8", disable=not job.progress):
        qw = int8_quantize(lin.weight.data)
        qw.extra["threshold"] = cfg.threshold
        lin.weight.data = qw.dequantize(lin.weight.dtype).to(lin.weight.device)
        out[name] = qw
    for name in out:
        attach_hook(model.get_submodule(name), lambda x: llm_int8_fake_quant(x, cfg.threshold))
    return out


@torch.no_grad()
def run_nf4(model: nn.Module, job) -> dict[str, QuantizedWeight]:
    """NF4 weights with double quantization (``--method bnb-nf4``); options compute_dtype, double_quant.

    Args:
        model: a causal LM, changed in place (dequantized weights, compute-dtype hooks).
        job: a QuantJob (no calibration needed).

    Returns:
        {Linear name: Nf4Weight} (packed codes + bitsandbytes quant state in ``extra``).

    Raises:
        UnsupportedError: bitsandbytes is not installed. UsageError: bad options or shapes.
    """
    cfg = job.options_as(BnbConfig, "bnb-nf4")
    compute = _DTYPES[cfg.compute_dtype]
    out = {}
    for name, lin in tqdm(quantizable_linears(model, job.ignore).items(), desc="bnb nf4", disable=not job.progress):
        if lin.weight.numel() % cfg.blocksize:
            raise UsageError(f"{name} has {lin.weight.numel()} weights, not a multiple of {cfg.blocksize}",
                             hint=f"add --ignore {name}")
        qw = nf4_quantize(lin.weight.data, cfg)
        qw.extra["compute_dtype"] = cfg.compute_dtype
        qw.extra["double_quant"] = cfg.double_quant
        lin.weight.data = qw.dequantize(lin.weight.dtype).to(lin.weight.device)
        out[name] = qw
    for name in out:
        attach_hook(model.get_submodule(name), lambda x: x.to(compute).to(x.dtype))
    return out
