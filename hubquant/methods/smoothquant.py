"""SmoothQuant (``--method smoothquant``) and naive W8A8 (``--method w8a8``): int8 weights and activations.

SmoothQuant moves activation outliers into the weights with an exact per-channel rescaling:
for input channel j of the Linears that read one tensor, ``s_j = amax(|X_j|)^a / amax(|W_:,j|)^(1-a)``;
the Linears' weight columns are multiplied by ``s`` and the producer of X (the preceding norm, or
the preceding Linear's output rows) is divided by ``s``, so the float model computes the same
function. Which producer feeds which Linears is architecture knowledge, kept as data in
``ARCHITECTURES``. Then W8A8: per-channel symmetric int8 weights (RTN) and int8 activations,
per token at run time (dynamic) or with a static per-tensor ``input_scale`` from calibration.

Options (``job.options``): ``alpha`` (float, default 0.5; ``"search"``: a grid over alpha per
smoothing group, scored by that group's W8A8 output error on calibration tokens; ``"layer-search"``: per
layer, coordinate descent over the groups' alphas scored by the quantized decoder layer's output error
(:mod:`hubquant.methods.smooth_search`, starting from ``alpha_start``, default 0.5 everywhere, on
``layer_search_tokens``, default 4096); or a dict by producer, e.g. ``{"mlp.up_proj": 0.9, "default": 0.8}``),
``alpha_grid``
(default 0.0..1.0 by 0.1), ``smooth`` (``"all"``: both norms plus v_proj->o_proj and
up_proj->down_proj, the default; ``"norms"``: only the two norms, as llm-compressor does),
``search_tokens`` (tokens kept per group for the search, default 512), ``weights`` (``"rtn"``, the
default, or ``"gptq"``: int8 or e4m3 weights by GPTQ on the smoothed layer's inputs, through the same engine),
``sequential`` (calibrate each layer on the quantized outputs of the previous ones; default True for
static activations and GPTQ weights, False otherwise: one pass over the float model).

Evaluation: after ``run``/``run_naive`` the model behaves like the quantized model. Each quantized
Linear holds its dequantized weight and carries a forward pre-hook that fake-quantizes its input
(:func:`attach_activation_quant`, from :mod:`hubquant.methods.actquant`); :func:`detach_activation_quant`
removes the hooks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from hubquant.errors import UnsupportedError, UsageError
from hubquant.methods.actquant import (  # noqa: F401  (attach/detach are part of this module's documented API)
    activation_fake_quant, attach_activation_quant, attach_input_hooks, detach_activation_quant, static_input_scale,
)
from hubquant.methods.fp8 import fp8_quantize_weight
from hubquant.modeling import model_dtype, quantizable_linears
from hubquant.quant import QuantizedWeight, QuantScheme, WeightScheme, rtn_quantize


# ---------------------------------------------------------------- architecture knowledge (data)
@dataclass(frozen=True)
class SmoothGroup:
    """`producer` (a norm or a Linear, relative to the decoder layer) writes the tensor that every
    Linear in `consumers` reads. `extra` marks groups beyond the two norms (``smooth="all"`` only)."""

    producer: str
    consumers: tuple[str, ...]
    extra: bool = False


_LLAMA_GROUPS = (
    SmoothGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    SmoothGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    # o_proj reads softmax(QK) @ V per head: scaling V's output rows is exact when the o_proj scales of all
    # query heads that share one KV head are equal (tied below for GQA).
    SmoothGroup("self_attn.v_proj", ("self_attn.o_proj",), extra=True),
    # down_proj reads act(gate(x)) * up(x): dividing up's rows by s divides the product by s.
    SmoothGroup("mlp.up_proj", ("mlp.down_proj",), extra=True),
)
_PHI3_GROUPS = (
    SmoothGroup("input_layernorm", ("self_attn.qkv_proj",)),
    SmoothGroup("post_attention_layernorm", ("mlp.gate_up_proj",)),
)
# model_type -> (groups, norm style). "rms": y = w * norm(x); "gemma": y = (1 + w) * norm(x).
ARCHITECTURES: dict[str, tuple[tuple[SmoothGroup, ...], str]] = {
    "llama": (_LLAMA_GROUPS, "rms"),
    "mistral": (_LLAMA_GROUPS, "rms"),
    "qwen2": (_LLAMA_GROUPS, "rms"),
    "qwen3": (_LLAMA_GROUPS, "rms"),
    "gemma": (_LLAMA_GROUPS, "gemma"),
    "phi3": (_PHI3_GROUPS, "rms"),
}


def architecture_groups(model: nn.Module, *, smooth: str = "all") -> tuple[tuple[SmoothGroup, ...], str]:
    """The smoothing groups and norm style of `model`'s architecture.

    Raises:
        UnsupportedError: the architecture has no smoothing map.
    """
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype not in ARCHITECTURES:
        raise UnsupportedError(
            f"SmoothQuant has no smoothing map for model_type '{mtype}'",
            hint=f"supported: {', '.join(ARCHITECTURES)}; use --method w8a8 (no smoothing) or --method fp8",
        )
    if smooth not in ("all", "norms"):
        raise UsageError(f"smooth option '{smooth}' is unknown", hint="use smooth=all or smooth=norms")
    groups, style = ARCHITECTURES[mtype]
    return tuple(g for g in groups if smooth == "all" or not g.extra), style


# ---------------------------------------------------------------- pure math
def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = act^alpha / w^(1-alpha) per input channel (float64), both ranges floored at 1e-5."""
    a = act_absmax.double().clamp(min=1e-5)
    w = weight_absmax.double().clamp(min=1e-5)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)


