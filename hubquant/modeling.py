"""Model walking: where the decoder layers and the quantizable Linears of a causal LM are."""
from __future__ import annotations

import torch
from torch import nn

from hubquant.errors import UnsupportedError
from hubquant.quant import matches_any

DEFAULT_IGNORE = ("lm_head",)

# model_type values hubquant converts (tests/conftest.py builds a tiny one of each); VISION_LANGUAGE ones have
# their language model quantized, their vision tower and projector kept float.
TEXT_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                      "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3", "glm4_moe", "olmoe", "gpt_oss",
                      "qwen3_next", "qwen3_5_moe", "ernie4_5_moe", "hunyuan_v1_moe", "minimax_m2", "exaone_moe",
                      "dots1", "deepseek_v32", "glm4_moe_lite", "flex_olmo", "phimoe")
VISION_LANGUAGE = ("qwen2_5_vl", "gemma3", "llava", "glm4v_moe")


# Modules kept in float whatever the method: routers and shared-expert gates are small and decide which
# expert runs (a rounding error there changes the routing, not just a value); vision towers and projectors
# of vision-language models are not the language model.
FLOAT_PATTERNS: tuple[str, ...] = (
    r"re:.*\.mlp\.gate$", r"re:.*\.block_sparse_moe\.gate$", r"re:.*\.mlp\.router$", r"re:.*shared_expert_gate$",
    r"re:.*\.self_attn\.indexer\..*",  # DeepSeek-V3.2's sparse-attention indexer: a top-k over tokens, like a router
    r"re:(.*\.)?(visual|vision_tower|vision_model|vision_encoder|multi_modal_projector|mm_projector)(\..*)?$",
)
def is_float_module(name: str) -> bool:
    return matches_any(name, FLOAT_PATTERNS)


def supported_hint() -> str:
    return (f"hubquant converts decoder-only text models ({', '.join(TEXT_ARCHITECTURES)}) and the language model "
            f"of vision-language models ({', '.join(VISION_LANGUAGE)})")


def auto_class(config):
    """The transformers Auto class that builds the checkpoint's own architecture (a vision-language model
    loads, and its variant reloads, with AutoModelForImageTextToText; text models with AutoModelForCausalLM)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    arch = (getattr(config, "architectures", None) or [""])[0]
    if MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(config.model_type) == arch or (
            config.model_type in VISION_LANGUAGE and config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES):
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (model.model.layers for Llama-likes, transformer.h for GPT-likes)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers",
                 "model.language_model.layers", "language_model.model.layers"):
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
        hint=supported_hint(),
    )


def layers_prefix(model: nn.Module) -> str:
    """Module-name prefix of the decoder layers, e.g. 'model.layers'."""
    layers = decoder_layers(model)
    for name, mod in model.named_modules():
        if mod is layers:
            return name
    raise AssertionError("decoder layers not registered in the model")


def quantizable_linears(module: nn.Module, ignore=DEFAULT_IGNORE, prefix: str = "") -> dict[str, nn.Linear]:
    """Linear sub-modules of `module` not matched by `ignore`, keyed by full module name.

    Routers, shared-expert gates and vision towers (FLOAT_PATTERNS, and the routers hubquant.moe_arch.mark_routers
    marks) always stay float."""
    out = {}
    for name, mod in module.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if isinstance(mod, nn.Linear) and not matches_any(full, ignore) and not matches_any(full, FLOAT_PATTERNS) \
                and not getattr(mod, "hubquant_float", False):  # a router hubquant.moe_arch found
            out[full] = mod
    return out


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())
