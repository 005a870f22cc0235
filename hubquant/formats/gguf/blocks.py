"""GGUF block quantization: pick each block's stored parameters, round the values, dequantize.

A quantized tensor is a `Grid`: integer codes [rows, cols] and, per sub-block of `sub` values, a float32
`scale` and optional `offset` such that a value dequantizes to `code * scale + offset`, computed from the
stored (fp16 / small-integer) parameters exactly as ggml dequantizes them, so `Grid.dequantize()` equals
`gguf.quants.dequantize` of `packing.pack(grid)` bit for bit. `fields` holds the stored parameters.

Without an importance matrix the weighting is ggml's plain one (|x|-based for scale+min types, x^2 for the
symmetric K-quants); with one (`imp`, per input column: the sum of x^2 of that column's activations) every
search minimises sum imp_j * (sigma^2 + w_j^2)^(1/2) * err_j^2, as llama.cpp's imatrix quantization does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hubquant.errors import UsageError
from hubquant.formats.gguf.search import (
    quantize_signed_superscale,
    quantize_superscale,
    search_asymmetric,
    search_symmetric,
    signed_absmax,
)

QK_K = 256


@dataclass(frozen=True)
class TypeInfo:
    name: str
    block: int  # values per block (a row's length must be a multiple)
    sub: int  # values sharing one float scale
    qmin: int
    qmax: int
    bits: float  # bits per weight, stored parameters included


TYPES: dict[str, TypeInfo] = {t.name: t for t in (
    TypeInfo("Q8_0", 32, 32, -128, 127, 8.5),
    TypeInfo("Q5_1", 32, 32, 0, 31, 6.0),
    TypeInfo("Q5_0", 32, 32, -16, 15, 5.5),
    TypeInfo("Q4_1", 32, 32, 0, 15, 5.0),
    TypeInfo("Q4_0", 32, 32, -8, 7, 4.5),
    TypeInfo("Q6_K", QK_K, 16, -32, 31, 6.5625),
    TypeInfo("Q5_K", QK_K, 32, 0, 31, 5.5),
    TypeInfo("Q4_K", QK_K, 32, 0, 15, 4.5),
    TypeInfo("Q3_K", QK_K, 16, -4, 3, 3.4375),
    TypeInfo("Q2_K", QK_K, 16, 0, 3, 2.625),
)}


@dataclass
class Grid:
    """One quantized 2-D tensor (see the module docstring)."""

    qtype: str
    codes: torch.Tensor  # int8 [rows, cols]
    scale: torch.Tensor  # float32 [rows, cols // sub]
    offset: torch.Tensor | None  # float32 [rows, cols // sub] or None
    fields: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def info(self) -> TypeInfo:
        return TYPES[self.qtype]

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, cols], the values ggml computes from the packed bytes."""
        rows, cols = self.codes.shape
        sub = self.info.sub
        v = self.codes.float().reshape(rows, cols // sub, sub) * self.scale[..., None]
        if self.offset is not None:
            v = v + self.offset[..., None]
        return v.reshape(rows, cols)


def round_codes(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, qmin: int,
                qmax: int) -> torch.Tensor:
    """Codes of x [R, n, sub] on the grid code * scale + offset ([R, n]); zero scales give code 0."""
    s = scale[..., None]
    t = x if offset is None else x - offset[..., None]
    nz = s != 0
    q = torch.where(nz, torch.round(t / torch.where(nz, s, torch.ones_like(s))), torch.zeros_like(t))
    return q.clamp_(qmin, qmax)


def _weights(x: torch.Tensor, imp: torch.Tensor | None, plain: str, sigma_factor: float = 1.0) -> torch.Tensor:
    """Per-value weights for x [R, nb, block] (imp: [nb, block] importance of each column, or None)."""
    if imp is not None:
        sigma2 = sigma_factor * (x * x).mean(-1, keepdim=True)
        return imp[None] * torch.sqrt(sigma2 + x * x)
    if plain == "abs+rms":
        return x.abs() + torch.sqrt((x * x).mean(-1, keepdim=True))
    if plain == "abs":
        return x.abs()
    return x * x  # "sq"


# ------------------------------------------------------------------------------------- per-type parameters
# Each returns (scale [R, nsub], offset [R, nsub] | None, stored fields) for x [R, nb, block].


def _q8_0(x, imp):
    d16 = (x.abs().amax(-1) / 127).to(torch.float16)
    return d16.float(), None, {"d": d16}


def _q_sym(nmax):
    def params(x, imp):
        if imp is None:
            d = signed_absmax(x.reshape(-1, x.shape[-1])) / -nmax
        else:
            d = search_symmetric(x.reshape(-1, x.shape[-1]), _weights(x, imp, "sq").reshape(-1, x.shape[-1]), nmax)
        d16 = d.reshape(x.shape[:2]).to(torch.float16)
        return d16.float(), None, {"d": d16}
    return params


def _q_minmax(nmax):
    def params(x, imp):
        if imp is None:
            lo, hi = x.amin(-1), x.amax(-1)
            d, m = (hi - lo) / nmax, lo
        else:
            flat = x.reshape(-1, x.shape[-1])
            s, mn = search_asymmetric(flat, _weights(x, imp, "abs").reshape(flat.shape), nmax, rmin=-0.9,
                                      rdelta=0.05, nstep=36)
            d, m = s.reshape(x.shape[:2]), -mn.reshape(x.shape[:2])
        d16, m16 = d.to(torch.float16), m.to(torch.float16)
        return d16.float(), m16.float(), {"d": d16, "m": m16}
    return params


def _k_minmax(nmax, sub, scale_levels, plain_search, plain_weights):
    """Q2_K / Q4_K / Q5_K: per sub-block scale and min, both quantized against fp16 super-block d / dmin."""
    def params(x, imp):
        rows, nb, _ = x.shape
        w = _weights(x, imp, plain_weights, sigma_factor=2.0)
        xs, ws = x.reshape(-1, sub), w.reshape(-1, sub)
        if imp is None:
            s, mn = search_asymmetric(xs, ws, nmax, **plain_search)
        else:
            s, mn = search_asymmetric(xs, ws, nmax, rmin=-0.9, rdelta=0.05, nstep=36)
        nsub = QK_K // sub
        d16, sc = quantize_superscale(s.reshape(rows, nb, nsub), scale_levels)
        dmin16, mq = quantize_superscale(mn.reshape(rows, nb, nsub), scale_levels)
        scale = (d16.float()[..., None] * sc.float()).reshape(rows, nb * nsub)
        offset = -(dmin16.float()[..., None] * mq.float()).reshape(rows, nb * nsub)
        return scale, offset, {"d": d16, "dmin": dmin16, "sc": sc, "m": mq}
    return params


def _k_sym(nmax, scale_nmax):
    """Q3_K / Q6_K: signed per-16 scales quantized against one fp16 super-block d."""
    def params(x, imp):
        rows, nb, _ = x.shape
        w = _weights(x, imp, "sq", sigma_factor=2.0)
        s = search_symmetric(x.reshape(-1, 16), w.reshape(-1, 16), nmax)
        d16, sc = quantize_signed_superscale(s.reshape(rows, nb, 16), scale_nmax)
        scale = (d16.float()[..., None] * sc.float()).reshape(rows, nb * 16)
        return scale, None, {"d": d16, "sc": sc}
    return params


_PARAMS = {
    "Q8_0": _q8_0,
    "Q4_0": _q_sym(8),
    "Q5_0": _q_sym(16),
    "Q4_1": _q_minmax(15),
    "Q5_1": _q_minmax(31),
    "Q2_K": _k_minmax(3, 16, 15, dict(rmin=-0.5, rdelta=0.1, nstep=15, use_mad=True), "abs"),
    "Q4_K": _k_minmax(15, 32, 63, dict(rmin=-1.0, rdelta=0.1, nstep=20), "abs+rms"),
    "Q5_K": _k_minmax(31, 32, 63, dict(rmin=-0.5, rdelta=0.1, nstep=15), "abs+rms"),
    "Q3_K": _k_sym(4, 32),
    "Q6_K": _k_sym(32, 128),
}

CHUNK_VALUES = 1 << 22  # rows are processed in chunks of about this many values (bounded temporaries)


def check_shape(cols: int, qtype: str) -> None:
    if qtype not in TYPES:
        raise UsageError(f"unknown GGUF tensor type {qtype}", hint=f"use one of {', '.join(TYPES)}")
    if cols % TYPES[qtype].block:
        raise UsageError(f"rows of {cols} values cannot be stored as {qtype} (blocks of {TYPES[qtype].block})",
                         hint="this type needs another fallback type for this tensor")


@torch.no_grad()
def choose_params(w: torch.Tensor, qtype: str, imp: torch.Tensor | None = None) -> Grid:
    """Stored parameters (scales, mins) for the float weight w [rows, cols]; codes are round-to-nearest.

    imp: [cols] importance of each input column (sum of squared activations), or None for the plain weighting.
    """
    rows, cols = w.shape
    check_shape(cols, qtype)
    info = TYPES[qtype]
    nb = cols // info.block
    imp_b = None if imp is None else imp.float().clamp(min=0).reshape(nb, info.block) + 1e-12
    step = max(1, CHUNK_VALUES // cols)
    parts = []
    for r in range(0, rows, step):
        x = w[r: r + step].float().reshape(-1, nb, info.block)
        parts.append(_PARAMS[qtype](x, imp_b))
    scale = torch.cat([p[0] for p in parts])
    offset = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
    fields = {k: torch.cat([p[2][k] for p in parts]) for k in parts[0][2]}
    codes = round_codes(w.float().reshape(rows, -1, info.sub), scale, offset, info.qmin, info.qmax)
    return Grid(qtype, codes.reshape(rows, cols).to(torch.int8), scale, offset, fields)


def quantize(w: torch.Tensor, qtype: str, imp: torch.Tensor | None = None) -> Grid:
    """Round-to-nearest quantization of w [rows, cols] to `qtype` (parameters searched with `imp` if given)."""
    return choose_params(w, qtype, imp)