def _kv_view(x: torch.Tensor, n_kv: int, head_dim: int) -> torch.Tensor:
    """[n_heads*hd] -> [n_kv, n_rep, hd] (query head i uses KV head i // n_rep)."""
    return x.reshape(n_kv, -1, head_dim)


def _expand(s_k: torch.Tensor, n_kv: int, n_rep: int, head_dim: int) -> torch.Tensor:
    """Per-KV-channel scales -> per o_proj input column (query head i reads KV head i // n_rep)."""
    if n_rep == 1:
        return s_k
    return s_k.reshape(n_kv, 1, head_dim).expand(n_kv, n_rep, head_dim).reshape(-1)


def fold_into_norm(norm: nn.Module, s: torch.Tensor, style: str) -> None:
    """Divide the norm's output channels by s, exactly in float64 (then cast back)."""
    w = norm.weight.data.double()
    new = (1 + w) / s - 1 if style == "gemma" else w / s
    norm.weight.data = new.to(norm.weight.dtype)
    if getattr(norm, "bias", None) is not None:
        norm.bias.data = (norm.bias.data.double() / s).to(norm.bias.dtype)


def fold_into_linear_rows(lin: nn.Linear, s: torch.Tensor) -> None:
    """Divide a Linear's output rows (and bias) by s."""
    lin.weight.data = (lin.weight.data.double() / s[:, None]).to(lin.weight.dtype)
    if lin.bias is not None:
        lin.bias.data = (lin.bias.data.double() / s).to(lin.bias.dtype)


def scale_linear_columns(lin: nn.Linear, s: torch.Tensor) -> None:
    """Multiply a Linear's input columns by s."""
    lin.weight.data = (lin.weight.data.double() * s[None, :]).to(lin.weight.dtype)


def quantize_weight(w: torch.Tensor, scheme: WeightScheme, dtype: torch.dtype, *,
                    per_tensor: bool = False) -> QuantizedWeight:
    """Per-channel RTN weights: int8 codes, or e4m3 for float schemes (optionally one per-tensor scale)."""
    if scheme.type == "float":
        return fp8_quantize_weight(w, scheme, scale_dtype=dtype, per_tensor=per_tensor)
    return rtn_quantize(w, scheme, scale_dtype=dtype)


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
        wq = quantize_weight(w * s32, scheme.weights, torch.float32).dequantize()
        err += float((xq @ wq.T - ref).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-12))
    return err


