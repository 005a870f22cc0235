"""What the pipeline does with a mixture-of-experts model around the method and the writer: quantize under the
routing policy (hubquant.moe.RoutingPolicy) with a stated rule for every expert the method leaves out, and check
the written experts against the model that was evaluated. Above methods and formats; hubquant.moe is below them."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hubquant import moe, moe_scaling
from hubquant.errors import UsageError
from hubquant.methods import MOE_OPTION_KEYS
from hubquant.modeling import quantizable_linears


def quantize_with_policy(model: nn.Module, job, method_fn, *, options: dict | None = None,
                         log: Callable[[str], None] = print):
    """Run `method_fn(model, job)` under the routing policy of the MoE options (`options`: the raw method options,
    default `job.options` when that is a dict, whose MoE keys are then taken out); every expert Linear the method
    did not quantize is quantized with round-to-nearest and counted (never left in float silently).
    Returns (quantized dict, policy or None for dense models)."""
    import dataclasses


    if options is None:
        options = job.options if isinstance(job.options, dict) else {}
    moe_opts = {k: options[k] for k in MOE_OPTION_KEYS if k in options}
    if isinstance(job.options, dict):
        job = dataclasses.replace(job, options={k: v for k, v in job.options.items() if k not in MOE_OPTION_KEYS})
    experts = moe.expert_linear_names(model)
    if not experts:
        if moe_opts:
            raise UsageError(f"{', '.join(moe_opts)} applies to mixture-of-experts models only",
                             hint="drop the --method-option")
        return method_fn(model, job), None
    policy = moe.RoutingPolicy.from_options(moe_opts)
    acts = job.scheme.activations
    if acts is not None and not acts.dynamic and not policy.calibrate_all_experts:
        policy.calibrate_all_experts = True  # a static input scale per expert needs that expert's inputs
        log("moe: static activation scales: every expert sees every calibration token (calibrate_all_experts)")
    extra: dict = {}
    policy.fallback = lambda lins: extra.update(_rtn_linears(lins, job))
    with moe.policy_in_force(policy):
        result = method_fn(model, job)
    scaled = moe_scaling.record(model)  # AWQ/SmoothQuant on a derived architecture: the moves checked per layer
    if scaled is not None:
        log(f"moe: scaling: {scaled.summary()}")
    result.update(extra)
    missing = {n: m for n, m in quantizable_linears(model, job.ignore).items() if n in experts and n not in result}
    if missing:
        log(f"moe: {len(missing)} expert Linears got no statistics from the method; quantized with round-to-nearest")
        policy.fallback_linears.extend(missing)
        result.update(_rtn_linears(missing, job))
    moe.pack_weight_only_int8(model, result, job.scheme)
    s = policy.summary()
    if s:
        log(f"moe: routed calibration tokens per expert over {s['layers']} layers x experts: min {s['min']}, "
            f"median {s['median']:g}, max {s['max']}; {s['below_threshold']} of {s['experts']} experts under "
            f"{s['threshold']} tokens ({s['rule']}; {s['fallback_linears']} Linears by that rule)")
    return result, policy


def _rtn_linears(lins: dict[str, nn.Linear], job) -> dict:
    """Round-to-nearest on the method's grid (int min-max, FP4 blocks, or FP8 e4m3 per channel), weights :=
    dequantized."""
    from hubquant.methods.rtn import quantize_linears

    if job.scheme.weights.type != "float":
        return quantize_linears(lins, job)
    if job.scheme.weights.bits == 4:  # FP4 (MXFP4A16 on MoE): the E2M1 grid under the scheme's block scales
        from hubquant import fp4
        from hubquant.methods.fp4 import rtn_linears

        return rtn_linears(lins, fp4.kind_of(job.scheme))
    from hubquant.quant import fp8_quantize_weight

    out = {}
    for name, lin in lins.items():
        w = lin.weight.data
        qw = fp8_quantize_weight(w, job.scheme.weights, scale_dtype=w.dtype)
        lin.weight.data = qw.dequantize(w.dtype)
        out[name] = qw
    return out


def verify_written(model: nn.Module, quantized: dict, scheme, out_dir, *, sample: int = 64) -> int:
    """Check a compressed-tensors MoE variant on disk against the model that was evaluated: every quantized expert
    projection has its tensors under its checkpoint name, and for `sample` of them (spread over layers and
    experts) the stored tensors are exactly the quantized codes whose dequantized values the model ran.
    Returns how many projections were compared.

    Raises:
        QualityGateError: a tensor is missing or differs (the files would not compute what was evaluated).
    """
    import json
    from pathlib import Path

    from safetensors import safe_open

    from hubquant.errors import QualityGateError
    from hubquant.formats.compressed_tensors import linear_tensors

    names = sorted(n for n in moe.expert_linear_names(model) if n in quantized)
    if not names:
        return 0
    out_dir = Path(out_dir)
    index = out_dir / "model.safetensors.index.json"
    where = (json.loads(index.read_text())["weight_map"] if index.is_file()
             else dict.fromkeys(safe_open(out_dir / "model.safetensors", "pt").keys(), "model.safetensors"))
    missing = [n for n in names if f"{moe.checkpoint_name(model, n)}.weight_scale" not in where]
    if missing:
        raise QualityGateError(f"{len(missing)} expert projections have no tensors in the variant "
                               f"(e.g. {moe.checkpoint_name(model, missing[0])}); nothing was pushed",
                               hint="report the model and method: the writer lost experts")
    lins = dict(model.named_modules())
    picked = names[:: max(1, len(names) // sample)] + names[-1:]
    for n in picked:
        qw = quantized[n]
        expected = linear_tensors(moe.checkpoint_name(model, n), qw, scheme)
        for key, value in expected.items():
            with safe_open(out_dir / where[key], "pt") as f:
                got = f.get_tensor(key)
            if got.dtype != value.dtype or not torch.equal(got.view(torch.uint8), value.view(torch.uint8)):
                raise QualityGateError(f"{key} on disk differs from the quantized values that were evaluated",
                                       hint="report the model and method; nothing was pushed")
        w = lins[n].weight
        if not torch.equal(w.detach().cpu(), qw.dequantize(w.dtype)):
            raise QualityGateError(f"{n}: the evaluated weight is not the dequantized stored one",
                                   hint="report the model and method; nothing was pushed")
    return len(picked)
