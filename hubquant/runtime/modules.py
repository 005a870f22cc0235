"""Quantized Linear modules over hubquant_kernels (Triton on CUDA, the torch references on CPU).

Each module holds its weights in the kernels' layout (repacked once by the loader). On CPU the first forward
dequantizes the weight once and keeps it (a float copy, not saved in the state dict), so generation on CPU
runs at float speed with exactly the quantized values.
"""
from __future__ import annotations

import torch
from torch import nn

from hubquant_kernels import w4a16 as k_w4
from hubquant_kernels import w8a8 as k_w8


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`t` laid out row-major with row stride = its width: `.contiguous()` alone keeps a [1, N] view of an [N, 1]
    column (strides (1, 1)), which the kernels' row-stride checks refuse (per-channel scales, G = 1)."""
    t = t.contiguous()
    if t.dim() == 2 and t.shape[0] == 1 and t.stride(0) != t.shape[1]:
        t = t.clone(memory_format=torch.contiguous_format)
        if t.stride(0) != t.shape[1]:
            t = torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)
    return t


def _bound(mod: nn.Module, tensors: tuple, make) -> k_w4.Bound:
    """The module's bound kernel op (hubquant_kernels.bound), made again whenever one of its tensors was
    replaced (load_state_dict, .to(), fusing into views)."""
    ids = tuple(map(id, tensors))
    op = mod._op
    if op is None or op[0] != ids:
        op = mod._op = (ids, make())
    return op[1]


class _BoundMixin:
    """Drops the bound op when the module's tensors move (.to(), .cuda(), .half()): it holds the old tensors."""

    def _apply(self, fn, *args, **kwargs):
        self._op = None
        return super()._apply(fn, *args, **kwargs)


class W4A16Linear(_BoundMixin, nn.Module):
    """4-bit grouped weights, 16-bit activations.

    Buffers: qweight int32 [K/8, N] (unsigned codes, kernel layout), scales [G, N], zeros uint8 [G, N] or None
    (symmetric: zero point 8), bias [N] or None, perm int64 [K] or None (GPTQ act-order: x is gathered with it).
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, *, qweight: torch.Tensor,
                 scales: torch.Tensor, zeros: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 perm: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("qweight", _rows(qweight))
        self.register_buffer("scales", _rows(scales))
        self.register_buffer("zeros", None if zeros is None else _rows(zeros.to(torch.uint8)))
        self.register_buffer("bias", bias)
        self.register_buffer("perm", perm)
        self._dense: torch.Tensor | None = None
        self._op: tuple[tuple, k_w4.Bound] | None = None

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W as a float [N, K] matrix in the input order of the original Linear."""
        w = k_w4.dequantize_reference(self.qweight, self.scales, self.zeros, self.group_size).to(dtype).t()
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            if self.perm is not None:
                x = x.index_select(-1, self.perm)
            return _bound(self, (self.qweight, self.scales, self.zeros, self.bias),
                          lambda: k_w4.bind(self.qweight, self.scales, self.zeros, self.group_size, self.bias))(x)
        if self._dense is None or self._dense.dtype != x.dtype:
            self._dense = self.dequantized_weight(x.dtype)
        return nn.functional.linear(x, self._dense, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"asym={self.zeros is not None}, act_order={self.perm is not None}")


class W8A8Linear(_BoundMixin, nn.Module):
    """8-bit weights and 8-bit activations (int8 or FP8 e4m3), per-channel weight scales.

    Buffers: qweight [N, K] int8 or float8_e4m3fn, w_scale fp32 [N], input_scale fp32 [1] (static schemes)
    or None (dynamic per-token), bias [N] or None.
    """

    def __init__(self, in_features: int, out_features: int, *, qweight: torch.Tensor, w_scale: torch.Tensor,
                 input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.fp8 = qweight.dtype == torch.float8_e4m3fn
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("w_scale", w_scale.float().reshape(-1).expand(out_features).contiguous())
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().reshape(1))
        self.register_buffer("bias", bias)
        self._wf: torch.Tensor | None = None
        self._op: tuple[tuple, k_w4.Bound] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return _bound(self, (self.qweight, self.w_scale, self.bias, self.input_scale),
                          lambda: k_w8.bind(self.qweight, self.w_scale, self.bias, static_scale=self.input_scale))(x)
        # CPU: the reference math in fp32 (codes are exact in fp32; int8 sums stay exact below 2^24)
        if self._wf is None:
            self._wf = self.qweight.float().t().contiguous()
        lead = x.shape[:-1]
        qa, sa = k_w8.quantize_act_reference(x.reshape(-1, self.in_features), fp8=self.fp8,
                                             static_scale=self.input_scale)
        y = (qa.float() @ self._wf) * sa[:, None] * self.w_scale[None, :]
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        kind = "fp8" if self.fp8 else "int8"
        act = "static" if self.input_scale is not None else "dynamic per-token"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}, activations {act}"
