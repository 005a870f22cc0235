"""Concatenate Linears that read the same input (q/k/v, gate/up) into one, for fewer, larger GEMVs.

Works for float nn.Linear, W4A16Linear (same group size, zero points on all or none, no act-order permutation)
and W8A8Linear (same int8/FP8 kind, dynamic activation scales). The fused module's output is the parts'
outputs side by side; anything else returns None and the caller keeps the separate modules. The parts' own tensors
become views of the fused ones, so fusing costs no memory: row views for float and W8A8 weights ([N, K]),
column views for W4A16 ([K/8, N]; the W4A16 kernels take row strides longer than N).
"""
from __future__ import annotations

import torch
from torch import nn

from hubquant.runtime.modules import W4A16Linear, W8A8Linear


def _cat_optional(parts: list[torch.Tensor | None], dim: int) -> torch.Tensor | None | bool:
    """torch.cat of all-present tensors, None if all are None, False if mixed."""
    if all(p is None for p in parts):
        return None
    if any(p is None for p in parts):
        return False
    return torch.cat(parts, dim)


def fuse_linears(mods: list[nn.Module]) -> nn.Module | None:
    """One module computing torch.cat([m(x) for m in mods], -1), or None if they cannot be fused."""
    if not mods or len({getattr(m, "in_features", None) for m in mods}) != 1:
        return None
    kinds = {type(m) for m in mods}
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    if kind is W4A16Linear:
        return _fuse_w4(mods)
    if kind is W8A8Linear:
        return _fuse_w8(mods)
    if kind is nn.Linear:
        bias = _cat_optional([m.bias for m in mods], 0)
        if bias is False or len({m.weight.dtype for m in mods}) != 1:
            return None
        w = torch.cat([m.weight.detach() for m in mods], 0)
        out = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if bias is not None:
                out.bias.copy_(bias)
        out.requires_grad_(False)
        _share_rows(mods, out.weight, out.bias, "weight", "bias", nn.Parameter)
        return out
    return None


def _share_rows(mods: list[nn.Module], weight: torch.Tensor, bias: torch.Tensor | None, w_name: str, b_name: str,
                wrap, extra: tuple[str, torch.Tensor] | None = None) -> None:
    """Point each part's [N_i, ...] tensors at its rows of the fused ones (contiguous views: no second copy)."""
    lo = 0
    for m in mods:
        hi = lo + m.out_features
        for name, full in ((w_name, weight), (b_name, bias), extra or (None, None)):
            if name is not None and full is not None:
                view = full[lo:hi]
                if wrap is nn.Parameter and name in m._parameters:
                    m._parameters[name] = nn.Parameter(view, requires_grad=False)
                else:
                    m._buffers[name] = view
        lo = hi


def _fuse_w4(mods: list[W4A16Linear]) -> W4A16Linear | None:
    if len({m.group_size for m in mods}) != 1 or any(m.perm is not None for m in mods):
        return None
    if len({m.scales.dtype for m in mods}) != 1:
        return None
    zeros = _cat_optional([m.zeros for m in mods], 1)
    bias = _cat_optional([m.bias for m in mods], 0)
    if zeros is False or bias is False:
        return None
    m0 = mods[0]
    out = W4A16Linear(m0.in_features, sum(m.out_features for m in mods), m0.group_size,
                      qweight=torch.cat([m.qweight for m in mods], 1), scales=torch.cat([m.scales for m in mods], 1),
                      zeros=zeros, bias=bias)
    _share_cols(mods, out)
    return out


def _share_cols(mods: list[W4A16Linear], fused: W4A16Linear) -> None:
    """Point each part's [.., N_i] tensors at its columns of the fused ones (strided views: no second copy; the
    W4A16 kernels take rows longer than N)."""
    lo = 0
    for m in mods:
        hi = lo + m.out_features
        for name in ("qweight", "scales", "zeros"):
            full = getattr(fused, name)
            if full is not None:
                m._buffers[name] = full[:, lo:hi]
        if fused.bias is not None:
            m._buffers["bias"] = fused.bias[lo:hi]
        m._dense = None
        lo = hi


def _fuse_w8(mods: list[W8A8Linear]) -> W8A8Linear | None:
    if len({m.fp8 for m in mods}) != 1 or any(m.input_scale is not None for m in mods):
        return None
    bias = _cat_optional([m.bias for m in mods], 0)
    if bias is False:
        return None
    out = W8A8Linear(mods[0].in_features, sum(m.out_features for m in mods),
                     qweight=torch.cat([m.qweight for m in mods], 0), w_scale=torch.cat([m.w_scale for m in mods], 0),
                     bias=bias)
    _share_rows(mods, out.qweight, out.bias, "qweight", "bias", None, extra=("w_scale", out.w_scale))
    return out