# ---------------------------------------------------------------- per-layer transforms
@dataclass(frozen=True, kw_only=True)
class SmoothConfig:
    """SmoothQuant settings, read from ``job.options`` (see the module docstring)."""

    alpha: float | str | tuple[tuple[str, float], ...] = 0.5
    smooth: str = "all"
    alpha_grid: tuple[float, ...] = tuple(i / 10 for i in range(11))
    search_tokens: int = 512
    alpha_start: tuple[tuple[str, float], ...] = (("default", 0.5),)
    layer_search_tokens: int = 4096
    version: int = 2

    @classmethod
    def from_options(cls, opts: dict) -> "SmoothConfig":
        alpha = opts.get("alpha", 0.5)
        if isinstance(alpha, dict):  # per group: {"mlp.up_proj": 0.9, "default": 0.8}
            alpha = tuple(sorted((str(k), _check_alpha(v)) for k, v in alpha.items()))
        elif alpha not in ("search", "layer-search"):
            alpha = _check_alpha(alpha)
        grid = tuple(_check_alpha(a) for a in opts.get("alpha_grid", cls.alpha_grid))
        start = opts.get("alpha_start", 0.5)
        start = {str(k): v for k, v in start.items()} if isinstance(start, dict) else {"default": start}
        return cls(alpha=alpha, smooth=str(opts.get("smooth", "all")), alpha_grid=grid,
                   search_tokens=int(opts.get("search_tokens", 512)),
                   alpha_start=tuple(sorted((k, _check_alpha(v)) for k, v in start.items())),
                   layer_search_tokens=int(opts.get("layer_search_tokens", 4096)))


def _check_alpha(alpha) -> float:
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        value = -1.0
    if not 0 <= value <= 1:
        raise UsageError(f"alpha={alpha!r} is invalid",
                         hint='use a number in [0, 1], alpha=search, alpha=layer-search, '
                              'or {"mlp.up_proj": 0.9, "default": 0.8}')
    return value


def _head_dims(model: nn.Module) -> tuple[int, int]:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return head_dim, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def _stats_hooks(names, sample_for, sample_tokens: int, n_batches: int):
    """Input hooks that record per-channel absmax (and a seeded row sample for `sample_for`)."""
    absmax: dict[str, torch.Tensor] = {}
    samples: dict[str, list[torch.Tensor]] = {n: [] for n in sample_for}
    per_batch = math.ceil(sample_tokens / max(n_batches, 1))
    gen = torch.Generator().manual_seed(0)

    def hook_for(name):
        def fn(x):
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            cur = x2.abs().amax(dim=0).cpu()
            absmax[name] = cur if name not in absmax else torch.maximum(absmax[name], cur)
            if name in samples:
                idx = torch.randperm(x2.shape[0], generator=gen)[:per_batch]
                samples[name].append(x2[idx.to(x2.device)].cpu())
        return fn

    return {n: hook_for(n) for n in names}, absmax, samples


