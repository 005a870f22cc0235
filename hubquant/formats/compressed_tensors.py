"""compressed-tensors: the primary format (vLLM and transformers + compressed-tensors load it).

- weight-only 2/3/4-bit ints  -> ``pack-quantized``: weight_packed int32 [out, ceil(in*b/32)], weight_scale,
  weight_shape, and for asymmetric schemes weight_zero_point packed along the output dim;
- 8-bit ints (W8A16 and W8A8)  -> ``int-quantized``: weight int8 [out, in], weight_scale [out, 1];
- FP8                          -> ``float-quantized``: weight float8_e4m3fn, weight_scale (+ input_scale).
Values are written exactly as `hubquant.quant` computed them, so loaders dequantize to the same floats.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from hubquant.errors import UsageError
from hubquant.formats.common import ignored_linears, method_options, write_model
from hubquant.quant import QuantizedWeight, QuantScheme

CT_VERSION = "0.19.0"


def pack_int32(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Dense bit-packing of signed b-bit codes into int32 along `dim`: element i at bit i*b, low bits first,
    stored as q + 2^(b-1); codes may straddle two words (3-bit)."""
    if dim == 0:
        return pack_int32(q.t(), bits, 1).t().contiguous()
    rows, cols = q.shape
    v = q.to(torch.int64) + (1 << (bits - 1))
    pad = (-cols) % 32
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    groups = v.reshape(rows, -1, 32)  # 32 codes fill exactly `bits` words
    words = torch.zeros(rows, groups.shape[1], bits, dtype=torch.int64)
    for j in range(32):
        start = j * bits
        w, off = divmod(start, 32)
        words[:, :, w] |= (groups[:, :, j] << off) & 0xFFFFFFFF
        if off + bits > 32:
            words[:, :, w + 1] |= groups[:, :, j] >> (32 - off)
    words = words.reshape(rows, -1)[:, : math.ceil(cols * bits / 32)]
    return (words - ((words >> 31) << 32)).to(torch.int32)  # reinterpret uint32 as int32


def unpack_int32(packed: torch.Tensor, bits: int, cols: int, dim: int = 1) -> torch.Tensor:
    """Inverse of pack_int32: signed int8 codes [rows, cols] (or [cols, n] when dim=0)."""
    if dim == 0:
        return unpack_int32(packed.t(), bits, cols, 1).t().contiguous()
    rows = packed.shape[0]
    u = packed.to(torch.int64) & 0xFFFFFFFF
    n_words = math.ceil(cols / 32) * bits
    if u.shape[1] < n_words:
        u = torch.nn.functional.pad(u, (0, n_words - u.shape[1]))
    u = u.reshape(rows, -1, bits)
    mask = (1 << bits) - 1
    out = torch.empty(rows, u.shape[1], 32, dtype=torch.int64)
    for j in range(32):
        w, off = divmod(j * bits, 32)
        val = u[:, :, w] >> off
        if off + bits > 32:
            val = val | (u[:, :, w + 1] << (32 - off))
        out[:, :, j] = val & mask
    return (out.reshape(rows, -1)[:, :cols] - (1 << (bits - 1))).to(torch.int8)


def _args(num_bits, type_, strategy, symmetric, *, group_size=None, dynamic=False, actorder=None,
          observer="minmax", zp_dtype=None) -> dict:
    return {
        "actorder": actorder, "block_structure": None, "dynamic": dynamic, "group_size": group_size,
        "num_bits": num_bits, "observer": observer, "observer_kwargs": {}, "scale_dtype": None,
        "strategy": strategy, "symmetric": symmetric, "type": type_, "zp_dtype": zp_dtype,
    }


def format_name(scheme: QuantScheme) -> str:
    w = scheme.weights
    if w.type == "float":
        return "float-quantized"
    return "int-quantized" if w.bits == 8 else "pack-quantized"


def check_scheme(scheme: QuantScheme) -> None:
    """compressed-tensors holds every scheme hubquant produces (2/3/4/8-bit ints, FP8, W8A8)."""


