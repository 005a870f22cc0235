"""compressed-tensors: the primary format (vLLM and transformers + compressed-tensors load it).

- weight-only 2/3/4-bit ints  -> ``pack-quantized``: weight_packed int32 [out, ceil(in*b/32)], weight_scale,
  weight_shape, and for asymmetric schemes weight_zero_point packed along the output dim;
- 8-bit ints (W8A16 and W8A8)  -> ``int-quantized``: weight int8 [out, in], weight_scale [out, 1]; weight-only
  8-bit ints of mixture-of-experts models -> ``pack-quantized`` (QuantizedWeight.extra[PACK_INT8], set by
  hubquant.moe.pack_weight_only_int8), the layout transformers and vLLM read for weight-only int8 experts;
- FP8                          -> ``float-quantized``: weight float8_e4m3fn, weight_scale (+ input_scale);
- FP4 (NVFP4A16, NVFP4, MXFP4A16) -> ``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized`` (hubquant.formats.ct_fp4).
Values are written exactly as `hubquant.quant` computed them, so loaders dequantize to the same floats.

The bytes and the config go through compressed-tensors' own API: `pack_to_int32` packs, and the
`quantization_config` is compressed-tensors' `QuantizationConfig` model dumped as llm-compressor saves it.
Asymmetric pack-quantized checkpoints also carry `"dequantize": true` (docs/formats.md says why): vLLM reads the
packed zero points as they are, and transformers (>= 5.16) dequantizes them on load instead of allocating
unpacked zero points that the packed tensor cannot fill.
"""
from __future__ import annotations

from pathlib import Path

import torch

from hubquant.errors import UsageError
from hubquant.formats import ct_fp4
from hubquant.formats.common import ignored_linears, method_options, write_model
from hubquant.quant import PACK_INT8, QuantizedWeight, QuantScheme


