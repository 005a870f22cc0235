"""The tensor-core W4A16 kernel (B + u codes, zero point and scale after each block) against float64.

Under TRITON_INTERPRET=1 the plain-Triton code construction runs (the PTX one is checked on the GPU by
bench/kernels/sweep_w4.py); both produce the same 16-bit codes.
"""
from __future__ import annotations

import pytest
import torch

from hubquant_kernels import w4a16, w4a16_tc

from .test_w4a16 import _case


@pytest.mark.parametrize("m,n,k,gs,asym,dtype", [
    (1, 72, 512, 128, False, torch.bfloat16),   # one group per block: the dot runs on exact codes
    (3, 40, 1024, -1, True, torch.float16),     # one group over K, asymmetric, fp16 codes (1024 + u)
    (5, 136, 512, 32, True, torch.bfloat16),    # groups smaller than the block: per-weight dequantization
    (17, 64, 256, 64, False, torch.float16),    # M past one 16-row tile
])
@pytest.mark.parametrize("swap,prefetch", [(False, False), (True, False), (False, True)])
def test_tc_matches_float64(m, n, k, gs, asym, dtype, swap, prefetch):
    x, qw, s, z, b = _case(m, n, k, gs, asym, dtype, seed=m + n + k)
    gsz = k if gs == -1 else gs
    exact = x.double() @ w4a16.dequantize_reference(qw, s, z, gs).double() + b.double()
    bm = 16 if m <= 16 else 32
    for split in (1, 2):
        y = w4a16_tc.tc(x, qw, s, z, b, torch.full((m, n), float("nan"), dtype=dtype), gsz, bm=bm,
                        bn=32 if n < 64 else 64, bk=128, split_k=split, swap=swap, prefetch=prefetch)
        y2 = w4a16_tc.tc(x, qw, s, z, b, torch.full((m, n), float("nan"), dtype=dtype), gsz, bm=bm,
                         bn=32 if n < 64 else 64, bk=128, split_k=split, swap=swap, prefetch=prefetch)
        err = float((y.double() - exact).norm() / exact.norm())
        assert not torch.isnan(y).any() and err < 6e-3, (split, err)
        assert torch.equal(y, y2)  # split-K left its workspace zeroed


def test_tc_candidates_fill_the_chip_and_respect_groups():
    names = [c.name for c in w4a16_tc.candidates(16, 8192, 8192, 128)]
    assert names and all(nm.startswith(("tc_16x", "tcT_16x")) for nm in names)
    assert w4a16_tc.candidates(65, 8192, 8192, 128) == []
    # offered beside the other kernels for M = 2..16 only
    assert any(c.name.startswith("tc") for c in w4a16.candidates(8, 4096, 4096, 128))
    assert not any(c.name.startswith("tc") for c in w4a16.candidates(1, 4096, 4096, 128))


def test_sweep_splits_fill_the_chip(monkeypatch):
    # 4096x4096 at M=16, BN=128: 32 tiles, so only splits giving 132..1056 programs are swept
    assert w4a16_tc.filling_splits(16, 4096, 4096, 16, 128, 128) == (6, 8, 12, 16)
    assert w4a16_tc.filling_splits(16, 28672, 4096, 16, 128, 128) == (1, 2, 3, 4)
    names = [c.name for c in w4a16_tc.sweep_candidates(16, 4096, 4096, 128)]
    assert "tc_16x128x128_s8_w4_p" in names and "tc_16x128x128_s8_w4" in names
    monkeypatch.setenv("HUBQUANT_W4_SWEEP", "1")
    assert {c.name for c in w4a16.candidates(16, 4096, 4096, 128)} >= set(names)
