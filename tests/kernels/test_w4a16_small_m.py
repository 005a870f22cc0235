"""The small-M W4A16 kernels: the rotated-code GEMV (w4a16_gemv3, Triton interpreter) and the tensor-core GEMV's
shuffled layout (w4a16_mmv: its inline PTX runs on NVIDIA GPUs only, so the CPU checks the layout and the
portable path; bench/kernels/sweep_gemv3.py checks the kernel on the GPU)."""
from __future__ import annotations

import pytest
import torch

from hubquant.errors import UnsupportedError
from hubquant_kernels import pack, w4a16, w4a16_gemv3, w4a16_mmv


def _case(m, n, k, gs, asym, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    gsz = k if gs == -1 else gs
    u = torch.randint(0, 16, (k, n), generator=g)
    s = (torch.rand(k // gsz, n, generator=g) * 0.02 + 1e-3).to(dtype)
    z = torch.randint(0, 16, (k // gsz, n), generator=g).to(torch.uint8) if asym else None
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    return u, pack.pack_kn(u), s, z, x, b


@pytest.mark.parametrize("cfg", [dict(bn=32, bk=128, split_k=1, stages=1), dict(bn=16, bk=64, split_k=3, stages=3),
                                 dict(bn=16, bk=128, split_k=2, stages=2, nt=2), dict(bn=32, bk=64, split_k=2, bm=4)])
@pytest.mark.parametrize("m,n,k,gs,asym,dtype", [(1, 72, 512, 32, False, torch.bfloat16),
                                                 (3, 40, 768, 128, True, torch.float16),
                                                 (1, 48, 512, -1, True, torch.bfloat16)])
def test_gemv3_matches_float64(cfg, m, n, k, gs, asym, dtype):
    _, qw, s, z, x, b = _case(m, n, k, gs, asym, dtype, seed=m + n + k)
    gsz = k if gs == -1 else gs
    exact = x.double() @ w4a16.dequantize_reference(qw, s, z, gs).double() + b.double()
    y = torch.full((m, n), float("nan"), dtype=dtype)
    w4a16_gemv3.gemv3(x, qw, s, z, b, y, gsz, **cfg)
    err = float((y.double() - exact).norm() / exact.norm())
    assert err < (5e-3 if dtype == torch.bfloat16 else 1e-3), err  # the output's own rounding, no more


def test_gemv3_codes_are_exact():
    """The plain-Triton codes are 256 + u (even nibbles) and 16 + u (odd ones), as the PTX rotates give."""
    u = torch.arange(16).repeat(2)
    qw = pack.pack_kn(u.reshape(32, 1).repeat(1, 16)[:32])  # [4, 16]: every nibble value at every position
    s = torch.ones(1, 16)
    x = torch.zeros(1, 32, dtype=torch.float32).to(torch.bfloat16)
    x[0, 5] = 1.0  # picks nibble 5 of word 0 (odd): y = u - 8
    y = torch.empty(1, 16, dtype=torch.bfloat16)
    w4a16_gemv3.gemv3(x, qw, s, None, None, y, 32, bn=16, bk=32, split_k=1, stages=1)
    assert torch.equal(y.float(), torch.full((1, 16), 5.0 - 8.0))


def test_mmv_shuffle_layout():
    u, qw, *_ = _case(1, 48, 256, 64, False, torch.bfloat16, seed=4)
    qs = w4a16_mmv.shuffle(qw)
    assert qs.shape == (3, 4, 32, 4) and qs.dtype == torch.int32
    assert torch.equal(w4a16_mmv.unshuffle(qs), u.to(torch.int64))
    for t, c, lane, j in ((0, 0, 0, 0), (1, 2, 13, 3), (2, 3, 31, 1)):  # the documented nibble order
        w = int(qs[t, c, lane, j]) & 0xFFFFFFFF
        q, kk, n0 = lane % 4, 64 * c + 16 * (lane % 4) + 4 * j, 16 * t + lane // 4
        want = [(kk, n0), (kk, n0 + 8), (kk + 2, n0), (kk + 2, n0 + 8), (kk + 1, n0), (kk + 1, n0 + 8),
                (kk + 3, n0), (kk + 3, n0 + 8)]
        assert q == lane % 4
        assert [(w >> (4 * i)) & 0xF for i in range(8)] == [int(u[a, b]) for a, b in want]


@pytest.mark.parametrize("m,gs,asym,dtype", [(1, 128, False, torch.bfloat16), (5, 64, True, torch.float16),
                                             (8, -1, True, torch.bfloat16)])
def test_mmv_candidates_through_the_entry_point(m, gs, asym, dtype, monkeypatch):
    n, k = 64, 512
    assert w4a16_mmv.candidates(m, n, k, k if gs == -1 else gs) == []  # off by default (a shuffled copy each)
    monkeypatch.setenv("HUBQUANT_MMV", "1")
    _, qw, s, z, x, b = _case(m, n, k, gs, asym, dtype, seed=m)
    gsz = k if gs == -1 else gs
    exact = x.double() @ w4a16.dequantize_reference(qw, s, z, gs).double() + b.double()
    names = [c.name for c in w4a16_mmv.candidates(m, n, k, gsz)]
    assert names and all(nm.startswith("mmv_") for nm in names)
    y = w4a16.w4a16_matmul(x, qw, s, z, gs, b, impl=names[0])
    assert float((y.double() - exact).norm() / exact.norm()) < 5e-3
    assert w4a16_mmv.shuffled(qw) is w4a16_mmv.shuffled(qw)  # made once per weight tensor


def test_mmv_declines_what_it_cannot_do(monkeypatch):
    monkeypatch.setenv("HUBQUANT_MMV", "1")
    assert w4a16_mmv.candidates(9, 64, 512, 128) == []  # M > 8
    assert w4a16_mmv.candidates(1, 72, 512, 128) == []  # N % 16
    assert w4a16_mmv.candidates(1, 64, 512, 32) == []  # groups of 32
    _, qw, s, _, x, _ = _case(1, 72, 512, 128, False, torch.bfloat16, seed=1)
    with pytest.raises(UnsupportedError):
        w4a16_mmv.mmv(x, qw, s, None, None, torch.empty(1, 72, dtype=torch.bfloat16), 128)


def test_mmv_shuffled_copy_lives_as_long_as_its_weight():
    import gc

    _, qw, *_ = _case(1, 32, 128, 64, False, torch.bfloat16, seed=2)
    before = len(w4a16_mmv.held())
    qs = w4a16_mmv.shuffled(qw)
    assert len(w4a16_mmv.held()) == before + 1 and any(t is qs for t in w4a16_mmv.held())
    qw.add_(0)  # an in-place change makes a new copy
    assert w4a16_mmv.shuffled(qw) is not qs
    del qw
    gc.collect()
    assert len(w4a16_mmv.held()) == before