def pack_int32(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Dense bit-packing of signed b-bit codes into int32 along `dim` (compressed-tensors' `pack_to_int32`):
    element i at bit i*b, low bits first, stored as q + 2^(b-1); codes may straddle two words (3-bit)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    if dim == 1 and q.shape[0] > PACK_ROWS:  # rows pack independently: a block at a time, fewer temporaries
        return torch.cat([pack_to_int32(q[r: r + PACK_ROWS].to(torch.int8), bits, packed_dim=1)
                          for r in range(0, q.shape[0], PACK_ROWS)])
    return pack_to_int32(q.to(torch.int8), bits, packed_dim=dim)


PACK_ROWS = 512


def unpack_int32(packed: torch.Tensor, bits: int, cols: int, dim: int = 1) -> torch.Tensor:
    """Inverse of pack_int32: signed int8 codes [rows, cols] (or [cols, n] when dim=0)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    other = packed.shape[1 - dim]
    shape = torch.Size((other, cols) if dim == 1 else (cols, other))
    return unpack_from_int32(packed, bits, shape, packed_dim=dim)


def _args(num_bits, type_, strategy, symmetric, *, group_size=None, dynamic=False, actorder=None,
          observer="minmax"):
    from compressed_tensors.quantization import QuantizationArgs

    kw = {"zp_dtype": torch.int8} if not symmetric and type_ == "int" else {}
    return QuantizationArgs(num_bits=num_bits, type=type_, strategy=strategy, symmetric=symmetric,
                            group_size=group_size, dynamic=dynamic, actorder=actorder, observer=observer, **kw)


def format_name(scheme: QuantScheme, *, pack_int8: bool = False) -> str:
    if ct_fp4.is_fp4(scheme):
        return ct_fp4.format_name(scheme)
    w = scheme.weights
    if w.type == "float":
        return "float-quantized"
    return "int-quantized" if w.bits == 8 and not pack_int8 else "pack-quantized"


def check_scheme(scheme: QuantScheme) -> None:
    """compressed-tensors holds every scheme hubquant produces (2/3/4/8-bit ints, FP8, W8A8, FP4)."""
    if ct_fp4.is_fp4(scheme):
        ct_fp4.check_scheme(scheme)


def _weight_args(scheme: QuantScheme, options):
    w = scheme.weights
    if w.type == "float":
        strategy = "channel" if scheme.activations is None or scheme.activations.dynamic else "tensor"
        return _args(8, "float", strategy, True)
    grouped = w.group_size != -1
    return _args(w.bits, "int", "group" if grouped else "channel", w.symmetric,
                 group_size=w.group_size if grouped else None,
                 actorder="static" if (getattr(options, "actorder", False) and grouped) else None)


def needs_dequantize_on_load(scheme: QuantScheme) -> bool:
    """Asymmetric sub-8-bit ints: transformers' compressed modules cannot take the packed zero points."""
    w = scheme.weights
    return w.type == "int" and w.bits < 8 and not w.symmetric


def quantization_config(scheme: QuantScheme, *, options=None, ignored=(), pack_int8: bool = False) -> dict:
    """The `quantization_config` dict: compressed-tensors' QuantizationConfig, dumped as llm-compressor saves it.

    Grouped weights of a method that ran with act-order (GPTQ's static groups) say ``actorder: static``.
    `pack_int8`: 8-bit weights are stored `pack-quantized` (see PACK_INT8).
    """
    if ct_fp4.is_fp4(scheme):
        return ct_fp4.quantization_config(scheme, options=options, ignored=ignored)
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    acts = None
    if scheme.activations is not None:
        a = scheme.activations
        acts = _args(a.bits, a.type, "token" if a.dynamic else "tensor", a.symmetric, dynamic=a.dynamic,
                     observer=None if a.dynamic else "minmax")
    fmt = format_name(scheme, pack_int8=pack_int8)
    group = QuantizationScheme(targets=["Linear"], weights=_weight_args(scheme, options), input_activations=acts,
                               format=fmt)
    config = QuantizationConfig(config_groups={"group_0": group}, format=fmt, quantization_status="compressed",
                                ignore=sorted(ignored))
    out = config.model_dump()
    out.update(sparsity_config={}, transform_config={}, version=compressed_tensors.__version__)
    if needs_dequantize_on_load(scheme):
        out["dequantize"] = True
    return out


def linear_tensors(name: str, qw: QuantizedWeight, scheme: QuantScheme, *, options=None) -> dict[str, torch.Tensor]:
    """The tensors one quantized Linear contributes, keyed by full name."""
    if ct_fp4.is_fp4(scheme):
        return ct_fp4.linear_tensors(name, qw, scheme, options=options)
    w = scheme.weights
    t: dict[str, torch.Tensor] = {}
    if w.type == "float":
        t[f"{name}.weight"] = qw.qweight.to(torch.float8_e4m3fn)
        scale = qw.scale if scheme.activations is None or scheme.activations.dynamic else qw.scale.reshape(1)
        t[f"{name}.weight_scale"] = scale
    elif w.bits == 8 and not qw.extra.get(PACK_INT8):
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


def _float_dtype(model) -> torch.dtype:
    """The model's float dtype; a streamed conversion's final write sees no parameters, so its config's."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    if p is not None:
        return p.dtype
    d = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None) or torch.float32
    return getattr(torch, d) if isinstance(d, str) else d


def write(model, quantized: dict[str, QuantizedWeight], *, scheme: QuantScheme, out_dir: Path, method: str,
          options=None) -> dict:
    """Write `quantized` + the rest of `model` as a compressed-tensors checkpoint into `out_dir`."""
    if not quantized:
        raise UsageError("nothing was quantized", hint="check --ignore: it matched every Linear")
    if scheme.activations is not None and scheme.activations.dynamic is False and not ct_fp4.is_fp4(scheme):
        missing = [n for n, q in quantized.items() if q.input_scale is None]
        if missing:
            raise UsageError(f"static activation scheme but no input_scale for {missing[0]}",
                             hint="static activations need calibration; use a calibrated method")
    options = method_options(method, options)
    qc = quantization_config(scheme, options=options, ignored=ignored_linears(model, quantized),
                             pack_int8=any(q.extra.get(PACK_INT8) for q in quantized.values()))
    dtype = next(iter(quantized.values())).scale.dtype
    if ct_fp4.is_fp4(scheme):  # FP4 scales are e4m3/E8M0 codes: the checkpoint keeps the model's dtype
        dtype = _float_dtype(model)
    write_model(model, quantized, Path(out_dir), qc, dtype=dtype,
                linear_tensors=lambda n, qw: linear_tensors(n, qw, scheme, options=options))
    return qc
