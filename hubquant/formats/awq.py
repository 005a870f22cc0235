"""AWQ checkpoints (`quant_method: "awq"`, GEMM version) for AutoAWQ / vLLM / transformers (via gptqmodel).

Per quantized Linear (see shared FORMATS.md), 4-bit only:
  qweight int32 [in, out/8]          unsigned codes packed along the OUTPUT dim, interleaved: nibble i of
                                     word c holds column 8c + ORDER[i], ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
  qzeros  int32 [in/gs, out/8]       unsigned zero points, same interleave (no -1 offset)
  scales  fp16  [in/gs, out]
Dequantization: (q - z) * s. Symmetric schemes store z = 8.
"""
from __future__ import annotations

from pathlib import Path

import torch

from hubquant.errors import UnsupportedError, UsageError
from hubquant.formats.common import write_model
from hubquant.formats.gptq import to_fp16_scales
from hubquant.quant import QuantizedWeight, QuantScheme

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_awq(u: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit values [rows, cols] -> int32 [rows, cols/8] in AWQ's interleaved order."""
    rows, cols = u.shape
    v = u.to(torch.int64).reshape(rows, cols // 8, 8)
    word = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for i, col in enumerate(ORDER):
        word |= v[:, :, col] << (4 * i)
    return (word - ((word >> 31) << 32)).to(torch.int32)


def pack_linear(qw: QuantizedWeight, *, name: str = "") -> dict[str, torch.Tensor]:
    """The AWQ GEMM tensors (qweight, qzeros, scales) of one QuantizedWeight."""
    out_f = qw.qweight.shape[0]
    if out_f % 8:
        raise UnsupportedError(f"{name} has {out_f} outputs, not a multiple of 8 (AWQ packs 8 per word)",
                               hint="use --format compressed-tensors or add the layer to --ignore")
    n_groups = qw.scale.shape[1]
    zp = qw.zero_point if qw.zero_point is not None else torch.zeros(out_f, n_groups, dtype=torch.int8)
    return {
        "qweight": pack_awq((qw.qweight.to(torch.int32) + 8).t().contiguous()),
        "qzeros": pack_awq((zp.to(torch.int32) + 8).t().contiguous()),
        "scales": to_fp16_scales(qw.scale, name).t().contiguous(),
    }


def check_scheme(scheme: QuantScheme) -> None:
    """Raise UsageError unless `scheme` is one this format writes (asymmetric 4-bit groups)."""
    w = scheme.weights
    if w.type != "int" or scheme.activations is not None or w.bits != 4 or w.symmetric or w.group_size == -1:
        raise UsageError("--format awq stores asymmetric 4-bit groups", hint="use --bits 4 --asym --group-size 128")


def quantization_config(scheme: QuantScheme, *, options=None, ignored=()) -> dict:
    w = scheme.weights
    return {"quant_method": "awq", "zero_point": True, "group_size": w.group_size, "bits": 4,
            "version": "gemm", "modules_to_not_convert": None}


def linear_tensors(name: str, qw: QuantizedWeight, scheme: QuantScheme | None = None, *,
                   options=None) -> dict[str, torch.Tensor]:
    """The tensors one quantized Linear contributes, keyed by full name."""
    return {f"{name}.{k}": t for k, t in pack_linear(qw, name=name).items()}


def write(model: torch.nn.Module, quantized: dict[str, QuantizedWeight], *, scheme: QuantScheme, out_dir: Path,
          method: str, options=None) -> dict:
    """Write an AWQ GEMM checkpoint (safetensors + config.json).

    Returns:
        The quantization_config written into config.json.

    Raises:
        UnsupportedError: not 4-bit grouped integer weight-only, or a Linear the format cannot pack.
    """
    w = scheme.weights
    if w.type != "int" or w.bits != 4 or scheme.activations is not None or w.group_size == -1:
        raise UnsupportedError(f"the awq format holds 4-bit grouped weight-only schemes, not {scheme.name}",
                               hint="use --bits 4 --group-size 128 (or 64), or --format compressed-tensors")
    qcfg = quantization_config(scheme)
    dtype = next(iter(quantized.values())).scale.dtype if quantized else torch.float16
    write_model(model, quantized, Path(out_dir), qcfg, dtype=dtype, linear_tensors=linear_tensors)
    return qcfg