@torch.no_grad()
def smooth_layer(layer: nn.Module, layer_name: str, absmax: dict[str, torch.Tensor], *, groups, style: str,
                 head_dim: int, n_kv: int, alpha: float | str, scheme: QuantScheme | None = None,
                 samples: dict | None = None, alpha_grid=(0.5,)) -> dict[str, float]:
    """Fold SmoothQuant scales into one decoder layer (in place); update `absmax` to the smoothed inputs.

    Args:
        layer: the decoder layer. layer_name: its full module name (e.g. "model.layers.3").
        absmax: per-input-channel activation absmax keyed by full Linear name (from calibration).
        groups, style: from :func:`architecture_groups`.
        head_dim, n_kv: attention geometry (to tie o_proj scales across query heads sharing a KV head).
        alpha: migration strength in [0, 1], or "search" (needs `scheme` and `samples`).
        scheme: the W8A8 scheme the search scores against.
        samples: calibration input rows keyed by each group's first consumer (for the search).
        alpha_grid: alphas the search tries.

    Returns:
        {producer full name: alpha used} for every group smoothed.
    """
    used = {}
    for g in groups:
        cnames = [f"{layer_name}.{c}" for c in g.consumers]
        if any(c not in absmax for c in cnames):
            continue  # a consumer is not quantized (ignored): leave this group alone
        producer = layer.get_submodule(g.producer)
        consumers = [layer.get_submodule(c) for c in g.consumers]
        act = absmax[cnames[0]]
        for c in cnames[1:]:
            act = torch.maximum(act, absmax[c])
        dev = consumers[0].weight.device
        wmax = torch.stack([c.weight.detach().float().abs().amax(dim=0) for c in consumers]).amax(dim=0).cpu()
        # v_proj -> o_proj with grouped KV heads: one scale per KV channel, shared by the query heads reading it
        n_rep = consumers[0].in_features // producer.out_features if isinstance(producer, nn.Linear) else 1
        act_k, w_k = (_kv_view(t, n_kv, head_dim).amax(dim=1).reshape(-1) for t in (act, wmax)) if n_rep > 1 \
            else (act, wmax)
        a = dict(alpha).get(g.producer, dict(alpha).get("default", 0.5)) if isinstance(alpha, tuple) else alpha
        if alpha == "search":
            x = samples[cnames[0]].to(dev)
            ws = [c.weight.detach().float() for c in consumers]
            errs = {ga: group_output_error(x, ws, _expand(smoothing_scales(act_k, w_k, ga), n_kv, n_rep, head_dim)
                                           .to(dev), scheme, act.to(dev)) for ga in alpha_grid}
            a = min(errs, key=errs.get)
        s_k = smoothing_scales(act_k, w_k, a).to(dev)
        s = _expand(s_k, n_kv, n_rep, head_dim)
        if isinstance(producer, nn.Linear):
            fold_into_linear_rows(producer, s_k)
        else:
            fold_into_norm(producer, s_k, style)
        for c in consumers:
            scale_linear_columns(c, s)
        for c in cnames:
            absmax[c] = (absmax[c].double() / s.cpu()).float()
        used[f"{layer_name}.{g.producer}"] = float(a)
    return used


def _layer_stats(work, names: list[str], sample_for: set[str], sample_tokens: int):
    hooks, absmax, samples = _stats_hooks(names, sample_for, sample_tokens, len(work.inputs))
    work.forward(hooks=hooks)
    return absmax, {n: torch.cat(v)[:sample_tokens] for n, v in samples.items() if v}


@torch.no_grad()
def smooth_model(model: nn.Module, calib: torch.Tensor, *, config: SmoothConfig = SmoothConfig(),
                 scheme: QuantScheme | None = None, ignore=("lm_head",), device: str = "cpu",
                 progress: bool = True) -> dict[str, float]:
    """Smooth `model` in place without quantizing it (its float function is unchanged up to rounding).

    Runs the layer-sequential engine over `calib` (LongTensor [n, seq]); `scheme` is needed only for
    ``alpha="search"``. Returns {producer name: alpha used}.

    Raises:
        UnsupportedError: architecture without a smoothing map. UsageError: bad options.
    """
    from hubquant.engine import run_layers

    if config.alpha == "layer-search":
        raise UsageError("alpha=layer-search scores quantized layers; smooth_model does not quantize",
                         hint="use quantize_w8a8 (--method smoothquant or fp8), or alpha=search")
    groups, style = architecture_groups(model, smooth=config.smooth)
    head_dim, n_kv = _head_dims(model)
    used: dict[str, float] = {}

    def on_layer(work):
        names = list(work.linears)
        first = {f"{work.name}.{g.consumers[0]}" for g in groups} & set(names) if config.alpha == "search" else set()
        absmax, samples = _layer_stats(work, names, first, config.search_tokens)
        used.update(smooth_layer(work.layer, work.name, absmax, groups=groups, style=style, head_dim=head_dim,
                                 n_kv=n_kv, alpha=config.alpha, scheme=scheme, samples=samples,
                                 alpha_grid=config.alpha_grid))

    run_layers(model, calib, on_layer=on_layer, device=device, ignore=ignore, rerun=False, progress=progress,
               desc="smoothing")
    return used


