"""One-launch W8A8/FP8 (quantization inside the GEMM) against the two-launch path and float64."""
from __future__ import annotations

import pytest
import torch

from hubquant_kernels import bound, fp8, quant_mm, w8a8


def _layer(n, k, is_fp8, seed):
    g = torch.Generator().manual_seed(seed)
    if is_fp8:
        return fp8.quantize_weight_fp8(torch.randn(n, k, generator=g) * 0.05)
    return torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8), torch.rand(n, generator=g) * 0.01


@pytest.mark.parametrize("is_fp8", [False, True])
@pytest.mark.parametrize("m,n,k,static", [(1, 72, 512, False), (3, 40, 1024, False), (4, 64, 384, True)])
def test_one_launch_equals_two_launches_bit_for_bit(is_fp8, m, n, k, static):
    qw, sw = _layer(n, k, is_fp8, seed=m + n)
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4).to(torch.bfloat16)
    x[0, 3] = 40.0  # an outlier sets its row's scale
    b = torch.randn(n, generator=g).to(torch.bfloat16)
    st = (x.float().abs().amax() / (448.0 if is_fp8 else 127.5)).reshape(1) if static else None
    exact = w8a8.scaled_mm_reference(*w8a8.quantize_act_reference(x, fp8=is_fp8, static_scale=st), qw, sw, b,
                                     torch.float64)
    names = [c.name for c in quant_mm.one_launch_candidates(m, k)]
    for name in [names[0]] + [nm for nm in names if "_s2_" in nm][:1]:
        c = next(c for c in quant_mm.one_launch_candidates(m, k) if c.name == name)
        y = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
        assert c.fn(x, qw, sw, b, st, y) is y
        qa, sa = w8a8.quantize_act(x, fp8=is_fp8, static_scale=st)
        two = w8a8.scaled_mm(qa, sa, qw, sw, b, out_dtype=torch.bfloat16, impl=name.replace("q1_", "triton_"))
        assert torch.equal(y, two), name  # same codes, same accumulation, same epilogue
        # (the CPU interpreter's e4m3 cast truncates: FP8 is checked more loosely here than on the GPU)
        assert float((y.double() - exact).norm() / exact.norm()) < (8e-2 if is_fp8 else 5e-3), name


def test_entry_points_and_bound_op_take_one_launch_at_small_m():
    qw, sw = _layer(48, 256, False, seed=3)
    x = torch.randn(2, 2, 256, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    y = w8a8.w8a8_matmul(x, qw, sw)
    assert y.shape == (2, 2, 48)
    ref = w8a8.w8a8_reference(x.reshape(4, 256), qw, sw)
    assert float((y.reshape(4, 48).float() - ref.float()).norm() / ref.float().norm()) < 1e-2
    op = w8a8.bind(qw, sw)
    assert isinstance(op, bound.Bound) and torch.equal(op(x), y)
    assert w8a8.linear_candidates(4, 256)[0].name.startswith("q1_")
    assert w8a8.linear_candidates(4, 256)[-1].name == "two_launch"
    # past MAX_M rows (one memory round trip per row before the GEMM starts) only two launches are offered
    assert quant_mm.one_launch_candidates(quant_mm.MAX_M + 1, 256) == []
    x5 = torch.randn(5, 256, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    qa, sa = w8a8.quantize_act(x5)
    assert torch.equal(w8a8.w8a8_matmul(x5, qw, sw), w8a8.scaled_mm(qa, sa, qw, sw))
