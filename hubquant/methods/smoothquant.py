"""SmoothQuant (``--method smoothquant``) and naive W8A8 (``--method w8a8``): int8 weights and activations.

SmoothQuant moves activation outliers into the weights with an exact per-channel rescaling:
for input channel j of the Linears that read one tensor, ``s_j = amax(|X_j|)^a / amax(|W_:,j|)^(1-a)``;
the Linears' weight columns are multiplied by ``s`` and the producer of X (the preceding norm, or
the preceding Linear's output rows) is divided by ``s``, so the float model computes the same
function. Which producer feeds which Linears is architecture knowledge, kept as data in
``ARCHITECTURES``. Then W8A8: per-channel symmetric int8 weights (RTN) and int8 activations,
per token at run time (dynamic) or with a static per-tensor ``input_scale`` from calibration.

Options (``job.options``): ``alpha`` (float, default 0.5, or ``"search"``: a grid over alpha per
smoothing group, scored by that group's W8A8 output error on calibration tokens), ``alpha_grid``
(default 0.0..1.0 by 0.1), ``smooth`` (``"all"``: both norms plus v_proj->o_proj and
up_proj->down_proj, the default; ``"norms"``: only the two norms, as llm-compressor does),
``search_tokens`` (tokens kept per group for the search, default 512), ``batch_size`` (4).

Evaluation: after ``run``/``run_naive`` the model behaves like the quantized model. Each quantized
Linear holds its dequantized weight and carries a forward pre-hook that fake-quantizes its input
(:func:`attach_activation_quant`); :func:`detach_activation_quant` removes the hooks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from hubquant.errors import UnsupportedError, UsageError
from hubquant.methods.fp8 import FP8_MAX, fp8_fake_quant_per_token, fp8_fake_quant_static, fp8_quantize_weight
from hubquant.modeling import decoder_layers, layers_prefix, model_dtype, quantizable_linears
from hubquant.quant import ActivationScheme, QuantizedWeight, QuantScheme, WeightScheme, rtn_quantize

INT8_HALF_RANGE = 127.5  # compressed-tensors' symmetric scale: amax / ((2^8 - 1) / 2)


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


def int8_fake_quant_per_token(x: torch.Tensor) -> torch.Tensor:
    """Dynamic symmetric int8 per token (last dim): scale = amax / 127.5, codes in [-128, 127]."""
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / INT8_HALF_RANGE).clamp(min=1e-8)
    return (torch.round(x.float() / scale).clamp(-128, 127) * scale).to(x.dtype)


def int8_fake_quant_static(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """Static symmetric int8 with one calibrated scale."""
    s = input_scale.float().reshape(())
    return (torch.round(x.float() / s).clamp(-128, 127) * s).to(x.dtype)


def activation_fake_quant(x: torch.Tensor, act: ActivationScheme, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize -> dequantize activations as `act` says (int8 or fp8; per token or static per tensor)."""
    if act.bits != 8 or not act.symmetric:
        raise UsageError(f"activation scheme {act} is not supported", hint="use 8-bit symmetric activations")
    if act.dynamic:
        return int8_fake_quant_per_token(x) if act.type == "int" else fp8_fake_quant_per_token(x)
    if input_scale is None:
        raise UsageError("static activations need an input_scale", hint="calibrate (pass calibration data)")
    return int8_fake_quant_static(x, input_scale) if act.type == "int" else fp8_fake_quant_static(x, input_scale)


def static_input_scale(amax: torch.Tensor, act: ActivationScheme, dtype: torch.dtype) -> torch.Tensor:
    """Per-tensor static scale [1] from the calibration amax (int8: /127.5, fp8: /448)."""
    div = INT8_HALF_RANGE if act.type == "int" else FP8_MAX
    return (amax.float().max().clamp(min=1e-8) / div).reshape(1).to(dtype)


def quantize_weight(w: torch.Tensor, scheme: WeightScheme, dtype: torch.dtype) -> QuantizedWeight:
    """Per-channel RTN weights: int8 codes, or e4m3 for float schemes; scales in `dtype`."""
    if scheme.type == "float":
        return fp8_quantize_weight(w, scheme, scale_dtype=dtype)
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


