"""SmoothQuant's smoothing of one decoder layer (pure math over the shared scale mappings) and the W8A8 options.

For input channel j of the Linears that read one tensor, ``s_j = amax(|X_j|)^a / amax(|W_:,j|)^(1-a)``; the
Linears' weight columns are multiplied by ``s`` and the producer of X divided by ``s``
(:func:`hubquant.methods.scaling.fold`, in float64), so the float model computes the same function.
Used by :mod:`hubquant.methods.smoothquant` (the model walk) and :mod:`hubquant.methods.smooth_search`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hubquant.errors import UsageError
from hubquant.methods.actquant import activation_fake_quant, static_input_scale
from hubquant.methods.options import MethodOptions, at_least, choice
from hubquant.methods.scaling import ScaleMapping, check_layer, expand_kv, fold, mappings_for
from hubquant.quant import QuantScheme, per_channel_quantize

W8A8_HINT = "use --method w8a8 (no smoothing) or --method fp8 for this model"
_ALPHA_HINT = 'use a number in [0, 1], alpha=search, alpha=layer-search, or {"mlp.up_proj": 0.9, "default": 0.8}'


# ---------------------------------------------------------------- options
def _check_alpha(alpha) -> float:
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        value = -1.0
    if isinstance(alpha, bool) or not 0 <= value <= 1:
        raise UsageError(f"alpha={alpha!r} is invalid", hint=_ALPHA_HINT)
    return value


def _parse_alpha(v: Any):
    if isinstance(v, dict):  # per group: {"mlp.up_proj": 0.9, "default": 0.8}
        return tuple(sorted((str(k), _check_alpha(a)) for k, a in v.items()))
    if isinstance(v, tuple):  # already parsed
        return tuple((str(k), _check_alpha(a)) for k, a in v)
    if v in ("search", "layer-search"):
        return v
    return _check_alpha(v)


def _parse_grid(v: Any) -> tuple[float, ...]:
    if not isinstance(v, (list, tuple)) or not v:
        raise ValueError("use a JSON list of numbers in [0, 1], e.g. [0.3, 0.5, 0.7]")
    return tuple(_check_alpha(a) for a in v)


def _parse_start(v: Any) -> tuple[tuple[str, float], ...]:
    start = {str(k): a for k, a in (v.items() if isinstance(v, dict) else v)} \
        if isinstance(v, (dict, tuple)) else {"default": v}
    return tuple(sorted((k, _check_alpha(a)) for k, a in start.items()))


def _optional(parse):
    return lambda v: None if v is None else parse(v)


@dataclass(frozen=True, kw_only=True)
class W8A8Options(MethodOptions):
    """W8A8 settings: weight rounding (rtn or gptq), sequential calibration (default: with GPTQ weights or static
    activations), tokens per calibration forward."""

    weights: str = field(default="rtn", metadata={"parse": choice("rtn", "gptq")})
    sequential: bool | None = None
    tokens_per_batch: int = field(default=16384, metadata={"parse": at_least(1)})

    def needs_calibration(self) -> bool:
        return self.weights == "gptq"


@dataclass(frozen=True, kw_only=True)
class SmoothConfig(W8A8Options):
    """SmoothQuant settings (see :mod:`hubquant.methods.smoothquant`)."""

    alpha: float | str | tuple[tuple[str, float], ...] = field(
        default=0.5, metadata={"parse": _parse_alpha, "help": "migration strength"})
    smooth: str = field(default="all", metadata={"parse": choice("all", "norms")})
    alpha_grid: tuple[float, ...] = field(default=tuple(i / 10 for i in range(11)), metadata={"parse": _parse_grid})
    search_tokens: int = field(default=512, metadata={"parse": at_least(1)})
    alpha_start: tuple[tuple[str, float], ...] = field(default=(("default", 0.5),), metadata={"parse": _parse_start})
    layer_search_tokens: int = field(default=4096, metadata={"parse": at_least(1)})
    version: int = 2

    @classmethod
    def from_options(cls, opts: dict) -> SmoothConfig:
        from hubquant.methods.options import parse_options

        return parse_options(cls, opts, method="smoothquant")

    @property
    def alpha_value(self):
        return self.alpha

    @property
    def smooth_value(self) -> str:
        return self.smooth


@dataclass(frozen=True, kw_only=True)
class Fp8Options(SmoothConfig):
    """FP8 settings: `alpha` or `smooth` turn on SmoothQuant smoothing before the e4m3 rounding (both unset: none);
    `weights="gptq"` rounds the weights with GPTQ."""

    alpha: float | str | tuple[tuple[str, float], ...] | None = field(
        default=None, metadata={"parse": _optional(_parse_alpha), "help": "migration strength; turns on smoothing"})
    smooth: str | None = field(default=None, metadata={"parse": _optional(choice("all", "norms"))})
    version: int = 1

    @property
    def smoothing(self) -> bool:
        return self.alpha is not None or self.smooth is not None

    @property
    def alpha_value(self):
        return 0.5 if self.alpha is None else self.alpha

    @property
    def smooth_value(self) -> str:
        return self.smooth or "all"

    def needs_calibration(self) -> bool:
        return self.smoothing or self.weights == "gptq"

    def uses_scaling(self) -> bool:
        return self.smoothing


# ---------------------------------------------------------------- architecture knowledge
def architecture_groups(model: nn.Module, *, smooth: str = "all") -> tuple[ScaleMapping, ...]:
    """The smoothing mappings of `model`'s architecture (`smooth="norms"`: the norms only), checked against
    its first decoder layer.

    Raises:
        UnsupportedError: the architecture has no mapping, or the model lacks a module the mapping names.
    """
    from hubquant.modeling import decoder_layers, layers_prefix

    if smooth not in ("all", "norms"):
        raise UsageError(f"smooth option '{smooth}' is unknown", hint="use smooth=all or smooth=norms")
    from hubquant import moe_scaling

    moe_groups = moe_scaling.scale_map(model, extra=smooth == "all")
    if moe_groups is not None:  # per-layer: a layer without a mapping's modules skips it (dense first layers, MLA)
        return moe_groups  # a tuple, or a StructuralMap (moe_scaling.for_layer gives each layer's)
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    groups = mappings_for(mtype, method="SmoothQuant", hint=W8A8_HINT)
    groups = tuple(g for g in groups if smooth == "all" or not g.extra)
    check_layer(decoder_layers(model)[0], f"{layers_prefix(model)}.0", groups, method="SmoothQuant", hint=W8A8_HINT)
    return groups


def head_dims(model: nn.Module) -> tuple[int, int]:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return head_dim, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


# ---------------------------------------------------------------- pure math
def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = act^alpha / w^(1-alpha) per input channel (float64), both ranges floored at 1e-5."""
    a = act_absmax.double().clamp(min=1e-5)
    w = weight_absmax.double().clamp(min=1e-5)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)


