"""FP4 schemes (NVFP4A16, MXFP4A16, NVFP4) for the rtn and gptq methods.

- RTN: each Linear rounded to the E2M1 grid under its block scales (`hubquant.fp4.quantize`); NVFP4 global scales
  shared by the Linears vLLM fuses (q/k/v, gate/up), as llm-compressor does.
- GPTQ: block scales fixed from the original weight (as llm-compressor's GPTQ does for FP4), then GPTQ's column
  loop on that grid: each column rounded with its block's step, its error pushed onto the columns not yet rounded.
- NVFP4 (W4A4): one calibration pass per decoder layer gives each Linear's input amax, hence its static input
  global scale (``input_global_scale``); a forward pre-hook then quantizes the Linear's input as the serving engine
  does (dynamic e4m3 scales per 16 inputs), so the pipeline's evaluation measures the W4A4 model.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from hubquant import fp4
from hubquant.errors import UsageError
from hubquant.methods.actquant import attach_hook
from hubquant.methods.base import QuantJob
from hubquant.modeling import decoder_layers, layers_prefix, quantizable_linears


def _apply(lin: torch.nn.Linear, qw: fp4.Fp4Weight) -> fp4.Fp4Weight:
    lin.weight.data = qw.dequantize(lin.weight.dtype).to(lin.weight.device)
    return qw


def rtn_linears(linears: dict[str, torch.nn.Linear], kind: str) -> dict[str, fp4.Fp4Weight]:
    gscales = fp4.fused_global_scales({n: m.weight.data for n, m in linears.items()}) if kind == "nvfp4" else {}
    return {n: _apply(lin, fp4.quantize(lin.weight.data, kind, gscale=gscales.get(n))) for n, lin in linears.items()}


def attach_activation_quant(linears: dict[str, torch.nn.Linear], quantized: dict[str, fp4.Fp4Weight]) -> None:
    """NVFP4 activations on every Linear of `quantized` (their static input global scales)."""
    for name, qw in quantized.items():
        g = qw.input_global_scale
        attach_hook(linears[name], lambda x, _g=g: fp4.fake_quant_activations(x, _g))


@torch.no_grad()
def run_rtn(model: torch.nn.Module, job: QuantJob) -> dict[str, fp4.Fp4Weight]:
    """Round every Linear except `job.ignore` to FP4; NVFP4 activations get calibrated input global scales."""
    kind = fp4.kind_of(job.scheme)
    if job.scheme.activations is not None:
        return _run_w4a4(model, job)
    layers, prefix = decoder_layers(model), layers_prefix(model)
    result: dict[str, fp4.Fp4Weight] = {}
    for i, layer in enumerate(tqdm(layers, desc=f"rtn {kind}: layers", disable=not job.progress)):
        result.update(rtn_linears(quantizable_linears(layer, job.ignore, f"{prefix}.{i}"), kind))
    rest = {n: m for n, m in quantizable_linears(model, job.ignore).items() if not n.startswith(prefix + ".")}
    result.update(rtn_linears(rest, kind))
    return result


def _run_w4a4(model: torch.nn.Module, job: QuantJob) -> dict[str, fp4.Fp4Weight]:
    from hubquant.engine import results, run_layers

    if job.calib is None:
        raise UsageError("--scheme NVFP4 needs calibration text for its activation global scales",
                         hint="pass --calib-dataset, or use --scheme NVFP4A16 (weights only)")
    prefix = layers_prefix(model)
    outside = [n for n in quantizable_linears(model, job.ignore) if not n.startswith(prefix + ".")]
    if outside:
        raise UsageError(f"--scheme NVFP4 quantizes the decoder layers' Linears, not {outside[0]}",
                         hint=f"add {outside[0].rsplit('.', 1)[-1]} to --ignore")
    result: dict[str, fp4.Fp4Weight] = results()  # a plain dict, or the sink of a streamed conversion

    def on_layer(work) -> None:
        stats = work.collect(list(work.linears), hessian=False, absmax=True)
        qws = rtn_linears(work.linears, "nvfp4")
        for name, qw in qws.items():
            qw.input_global_scale = fp4.activation_global_scale(stats[name].absmax).cpu()
            _to_cpu(qw)
        attach_activation_quant(work.linears, qws)
        result.update(qws)

    run_layers(model, job.calib, on_layer=on_layer, device=job.device, ignore=job.ignore, progress=job.progress,
               desc="rtn nvfp4")
    return result


def _to_cpu(qw: fp4.Fp4Weight) -> fp4.Fp4Weight:
    qw.qweight, qw.scale = qw.qweight.cpu(), qw.scale.cpu()
    if qw.global_scale is not None:
        qw.global_scale = qw.global_scale.cpu()
    return qw


# ---------------------------------------------------------------- GPTQ on the FP4 grid
@torch.no_grad()
def gptq_quantize(weights: list[torch.Tensor], prep, kind: str, *, gscales: list[torch.Tensor | None],
                  block_size: int = 128) -> list[fp4.Fp4Weight]:
    """GPTQ of the Linears `weights` (one input, so one Hessian `prep`: hubquant.methods.gptq.HessianPrep).

    Block scales (and NVFP4 global scales `gscales`) come from the original weights and stay fixed; columns are
    rounded in `prep.perm` order and each column's error is pushed onto the columns not yet rounded.
    Returns one Fp4Weight per weight (codes in the original column order).
    """
    block = fp4.BLOCKS[kind]
    rtn = [fp4.quantize(w, kind, gscale=g) for w, g in zip(weights, gscales)]
    steps = torch.cat([q.steps() for q in rtn], 0).repeat_interleave(block, dim=1)  # [R, in] fixed steps
    w = torch.cat([x.detach().float() for x in weights], 0)
    w[:, prep.dead] = 0.0
    perm, hinv = prep.perm, prep.hinv
    if perm is not None:
        w, steps = w[:, perm], steps[:, perm]
    n = w.shape[1]
    codes = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1, h1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.empty_like(w1)
        for i in range(i2 - i1):
            s = steps[:, i1 + i]
            c = fp4.e2m1_codes((w1[:, i] / s).clamp_(-fp4.E2M1_MAX, fp4.E2M1_MAX))
            codes[:, i1 + i] = c
            e = (w1[:, i] - fp4.e2m1_values(c) * s) / h1[i, i]
            err1[:, i] = e
            w1[:, i:].addr_(e, h1[i, i:], alpha=-1.0)
        if i2 < n:
            w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1.0)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    out, row = [], 0
    for q in rtn:
        rows = q.qweight.shape[0]
        q.qweight = codes[row: row + rows].clone()
        row += rows
        out.append(q)
    return out
