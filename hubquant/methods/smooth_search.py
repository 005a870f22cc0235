"""SmoothQuant alpha search on a decoder layer's output (``alpha="layer-search"``).

The per-group search in :mod:`hubquant.methods.smoothquant` scores each smoothing group by the output error of
its own Linears. This one scores a whole set of per-group alphas by what the layer hands on: the decoder layer
is copied, smoothed with the candidate alphas, quantized (round-to-nearest weights of the scheme, activations
fake-quantized as the scheme says) and run on a few calibration sequences; the score is the squared error of its
output against the float layer's. Coordinate descent: starting from ``alpha_start``, each group in turn takes
the grid value that lowers the layer's error most while the others stay fixed (one pass).
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from hubquant.methods.actquant import activation_fake_quant, static_input_scale
from hubquant.methods.smoothing import smooth_layer
from hubquant.quant import per_channel_quantize


def _slice_batch(obj, b: int, n: int):
    """Keep the first n of b sequences in every tensor whose first dimension is the batch."""
    if torch.is_tensor(obj):
        return obj[:n] if obj.dim() and obj.shape[0] == b and n < b else obj
    if isinstance(obj, tuple):
        return tuple(_slice_batch(o, b, n) for o in obj)
    if isinstance(obj, list):
        return [_slice_batch(o, b, n) for o in obj]
    if isinstance(obj, dict):
        return {k: _slice_batch(v, b, n) for k, v in obj.items()}
    return obj


def _out(y):
    return y[0] if isinstance(y, (tuple, list)) else y


@torch.no_grad()
def quantized_layer_error(work, absmax: dict[str, torch.Tensor], alphas: dict[str, float], *, x: torch.Tensor,
                          kw: dict, ref: torch.Tensor, groups, head_dim: int, n_kv: int, scheme) -> float:
    """Squared error of a smoothed (by `alphas`, {producer: alpha}) and quantized copy of `work.layer` on x."""
    layer = copy.deepcopy(work.layer)
    am = {k: v.clone() for k, v in absmax.items()}
    smooth_layer(layer, work.name, am, groups=groups, head_dim=head_dim, n_kv=n_kv,
                 alpha=tuple(sorted(alphas.items())))
    act = scheme.activations
    for name in absmax:
        lin: nn.Linear = layer.get_submodule(work.relative(name))
        lin.weight.data = per_channel_quantize(lin.weight.data, scheme.weights, torch.float32,
                                          per_tensor=not act.dynamic and scheme.weights.type == "float"
                                          ).dequantize(lin.weight.dtype)
        s = None if act.dynamic else static_input_scale(am[name], act, torch.float32)
        lin.register_forward_pre_hook(lambda m, a, _s=s: (activation_fake_quant(a[0], act, _s),) + tuple(a[1:]))
    return float((_out(layer(x, **kw)).float() - ref).pow(2).sum())


@torch.no_grad()
def search_layer_alphas(work, absmax: dict[str, torch.Tensor], *, groups, head_dim: int, n_kv: int,
                        scheme, grid, start: dict[str, float], tokens: int = 4096) -> tuple[dict[str, float], dict]:
    """Per-group alphas for one layer by coordinate descent on the quantized layer's output error.

    Args:
        work: the engine's LayerWork (float layer, captured inputs). absmax: per-channel input absmax by full
            Linear name (the Linears to quantize; not changed).
        groups, head_dim, n_kv: as for :func:`hubquant.methods.smoothing.smooth_layer`.
        scheme: the W8A8 / FP8 scheme to score against. grid: alphas to try.
        start: {smoothed module (relative) or "default": alpha} to start from.
        tokens: calibration tokens (whole sequences from the first batch) the error is measured on.

    Returns:
        ({smoothed module (relative): alpha}, {"error_start": float, "error": float, "trials": int}).
    """
    x0, kw0 = work.inputs[0], work.kwargs[0]
    b = x0.shape[0]
    n = max(1, min(b, math.ceil(tokens / x0.shape[1])))
    x, kw = x0[:n], _slice_batch(kw0, b, n)
    ref = _out(work.layer(x, **kw)).float()
    active = [g for g in groups if all(f"{work.name}.{c}" in absmax for c in g.balance)]
    cur = {g.smooth: float(start.get(g.smooth, start.get("default", 0.5))) for g in active}

    def score(alphas):
        return quantized_layer_error(work, absmax, alphas, x=x, kw=kw, ref=ref, groups=groups, head_dim=head_dim,
                                     n_kv=n_kv, scheme=scheme)

    best = first = score(cur)
    trials = 1
    for g in active:
        a0 = cur[g.smooth]  # already scored
        for a in grid:
            if abs(a - a0) < 1e-9:
                continue
            trial = {**cur, g.smooth: float(a)}
            err = score(trial)
            trials += 1
            if err < best:
                best, cur = err, trial
    return cur, {"error_start": first, "error": best, "trials": trials}
