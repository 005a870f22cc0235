"""W4A16Linear hands the kernels row-major buffers whatever views the loader built: per-channel scales come out of
repacking as the transpose of an [N, 1] column, whose `.contiguous()` keeps strides (1, 1) and which the kernels'
row-stride check refuses (found by tests/loading/test_runtime_devices.py on a GPU)."""
from __future__ import annotations

import torch

from hubquant.runtime.modules import W4A16Linear
from hubquant_kernels import w4a16 as k_w4


def test_per_channel_scales_pass_the_kernel_checks():
    k, n = 64, 32
    qweight = torch.randint(0, 2**31 - 1, (k // 8, n), dtype=torch.int32)
    scales = torch.rand(n, 1, dtype=torch.float16).t()  # [1, N], strides (1, 1)
    zeros = torch.randint(0, 16, (n, 1), dtype=torch.uint8).t()
    assert scales.is_contiguous() and scales.stride(0) == 1
    lin = W4A16Linear(k, n, -1, qweight=qweight, scales=scales, zeros=zeros)
    assert lin.scales.stride() == (n, 1) and lin.zeros.stride() == (n, 1)
    assert torch.equal(lin.scales, scales) and torch.equal(lin.zeros, zeros)
    x = torch.randn(2, k, dtype=torch.float16)
    assert k_w4._check(x, lin.qweight, lin.scales, lin.zeros, -1, None)[:3] == (k, n, k)
