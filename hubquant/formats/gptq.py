"""GPTQ checkpoints (`quant_method: "gptq"`) for AutoGPTQ / GPTQModel / optimum / TGI / vLLM consumers.

Per quantized Linear (see shared FORMATS.md):
  qweight int32 [in*b/32, out]  unsigned codes q + 2^(b-1) packed along the input dim, low bits first
                                (a dense bitstream, so 3-bit codes straddle words as AutoGPTQ packs them)
  qzeros  int32 [n_groups, out*b/32]  zero points packed along the output dim; v1 (`gptq`) stores z - 1
  scales  fp16  [n_groups, out]
  g_idx   int32 [in]  i // group_size (act-order uses static groups, so no permutation is needed)
Symmetric schemes write checkpoint_format "gptq" (v1). Asymmetric ones write "gptq_v2" (z stored as is),
because v1's z - 1 underflows for z = 0.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

import hubquant
from hubquant.errors import UnsupportedError, UsageError
from hubquant.formats.common import method_options, write_model
from hubquant.formats.compressed_tensors import pack_int32
from hubquant.quant import QuantizedWeight, QuantScheme


def check_scheme(scheme: QuantScheme) -> None:
    """Raise UsageError unless `scheme` is one this format writes (symmetric ints: v1 checkpoints)."""
    w = scheme.weights
    if w.type != "int" or scheme.activations is not None:
        raise UsageError(f"--format gptq holds integer weight-only schemes, not {scheme.name}",
                         hint="use --format compressed-tensors")
    if not w.symmetric or w.bits not in (2, 3, 4, 8):
        raise UsageError("--format gptq is written symmetric (v1 checkpoints)", hint="drop --asym")


def _check(scheme: QuantScheme) -> None:
    w = scheme.weights
    if w.type != "int" or scheme.activations is not None or w.bits not in (2, 3, 4, 8):
        raise UnsupportedError(f"the gptq format holds 2/3/4/8-bit integer weight-only schemes, not {scheme.name}",
                               hint="use --format compressed-tensors")


def to_fp16_scales(scale: torch.Tensor, name: str) -> torch.Tensor:
    """Scales as fp16 (what GPTQ/AWQ loaders expect); warns when that changes a value."""
    s16 = scale.to(torch.float16)
    if not torch.equal(s16.to(scale.dtype), scale):
        warnings.warn(f"{name}: scales are not exactly representable in fp16; the checkpoint rounds them "
                      "(save the model in bf16/fp16 to avoid this)", stacklevel=3)
    return s16


def pack_linear(qw: QuantizedWeight, *, version: str = "gptq", name: str = "") -> dict[str, torch.Tensor]:
    """The GPTQ tensors (qweight, qzeros, scales, g_idx) of one QuantizedWeight."""
    bits = qw.scheme.bits
    out_f, in_f = qw.qweight.shape
    n_groups = qw.scale.shape[1]
    gs = in_f // n_groups
    if (in_f * bits) % 32 or (out_f * bits) % 32:
        raise UnsupportedError(f"{name} [{out_f}x{in_f}] cannot be packed into int32 words at {bits} bits",
                               hint="use --format compressed-tensors or add the layer to --ignore")
    zp = qw.zero_point if qw.zero_point is not None else torch.zeros(out_f, n_groups, dtype=torch.int8)
    z = zp.to(torch.int32) - (1 if version == "gptq" else 0)  # signed; pack_int32 adds 2^(b-1)
    return {
        "qweight": pack_int32(qw.qweight.t().contiguous(), bits, dim=0),
        "qzeros": pack_int32(z.t().contiguous(), bits, dim=1),
        "scales": to_fp16_scales(qw.scale, name).t().contiguous(),
        "g_idx": (torch.arange(in_f, dtype=torch.int32) // gs),
    }


def _opt(options, key: str, default):
    return options.get(key, default) if isinstance(options, dict) else getattr(options, key, default)


def quantization_config(scheme: QuantScheme, *, options=None, ignored=()) -> dict:
    """The GPTQ `quantization_config` (act-order, damping and true-sequential from the method's options)."""
    w = scheme.weights
    version = "gptq" if w.symmetric else "gptq_v2"
    actorder = bool(_opt(options, "actorder", False))
    return {
        "bits": w.bits,
        "group_size": w.group_size,
        "desc_act": False,  # act-order ran with static groups: g_idx is the identity grouping
        "static_groups": actorder,
        "sym": w.symmetric,
        "damp_percent": float(_opt(options, "damp", 0.01)),
        "true_sequential": bool(_opt(options, "true_sequential", False)),
        "checkpoint_format": version,
        "format": version,
        "lm_head": False,
        "quant_method": "gptq",
        "meta": {"quantizer": [f"hubquant:{hubquant.__version__}"], "act_order": actorder},
    }


def linear_tensors(name: str, qw: QuantizedWeight, scheme: QuantScheme, *, options=None) -> dict[str, torch.Tensor]:
    """The tensors one quantized Linear contributes, keyed by full name."""
    version = "gptq" if scheme.weights.symmetric else "gptq_v2"
    return {f"{name}.{k}": t for k, t in pack_linear(qw, version=version, name=name).items()}


def write_side_files(out_dir: Path, qc: dict) -> None:
    """quantize_config.json, which AutoGPTQ-era loaders read beside config.json."""
    side = {k: v for k, v in qc.items() if k not in ("format", "meta")}
    side["model_file_base_name"] = "model"
    (Path(out_dir) / "quantize_config.json").write_text(json.dumps(side, indent=2) + "\n")


def write(model: torch.nn.Module, quantized: dict[str, QuantizedWeight], *, scheme: QuantScheme, out_dir: Path,
          method: str, options=None) -> dict:
    """Write a GPTQ-format checkpoint (safetensors, config.json, quantize_config.json).

    Returns:
        The quantization_config written into config.json.

    Raises:
        UnsupportedError: a scheme or Linear shape the format cannot hold.
    """
    _check(scheme)
    out_dir = Path(out_dir)
    options = method_options(method, options)
    qcfg = quantization_config(scheme, options=options)
    dtype = next(iter(quantized.values())).scale.dtype if quantized else torch.float16
    write_model(model, quantized, out_dir, qcfg, dtype=dtype,
                linear_tensors=lambda n, qw: linear_tensors(n, qw, scheme))
    write_side_files(out_dir, qcfg)
    return qcfg
