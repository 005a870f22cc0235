"""compressed-tensors ``nvfp4-pack-quantized`` and ``mxfp4-pack-quantized`` (NVFP4A16, NVFP4, MXFP4A16).

The `quantization_config` is compressed-tensors' own preset (``preset_name_to_scheme``) in its
``QuantizationConfig`` model, dumped as llm-compressor saves it. Tensors per Linear, as compressed-tensors'
``NVFP4PackedCompressor`` / ``MXFP4PackedCompressor`` write them (tests/formats/test_fp4.py compares the bytes):
``weight_packed`` uint8 [out, in/2] (two E2M1 codes a byte, low nibble first), ``weight_scale`` float8_e4m3fn
[out, in/16] (NVFP4) or uint8 E8M0 exponents [out, in/32] (MXFP4), ``weight_global_scale`` fp32 [1] (NVFP4;
loaders divide the block scale by it) and, for NVFP4 activations, ``input_global_scale`` fp32 [1].
"""
from __future__ import annotations

import torch

from hubquant import fp4
from hubquant.errors import UsageError
from hubquant.schemes import QuantScheme

FORMAT_NAMES = {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}


def is_fp4(scheme: QuantScheme) -> bool:
    return scheme.weights.type == "float" and scheme.weights.bits == 4


def format_name(scheme: QuantScheme) -> str:
    return FORMAT_NAMES[fp4.kind_of(scheme)]


def check_scheme(scheme: QuantScheme) -> None:
    """NVFP4A16, NVFP4 and MXFP4A16 (MXFP4 activations are not written)."""
    kind = fp4.kind_of(scheme)
    if kind == "mxfp4" and scheme.activations is not None:
        raise UsageError("MXFP4 with quantized activations is not supported", hint="use --scheme MXFP4A16 or NVFP4")
    import compressed_tensors
    from compressed_tensors.quantization import preset_name_to_scheme

    try:
        preset_name_to_scheme(scheme.name, ["Linear"])
    except KeyError:
        raise UsageError(f"compressed-tensors {compressed_tensors.__version__} has no {scheme.name} scheme",
                         hint="pip install -U compressed-tensors") from None


def quantization_config(scheme: QuantScheme, *, options=None, ignored=()) -> dict:
    """compressed-tensors' preset `scheme.name` as a QuantizationConfig dump (+ ``actorder: static`` after GPTQ)."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    fmt = format_name(scheme)
    group = preset_name_to_scheme(scheme.name, ["Linear"])
    group.format = fmt
    if getattr(options, "actorder", False):  # GPTQ's static groups: scales from the original weight, no g_idx
        group.weights.actorder = "static"
    config = QuantizationConfig(config_groups={"group_0": group}, format=fmt, quantization_status="compressed",
                                ignore=sorted(ignored))
    out = config.model_dump()
    out.update(sparsity_config={}, transform_config={}, version=compressed_tensors.__version__)
    return out


def linear_tensors(name: str, qw: fp4.Fp4Weight, scheme: QuantScheme, *, options=None) -> dict[str, torch.Tensor]:
    """One Linear's tensors, keyed by full name."""
    t = {f"{name}.weight_packed": fp4.pack_codes(qw.qweight), f"{name}.weight_scale": qw.scale}
    if qw.global_scale is not None:
        t[f"{name}.weight_global_scale"] = qw.global_scale.to(torch.float32).reshape(1).clone()  # fused: shared
    if scheme.activations is not None:
        if qw.input_global_scale is None:
            raise UsageError(f"--scheme {scheme.name} but no input global scale for {name}",
                             hint="NVFP4 activations need calibration; use --method rtn with calibration text")
        t[f"{name}.input_global_scale"] = qw.input_global_scale.to(torch.float32).reshape(1).clone()
    return {k: v.contiguous() for k, v in t.items()}
