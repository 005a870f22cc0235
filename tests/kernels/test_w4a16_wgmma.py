"""The swapped-operand tensor-core W4A16 kernel (w4a16_wgmma, M >= 64 on the GPU) against float64, through
Triton's interpreter: one group per block and several, sym and asym, split-K, bias, fp16 and bf16, odd M and N."""
from __future__ import annotations

import pytest
import torch

from hubquant_kernels import w4a16, w4a16_wgmma
from tests.kernels.test_w4a16 import _case


@pytest.mark.parametrize("m,n,k,gs,asym,dtype,cfg", [
    (20, 48, 256, 128, False, torch.bfloat16, {"bm": 16, "bn": 32, "bk": 64}),
    (33, 40, 256, 32, True, torch.float16, {"bm": 32, "bn": 32, "bk": 64}),  # 2 groups per block
    (37, 33, 512, 64, True, torch.bfloat16, {"bm": 16, "bn": 32, "bk": 64, "split_k": 2}),
    (5, 64, 256, -1, False, torch.bfloat16, {"bm": 16, "bn": 64, "bk": 64, "split_k": 2}),
])
@pytest.mark.parametrize("tma", [False, True])
def test_wgmma_matches_float64(m, n, k, gs, asym, dtype, cfg, tma):
    x, qw, s, z, b = _case(m, n, k, gs, asym, dtype, seed=m + n)
    gsz = k if gs == -1 else gs
    ref = x.double() @ w4a16.dequantize_reference(qw, s, z, gs).double() + b.double()
    for _ in range(2):  # twice: split-K must leave the workspace zeroed
        y = torch.full((m, n), float("nan"), dtype=dtype)
        w4a16_wgmma.wgmma(x, qw, s, z, b, y, gsz, warps=4, stages=2, tma=tma, **cfg)
        assert not torch.isnan(y).any()
        err = float((y.double() - ref).norm() / ref.norm())
        assert err < 1e-2, err


def test_identity_rows_give_the_weights():
    """x = I gives y = W: within one bf16 step of the reference's rounding (the interpreter rounds fp32 -> bf16
    toward zero, the GPU to nearest), and with the dequantized values' signs and zeros exactly."""
    k, n = 64, 32
    _, qw, s, z, _ = _case(64, n, k, 32, True, torch.bfloat16, seed=3)
    y = torch.empty(k, n, dtype=torch.bfloat16)
    w4a16_wgmma.wgmma(torch.eye(k, dtype=torch.bfloat16), qw, s, z, None, y, 32, bm=16, bn=32, bk=64, warps=4,
                      stages=2)
    ref = w4a16.dequantize_reference(qw, s, z, 32)
    assert torch.equal(y.float() == 0, ref == 0) and torch.equal(y.float().sign(), ref.sign())
    assert float(((y.float() - ref).abs() / ref.abs().clamp_min(1e-30)).max()) <= 2 ** -7


def test_fits_and_candidates():
    assert w4a16_wgmma.fits(4096, 128, 64) and w4a16_wgmma.fits(4096, 32, 128) and w4a16_wgmma.fits(4096, 4096, 128)
    assert not w4a16_wgmma.fits(4104, 8, 64)  # K not a multiple of the block
    assert not w4a16_wgmma.fits(4096, 128, 64, split=3)  # 64 blocks do not split 3 ways evenly
    assert not w4a16_wgmma.candidates(16, 4096, 4096, 128)
    names = [c.name for c in w4a16_wgmma.candidates(256, 4096, 4096, 128)]
    assert names and all(nm.startswith("wgmma_") and "_tma" not in nm for nm in names)
    assert not w4a16_wgmma.candidates(4096, 4096, 4096, 128)  # dequantize + cuBLAS is faster there
    assert any(c.name.startswith("wgmma_") for c in w4a16.candidates(64, 4096, 4096, 128))
    with pytest.raises(ValueError):
        w4a16_wgmma.wgmma(torch.zeros(2, 96, dtype=torch.bfloat16), torch.zeros(12, 8, dtype=torch.int32),
                          torch.ones(1, 8, dtype=torch.bfloat16), None, None, torch.empty(2, 8), 96, bm=16, bn=8,
                          bk=64)