def quantization_config(scheme: QuantScheme, *, options=None, ignored=()) -> dict:
    """The `quantization_config` dict (as llm-compressor writes it for the same scheme).

    Grouped weights of a method that ran with act-order (GPTQ's static groups) say ``actorder: static``.
    """
    w = scheme.weights
    if w.type == "float":
        strategy = "channel" if scheme.activations is None or scheme.activations.dynamic else "tensor"
        weights = _args(8, "float", strategy, True)
    else:
        grouped = w.group_size != -1
        weights = _args(
            w.bits, "int", "group" if grouped else "channel", w.symmetric,
            group_size=w.group_size if grouped else None,
            actorder="static" if (getattr(options, "actorder", False) and grouped) else None,
            zp_dtype=None if w.symmetric else "torch.int8",
        )
    acts = None
    if scheme.activations is not None:
        a = scheme.activations
        acts = _args(a.bits, a.type, "token" if a.dynamic else "tensor", a.symmetric, dynamic=a.dynamic,
                     observer=None if a.dynamic else "minmax")
    fmt = format_name(scheme)
    return {
        "config_groups": {"group_0": {"format": fmt, "targets": ["Linear"], "weights": weights,
                                      "input_activations": acts, "output_activations": None}},
        "format": fmt, "global_compression_ratio": None, "ignore": sorted(ignored), "kv_cache_scheme": None,
        "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {},
        "transform_config": {}, "version": CT_VERSION,
    }


def linear_tensors(name: str, qw: QuantizedWeight, scheme: QuantScheme, *, options=None) -> dict[str, torch.Tensor]:
    """The tensors one quantized Linear contributes, keyed by full name."""
    w = scheme.weights
    t: dict[str, torch.Tensor] = {}
    if w.type == "float":
        t[f"{name}.weight"] = qw.qweight.to(torch.float8_e4m3fn)
        scale = qw.scale if scheme.activations is None or scheme.activations.dynamic else qw.scale.reshape(1)
        t[f"{name}.weight_scale"] = scale
    elif w.bits == 8:
        t[f"{name}.weight"] = qw.qweight.to(torch.int8)
        t[f"{name}.weight_scale"] = qw.scale
        if qw.zero_point is not None:
            t[f"{name}.weight_zero_point"] = qw.zero_point
    else:
        out_f, in_f = qw.qweight.shape
        t[f"{name}.weight_packed"] = pack_int32(qw.qweight, w.bits)
        t[f"{name}.weight_scale"] = qw.scale
        t[f"{name}.weight_shape"] = torch.tensor([out_f, in_f], dtype=torch.int64)
        if qw.zero_point is not None:
            t[f"{name}.weight_zero_point"] = pack_int32(qw.zero_point, w.bits, dim=0)
    if qw.input_scale is not None:
        t[f"{name}.input_scale"] = qw.input_scale.reshape(1).to(qw.scale.dtype)
    return {k: v.contiguous() for k, v in t.items()}


def write(model, quantized: dict[str, QuantizedWeight], *, scheme: QuantScheme, out_dir: Path, method: str,
          options=None) -> dict:
    """Write `quantized` + the rest of `model` as a compressed-tensors checkpoint into `out_dir`."""
    if not quantized:
        raise UsageError("nothing was quantized", hint="check --ignore: it matched every Linear")
    if scheme.activations is not None and scheme.activations.dynamic is False:
        missing = [n for n, q in quantized.items() if q.input_scale is None]
        if missing:
            raise UsageError(f"static activation scheme but no input_scale for {missing[0]}",
                             hint="static activations need calibration; use a calibrated method")
    options = method_options(method, options)
    qc = quantization_config(scheme, options=options, ignored=ignored_linears(model, quantized))
    dtype = next(iter(quantized.values())).scale.dtype
    write_model(model, quantized, Path(out_dir), qc, dtype=dtype,
                linear_tensors=lambda n, qw: linear_tensors(n, qw, scheme, options=options))
    return qc
