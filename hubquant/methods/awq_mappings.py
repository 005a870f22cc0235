"""Where AWQ may move scale, per architecture (data, not code).

A mapping says: the output of `smooth` (a norm, or a Linear's output rows) feeds only the Linears in
`balance`, so dividing `smooth`'s output channel j by s_j and multiplying column j of every `balance`
weight by s_j leaves the float model unchanged. Names are relative to a decoder layer.
"""
from __future__ import annotations

from dataclasses import dataclass

from hubquant.errors import UnsupportedError


@dataclass(frozen=True, kw_only=True)
class AWQMapping:
    smooth: str
    balance: tuple[str, ...]
    norm_offset: float = 0.0  # Gemma norms scale by (1 + weight)


def _llama_like(mlp_norm: str = "post_attention_layernorm", offset: float = 0.0) -> tuple[AWQMapping, ...]:
    return (
        AWQMapping(smooth="input_layernorm", balance=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                   norm_offset=offset),
        AWQMapping(smooth="self_attn.v_proj", balance=("self_attn.o_proj",)),  # skipped when heads are grouped
        AWQMapping(smooth=mlp_norm, balance=("mlp.gate_proj", "mlp.up_proj"), norm_offset=offset),
        AWQMapping(smooth="mlp.up_proj", balance=("mlp.down_proj",)),
    )


AWQ_MAPPINGS: dict[str, tuple[AWQMapping, ...]] = {
    "llama": _llama_like(),
    "mistral": _llama_like(),
    "qwen2": _llama_like(),
    "qwen3": _llama_like(),
    "gemma": _llama_like(offset=1.0),
    "gemma2": _llama_like("pre_feedforward_layernorm", offset=1.0),
    "gemma3_text": _llama_like("pre_feedforward_layernorm", offset=1.0),
    "gemma3": _llama_like("pre_feedforward_layernorm", offset=1.0),
    "phi3": (
        AWQMapping(smooth="input_layernorm", balance=("self_attn.qkv_proj",)),
        AWQMapping(smooth="post_attention_layernorm", balance=("mlp.gate_up_proj",)),
    ),
}


def mappings_for(model_type: str) -> tuple[AWQMapping, ...]:
    """The AWQ mappings of an architecture (config.model_type).

    Raises:
        UnsupportedError: the architecture has no mapping; the hint suggests GPTQ or RTN.
    """
    try:
        return AWQ_MAPPINGS[model_type]
    except KeyError:
        raise UnsupportedError(
            f"AWQ has no scale mapping for architecture '{model_type}' (known: {', '.join(AWQ_MAPPINGS)})",
            hint="use --method gptq or --method rtn for this model",
        ) from None
