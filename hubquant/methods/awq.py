"""AWQ: activation-aware per-channel scaling, then (clipped) round-to-nearest (Lin et al., 2023).

For each mapping (hubquant.methods.scaling, shared with SmoothQuant) the input channels of the `balance` Linears are
multiplied by s and the `smooth` module's output divided by s, exactly in float. s is searched on a
grid (duo scaling: s = x_mean^r / (w_mean^(1-r) + 1e-4)); a candidate's loss is the output error of
the balance Linears on *all* calibration tokens, computed from the input second moment H = X^T X
as trace(E H E^T) with E = Q(W diag(s)) diag(s)^-1 - W, so no activations are replayed per candidate.
The clip search then shrinks each group's range (ratios 1.0 .. 0.5) to minimise the same error per group.

Options (job.options): grid 20, clip True, duo_scaling True.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from hubquant import moe_scaling
from hubquant.engine import LayerWork, LinearStats, results, run_layers
from hubquant.errors import UsageError
from hubquant.methods.base import QuantJob
from hubquant.methods.options import MethodOptions, at_least
from hubquant.methods.scaling import ScaleMapping, fold, mappings_for
from hubquant.modeling import model_dtype
from hubquant.quant import QuantizedWeight, WeightScheme, dequantize, minmax_qparams, quantize


@dataclass(frozen=True, kw_only=True)
class AwqOptions(MethodOptions):
    """AWQ settings: scale-search grid size, clip search, duo scaling (activation and weight magnitudes)."""

    grid: int = field(default=20, metadata={"parse": at_least(1)})
    clip: bool = True
    duo_scaling: bool = True


DEFAULTS = {f.name: f.default for f in dataclasses.fields(AwqOptions) if f.name != "version"}
CLIP_GRID = 20
CLIP_MIN_RATIO = 0.5
NO_CLIP = ("q_proj", "k_proj", "qkv_proj")  # AutoAWQ leaves q/k unclipped (attention scores are sensitive)


def fake_quant(w: torch.Tensor, scheme: WeightScheme, clip_ratio=1.0) -> torch.Tensor:
    """Min-max quantize -> dequantize in float32 (clip_ratio shrinks each group's range)."""
    scale, zp = minmax_qparams(w, scheme, clip_ratio=clip_ratio)
    return dequantize(quantize(w, scale, zp, scheme), scale, zp, scheme.group_size)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """sum over tokens of ||x W^T - x W_hat^T||^2 = trace(E H E^T), E = W_hat - W, H = X^T X."""
    e = w_hat - w
    return ((e @ h) * e).sum()


def weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Per input channel mean of |w| normalised by its group's max (AWQ's w_mean), over all balance weights."""
    w = torch.cat([x.float() for x in weights], 0)
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    g = w.abs().reshape(out_f, in_f // gs, gs)
    g = g / (g.amax(dim=-1, keepdim=True) + 1e-6)
    return g.reshape(out_f, in_f).mean(0)


@torch.no_grad()
def search_scale(
    weights: list[torch.Tensor], x_mean: torch.Tensor, h: torch.Tensor, scheme: WeightScheme, *,
    grid: int = 20, duo_scaling: bool = True,
) -> tuple[torch.Tensor, float, float]:
    """Best per-input-channel scale s for Linears that share one input.

    Args:
        weights: the balance Linears' float weights [out_i, in].
        x_mean: mean |x| per input channel [in].
        h: X^T X of the shared input [in, in] (fp32).
        scheme: the weight scheme used for the candidates' quantization.
        grid: number of ratios r in [0, 1).
        duo_scaling: use weight magnitudes too (s = x^r / w^(1-r)); else s = x^r.

    Returns:
        (s [in] float32, best ratio, best loss). r = 0 with duo scaling off gives s = 1 (plain RTN).
    """
    ws = [w.float() for w in weights]
    x_mean = x_mean.float()
    w_mean = weight_mean(ws, scheme.group_size) if duo_scaling else None
    best = (torch.ones_like(x_mean), -1.0, float("inf"))
    for k in range(grid):
        r = k / grid
        if duo_scaling:
            s = x_mean.pow(r) / (w_mean.pow(1 - r) + 1e-4)
        else:
            s = x_mean.pow(r)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        loss = sum(float(output_error(w, fake_quant(w * s, scheme) / s, h)) for w in ws)
        if loss < best[2]:
            best = (s, r, loss)
    return best


@torch.no_grad()
def search_clip(w: torch.Tensor, h: torch.Tensor, scheme: WeightScheme, *, grid: int = CLIP_GRID,
                min_ratio: float = CLIP_MIN_RATIO) -> torch.Tensor:
    """Per (row, group) range-shrink ratio minimising that group's output error d^T H_gg d.

    Returns clip ratios [out, n_groups] for `minmax_qparams(..., clip_ratio=)`. The candidates are
    fake-quantized in float32 with the min-max rule of hubquant.quant (group ranges computed once).
    """
    w = w.float()
    out_f, in_f = w.shape
    gs = in_f if scheme.group_size == -1 else scheme.group_size
    ng = in_f // gs
    hb = torch.stack([h[i * gs:(i + 1) * gs, i * gs:(i + 1) * gs] for i in range(ng)]).float()  # [ng, gs, gs]
    g = w.reshape(out_f, ng, gs)
    lo = g.amin(-1, keepdim=True).clamp(max=0)
    hi = g.amax(-1, keepdim=True).clamp(min=0)
    levels = float(2**scheme.bits - 1)
    best_err = torch.full((out_f, ng), float("inf"), device=w.device)
    best_ratio = torch.ones(out_f, ng, device=w.device)
    for k in range(grid):
        ratio = 1.0 - (1.0 - min_ratio) * k / grid
        if scheme.symmetric:
            scale = (torch.maximum(-lo, hi) * (ratio / (levels / 2))).clamp(min=1e-8)
            q = torch.round(g / scale).clamp_(scheme.qmin, scheme.qmax)
            d = q.mul_(scale).sub_(g)
        else:
            scale = ((hi - lo) * (ratio / levels)).clamp(min=1e-8)
            zp = torch.round(scheme.qmin - lo * ratio / scale).clamp_(scheme.qmin, scheme.qmax)
            q = torch.round(g / scale).add_(zp).clamp_(scheme.qmin, scheme.qmax)
            d = q.sub_(zp).mul_(scale).sub_(g)
        d = d.transpose(0, 1)  # [ng, out, gs]
        err = (torch.bmm(d, hb) * d).sum(-1).T  # d_g^T H_gg d_g per (row, group)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio


def _get(module: torch.nn.Module, path: str) -> torch.nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def apply_scale(layer: torch.nn.Module, mapping: ScaleMapping, s: torch.Tensor) -> None:
    """Fold s into the layer: smooth output / s, balance input columns * s (exact in float; AWQ's rounding:
    Linears in their own dtype, norms in float32)."""
    fold(layer, mapping, s, dtype=None)


def _active_mappings(work: LayerWork, mappings) -> list[ScaleMapping]:
    out = []
    for m in mappings:
        try:
            smooth = _get(work.layer, m.smooth)
            balance = [_get(work.layer, b) for b in m.balance]
        except AttributeError:
            continue
        if not all(f"{work.name}.{b}" in work.linears for b in m.balance):
            continue  # an ignored Linear: leave the mapping out
        if isinstance(smooth, torch.nn.Linear) and smooth.out_features != balance[0].in_features:
            continue  # grouped-query attention: v_proj rows do not line up with o_proj columns
        out.append(m)
    return out


def run(model: torch.nn.Module, job: QuantJob) -> dict[str, QuantizedWeight]:
    """AWQ-scale then quantize every Linear of every decoder layer (method contract in docs/DESIGN.md).

    Raises:
        UsageError: no calibration data or unknown options.
        UnsupportedError: an architecture without AWQ mappings.
    """
    if job.calib is None:
        raise UsageError("AWQ needs calibration data", hint="pass --calib-dataset (or use --method rtn)")
    opts = dataclasses.asdict(job.options_as(AwqOptions, "awq"))
    mappings = moe_scaling.scale_map(model)  # mixture of experts: checked or built per layer (hubquant.moe_scaling)
    if mappings is None:
        mappings = mappings_for(getattr(model.config, "model_type", type(model).__name__))
    scheme = job.scheme.weights
    dtype = model_dtype(model)
    result: dict[str, QuantizedWeight] = results()  # a plain dict, or the streamed conversion's sink

    @torch.no_grad()
    def on_layer(work: LayerWork) -> None:
        stats: dict[str, LinearStats] = work.collect(work.linears, hessian=True, absmean=True)
        hs = {id(st.xtx): st.xtx for st in stats.values()}  # one H per distinct input
        for m in _active_mappings(work, moe_scaling.for_layer(mappings, work)):
            names = [f"{work.name}.{b}" for b in m.balance]
            st = stats[names[0]]
            h = hs[id(st.xtx)]
            s, _, _ = search_scale([work.linears[n].weight for n in names], st.absmean, h, scheme,
                                   grid=opts["grid"], duo_scaling=opts["duo_scaling"])
            apply_scale(work.layer, m, s)
            hs[id(st.xtx)] = h / (s.view(-1, 1) * s.view(1, -1))  # the balance input is now x / s
        for name, lin in work.linears.items():
            h = hs[id(stats[name].xtx)]
            w = lin.weight.float()
            ratio = 1.0
            if opts["clip"] and name.rsplit(".", 1)[-1] not in NO_CLIP:
                ratio = search_clip(w, h, scheme)
            scale, zp = minmax_qparams(w, scheme, scale_dtype=dtype, clip_ratio=ratio)
            q = quantize(w, scale, zp, scheme)
            lin.weight.copy_(dequantize(q, scale, zp, scheme.group_size).to(lin.weight.dtype))
            result[name] = QuantizedWeight(qweight=q.cpu(), scale=scale.cpu(),
                                           zero_point=None if zp is None else zp.cpu(), scheme=scheme)

    run_layers(model, job.calib, on_layer=on_layer, device=job.device, ignore=job.ignore,
               progress=job.progress, desc="awq")
    return result
