"""Quantize a model's tensors to a llama.cpp preset (the GGUF counterpart of a method's `run`).

Three ways, picked by --method when --format gguf:
- rtn: llama.cpp's plain quantization (no calibration);
- imatrix: an importance matrix (per input column: sum of squared activations, from one calibration pass
  over the float model, layer by layer) weights every block's scale/min search;
- gptq: per decoder layer, true-sequential: the importance from the Linear's Hessian diagonal picks the
  blocks' parameters, then GPTQ rounds the columns onto those grids with error compensation.

Every quantized tensor's float weight in `model` is replaced by its dequantized value (the model then
computes what llama.cpp computes from the file); the returned dict holds, per module, a QuantizedWeight
whose qweight (and `extra["gguf_bytes"]`) holds the packed ggml blocks and `extra` the GGUF type.

Mixtures of experts: fused experts become per-expert Linears first (hubquant.moe.unfuse_experts); an expert's
importance comes only from the calibration tokens its router sends to it (its Linears' hooks fire with those
tokens only), like llama.cpp's per-expert imatrix. Experts that got fewer than `min_expert_tokens` (the
routing policy's threshold, default 16) are quantized without importance (llama.cpp's plain weighting),
unless `calibrate_all_experts=true`, where every expert's importance comes from every calibration token.
All experts of one stacked tensor share the tensor's type.
"""
from __future__ import annotations

import contextlib
import time

import torch

from hubquant import moe
from hubquant.errors import UsageError
from hubquant.formats.gguf import mix
from hubquant.formats.gguf.arch import TensorEntry, tensor_entries, tie_if_needed
from hubquant.formats.gguf.blocks import Grid, quantize
from hubquant.formats.gguf.experts import n_experts
from hubquant.formats.gguf.packing import pack
from hubquant.quant import QuantizedWeight, WeightScheme, matches_any

MODES = {"rtn": "plain", "imatrix": "imatrix", "gptq": "gptq"}
GPTQ_DEFAULTS = {"damp": 0.01, "actorder": True, "block_size": 128}
_SCHEME = WeightScheme(bits=4, group_size=-1)  # GGUF grids carry their own block parameters


def mode_of(method: str) -> str:
    if method not in MODES:
        raise UsageError(f"--method {method} cannot be written as --format gguf",
                         hint="use --method rtn (plain), imatrix (importance matrix) or gptq (GPTQ + importance)")
    return MODES[method]