# ---------------------------------------------------------------- methods
def _check_scheme(scheme: QuantScheme) -> None:
    w, a = scheme.weights, scheme.activations
    if w.bits != 8 or w.group_size != -1 or not w.symmetric or a is None:
        raise UsageError(
            f"W8A8 needs 8-bit symmetric per-channel weights and 8-bit activations, got {scheme.name}",
            hint="use the method's default scheme (--bits 8, no --group-size)",
        )
    if a.strategy not in ("token", "tensor") or (a.strategy == "token") != a.dynamic:
        raise UsageError(f"activation strategy {a.strategy} with dynamic={a.dynamic} is not supported",
                         hint="use dynamic per-token or static per-tensor activations")


def _gptq_layer(work, names: list[str], scheme: WeightScheme, dtype) -> dict[str, QuantizedWeight]:
    """GPTQ int8 / e4m3 per-channel weights for one layer's Linears (Hessians of the smoothed float inputs)."""
    from hubquant.methods.fp8 import fp8_gptq_quantize
    from hubquant.methods.gptq import gptq_quantize

    stats = work.collect(names, hessian=True)
    shared: dict[int, list[str]] = {}  # q/k/v and gate/up read one input: one Hessian, one matrix
    for n in names:
        shared.setdefault(id(stats[n].xtx), []).append(n)
    out = {}
    for group in shared.values():
        h = stats[group[0]].hessian()
        lins = [work.linears[n] for n in group]
        w = torch.cat([lin.weight for lin in lins], 0)
        if scheme.type == "float":
            qw = fp8_gptq_quantize(w, h, scheme, scale_dtype=dtype)
        else:
            qw, _ = gptq_quantize(w, h, scheme, scale_dtype=dtype, inplace=True)
        row = 0
        for n, lin in zip(group, lins, strict=True):
            rows = slice(row, row + lin.out_features)
            row += lin.out_features
            out[n] = QuantizedWeight(qweight=qw.qweight[rows].cpu(), scale=qw.scale[rows].cpu(), zero_point=None,
                                     scheme=scheme)
    return out


def _quantize_linear(name: str, lin: nn.Linear, scheme: QuantScheme, dtype, absmax=None,
                     qw: QuantizedWeight | None = None) -> QuantizedWeight:
    act = scheme.activations
    static = not act.dynamic
    if qw is None:
        per_tensor = static and scheme.weights.type == "float"  # compressed-tensors' FP8 static scheme
        qw = quantize_weight(lin.weight.data, scheme.weights, dtype, per_tensor=per_tensor)
    if static:
        if absmax is None:
            raise UnsupportedError(f"no calibration statistics for {name} (outside the decoder layers)",
                                   hint=f"add --ignore {name}, or use dynamic activations")
        qw.input_scale = static_input_scale(absmax, act, dtype)
    lin.weight.data = qw.dequantize(lin.weight.dtype).to(lin.weight.device)
    qw.qweight, qw.scale = qw.qweight.cpu(), qw.scale.cpu()  # formats write from host memory
    if qw.input_scale is not None:
        qw.input_scale = qw.input_scale.cpu()
    return qw


