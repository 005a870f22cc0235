"""The small-M W4A16 kernels under the Triton interpreter: the rotated-code GEMV (w4a16_gemv3) and the tensor-core
GEMV (w4a16_mmv: its inline PTX runs on NVIDIA GPUs only; here its MMAs are emulated across lanes in plain Triton,
so the layout, grouping, split-K and stores are checked; bench/kernels/sweep_gemv3.py checks the PTX on the GPU)."""
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


@pytest.mark.parametrize("m,n,k,gs,asym,dtype,wn,wk,split,pf,slice_n", [
    (1, 64, 512, 128, False, torch.bfloat16, 2, 1, 1, 2, 0),
    (3, 128, 512, -1, True, torch.float16, 1, 2, 2, False, 0),
    (8, 64, 768, 256, True, torch.bfloat16, 1, 1, 3, True, 32),  # column slice of a wider weight (fused layers)
    (9, 64, 1024, 128, False, torch.bfloat16, 1, 4, 1, True, 0),  # two B tiles; 4 warps share K
    (16, 32, 1024, 128, True, torch.float16, 1, 2, 2, 2, 0),
    (2, 64, 1024, 256, False, torch.bfloat16, 2, 2, 1, False, 0),
    (27, 64, 512, 128, True, torch.bfloat16, 2, 2, 1, True, 0),  # two launches of 16 and 11 rows
])
def test_mmv_kernel_matches_float64(m, n, k, gs, asym, dtype, wn, wk, split, pf, slice_n):
    """The kernel itself (its two MMAs per tile emulated across lanes under the interpreter) on the stored layout:
    output poisoned with NaN, split-K run twice (the workspace must come back zeroed)."""
    wide = n + slice_n
    _, qw, s, z, x, _ = _case(m, wide, k, gs, asym, dtype, seed=m * k + n)
    b = torch.randn(n, generator=torch.Generator().manual_seed(5)).to(dtype)
    qw, s = qw[:, :n], s[:, :n]
    z = z[:, :n] if z is not None else None
    gsz = k if gs == -1 else gs
    exact = x.double() @ w4a16.dequantize_reference(qw, s, z, gs).double() + b.double()
    for _ in range(2):
        y = torch.full((m, n), float("nan"), dtype=dtype)
        w4a16_mmv.mmv(x, qw, s, z, b, y, gsz, wn=wn, wk=wk, split_k=split, prefetch=pf)
        assert not torch.isnan(y).any()
        err = float((y.double() - exact).norm() / exact.norm())
        assert err < (5e-3 if dtype == torch.bfloat16 else 1e-3), err  # the output's own rounding, no more


def test_mmv_sums_each_output_from_its_own_codes():
    """One-hot activations and weights: every output must pick exactly its own code (catches swapped fragments)."""
    k, n = 256, 64
    u = torch.randint(0, 16, (k, n), generator=torch.Generator().manual_seed(3))
    qw = pack.pack_kn(u)
    s = torch.ones(k // 128, n, dtype=torch.bfloat16)
    for m, row, col in ((1, 0, 37), (11, 10, 200), (16, 15, 129)):
        x = torch.zeros(m, k, dtype=torch.bfloat16)
        x[row, col] = 1.0
        y = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
        w4a16_mmv.mmv(x, qw, s, None, None, y, 128, wn=2, wk=1, split_k=2)
        want = torch.zeros(m, n)
        want[row] = u[col].float() - 8.0
        assert torch.equal(y.float(), want)


@pytest.mark.parametrize("m,gs,asym,dtype", [(2, 128, False, torch.bfloat16), (5, 256, True, torch.float16),
                                             (16, -1, True, torch.bfloat16)])
def test_mmv_candidates_through_the_entry_point(m, gs, asym, dtype, monkeypatch):
    n, k = 64, 512
    gsz = k if gs == -1 else gs
    monkeypatch.setenv("HUBQUANT_MMV", "0")
    assert w4a16_mmv.candidates(m, n, k, gsz) == []  # HUBQUANT_MMV=0 leaves them out
    monkeypatch.delenv("HUBQUANT_MMV")
    _, qw, s, z, x, b = _case(m, n, k, gs, asym, dtype, seed=m)
    exact = x.double() @ w4a16.dequantize_reference(qw, s, z, gs).double() + b.double()
    names = [c.name for c in w4a16_mmv.candidates(m, n, k, gsz)]
    assert names and all(nm.startswith("mmv_") for nm in names)
    assert any(c.name == names[0] for c in w4a16.candidates(m, n, k, gsz))  # offered by default
    y = w4a16.w4a16_matmul(x, qw, s, z, gs, b, impl=names[0])
    assert float((y.double() - exact).norm() / exact.norm()) < 5e-3


def test_mmv_not_offered_at_m1_beside_the_fma_gemvs():
    """At M=1 the FMA GEMVs win every measured shape: the default set leaves the MMA GEMV out there."""
    assert w4a16_mmv.candidates(1, 64, 512, 128)  # it can run M=1 (benchmarks time it)
    names = [c.name for c in w4a16.candidates(1, 64, 512, 128)]
    assert names and not any(nm.startswith("mmv_") for nm in names)
    assert any(nm.startswith("mmv_") for nm in (c.name for c in w4a16.candidates(2, 64, 512, 128)))


def test_mmv_declines_what_it_cannot_do():
    assert w4a16_mmv.candidates(33, 64, 512, 128) == []  # M > 32
    assert w4a16_mmv.candidates(1, 80, 512, 128) == []  # N % 32
    assert w4a16_mmv.candidates(1, 64, 512, 64) == []  # groups of 64
    assert w4a16_mmv.candidates(1, 64, 448, 448) == []  # K % 128
    _, qw, s, _, x, _ = _case(1, 80, 512, 128, False, torch.bfloat16, seed=1)
    with pytest.raises(UnsupportedError):
        w4a16_mmv.mmv(x, qw, s, None, None, torch.empty(1, 80, dtype=torch.bfloat16), 128)