# ---------------------------------------------------------------- calibration pass
@torch.no_grad()
def collect_activation_stats(model: nn.Module, calib: torch.Tensor, names: list[str], *, sample_for: set[str] = frozenset(),
                             sample_tokens: int = 512, batch_size: int = 4, device: str = "cpu",
                             progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-input-channel absmax of every Linear in `names` over the calibration tokens.

    Returns (absmax [in] float32 per name, sampled input rows [<=sample_tokens, in] for names in
    `sample_for`). Rows are drawn uniformly with a fixed seed.
    """
    absmax: dict[str, torch.Tensor] = {}
    samples: dict[str, list[torch.Tensor]] = {n: [] for n in sample_for}
    n_batches = math.ceil(calib.shape[0] / batch_size)
    per_batch = math.ceil(sample_tokens / n_batches)
    gen = torch.Generator().manual_seed(0)

    def hook(name):
        def fn(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            cur = x.abs().amax(dim=0).cpu()
            absmax[name] = cur if name not in absmax else torch.maximum(absmax[name], cur)
            if name in samples:
                idx = torch.randperm(x.shape[0], generator=gen)[:per_batch]
                samples[name].append(x[idx.to(x.device)].cpu())
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for i in tqdm(range(0, calib.shape[0], batch_size), desc="calibrating activations", disable=not progress):
            model(input_ids=calib[i:i + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return absmax, {n: torch.cat(v)[:sample_tokens] for n, v in samples.items() if v}


# ---------------------------------------------------------------- model transforms
def _head_dims(model: nn.Module) -> tuple[int, int]:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return head_dim, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


@torch.no_grad()
def smooth_model(model: nn.Module, absmax: dict[str, torch.Tensor], *, alpha: float | str = 0.5,
                 smooth: str = "all", scheme: QuantScheme | None = None, samples: dict | None = None,
                 alpha_grid: tuple[float, ...] = tuple(i / 10 for i in range(11)), progress: bool = True,
                 ) -> dict[str, dict]:
    """Fold SmoothQuant scales into `model` (in place) and update `absmax` to the smoothed inputs.

    Args:
        model: a causal LM of an architecture in ``ARCHITECTURES``.
        absmax: per-input-channel activation absmax keyed by Linear name (from calibration).
        alpha: migration strength in [0, 1], or "search" (needs `scheme` and `samples`).
        smooth: "all" or "norms" (see module docstring).
        scheme: the W8A8 scheme the search scores against.
        samples: calibration input rows keyed by the first consumer's name (for the search).
        alpha_grid: alphas the search tries.
        progress: show a progress bar.

    Returns:
        {producer module name: {"alpha": a, "consumers": [...]}} for every group smoothed.

    Raises:
        UnsupportedError: unknown architecture. UsageError: bad alpha.
    """
    groups, style = architecture_groups(model, smooth=smooth)
    if alpha != "search" and not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise UsageError(f"alpha={alpha!r} is invalid", hint="use a number in [0, 1] or alpha=search")
    prefix = layers_prefix(model)
    head_dim, n_kv = _head_dims(model)
    record = {}
    for li, _layer in enumerate(tqdm(decoder_layers(model), desc="smoothing", disable=not progress)):
        for g in groups:
            pname = f"{prefix}.{li}.{g.producer}"
            cnames = [f"{prefix}.{li}.{c}" for c in g.consumers]
            if any(c not in absmax for c in cnames):
                continue  # a consumer is not quantized (ignored): leave this group alone
            producer = model.get_submodule(pname)
            consumers = [model.get_submodule(c) for c in cnames]
            act = absmax[cnames[0]]
            for c in cnames[1:]:
                act = torch.maximum(act, absmax[c])
            wmax = torch.stack([c.weight.detach().float().abs().amax(dim=0) for c in consumers]).amax(dim=0)
            gqa = isinstance(producer, nn.Linear) and producer.out_features != consumers[0].in_features
            if gqa:  # v_proj -> o_proj with grouped KV heads: one scale per KV channel
                act_k = _kv_view(act, n_kv, head_dim).amax(dim=1).reshape(-1)
                w_k = _kv_view(wmax, n_kv, head_dim).amax(dim=1).reshape(-1)
            else:
                act_k, w_k = act, wmax

            def expand(s_k):
                if not gqa:
                    return s_k
                n_rep = consumers[0].in_features // producer.out_features
                return s_k.reshape(n_kv, 1, head_dim).expand(n_kv, n_rep, head_dim).reshape(-1)

            a = alpha
            if alpha == "search":
                x = samples[cnames[0]]
                ws = [c.weight.detach().float() for c in consumers]
                errs = {g_a: group_output_error(x, ws, expand(smoothing_scales(act_k, w_k, g_a)), scheme, act)
                        for g_a in alpha_grid}
                a = min(errs, key=errs.get)
            s_k = smoothing_scales(act_k, w_k, a)
            s = expand(s_k)
            if isinstance(producer, nn.Linear):
                fold_into_linear_rows(producer, s_k)
            else:
                fold_into_norm(producer, s_k, style)
            for c in consumers:
                scale_linear_columns(c, s)
            for c in cnames:
                absmax[c] = (absmax[c].double() / s).float()
            record[pname] = {"alpha": float(a), "consumers": g.consumers}
    return record


def attach_activation_quant(model: nn.Module, quantized: dict[str, QuantizedWeight], act: ActivationScheme) -> int:
    """Make `model` quantize the inputs of every Linear in `quantized` as `act` says.

    A forward pre-hook per Linear fake-quantizes its input (per token, or with the Linear's
    static `input_scale`). Hooks stay on the modules (an evaluator running `model` sees them) until
    :func:`detach_activation_quant`. Returns the number of hooks attached.
    """
    detach_activation_quant(model)
    n = 0
    for name, qw in quantized.items():
        mod = model.get_submodule(name)
        scale = qw.input_scale

        def hook(_mod, args, _scale=scale):
            return (activation_fake_quant(args[0], act, _scale),) + tuple(args[1:])

        mod._hubquant_act_quant = mod.register_forward_pre_hook(hook)
        n += 1
    return n


def detach_activation_quant(model: nn.Module) -> int:
    """Remove the hooks :func:`attach_activation_quant` added; returns how many were removed."""
    n = 0
    for mod in model.modules():
        handle = mod.__dict__.pop("_hubquant_act_quant", None)
        if handle is not None:
            handle.remove()
            n += 1
    return n


# ---------------------------------------------------------------- methods
def _check_scheme(scheme: QuantScheme, float_weights: bool | None = None) -> None:
    w, a = scheme.weights, scheme.activations
    if w.bits != 8 or w.group_size != -1 or not w.symmetric or a is None:
        raise UsageError(
            f"W8A8 needs 8-bit symmetric per-channel weights and 8-bit activations, got {scheme.name}",
            hint="use the method's default scheme (--bits 8, no --group-size)",
        )
    if a.strategy not in ("token", "tensor") or (a.strategy == "token") != a.dynamic:
        raise UsageError(f"activation strategy {a.strategy} with dynamic={a.dynamic} is not supported",
                         hint="use dynamic per-token or static per-tensor activations")


@torch.no_grad()
def quantize_w8a8(model: nn.Module, job, *, smooth: bool) -> dict[str, QuantizedWeight]:
    """The shared W8A8 flow (int8 or fp8 as `job.scheme` says), with or without smoothing."""
    scheme = job.scheme
    _check_scheme(scheme)
    act = scheme.activations
    linears = quantizable_linears(model, job.ignore)
    dtype = model_dtype(model)
    opts = dict(job.options or {})
    alpha = opts.get("alpha", 0.5)
    if isinstance(alpha, str) and alpha != "search":
        alpha = float(alpha)
    needs_stats = smooth or not act.dynamic
    if needs_stats and job.calib is None:
        raise UsageError("this method needs calibration data (smoothing or static activation scales)",
                         hint="pass calibration text (--calib-dataset) or use dynamic activations")
    absmax, record = {}, {}
    if needs_stats:
        sample_for = set()
        if smooth and alpha == "search":
            groups, _ = architecture_groups(model, smooth=opts.get("smooth", "all"))
            prefix = layers_prefix(model)
            sample_for = {f"{prefix}.{i}.{g.consumers[0]}" for i in range(len(decoder_layers(model))) for g in groups}
            sample_for &= set(linears)
        absmax, samples = collect_activation_stats(
            model, job.calib, list(linears), sample_for=sample_for, sample_tokens=int(opts.get("search_tokens", 512)),
            batch_size=int(opts.get("batch_size", 4)), device=job.device, progress=job.progress)
        if smooth:
            grid = tuple(float(a) for a in opts.get("alpha_grid", [i / 10 for i in range(11)]))
            record = smooth_model(model, absmax, alpha=alpha, smooth=opts.get("smooth", "all"), scheme=scheme,
                                  samples=samples, alpha_grid=grid, progress=job.progress)
    quantized = {}
    for name, lin in tqdm(linears.items(), desc="quantizing", disable=not job.progress):
        qw = quantize_weight(lin.weight.data, scheme.weights, dtype)
        if not act.dynamic:
            qw.input_scale = static_input_scale(absmax[name], act, dtype)
        if record:
            qw.extra["smoothquant"] = True
        lin.weight.data = qw.dequantize(lin.weight.dtype).to(lin.weight.device)
        quantized[name] = qw
    attach_activation_quant(model, quantized, act)
    if record:
        alphas = sorted({r["alpha"] for r in record.values()})
        model._hubquant_smoothquant = {"alpha": alpha, "alphas_used": alphas, "groups": len(record)}
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
