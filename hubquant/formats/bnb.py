"""bitsandbytes pre-quantized checkpoints (``quant_method: "bitsandbytes"``), as transformers 5.x saves them.

Per quantized Linear:
- 8-bit (LLM.int8): ``weight`` int8 [out, in], ``SCB`` float32 [out], ``weight_format`` uint8 scalar 0;
- 4-bit (NF4): ``weight`` uint8 [out*in/2, 1] and the packed quant state ``weight.absmax``,
  ``weight.quant_map``, ``weight.quant_state.bitsandbytes__nf4`` (JSON bytes), plus with double quant
  ``weight.nested_absmax`` and ``weight.nested_quant_map``.
config.json carries the ``BitsAndBytesConfig`` dict transformers writes. Everything else (embeddings,
norms, an unquantized lm_head) is saved as it is in the model.
"""
from __future__ import annotations

from pathlib import Path

import torch

from hubquant.errors import UsageError
from hubquant.formats.common import ignored_linears, method_options, write_model
from hubquant.modeling import model_dtype
from hubquant.quant import QuantizedWeight, QuantScheme


def check_scheme(scheme: QuantScheme) -> None:
    """bitsandbytes checkpoints come from the bnb-* methods, whose schemes are fixed (checked by the method)."""


def quantization_config(scheme: QuantScheme, *, options=None, ignored=()) -> dict:
    """The BitsAndBytesConfig dict for `scheme` (4-bit: NF4) and the method's options; `ignored`: float Linears."""
    ignored = sorted(ignored)
    return bnb_config(four_bit=scheme.weights.bits == 4,
                      compute_dtype=str(getattr(options, "compute_dtype", "bfloat16")),
                      double_quant=bool(getattr(options, "double_quant", True)),
                      threshold=float(getattr(options, "threshold", 6.0)),
                      # None lets transformers skip its defaults (the output embedding); else name every float Linear
                      skip_modules=None if ignored == ["lm_head"] else ignored)


def bnb_config(*, four_bit: bool, compute_dtype: str = "bfloat16", double_quant: bool = True,
               threshold: float = 6.0, skip_modules: list[str] | None = None) -> dict:
    """The ``quantization_config`` dict, key for key as transformers' BitsAndBytesConfig.to_dict() gives it."""
    return {
        "_load_in_4bit": four_bit, "_load_in_8bit": not four_bit,
        "bnb_4bit_compute_dtype": compute_dtype if four_bit else "float32",
        "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4" if four_bit else "fp4",
        "bnb_4bit_use_double_quant": bool(double_quant) if four_bit else False,
        "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules, "llm_int8_threshold": float(threshold),
        "load_in_4bit": four_bit, "load_in_8bit": not four_bit, "quant_method": "bitsandbytes",
    }


def linear_tensors(name: str, qw: QuantizedWeight, scheme: QuantScheme | None = None, *,
                   options=None) -> dict[str, torch.Tensor]:
    """The tensors one quantized Linear contributes, keyed by full name."""
    state = qw.extra.get("quant_state")
    if state is not None:  # NF4
        t = {f"{name}.weight": qw.qweight}
        for key, value in state.as_dict(packed=True).items():
            t[f"{name}.weight.{key}"] = value
    else:
        if "SCB" not in qw.extra or qw.qweight.dtype != torch.int8:
            raise UsageError(f"{name} was not quantized by a bitsandbytes method",
                             hint="use --method bnb-int8 or bnb-nf4 with --format bitsandbytes")
        t = {f"{name}.weight": qw.qweight, f"{name}.SCB": qw.extra["SCB"].float().reshape(-1),
             f"{name}.weight_format": torch.tensor(0, dtype=torch.uint8)}
    return {k: v.detach().cpu().contiguous() for k, v in t.items()}


def write(model, quantized: dict[str, QuantizedWeight], *, scheme: QuantScheme, out_dir: Path, method: str,
          options=None) -> dict:
    """Write a pre-quantized bitsandbytes checkpoint of `model` into `out_dir`.

    Args:
        model: the model the method ran on (its non-quantized tensors are saved as they are).
        quantized: output of ``run_int8`` or ``run_nf4``.
        scheme: the job's scheme (4-bit weights mean NF4).
        out_dir: target folder (model.safetensors + config.json).
        method: "bnb-int8" or "bnb-nf4".
        options: method options (threshold, compute_dtype, double_quant).

    Returns:
        The quantization_config written to config.json.

    Raises:
        UsageError: nothing quantized, or tensors that no bitsandbytes method produced.
    """
    if not quantized:
        raise UsageError("nothing was quantized", hint="check --ignore: it matched every Linear")
    qc = quantization_config(scheme, options=method_options(method, options), ignored=ignored_linears(model, quantized))
    write_model(model, quantized, Path(out_dir), qc, dtype=model_dtype(model), linear_tensors=linear_tensors)
    return qc