def _kv_view(x: torch.Tensor, n_kv: int, head_dim: int) -> torch.Tensor:
    """[n_heads*hd] -> [n_kv, n_rep, hd] (query head i uses KV head i // n_rep)."""
    return x.reshape(n_kv, -1, head_dim)


def group_output_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor, scheme: QuantScheme,
                       act_absmax: torch.Tensor) -> float:
    """Relative W8A8 output error of Linears sharing input `x` [n, in] after smoothing by s."""
    s32 = s.float()
    xs = x / s32
    input_scale = static_input_scale(act_absmax.float() / s32, scheme.activations, torch.float32)
    xq = activation_fake_quant(xs, scheme.activations, input_scale)
    err = 0.0
    for w in weights:
        ref = x @ w.T
        wq = per_channel_quantize(w * s32, scheme.weights, torch.float32).dequantize()
        err += float((xq @ wq.T - ref).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-12))
    return err


@torch.no_grad()
def smooth_layer(layer: nn.Module, layer_name: str, absmax: dict[str, torch.Tensor], *, groups, head_dim: int,
                 n_kv: int, alpha: float | str, scheme: QuantScheme | None = None, samples: dict | None = None,
                 alpha_grid=(0.5,)) -> dict[str, float]:
    """Fold SmoothQuant scales into one decoder layer (in place); update `absmax` to the smoothed inputs.

    Args:
        layer: the decoder layer. layer_name: its full module name (e.g. "model.layers.3").
        absmax: per-input-channel activation absmax keyed by full Linear name (from calibration).
        groups: from :func:`architecture_groups`.
        head_dim, n_kv: attention geometry (to tie o_proj scales across query heads sharing a KV head).
        alpha: migration strength in [0, 1], "search" (needs `scheme` and `samples`), or per-group pairs.
        scheme: the W8A8 scheme the search scores against.
        samples: calibration input rows keyed by each group's first Linear (for the search).
        alpha_grid: alphas the search tries.

    Returns:
        {smoothed module's full name: alpha used} for every group smoothed.
    """
    used = {}
    for g in groups:
        cnames = [f"{layer_name}.{c}" for c in g.balance]
        if any(c not in absmax for c in cnames):
            continue  # a consumer is not quantized (ignored): leave this group alone
        try:
            producer = layer.get_submodule(g.smooth)
        except AttributeError:
            continue  # a layer without the producer (MLA has no v_proj, its o_proj reads kv_b_proj's heads)
        consumers = [layer.get_submodule(c) for c in g.balance]
        act = absmax[cnames[0]]
        for c in cnames[1:]:
            act = torch.maximum(act, absmax[c])
        dev = consumers[0].weight.device
        wmax = torch.stack([c.weight.detach().float().abs().amax(dim=0) for c in consumers]).amax(dim=0).cpu()
        # v_proj -> o_proj with grouped KV heads: one scale per KV channel, shared by the query heads reading it
        n_rep = consumers[0].in_features // producer.out_features if isinstance(producer, nn.Linear) else 1
        act_k, w_k = (_kv_view(t, n_kv, head_dim).amax(dim=1).reshape(-1) for t in (act, wmax)) if n_rep > 1 \
            else (act, wmax)
        a = dict(alpha).get(g.smooth, dict(alpha).get("default", 0.5)) if isinstance(alpha, tuple) else alpha
        if alpha == "search":
            x = samples[cnames[0]].to(dev)
            ws = [c.weight.detach().float() for c in consumers]
            errs = {ga: group_output_error(x, ws, expand_kv(smoothing_scales(act_k, w_k, ga), n_kv, n_rep, head_dim)
                                           .to(dev), scheme, act.to(dev)) for ga in alpha_grid}
            a = min(errs, key=errs.get)
        s_k = smoothing_scales(act_k, w_k, a).to(dev)
        s = expand_kv(s_k, n_kv, n_rep, head_dim)
        fold(layer, g, s, s_smooth=s_k, dtype=torch.float64)
        for c in cnames:
            absmax[c] = (absmax[c].double() / s.cpu()).float()
        used[f"{layer_name}.{g.smooth}"] = float(a)
    return used
