"""SmoothQuant (``--method smoothquant``) and naive W8A8 (``--method w8a8``): int8 weights and activations.

SmoothQuant moves activation outliers into the weights with an exact per-channel rescaling:
for input channel j of the Linears that read one tensor, ``s_j = amax(|X_j|)^a / amax(|W_:,j|)^(1-a)``;
the Linears' weight columns are multiplied by ``s`` and the producer of X (the preceding norm, or
the preceding Linear's output rows) is divided by ``s``, so the float model computes the same
function. Which producer feeds which Linears is architecture knowledge, kept as data in
:mod:`hubquant.methods.scaling` (shared with AWQ); the per-layer math is in
:mod:`hubquant.methods.smoothing`. Then W8A8: per-channel symmetric int8 weights (RTN) and int8 activations,
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

import torch
from torch import nn
from tqdm.auto import tqdm

from hubquant import moe_scaling
from hubquant.engine import for_each_layer, results
from hubquant.errors import UnsupportedError, UsageError
from hubquant.methods.actquant import (  # noqa: F401  (attach/detach are part of this module's documented API)
    activation_fake_quant,
    attach_activation_quant,
    attach_input_hooks,
    detach_activation_quant,
    static_input_scale,
)
from hubquant.methods.gptq import fp8_gptq_quantize, gptq_quantize
from hubquant.methods.smooth_search import search_layer_alphas
from hubquant.methods.smoothing import (  # noqa: F401  (the smoothing math and options, re-exported)
    SmoothConfig,
    W8A8Options,
    architecture_groups,
    group_output_error,
    head_dims,
    smooth_layer,
    smoothing_scales,
)
from hubquant.modeling import model_dtype, quantizable_linears
from hubquant.quant import QuantizedWeight, QuantScheme, WeightScheme
from hubquant.quant import per_channel_quantize as quantize_weight  # noqa: F401  (re-exported)


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

    if config.alpha_value == "layer-search":
        raise UsageError("alpha=layer-search scores quantized layers; smooth_model does not quantize",
                         hint="use quantize_w8a8 (--method smoothquant or fp8), or alpha=search")
    groups = architecture_groups(model, smooth=config.smooth_value)
    head_dim, n_kv = head_dims(model)
    alpha = config.alpha_value
    used: dict[str, float] = {}

    def on_layer(work):
        names = list(work.linears)
        lgroups = moe_scaling.for_layer(groups, work)
        first = {f"{work.name}.{g.balance[0]}" for g in lgroups} & set(names) if alpha == "search" else set()
        absmax, samples = _layer_stats(work, names, first, config.search_tokens)
        used.update(smooth_layer(work.layer, work.name, absmax, groups=lgroups, head_dim=head_dim,
                                 n_kv=n_kv, alpha=alpha, scheme=scheme, samples=samples,
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
def quantize_w8a8(model: nn.Module, job, *, smooth: bool, options: W8A8Options | None = None
                  ) -> dict[str, QuantizedWeight]:
    """The shared W8A8 flow (int8 or fp8 as `job.scheme` says), with or without smoothing.

    With calibration (smoothing or static scales) it runs layer by layer through the engine: collect
    input ranges, smooth, quantize, and rerun the layer so the next one calibrates on quantized inputs.
    `options` default: `job.options` read as SmoothConfig (smoothing) or W8A8Options.
    """
    from hubquant.engine import run_layers

    scheme = job.scheme
    _check_scheme(scheme)
    act = scheme.activations
    linears = quantizable_linears(model, job.ignore)
    dtype = model_dtype(model)
    cfg = options or job.options_as(SmoothConfig if smooth else W8A8Options, "smoothquant" if smooth else "w8a8")
    alpha0 = cfg.alpha_value if smooth else None
    smooth_mode = cfg.smooth_value if smooth else None
    quantized: dict[str, QuantizedWeight] = results()  # a plain dict, or the streamed conversion's sink
    done: set[str] = set()  # quantized Linears (a streamed conversion's sink lets written layers go)
    used: dict[str, float] = {}
    search_info: dict[str, dict] = {}
    use_gptq = cfg.weights == "gptq"
    if smooth or not act.dynamic or use_gptq:
        if job.calib is None:
            raise UsageError("this method needs calibration data (smoothing or static activation scales)",
                             hint="pass calibration text (--calib-dataset) or use dynamic activations")
        groups = architecture_groups(model, smooth=smooth_mode) if smooth else ()
        head_dim, n_kv = head_dims(model)

        def on_layer(work):
            names = [n for n in work.linears if n in linears]
            lgroups = moe_scaling.for_layer(groups, work)
            first = set()
            if alpha0 == "search":
                first = {f"{work.name}.{g.balance[0]}" for g in lgroups} & set(names)
            absmax, samples = _layer_stats(work, names, first, cfg.search_tokens if smooth else 0)
            float_out = work.outputs  # the float layer's outputs (smoothing keeps its function)
            alpha = alpha0
            if alpha0 == "layer-search":
                found, info = search_layer_alphas(work, absmax, groups=lgroups, head_dim=head_dim,
                                                  n_kv=n_kv, scheme=scheme, grid=cfg.alpha_grid,
                                                  start=dict(cfg.alpha_start), tokens=cfg.layer_search_tokens)
                alpha = tuple(sorted(found.items()))
                search_info[work.name] = info
            if smooth:
                used.update(smooth_layer(work.layer, work.name, absmax, groups=lgroups, head_dim=head_dim,
                                         n_kv=n_kv, alpha=alpha, scheme=scheme, samples=samples,
                                         alpha_grid=cfg.alpha_grid))
            pre = _gptq_layer(work, names, scheme.weights, dtype) if use_gptq else {}
            work.outputs = float_out  # (collect() drops them; only used when not sequential)
            layer_q = {n: _quantize_linear(n, linears[n], scheme, dtype, absmax.get(n), pre.get(n)) for n in names}
            attach_input_hooks(model, layer_q, act)  # the rerun feeds quantized outputs to the next layer
            quantized.update(layer_q)
            done.update(n for n in linears if n.startswith(work.name + "."))  # (+ experts the MoE rule rounds)

        # Sequential (each layer calibrated on the quantized outputs of the ones before) costs a second pass per
        # layer. Static scales and GPTQ depend on it; with dynamic activations only the smoothing ranges would,
        # so by default those are measured on the float model in one pass, as the SmoothQuant paper does.
        sequential = cfg.sequential if cfg.sequential is not None else (use_gptq or not act.dynamic)
        run_layers(model, job.calib, on_layer=on_layer, device=job.device, ignore=job.ignore, rerun=sequential,
                   progress=job.progress, desc="smoothquant" if smooth else "w8a8 calibration",
                   tokens_per_batch=cfg.tokens_per_batch)
    else:  # no calibration: each decoder layer's Linears rounded in turn (streamable), then the rest below
        def round_layer(name: str, layer: nn.Module) -> None:
            layer_q = {n: _quantize_linear(n, linears[n], scheme, dtype) for n in linears if n.startswith(name + ".")}
            attach_input_hooks(model, layer_q, act)
            quantized.update(layer_q)
            done.update(layer_q)

        for_each_layer(model, round_layer, progress=job.progress, desc="quantizing")
    for name in tqdm([n for n in linears if n not in done], desc="quantizing", disable=not job.progress):
        quantized[name] = _quantize_linear(name, linears[name], scheme, dtype)
    attach_activation_quant(model, quantized, act)
    if smooth:
        for qw in quantized.values():
            qw.extra["smoothquant"] = {"alpha": alpha0, "smooth": smooth_mode}
        model._hubquant_smoothquant = {"alpha": alpha0, "smooth": smooth_mode, "alphas_used": used,
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