def model_shape(config) -> mix.ModelShape:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return mix.ModelShape(n_layer=config.num_hidden_layers, n_gqa=max(1, heads // kv),
                          tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                          n_expert=n_experts(config))


def plan_types(model, preset: str, *, has_imatrix: bool, ignore=()) -> tuple[list[TensorEntry], dict[str, str]]:
    """The GGUF tensor entries of `model` and the type of each quantized one (keyed by module name; a stacked
    experts entry's type is also given under each expert's Linear)."""
    entries = tensor_entries(model)
    quant = [e for e in entries if e.quantizable]
    by_name = mix.plan([(e.gguf, e.shape[-1]) for e in quant], preset, model_shape(model.config),
                       has_imatrix=has_imatrix)
    types = {}
    for e in quant:
        user_ignored = matches_any(e.module, [p for p in ignore if p != "lm_head"])
        types[e.module] = "F16" if user_ignored else by_name[e.gguf]
        for m in e.experts:
            types[m] = types[e.module]
    return entries, types


def _record(result: dict, module: str, grid: Grid, param: torch.nn.Parameter, *, imatrix: bool) -> None:
    param.data.copy_(grid.dequantize().to(param.dtype))
    data = torch.from_numpy(pack(grid))  # the ggml blocks (parameters inside): what the writer stores
    result[module] = QuantizedWeight(qweight=data, scale=torch.empty(0), zero_point=None, scheme=_SCHEME,
                                     extra={"gguf_type": grid.qtype, "gguf_bytes": data, "imatrix": imatrix})


@torch.no_grad()
def collect_imatrix(model, calib: torch.Tensor, *, device: str = "cpu", progress: bool = True,
                    into: dict | None = None) -> dict[str, torch.Tensor]:
    """Per decoder-layer Linear: sum over calibration tokens of x_j^2 for each input column j (float model).
    into: the dict to fill (a streamed run takes each layer's entries out as the layer is written)."""
    from hubquant.engine import run_layers

    out: dict[str, torch.Tensor] = {} if into is None else into

    def on_layer(work) -> None:
        def hook(name):
            def fn(x):
                s = x.reshape(-1, x.shape[-1]).float().pow(2).sum(0).cpu()
                out[name] = s if name not in out else out[name] + s
            return fn
        work.forward(hooks={n: hook(n) for n in work.linears})

    run_layers(model, calib, on_layer=on_layer, device=device, ignore=(), rerun=False, progress=progress,
               desc="imatrix")
    return out


@torch.no_grad()
def _gptq_layers(model, calib, types: dict, result: dict, imatrix: dict, opts: dict, *, device: str,
                 progress: bool) -> None:
    from hubquant.engine import run_layers
    from hubquant.formats.gguf.gptq import gptq_grid
    from hubquant.methods.gptq import CholeskyFailed, prepare_hessian

    def on_layer(work) -> None:
        preps: dict[int, tuple] = {}

        def on_group(names, st) -> None:
            known = preps.get(id(st))
            if known is None:
                imp = torch.diagonal(st.xtx).clone().cpu()
                h = st.xtx.mul_(2.0 / max(st.count, 1))
                try:
                    prep = prepare_hessian(h, _SCHEME, damp=opts["damp"], actorder=opts["actorder"], inplace=True)
                except CholeskyFailed as e:
                    raise UsageError(f"GPTQ failed on {', '.join(names)}: {e}",
                                     hint="raise --method-option damp=0.1, or use --method imatrix") from e
                st.xtx = None
                known = preps[id(st)] = (st, prep, imp)
            _, prep, imp = known
            for name in names:
                t = types.get(name)
                if t is None or t == "F16":
                    continue
                lin = work.linears[name]
                imatrix[name] = imp
                grid = gptq_grid(lin.weight, prep, t, imp.to(lin.weight.device), block_size=opts["block_size"])
                _record(result, name, grid, lin.weight, imatrix=True)

        work.sequential(on_group)

    run_layers(model, calib, on_layer=on_layer, device=device, ignore=(), progress=progress, desc="gguf-gptq")


def _gptq_settings(options) -> dict:
    """damp / actorder / block_size from GPTQ's options object or a dict (other keys are GPTQ's own)."""
    if options is None:
        return dict(GPTQ_DEFAULTS)
    get = options.get if isinstance(options, dict) else (lambda k, d: getattr(options, k, d))
    return {k: get(k, d) for k, d in GPTQ_DEFAULTS.items()}


def quantize_for_format(model: torch.nn.Module, job, *, method: str, options: dict | None = None,
                        log=print) -> dict[str, QuantizedWeight]:
    """The format registry's hook: `--method rtn|imatrix|gptq --format gguf` (options: gguf_type)."""
    opts = dict(options or {})
    return run(model, job, mode=mode_of(method), preset=opts.get("gguf_type") or mix.DEFAULT_PRESET, log=log)


def run_imatrix(model: torch.nn.Module, job) -> dict[str, QuantizedWeight]:
    """`--method imatrix` called as a method (the default preset)."""
    return run(model, job, mode="imatrix")


@contextlib.contextmanager
def routing_policy(model):
    """The routing policy calibration passes run under: the pipeline's (hubquant.moe_pipeline) threshold and
    calibrate_all_experts, but low-token experts are only recorded (this module quantizes them itself, without
    importance) instead of going to that policy's int round-to-nearest fallback; counts go back to the
    pipeline's policy for its log and card. Yields None for dense models."""
    if not moe.expert_modules(model):
        yield None
        return
    outer = moe._POLICY.get()  # the pipeline's policy, when one is in force
    policy = moe.RoutingPolicy(min_expert_tokens=outer.min_expert_tokens if outer else 16,
                               calibrate_all_experts=outer.calibrate_all_experts if outer else False)
    with moe.policy_in_force(policy):
        yield policy
    if outer is not None:
        outer.counts.update(policy.counts)
        outer.fallback_linears.extend(policy.fallback_linears)


def log_low_token(policy, mode: str, log) -> None:
    """The line saying how many expert projections the low-token rule quantized without importance."""
    if policy is not None and policy.fallback_linears and mode != "plain":
        log(f"gguf: {len(policy.fallback_linears)} expert projections saw under {policy.min_expert_tokens} routed "
            "calibration tokens: quantized without importance (plain weighting)")


def run(model: torch.nn.Module, job, *, mode: str, preset: str = mix.DEFAULT_PRESET, log=print,
        imatrix: dict[str, torch.Tensor] | None = None) -> dict[str, QuantizedWeight]:
    """Quantize `model` to the llama.cpp `preset` (see the module docstring); mode: plain, imatrix or gptq.

    imatrix: a `collect_imatrix` result to reuse (mode imatrix; e.g. one pass for several presets).

    Raises:
        UsageError: calibration missing for imatrix/gptq, or an unknown preset.
    """
    preset = mix.check_preset(preset)
    moe.unfuse_experts(model)
    tie_if_needed(model)
    opts = _gptq_settings(job.options)
    if mode != "plain" and job.calib is None:
        raise UsageError(f"GGUF {mode} needs calibration text", hint="pass --calib-dataset, or use --method rtn")
    entries, types = plan_types(model, preset, has_imatrix=mode != "plain", ignore=job.ignore)
    params = dict(model.named_parameters(remove_duplicate=False))
    result: dict[str, QuantizedWeight] = {}
    given, imatrix = imatrix, {}
    t0 = time.time()
    with routing_policy(model) as policy:
        if mode == "imatrix" and given is not None:
            imatrix = given
        elif mode == "imatrix":
            imatrix = collect_imatrix(model, job.calib, device=job.device, progress=job.progress)
        elif mode == "gptq":
            _gptq_layers(model, job.calib, types, result, imatrix, opts, device=job.device, progress=job.progress)
    for e in entries:
        t = types.get(e.module) if e.quantizable else None
        if t is None or t == "F16":
            continue
        for module in e.experts or (e.module,):
            if module in result:
                continue
            p = params[f"{module}.weight" if e.experts else e.param]
            imp = imatrix.get(module)
            _record(result, module, quantize(p.detach(), t, None if imp is None else imp.to(p.device)), p,
                    imatrix=imp is not None)
    log_low_token(policy, mode, log)
    counts: dict[str, int] = {}
    for qw in result.values():
        counts[qw.extra["gguf_type"]] = counts.get(qw.extra["gguf_type"], 0) + 1
    log(f"gguf {preset} ({mode}): {len(result)} tensors in {time.time() - t0:.1f} s: "
        + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    return result