@torch.no_grad()
def quantize_w8a8(model: nn.Module, job, *, smooth: bool) -> dict[str, QuantizedWeight]:
    """The shared W8A8 flow (int8 or fp8 as `job.scheme` says), with or without smoothing.

    With calibration (smoothing or static scales) it runs layer by layer through the engine: collect
    input ranges, smooth, quantize, and rerun the layer so the next one calibrates on quantized inputs.
    """
    from hubquant.engine import run_layers

    scheme = job.scheme
    _check_scheme(scheme)
    act = scheme.activations
    linears = quantizable_linears(model, job.ignore)
    dtype = model_dtype(model)
    opts = dict(job.options or {})
    cfg = SmoothConfig.from_options(opts) if smooth else None
    quantized: dict[str, QuantizedWeight] = {}
    used: dict[str, float] = {}
    search_info: dict[str, dict] = {}
    use_gptq = opts.get("weights", "rtn") == "gptq"
    if opts.get("weights", "rtn") not in ("rtn", "gptq"):
        raise UsageError(f"weights={opts.get('weights')!r} is not supported here",
                         hint="use weights=rtn or weights=gptq")
    if smooth or not act.dynamic or use_gptq:
        if job.calib is None:
            raise UsageError("this method needs calibration data (smoothing or static activation scales)",
                             hint="pass calibration text (--calib-dataset) or use dynamic activations")
        groups, style = architecture_groups(model, smooth=cfg.smooth) if smooth else ((), "rms")
        head_dim, n_kv = _head_dims(model)

        def on_layer(work):
            names = [n for n in work.linears if n in linears]
            first = set()
            if smooth and cfg.alpha == "search":
                first = {f"{work.name}.{g.consumers[0]}" for g in groups} & set(names)
            absmax, samples = _layer_stats(work, names, first, cfg.search_tokens if cfg else 0)
            float_out = work.outputs  # the float layer's outputs (smoothing keeps its function)
            alpha = cfg.alpha if smooth else None
            if smooth and cfg.alpha == "layer-search":
                from hubquant.methods.smooth_search import search_layer_alphas

                found, info = search_layer_alphas(work, absmax, groups=groups, style=style, head_dim=head_dim,
                                                  n_kv=n_kv, scheme=scheme, grid=cfg.alpha_grid,
                                                  start=dict(cfg.alpha_start), tokens=cfg.layer_search_tokens)
                alpha = tuple(sorted(found.items()))
                search_info[work.name] = info
            if smooth:
                used.update(smooth_layer(work.layer, work.name, absmax, groups=groups, style=style, head_dim=head_dim,
                                         n_kv=n_kv, alpha=alpha, scheme=scheme, samples=samples,
                                         alpha_grid=cfg.alpha_grid))
            pre = _gptq_layer(work, names, scheme.weights, dtype) if use_gptq else {}
            work.outputs = float_out  # (collect() drops them; only used when not sequential)
            layer_q = {n: _quantize_linear(n, linears[n], scheme, dtype, absmax.get(n), pre.get(n)) for n in names}
            attach_input_hooks(model, layer_q, act)  # the rerun feeds quantized outputs to the next layer
            quantized.update(layer_q)

        # Sequential (each layer calibrated on the quantized outputs of the ones before) costs a second pass per
        # layer. Static scales and GPTQ depend on it; with dynamic activations only the smoothing ranges would,
        # so by default those are measured on the float model in one pass, as the SmoothQuant paper does.
        sequential = opts.get("sequential", use_gptq or not act.dynamic)
        sequential = sequential if isinstance(sequential, bool) else str(sequential).lower() in ("1", "true", "yes")
        run_layers(model, job.calib, on_layer=on_layer, device=job.device, ignore=job.ignore, rerun=sequential,
                   progress=job.progress, desc="smoothquant" if smooth else "w8a8 calibration",
                   tokens_per_batch=int(opts.get("tokens_per_batch", 16384)))
    for name in tqdm([n for n in linears if n not in quantized], desc="quantizing", disable=not job.progress):
        quantized[name] = _quantize_linear(name, linears[name], scheme, dtype)
    attach_activation_quant(model, quantized, act)
    if smooth:
        for qw in quantized.values():
            qw.extra["smoothquant"] = {"alpha": cfg.alpha, "smooth": cfg.smooth}
        model._hubquant_smoothquant = {"alpha": cfg.alpha, "smooth": cfg.smooth, "alphas_used": used,
                                       "layer_search": search_info}
    return quantized


def run(model: nn.Module, job) -> dict[str, QuantizedWeight]:
    """SmoothQuant + W8A8 int8 (see the module docstring).

    Args:
        model: a causal LM (Llama, Mistral, Qwen2/3, Gemma, Phi-3), changed in place.
        job: a QuantJob with calibration tokens (`job.calib`); options alpha, smooth, alpha_grid.

    Returns:
        Quantized weights by Linear name (int8 codes, per-channel scales, `input_scale` if static).

    Raises:
        UsageError: no calibration data, or a scheme other than W8A8. UnsupportedError: architecture
            without a smoothing map.
    """
    return quantize_w8a8(model, job, smooth=True)


def run_naive(model: nn.Module, job) -> dict[str, QuantizedWeight]:
    """W8A8 int8 without smoothing (``--method w8a8``), the baseline SmoothQuant must beat.

    Needs `job.calib` only for static activations. Same return value and side effects as :func:`run`.
    """
    return quantize_w8a8(model, job, smooth=False)
