"""Model walking: where the decoder layers and the quantizable Linears of a causal LM are."""
from __future__ import annotations

import torch
from torch import nn

from hubquant.errors import UnsupportedError
from hubquant.quant import matches_any

DEFAULT_IGNORE = ("lm_head",)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (model.model.layers for Llama-likes, transformer.h for GPT-likes)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers",
                 "model.language_model.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    arch = getattr(getattr(model, "config", None), "architectures", None) or [type(model).__name__]
    raise UnsupportedError(
        f"cannot find the decoder layers of {arch[0]}",
        hint="hubquant supports decoder-only causal LMs (Llama, Qwen2, Mistral, Gemma, Phi-3, ...)",
    )


def layers_prefix(model: nn.Module) -> str:
    """Module-name prefix of the decoder layers, e.g. 'model.layers'."""
    layers = decoder_layers(model)
    for name, mod in model.named_modules():
        if mod is layers:
            return name
    raise AssertionError("decoder layers not registered in the model")


def quantizable_linears(module: nn.Module, ignore=DEFAULT_IGNORE, prefix: str = "") -> dict[str, nn.Linear]:
    """Linear sub-modules of `module` not matched by `ignore`, keyed by full module name."""
    out = {}
    for name, mod in module.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if isinstance(mod, nn.Linear) and not matches_any(full, ignore):
            out[full] = mod
    return out


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())
