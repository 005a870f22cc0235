"""gpt-oss's own MXFP4 checkpoint layout (``--format mxfp4``): what OpenAI's gpt-oss releases on the Hub use.

Experts only, as transformers' `Mxfp4HfQuantizer` and vLLM's gpt-oss loader read them, per sparse block:
``mlp.experts.gate_up_proj_blocks`` uint8 [E, 2I, H/32, 16] (two E2M1 codes a byte, low nibble first; rows
interleave gate (even) and up (odd)), ``gate_up_proj_scales`` uint8 E8M0 exponents [E, 2I, H/32],
``down_proj_blocks`` [E, H, I/32, 16], ``down_proj_scales`` [E, H, I/32], and the float biases
``gate_up_proj_bias`` [E, 2I] (interleaved) and ``down_proj_bias`` [E, H]. Attention, router, embeddings and
lm_head stay float (`quantization_config.modules_to_not_convert`). The codes and exponents are hubquant.fp4's
MXFP4 (compressed-tensors' numerics), which dequantize as transformers' `convert_moe_packed_tensors` does:
``e2m1 * 2^(e - 127)``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from hubquant.errors import UnsupportedError, UsageError

# float in this layout: everything but the experts (ConvertOptions.ignored_patterns keeps attention float)
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def check_scheme(scheme) -> None:
    w = scheme.weights
    if not (w.type == "float" and w.bits == 4 and w.group_size == 32 and scheme.activations is None):
        raise UsageError(f"--format mxfp4 holds MXFP4 weights only, not {scheme.name}",
                         hint="add --scheme MXFP4A16 (with --method rtn or gptq)")


def quantization_config(scheme, *, options=None, ignored=()) -> dict:
    return {"quant_method": "mxfp4", "modules_to_not_convert": list(NOT_CONVERTED)}


def linear_tensors(name, qw, scheme, *, options=None) -> dict:
    """Per-Linear tensors do not exist in this layout: gate and up share one interleaved tensor per block."""
    raise UnsupportedError("--format mxfp4 writes whole sparse blocks, not single Linears",
                           hint="use --streaming off with --format mxfp4")


def _blocks(codes: torch.Tensor) -> torch.Tensor:
    from hubquant import fp4

    out_f, in_f = codes.shape
    return fp4.pack_codes(codes).reshape(out_f, in_f // 32, 16)


def _interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.stack([a, b], dim=1).reshape(a.shape[0] * 2, *a.shape[1:])


def block_tensors(prefix: str, experts, quantized: dict) -> dict[str, torch.Tensor]:
    """The six tensors of one sparse block (`prefix` = "model.layers.N.mlp.experts") from its per-expert Linears."""
    gu_blocks, gu_scales, gu_bias, d_blocks, d_scales, d_bias = [], [], [], [], [], []
    for i, mlp in enumerate(experts):
        q = {n: quantized.get(f"{prefix}.{i}.{n}") for n in mlp.names}
        missing = [n for n, v in q.items() if v is None]
        if missing:
            raise UsageError(f"{prefix}.{i}.{missing[0]} was not quantized; --format mxfp4 needs every expert",
                             hint="drop the --ignore pattern that matches experts")
        gate, up, down = mlp.projections()
        g, u, d = (q[n] for n in mlp.names)
        gu_blocks.append(_interleave(_blocks(g.qweight), _blocks(u.qweight)))
        gu_scales.append(_interleave(g.scale, u.scale))
        gu_bias.append(_interleave(gate.bias.detach(), up.bias.detach()))
        d_blocks.append(_blocks(d.qweight))
        d_scales.append(d.scale)
        d_bias.append(down.bias.detach())
    stack = lambda ts: torch.stack([t.cpu() for t in ts]).contiguous()  # noqa: E731
    return {f"{prefix}.gate_up_proj_blocks": stack(gu_blocks), f"{prefix}.gate_up_proj_scales": stack(gu_scales),
            f"{prefix}.gate_up_proj_bias": stack(gu_bias), f"{prefix}.down_proj_blocks": stack(d_blocks),
            f"{prefix}.down_proj_scales": stack(d_scales), f"{prefix}.down_proj_bias": stack(d_bias)}


def write(model, quantized: dict, *, scheme, out_dir: Path, method: str, options=None) -> dict:
    """The whole gpt-oss model in its MXFP4 layout. Raises UnsupportedError for other architectures and
    UsageError when a Linear outside the experts was quantized (this layout stores them float)."""
    from hubquant import moe
    from hubquant.formats.common import dense_tensors, save_tensors, write_config
    from hubquant.modeling import model_dtype

    if moe.model_type(model) != "gpt_oss" or not moe.expert_modules(model):
        raise UnsupportedError(f"--format mxfp4 is gpt-oss's own layout; this model is {moe.model_type(model)}",
                               hint="use --format compressed-tensors --scheme MXFP4A16 for other models")
    check_scheme(scheme)
    experts = moe.expert_linear_names(model)
    outside = sorted(n for n in quantized if n not in experts)
    if outside:
        raise UsageError(f"--format mxfp4 stores {outside[0]} in float, but it was quantized",
                         hint="keep attention float: --ignore 're:.*\\.self_attn\\..*'")
    tensors = dense_tensors(model, quantized)
    for name, mods in moe.expert_modules(model).items():
        tensors = {k: v for k, v in tensors.items() if not k.startswith(f"{name}.")}  # per-expert biases
        tensors.update(block_tensors(name, mods, quantized))
    save_tensors(tensors, Path(out_dir))
    qc = quantization_config(scheme)
    write_config(model, Path(out_dir), qc, dtype=model_dtype(model))
    return qc
