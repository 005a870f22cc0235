"""W4A16 kernels (GEMV, tiled with and without split-K, dequant + matmul) against float64 and the torch reference."""
from __future__ import annotations

import pytest
import torch

from hubquant.errors import UnsupportedError, UsageError
from hubquant_kernels import pack, w4a16


def _case(m, n, k, gs, asym, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    gsz = k if gs == -1 else gs
    qw = pack.pack_kn(torch.randint(0, 16, (k, n), generator=g))
    s = (torch.rand(k // gsz, n, generator=g) * 0.02 + 1e-3).to(dtype)
    z = torch.randint(0, 16, (k // gsz, n), generator=g).to(torch.uint8) if asym else None
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    return x, qw, s, z, b


def _pick(cands):
    """A few of each family (the interpreter is slow): plain and split GEMV, plain and split tiled, dequant."""
    picked, seen = [], set()
    for c in cands:
        fam = c.name.split("_")[0] + ("" if "_s1_" in c.name or "+" in c.name else "_split")
        if fam not in seen:
            seen.add(fam)
            picked.append(c)
    return picked


CASES = [  # m, n, k, group, asym, dtype
    (1, 72, 512, 32, False, torch.bfloat16),
    (1, 40, 1024, 128, True, torch.float16),
    (3, 24, 768, 64, True, torch.bfloat16),
    (5, 136, 1024, -1, False, torch.bfloat16),
    (20, 48, 512, 128, False, torch.float16),
    (70, 33, 256, 64, True, torch.bfloat16),
]


@pytest.mark.parametrize("m,n,k,gs,asym,dtype", CASES)
def test_w4a16_candidates_match_reference(m, n, k, gs, asym, dtype):
    x, qw, s, z, b = _case(m, n, k, gs, asym, dtype, seed=m * 1000 + n)
    exact = x.double() @ w4a16.dequantize_reference(qw, s, z, gs).double() + b.double()
    ref = w4a16.w4a16_reference(x, qw, s, z, gs, b)
    gsz = k if gs == -1 else gs
    cands = _pick(w4a16.candidates(m, n, k, gsz))
    assert len(cands) >= 2
    for c in cands:
        y1 = w4a16.w4a16_matmul(x, qw, s, z, gs, b, impl=c.name)
        y2 = w4a16.w4a16_matmul(x, qw, s, z, gs, b, impl=c.name)  # split-K must leave its workspace zeroed
        assert y1.dtype == dtype and y1.shape == (m, n)
        err = float((y1.double() - exact).norm() / exact.norm())
        assert err < 1e-2, (c.name, err)
        assert float((y1.double() - ref.double()).norm() / ref.double().norm()) < 1e-2, c.name
        assert torch.equal(y1, y2), c.name


def test_dequantize_matches_hubquant_quant():
    """The kernel layout dequantizes to exactly what hubquant.quant computes from signed codes."""
    from hubquant.quant import dequantize

    g = torch.Generator().manual_seed(3)
    q = torch.randint(-8, 8, (24, 128), generator=g, dtype=torch.int8)  # [N, K]
    zp = torch.randint(-8, 8, (24, 2), generator=g, dtype=torch.int8)
    s = torch.rand(24, 2, generator=g).to(torch.bfloat16)
    qw = pack.ct_to_kernel_layout(pack.pack_rows(q), 128)
    w = w4a16.dequantize_reference(qw, s.t().contiguous(), (zp.to(torch.int32) + 8).t().contiguous(), 64)
    assert torch.equal(w.t(), dequantize(q, s, zp, 64))
    w_tr = w4a16.w4a16_dequantize(qw, s.t().contiguous(), (zp.to(torch.int32) + 8).t().contiguous().to(torch.uint8),
                                  64, torch.float32)
    assert torch.equal(w_tr, w)


def test_leading_dims_and_default_choice():
    x, qw, s, z, b = _case(6, 40, 256, 64, False, torch.bfloat16, seed=9)
    y = w4a16.w4a16_matmul(x.reshape(2, 3, 256), qw, s, z, 64, b)
    assert y.shape == (2, 3, 40)
    ref = w4a16.w4a16_reference(x, qw, s, z, 64, b)
    assert float((y.reshape(6, 40).double() - ref.double()).norm() / ref.double().norm()) < 1e-2


def test_wrapper_errors():
    x, qw, s, z, _ = _case(2, 40, 256, 64, False, torch.bfloat16, seed=4)
    with pytest.raises(UnsupportedError, match="dtype"):
        w4a16.w4a16_matmul(x.float(), qw, s, z, 64)
    with pytest.raises(UsageError, match="features"):
        w4a16.w4a16_matmul(x[:, :128], qw, s, z, 64)
    with pytest.raises(UsageError, match="scales have shape"):
        w4a16.w4a16_matmul(x, qw, s[:2], z, 64)
    with pytest.raises(UnsupportedError, match="group size"):
        w4a16.w4a16_matmul(x, qw, torch.ones(32, 40, dtype=torch.bfloat16), None, 8)
    with pytest.raises(UsageError, match="no W4A16 implementation"):
        w4a16.w4a16_matmul(x, qw, s, z, 64, impl="nope")


@pytest.mark.parametrize("m,n,k,gs,asym,dtype", [
    (1, 300, 1024, 128, False, torch.bfloat16),  # one group per K block (scale after the block)
    (1, 136, 512, 32, True, torch.float16),  # several groups per block (per-row scales)
    (1, 72, 768, -1, True, torch.bfloat16),  # one group over K; K not a multiple of the block
])
def test_gemv2_every_config_matches_float64(m, n, k, gs, asym, dtype):
    """The mantissa-code GEMV (1 + u/16 codes, zero point folded into a per-row sum of x) in every block shape."""
    from hubquant_kernels import w4a16_gemv

    x, qw, s, z, b = _case(m, n, k, gs, asym, dtype, seed=n + k)
    exact = x.double() @ w4a16.dequantize_reference(qw, s, z, gs).double() + b.double()
    gsz = k if gs == -1 else gs
    cands = w4a16_gemv.candidates(m, n, k, gsz)
    names = {c.name for c in cands}
    assert {f"gemv2_bn{bn}_bk{bk}_s1_w{w}" for bn, bk, w in w4a16_gemv.CONFIGS} <= names
    for c in cands:
        if "_s1_" not in c.name and "_s2_" not in c.name and "_s16_" not in c.name:
            continue  # the interpreter is slow: no split, a small and the largest split
        y = torch.full((m, n), float("nan"), dtype=dtype)
        y = c.fn(x, qw, s, z, b, y, gsz)
        y2 = c.fn(x, qw, s, z, b, torch.full_like(y, float("nan")), gsz)
        err = float((y.double() - exact).norm() / exact.norm())
        assert not torch.isnan(y).any() and err < 4e-3, (c.name, err)
        assert torch.equal(y, y2), c.name  # split-K left its workspace zeroed
    # the kernel itself takes any M (one program row per token); the chooser offers it at M=1 only
    x3 = torch.cat([x, x.flip(1), -x])
    y3 = w4a16_gemv.gemv2(x3, qw, s, z, b, torch.empty(3 * m, n, dtype=dtype), gsz, bn=64, bk=256, split_k=2)
    exact3 = x3.double() @ w4a16.dequantize_reference(qw, s, z, gs).double() + b.double()
    assert float((y3.double() - exact3).norm() / exact3.norm()) < 4e-3
    assert w4a16_gemv.candidates(2, n, k, gsz) == []


def test_gemv2_codes_are_exact():
    """Every nibble position of every code decodes to exactly 1 + u/16 (including the sign nibble 7)."""
    from hubquant_kernels import w4a16_gemv

    u = torch.arange(16).repeat_interleave(8).reshape(16, 8)  # [words, nibbles]: every value at every position
    u = torch.cat([u, torch.randint(0, 16, (16, 8), generator=torch.Generator().manual_seed(0))])
    words = (u.to(torch.int64) << (4 * torch.arange(8))).sum(1)
    pw = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    out = torch.empty(8, 32, dtype=torch.float32)
    w4a16_gemv._decode_codes_kernel[(1,)](pw, out, 32)
    assert torch.equal(out, (1 + u.t().float() / 16))


@pytest.mark.parametrize("gs,asym,dtype", [(128, False, torch.bfloat16), (64, True, torch.float16)])
def test_gemv2_mask_free_paths_and_prefetch_depth(gs, asym, dtype):
    """Shapes that divide (no masks): one or two blocks in flight, every split, including splits of 1-2 blocks."""
    from hubquant_kernels import w4a16_gemv

    m, n, k = 1, 128, 2048
    x, qw, s, z, b = _case(m, n, k, gs, asym, dtype, seed=gs)
    exact = x.double() @ w4a16.dequantize_reference(qw, s, z, gs).double() + b.double()
    for split, depth, bk in [(1, 1, 256), (1, 2, 256), (2, 2, 256), (4, 2, 256), (8, 2, 256), (4, 1, 128), (3, 2, 128),
                              (6, 2, 128), (6, 1, 256), (12, 1, 128)]:
        y = w4a16_gemv.gemv2(x, qw, s, z, b, torch.full((m, n), float("nan"), dtype=dtype), gs, bn=64, bk=bk,
                             split_k=split, depth=depth)
        err = float((y.double() - exact).norm() / exact.norm())
        assert not torch.isnan(y).any() and err < 4e-3, (split, depth, bk, err)


def test_gemv2_offers_two_blocks_in_flight_where_blocks_allow():
    from hubquant_kernels import w4a16_gemv

    names = [c.name for c in w4a16_gemv.candidates(1, 8192, 8192, 128)]
    assert any(nm.endswith("_d2") for nm in names) and any(not nm.endswith("_d2") for nm in names)
    assert all(nm.startswith("gemv2_") for nm in names)


def test_column_views_of_a_fused_weight():
    """Parts of a fused q/k/v weight are column views (rows longer than N): every kernel family reads them right."""
    m, k, gs = 3, 512, 64
    g = torch.Generator().manual_seed(11)
    widths = (64, 32, 32)
    qw = pack.pack_kn(torch.randint(0, 16, (k, sum(widths)), generator=g))
    s = (torch.rand(k // gs, sum(widths), generator=g) * 0.02 + 1e-3).to(torch.bfloat16)
    z = torch.randint(0, 16, (k // gs, sum(widths)), generator=g).to(torch.uint8)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    lo = widths[0]
    view = (qw[:, lo:lo + 32], s[:, lo:lo + 32], z[:, lo:lo + 32])
    assert not view[0].is_contiguous()
    exact = x.double() @ w4a16.dequantize_reference(*(t.contiguous() for t in view), gs).double()
    for c in _pick(w4a16.candidates(m, 32, k, gs)):
        y = w4a16.w4a16_matmul(x, *view, gs, impl=c.name)
        assert float((y.double() - exact).norm() / exact.norm()) < 1e-2, c.name
    y1 = w4a16.w4a16_matmul(x[:1], *view, gs)  # M=1: gemv2
    assert float((y1.double() - exact[:1]).norm() / exact[:1].norm()) < 1e-2
    with pytest.raises(UsageError, match="same row stride"):
        w4a16.w4a16_matmul(x, view[0], view[1], view[2].contiguous(), gs)
