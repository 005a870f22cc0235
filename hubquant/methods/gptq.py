"""GPTQ: quantize columns one at a time and push each column's error onto the columns not yet
quantized, weighted by the inverse Hessian of the layer's inputs (Frantar et al., 2022).

Pure math first (`gptq_quantize`), then the model walk (`run`) over hubquant.engine.
Options (job.options): block_size 128, damp 0.01 (times mean diag H), actorder True (static groups:
group parameters come from the original weights, so no g_idx permutation is needed at inference),
true_sequential False (True: quantize attention, then o_proj, then the MLP with statistics
re-collected after each step; slower, usually a little more accurate).
"""
from __future__ import annotations

import torch

from hubquant.engine import LayerWork, run_layers
from hubquant.errors import UsageError
from hubquant.methods import QuantJob
from hubquant.modeling import model_dtype
from hubquant.quant import QuantizedWeight, WeightScheme, minmax_qparams

DEFAULTS = {"block_size": 128, "damp": 0.01, "actorder": True, "true_sequential": False}
DAMP_RETRIES = (1.0, 10.0, 100.0)  # multipliers of `damp` tried before giving up


class CholeskyFailed(RuntimeError):
    """The damped Hessian is not positive definite even after the retries."""


def inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, retrying with more damping.

    Returns (factor, damp actually used). Raises CholeskyFailed.
    """
    diag_mean = torch.mean(torch.diag(h)).item()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for mult in DAMP_RETRIES:
        d = damp * mult
        hd = h + (d * diag_mean) * eye
        low, info = torch.linalg.cholesky_ex(hd)
        if info.item() == 0:
            hinv = torch.cholesky_inverse(low)
            up, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info.item() == 0 and torch.isfinite(up).all():
                return up, d
    raise CholeskyFailed(f"Hessian not positive definite with damping up to {damp * DAMP_RETRIES[-1]:g}")


def _quant_col(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, qmin: int, qmax: int):
    """Quantize one column (per-row scale/zp vectors) -> (int codes as float, dequantized column)."""
    q = torch.round(w / scale)
    if zp is not None:
        q = q + zp
    q = q.clamp(qmin, qmax)
    deq = (q - zp) * scale if zp is not None else q * scale
    return q, deq


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, scheme: WeightScheme, *, block_size: int = 128,
    damp: float = 0.01, actorder: bool = True, scale_dtype: torch.dtype = torch.float32,
) -> tuple[QuantizedWeight, float]:
    """GPTQ-quantize one weight matrix.

    Args:
        weight: [out, in] float weight.
        hessian: [in, in] fp32 2 X^T X / n of the Linear's inputs.
        scheme: bits, group size (-1 = per output channel), symmetric or not.
        block_size: columns updated lazily together.
        damp: dampening as a fraction of mean(diag H).
        actorder: quantize columns in decreasing diag(H) order; group parameters are static
            (computed from the original weight), so the checkpoint needs no g_idx.
        scale_dtype: dtype the scales are stored in (the model dtype); rounding uses the stored scale.

    Returns:
        (QuantizedWeight with codes in the original column order, sum of the weighted squared error).

    Raises:
        CholeskyFailed: the Hessian stays singular with the largest damping.
    """
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    out_f, in_f = w.shape
    gs = in_f if scheme.group_size == -1 else scheme.group_size
    if in_f % gs:
        minmax_qparams(w, scheme)  # raises the UsageError that names valid group sizes
    qmin, qmax = scheme.qmin, scheme.qmax

    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    # static parameters: per channel, or per group with act-order (from the original weight)
    static = scheme.group_size == -1 or actorder
    scale = torch.empty(out_f, in_f // gs, dtype=scale_dtype, device=w.device)
    zp = None if scheme.symmetric else torch.empty(out_f, in_f // gs, dtype=torch.int8, device=w.device)
    if static:
        s, z = minmax_qparams(w, scheme, scale_dtype=scale_dtype)
        scale.copy_(s)
        if zp is not None:
            zp.copy_(z)

    perm = torch.argsort(torch.diag(h), descending=True) if actorder else None
    if perm is not None:
        w = w[:, perm]
        h = h[perm][:, perm]
    group_of = (perm if perm is not None else torch.arange(in_f, device=w.device)) // gs

    hinv, _ = inverse_hessian_cholesky(h, damp)
    del h
    block = block_size if static else max(gs, (block_size // gs) * gs)  # dynamic groups never straddle blocks
    codes = torch.zeros_like(w)
    loss = torch.zeros(out_f, device=w.device)
    # per-column scale / zero point as float vectors, gathered once for static parameters
    col_scale = scale.float()[:, group_of] if static else None
    col_zp = zp.float()[:, group_of] if (static and zp is not None) else None

    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if not static and c % gs == 0:  # group parameters from the error-updated weights
                s, z = minmax_qparams(w1[:, i: i + gs], WeightScheme(bits=scheme.bits, group_size=-1,
                                      symmetric=scheme.symmetric), scale_dtype=scale_dtype)
                scale[:, c // gs] = s[:, 0]
                cs, cz = s[:, 0].float(), None
                if zp is not None:
                    zp[:, c // gs] = z[:, 0]
                    cz = z[:, 0].float()
            elif static:
                cs = col_scale[:, c]
                cz = col_zp[:, c] if col_zp is not None else None
            col = w1[:, i]
            q, deq = _quant_col(col, cs, cz, qmin, qmax)
            codes[:, c] = q
            d = hinv1[i, i]
            e = (col - deq) / d
            loss += (col - deq) ** 2 / d**2 / 2
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    qw = QuantizedWeight(qweight=codes.to(torch.int8), scale=scale, zero_point=zp, scheme=scheme)
    return qw, float(loss.sum())


def _groups(work: LayerWork, true_sequential: bool) -> list[list[str]]:
    """Linears of a layer in the order they are quantized (one group when not true-sequential)."""
    names = list(work.linears)
    if not true_sequential:
        return [names]
    order = [("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value"), ("o_proj", "dense", "out_proj"),
             ("gate_proj", "up_proj", "gate_up_proj", "fc1", "w1", "w3"), ("down_proj", "fc2", "w2")]
    groups, left = [], list(names)
    for suffixes in order:
        g = [n for n in left if n.rsplit(".", 1)[-1] in suffixes]
        if g:
            groups.append(g)
            left = [n for n in left if n not in g]
    if left:
        groups.append(left)
    return groups


def run(model: torch.nn.Module, job: QuantJob) -> dict[str, QuantizedWeight]:
    """Quantize every Linear of every decoder layer with GPTQ (see the method contract in docs/DESIGN.md).

    Raises:
        UsageError: no calibration data, unknown options, or a layer whose Hessian cannot be inverted.
    """
    if job.calib is None:
        raise UsageError("GPTQ needs calibration data", hint="pass --calib-dataset (or use --method rtn)")
    unknown = set(job.options) - set(DEFAULTS)
    if unknown:
        raise UsageError(f"unknown GPTQ option(s): {', '.join(sorted(unknown))}", hint=f"use {', '.join(DEFAULTS)}")
    opts = {**DEFAULTS, **job.options}
    scheme = job.scheme.weights
    dtype = model_dtype(model)
    result: dict[str, QuantizedWeight] = {}

    @torch.no_grad()
    def on_layer(work: LayerWork) -> None:
        for group in _groups(work, opts["true_sequential"]):
            stats = work.collect(group, hessian=True)
            shared: dict[int, list[str]] = {}  # q/k/v and gate/up share one Hessian: quantize them as one matrix
            for name in group:
                shared.setdefault(id(stats[name].xtx), []).append(name)
            for names in shared.values():
                h = stats[names[0]].hessian()
                lins = [work.linears[n] for n in names]
                w = torch.cat([lin.weight for lin in lins], 0)
                try:
                    qw, _ = gptq_quantize(w, h, scheme, block_size=opts["block_size"], damp=opts["damp"],
                                          actorder=opts["actorder"], scale_dtype=dtype)
                except CholeskyFailed as e:
                    raise UsageError(f"GPTQ failed on {', '.join(names)}: {e}",
                                     hint=f"raise --damp (e.g. 0.1), add '{names[0]}' to --ignore, or use --method rtn") from e
                deq = qw.dequantize(dtype)
                row = 0
                for name, lin in zip(names, lins):
                    rows = slice(row, row + lin.out_features)
                    row += lin.out_features
                    part = QuantizedWeight(qweight=qw.qweight[rows].cpu(), scale=qw.scale[rows].cpu(),
                                           zero_point=None if qw.zero_point is None else qw.zero_point[rows].cpu(),
                                           scheme=scheme)
                    lin.weight.data.copy_(deq[rows])
                    result[name] = part
                del h
            del stats

    run_layers(model, job.calib, on_layer=on_layer, device=job.device, ignore=job.ignore,
               progress=job.progress, desc="gptq")
    return result
