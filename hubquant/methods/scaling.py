"""Where per-channel scale may move, per architecture (data), and the one fold that moves it (AWQ, SmoothQuant).

A mapping says: the output of `smooth` (a norm, or a Linear's output rows) feeds only the Linears in
`balance`, so dividing `smooth`'s output channel j by s_j and multiplying input column j of every `balance`
weight by s_j leaves the float model's function unchanged. Names are relative to a decoder layer.

- A norm computes ``y = norm(x) * (offset + weight) (+ bias)``: offset 0 for RMSNorm, 1 for Gemma's norms.
- ``v_proj -> o_proj``: o_proj reads softmax(QK) @ V per head, so scaling V's output rows is exact when every
  query head that shares one KV head gets the same scales (grouped-query attention): pass one scale per KV
  channel for the source and the expanded per-column scales for the targets (:func:`expand_kv`).
- ``up_proj -> down_proj``: down_proj reads act(gate(x)) * up(x); dividing up's rows by s divides the product.

``extra`` marks the Linear-to-Linear mappings (SmoothQuant's ``smooth="norms"`` leaves them out).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hubquant.errors import UnsupportedError


@dataclass(frozen=True, kw_only=True)
class ScaleMapping:
    smooth: str
    balance: tuple[str, ...]
    norm_offset: float = 0.0  # Gemma norms scale by (1 + weight)
    extra: bool = False  # a Linear's output rows, not a norm


def _llama_like(mlp_norm: str = "post_attention_layernorm", offset: float = 0.0) -> tuple[ScaleMapping, ...]:
    return (
        ScaleMapping(smooth="input_layernorm", balance=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                     norm_offset=offset),
        ScaleMapping(smooth=mlp_norm, balance=("mlp.gate_proj", "mlp.up_proj"), norm_offset=offset),
        ScaleMapping(smooth="self_attn.v_proj", balance=("self_attn.o_proj",), extra=True),
        ScaleMapping(smooth="mlp.up_proj", balance=("mlp.down_proj",), extra=True),
    )


ARCHITECTURES: dict[str, tuple[ScaleMapping, ...]] = {
    "llama": _llama_like(),
    "mistral": _llama_like(),
    "qwen2": _llama_like(),
    "qwen3": _llama_like(),
    "gemma": _llama_like(offset=1.0),
    "gemma2": _llama_like("pre_feedforward_layernorm", offset=1.0),
    "gemma3_text": _llama_like("pre_feedforward_layernorm", offset=1.0),
    "gemma3": _llama_like("pre_feedforward_layernorm", offset=1.0),
    "phi3": (
        ScaleMapping(smooth="input_layernorm", balance=("self_attn.qkv_proj",)),
        ScaleMapping(smooth="post_attention_layernorm", balance=("mlp.gate_up_proj",)),
    ),
}

DEFAULT_HINT = "use --method gptq or --method rtn for this model"


def mappings_for(model_type: str | None, *, method: str = "AWQ", hint: str = DEFAULT_HINT) -> tuple[ScaleMapping, ...]:
    """The scale mappings of an architecture (config.model_type).

    Raises:
        UnsupportedError: the architecture has no mapping; `hint` names the methods that need none.
    """
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedError(
            f"{method} has no scale mapping for architecture '{model_type}' (known: {', '.join(ARCHITECTURES)})",
            hint=hint,
        ) from None


def check_layer(layer: nn.Module, layer_name: str, mappings, *, method: str, hint: str) -> None:
    """Raise UnsupportedError when a mapping names a module `layer` does not have (a config that lies)."""
    for m in mappings:
        for name in (m.smooth, *m.balance):
            try:
                layer.get_submodule(name)
            except AttributeError:
                raise UnsupportedError(f"{method}: {layer_name} has no module '{name}' that its architecture's "
                                       "scale mapping names", hint=hint) from None


# ---------------------------------------------------------------- the fold
def expand_kv(s_kv: torch.Tensor, n_kv: int, n_rep: int, head_dim: int) -> torch.Tensor:
    """Per-KV-channel scales -> per o_proj input column (query head i reads KV head i // n_rep)."""
    if n_rep == 1:
        return s_kv
    return s_kv.reshape(n_kv, 1, head_dim).expand(n_kv, n_rep, head_dim).reshape(-1)


def fold_into_norm(norm: nn.Module, s: torch.Tensor, *, offset: float = 0.0, dtype: torch.dtype | None = None) -> None:
    """Divide the norm's output channels by s: weight := (offset + weight) / s - offset, bias := bias / s.

    Computed in `dtype` (None: float32), then cast back to the parameters' dtype.
    """
    dtype = dtype or torch.float32
    s = s.to(norm.weight.device, dtype)
    w = norm.weight.data.to(dtype)
    norm.weight.data = (w / s if offset == 0 else (w + offset) / s - offset).to(norm.weight.dtype)
    if getattr(norm, "bias", None) is not None:
        norm.bias.data = (norm.bias.data.to(dtype) / s).to(norm.bias.dtype)


def fold_into_linear_rows(lin: nn.Linear, s: torch.Tensor, *, dtype: torch.dtype | None = None) -> None:
    """Divide a Linear's output rows (and bias) by s, in `dtype` (None: the weight's own, s rounded to it)."""
    cd = dtype or lin.weight.dtype
    s = s.to(lin.weight.device, cd)
    lin.weight.data = (lin.weight.data.to(cd) / s[:, None]).to(lin.weight.dtype)
    if lin.bias is not None:
        cb = dtype or lin.bias.dtype
        lin.bias.data = (lin.bias.data.to(cb) / s.to(cb)).to(lin.bias.dtype)


def scale_linear_columns(lin: nn.Linear, s: torch.Tensor, *, dtype: torch.dtype | None = None) -> None:
    """Multiply a Linear's input columns by s, in `dtype` (None: the weight's own, s rounded to it)."""
    cd = dtype or lin.weight.dtype
    lin.weight.data = (lin.weight.data.to(cd) * s.to(lin.weight.device, cd)[None, :]).to(lin.weight.dtype)


@torch.no_grad()
def fold(layer: nn.Module, mapping: ScaleMapping, s: torch.Tensor, *, s_smooth: torch.Tensor | None = None,
         dtype: torch.dtype | None = None) -> None:
    """Move per-channel scale s across `mapping` in one decoder layer, exactly in float.

    Args:
        layer: the decoder layer. mapping: which module's output is divided and which Linears' columns multiplied.
        s: per input column of the balance Linears.
        s_smooth: per output channel of the smooth module when it differs from s (grouped KV heads: one scale per
            KV channel; s is then its :func:`expand_kv`).
        dtype: arithmetic dtype; None computes Linears in their own dtype and norms in float32 (AWQ's
            convention), torch.float64 rounds once (SmoothQuant's).
    """
    smooth = layer.get_submodule(mapping.smooth)
    src = s if s_smooth is None else s_smooth
    if isinstance(smooth, nn.Linear):
        fold_into_linear_rows(smooth, src, dtype=dtype)
    else:
        fold_into_norm(smooth, src, offset=mapping.norm_offset, dtype=dtype)
    for name in mapping.balance:
        scale_linear_columns(layer.get_submodule(name), s, dtype=dtype)
