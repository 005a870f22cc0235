"""The whole-tile tensor-core W4A16 kernel (w4a16_mma) against float64: one group per block and several, sym and
asym, split-K, bias, fp16 and bf16, odd M and N."""
from __future__ import annotations

import pytest
import torch

from hubquant_kernels import w4a16, w4a16_mma
from tests.kernels.test_w4a16 import _case


@pytest.mark.parametrize("m,n,k,gs,asym,dtype,cfg", [
    (20, 48, 512, 128, False, torch.bfloat16, {"bm": 16, "bn": 32, "bk": 64}),
    (33, 40, 256, 32, True, torch.float16, {"bm": 32, "bn": 32, "bk": 64}),  # 2 groups per block
    (70, 33, 512, 128, True, torch.bfloat16, {"bm": 32, "bn": 32, "bk": 64, "split_k": 2}),
    (5, 64, 256, -1, False, torch.bfloat16, {"bm": 16, "bn": 64, "bk": 64, "split_k": 2}),
])
@pytest.mark.parametrize("join,prefetch", [(True, False), (False, False), (True, True)])
def test_mma_matches_float64(m, n, k, gs, asym, dtype, cfg, join, prefetch):
    x, qw, s, z, b = _case(m, n, k, gs, asym, dtype, seed=m + n)
    gsz = k if gs == -1 else gs
    ref = x.double() @ w4a16.dequantize_reference(qw, s, z, gs).double() + b.double()
    for _ in range(2):  # twice: split-K must leave the workspace zeroed
        y = torch.full((m, n), float("nan"), dtype=dtype)
        w4a16_mma.mma(x, qw, s, z, b, y, gsz, warps=4, stages=2, join=join, prefetch=prefetch, **cfg)
        assert not torch.isnan(y).any()
        err = float((y.double() - ref).norm() / ref.norm())
        assert err < 1e-2, err


def test_offered_by_the_chooser_from_m2():
    assert not w4a16_mma.candidates(1, 4096, 4096, 128)
    names = [c.name for c in w4a16.candidates(4096, 4096, 4096, 128)]
    assert any(n.startswith("mma_") for n in names) and "dequant+cublas" in names
    assert not any(n.startswith("mm_") for n in names)  # the narrow-dot tiles are gone at large M
    assert any(n.startswith("mma_16x") for n in (c.name for c in w4a16.candidates(16, 4096, 4096, 128)))
