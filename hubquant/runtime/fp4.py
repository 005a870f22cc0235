"""FP4 Linears for `hubquant.load`: compressed-tensors ``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized``.

On CUDA the weights are repacked once into the kernel layout (``hubquant_kernels.fp4.repack``: int32 [K/8, N],
scales [K/block, N]) and run through ``fp4_linear_kn`` (dequantized in registers, no float copy); on CPU, or where
the kernel does not apply (K not a multiple of 32), the weight is dequantized once with `hubquant.fp4`'s reference
math (the values compressed-tensors decompresses) and kept as a float copy. NVFP4 W4A4 checkpoints
(``input_global_scale``) also quantize each input as the serving engine does (dynamic e4m3 scales per 16 inputs
under the static global scale).
"""
from __future__ import annotations

import torch
from torch import nn

from hubquant import fp4


def _kernels():
    try:
        from hubquant_kernels import fp4 as k_fp4
    except ImportError:  # an older hubquant_kernels without FP4
        return None
    return k_fp4


class Fp4Linear(nn.Module):
    """Buffers: either the checkpoint layout (packed uint8 [N, K/2], block_scale float8_e4m3fn [N, K/16] for NVFP4
    or uint8 [N, K/32] for MXFP4) or, with `kernel_layout`, the kernel's (qweight int32 [K/8, N], block_scale uint8
    [K/block, N]); global_scale fp32 [1] or None, input_global_scale fp32 [1] or None (W4A4), bias [N] or None."""

    def __init__(self, in_features: int, out_features: int, kind: str, *, packed: torch.Tensor,
                 block_scale: torch.Tensor, global_scale: torch.Tensor | None = None,
                 input_global_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 kernel_layout: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        self.kernel_layout = kernel_layout
        if kernel_layout:
            packed, block_scale = _kernels().repack(packed, block_scale)
        self.register_buffer("packed", packed.contiguous())
        self.register_buffer("block_scale", block_scale.contiguous())
        self.register_buffer("global_scale", None if global_scale is None else global_scale.float().reshape(1))
        self.register_buffer("input_global_scale",
                             None if input_global_scale is None else input_global_scale.float().reshape(1))
        self.register_buffer("bias", bias)
        self._dense: torch.Tensor | None = None

    def checkpoint_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight_packed uint8 [N, K/2], weight_scale) as the checkpoint stores them."""
        if not self.kernel_layout:
            return self.packed, self.block_scale
        raw = self.packed.t().contiguous().view(torch.uint8)
        scale = self.block_scale.t().contiguous()
        return raw, scale.view(torch.float8_e4m3fn) if self.kind == "nvfp4" else scale

    def weight_value(self) -> fp4.Fp4Weight:
        packed, scale = self.checkpoint_tensors()
        return fp4.Fp4Weight(qweight=fp4.unpack_codes(packed), scale=scale, zero_point=None,
                             scheme=fp4.weight_scheme(self.kind), global_scale=self.global_scale)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W [N, K] in `dtype`, as compressed-tensors decompresses it."""
        return self.weight_value().dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_global_scale is not None:
            x = fp4.fake_quant_activations(x, self.input_global_scale)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.kernel_layout and x.dtype in (torch.bfloat16, torch.float16):
            return _kernels().fp4_linear_kn(x, self.packed, self.block_scale, self.global_scale, self.kind, bias)
        if self._dense is None or self._dense.dtype != x.dtype or self._dense.device != x.device:
            self._dense = self.dequantized_weight(x.dtype).to(x.device)
        return nn.functional.linear(x, self._dense, bias)

    def extra_repr(self) -> str:
        acts = ", activations nvfp4" if self.input_global_scale is not None else ""
        layout = ", kernel layout" if self.kernel_layout else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}{acts}{layout}"


def build(wargs: dict, t: dict, in_f: int, out_f: int, dtype: torch.dtype, device) -> Fp4Linear:
    """An Fp4Linear from one Linear's compressed-tensors tensors (`t`, keyed by local name)."""
    kind = "mxfp4" if int(wargs.get("group_size") or 16) == 32 else "nvfp4"
    bias = t.get("bias")
    g, ig = t.get("weight_global_scale"), t.get("input_global_scale")
    kernel = torch.device(device).type == "cuda" and in_f % 32 == 0 and _kernels() is not None
    return Fp4Linear(in_f, out_f, kind, packed=t["weight_packed"].to(device), block_scale=t["weight_scale"].to(device),
                     global_scale=None if g is None else g.to(device),
                     input_global_scale=None if ig is None else ig.to(device),
                     bias=None if bias is None else bias.to(device, dtype), kernel_layout=kernel)
