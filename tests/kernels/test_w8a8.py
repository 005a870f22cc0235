"""W8A8 int8 and FP8: fused per-token activation quantization and the scaled GEMM (Triton interpreter)."""
from __future__ import annotations

import pytest
import torch

from hubquant.errors import UnsupportedError, UsageError
from hubquant_kernels import fp8, w8a8


def _x(m, k, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4  # rows of different ranges
    return x.to(dtype)


@pytest.mark.parametrize("m,k", [(1, 512), (7, 1000), (33, 256)])
def test_int8_act_quant_bit_exact(m, k):
    x = _x(m, k, seed=m)
    q, s = w8a8.quantize_act(x)
    qr, sr = w8a8.quantize_act_reference(x)
    assert torch.equal(q, qr) and torch.equal(s, sr)
    assert int(q.to(torch.int32).abs().max()) >= 127  # the largest value of each row reaches the top code


@pytest.mark.parametrize("m,k", [(1, 512), (7, 1000)])
def test_fp8_act_quant_reconstructs(m, k):
    """Scales are bit-exact. The CPU interpreter's float->fp8 cast is not round-to-nearest-even (on the GPU
    the benchmark finds the codes identical to torch's), so here the codes are checked by reconstruction."""
    x = _x(m, k, seed=m + 1)
    q, s = w8a8.quantize_act(x, fp8=True)
    qr, sr = w8a8.quantize_act_reference(x, fp8=True)
    assert torch.equal(s, sr)
    err = float((q.float() * s[:, None] - x.float()).norm() / x.float().norm())
    ref_err = float((qr.float() * sr[:, None] - x.float()).norm() / x.float().norm())
    assert ref_err < 0.04 and err < 0.08


def test_static_activation_scale():
    x = _x(5, 256, seed=2)
    st = torch.tensor([0.02])
    q, s = w8a8.quantize_act(x, static_scale=st)
    qr, _ = w8a8.quantize_act_reference(x, static_scale=st)
    assert torch.equal(q, qr) and bool((s == 0.02).all())


@pytest.mark.parametrize("m,n,k", [(1, 72, 512), (5, 40, 1024), (40, 33, 256)])
@pytest.mark.parametrize("is_fp8", [False, True])
def test_scaled_mm_candidates(m, n, k, is_fp8):
    g = torch.Generator().manual_seed(m * n + is_fp8)
    x = _x(m, k, seed=n)
    qa, sa = w8a8.quantize_act_reference(x, fp8=is_fp8)
    if is_fp8:
        qw, sw = fp8.quantize_weight_fp8(torch.randn(n, k, generator=g) * 0.05)
    else:
        qw = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        sw = torch.rand(n, generator=g) * 0.01
    b = torch.randn(n, generator=g).to(torch.bfloat16)
    exact = w8a8.scaled_mm_reference(qa, sa, qw, sw, b, torch.float64)
    names = [c.name for c in w8a8.mm_candidates(m, n, k, is_fp8, torch.bfloat16) if c.name.startswith("triton")]
    picked = [names[0]] + [nm for nm in names if "_s1_" not in nm][:1]
    outs = []
    for name in picked:
        y = w8a8.scaled_mm(qa, sa, qw, sw, b, out_dtype=torch.bfloat16, impl=name)
        y2 = w8a8.scaled_mm(qa, sa, qw, sw, b, out_dtype=torch.bfloat16, impl=name)
        assert float((y.double() - exact).norm() / exact.norm()) < 5e-3, name
        assert torch.equal(y, y2), name
        outs.append(y)
    if not is_fp8:  # int8 split-K sums int32 partials and scales once: the unsplit kernel's output bit for bit
        assert all(torch.equal(o, outs[0]) for o in outs), picked


def test_end_to_end_matmul_and_errors():
    g = torch.Generator().manual_seed(5)
    x = _x(3, 256, seed=7).reshape(1, 3, 256)
    qw = torch.randint(-128, 128, (48, 256), generator=g, dtype=torch.int8)
    sw = torch.rand(48, 1, generator=g) * 0.01
    y = w8a8.w8a8_matmul(x, qw, sw)
    ref = w8a8.w8a8_reference(x.reshape(3, 256), qw, sw.reshape(48))
    assert y.shape == (1, 3, 48)
    assert float((y.reshape(3, 48).double() - ref.double()).norm() / ref.double().norm()) < 5e-3
    fw, fs = fp8.quantize_weight_fp8(torch.randn(48, 256, generator=g) * 0.05)
    yf = fp8.fp8_matmul(x, fw, fs)
    rf = fp8.fp8_reference(x.reshape(3, 256), fw, fs)
    # loose: the interpreter's fp8 cast of the activations differs from torch's (see above)
    assert float((yf.reshape(3, 48).double() - rf.double()).norm() / rf.double().norm()) < 0.1
    with pytest.raises(UnsupportedError):
        w8a8.w8a8_matmul(x, fw, fs)  # fp8 weights through the int8 entry point
    with pytest.raises(UsageError, match="w_scale"):
        w8a8.w8a8_matmul(x, qw, sw[:10])
    with pytest.raises(UsageError, match="one value"):
        w8a8.w8a8_matmul(x, qw, sw, static_scale=torch.ones(3))


# ---------------------------------------------------------------- the row-tile quantization kernel, every config
@pytest.mark.parametrize("m,k", [(5, 256), (3, 1000), (6, 2100), (2, 5000)])
def test_act_quant_every_config_bit_exact(m, k):
    """One-pass tiles and two-pass chunked kernels (row and column tails) give the reference's codes and scales."""
    x = _x(m, k, seed=k)
    qr, sr = w8a8.quantize_act_reference(x)
    names = [c.name for c in w8a8.act_quant_candidates(m, k, False)]
    assert names[-1] == "row_v1" and (k <= 1024 or any("_bk" in nm for nm in names))
    names += [c.name for c in w8a8.act_quant_candidates(m, k, False, div=0)]  # IEEE division in the same tiles
    for name in names:
        q, s = w8a8.quantize_act(x, impl=name)
        assert torch.equal(q, qr) and torch.equal(s, sr), name
    st = torch.tensor([0.015])
    qs, _ = w8a8.quantize_act_reference(x, static_scale=st)
    for name in names:
        q, s = w8a8.quantize_act(x, static_scale=st, impl=name)
        assert torch.equal(q, qs) and bool((s == st).all()), name
    for name in names[:-1]:  # fp8: scales exact, codes checked by reconstruction (see above)
        q, s = w8a8.quantize_act(x, fp8=True, impl=name)
        _, sr8 = w8a8.quantize_act_reference(x, fp8=True)
        assert torch.equal(s, sr8), name
        assert float((q.float() * s[:, None] - x.float()).norm() / x.float().norm()) < 0.08, name


def _near_tie(v: torch.Tensor) -> torch.Tensor:
    """Where v (fp32) lies within one ulp of a half-integer (a reciprocal multiply may round the other way)."""
    ulp = torch.nextafter(v.abs(), torch.tensor(float("inf"))) - v.abs()
    return ((v - torch.floor(v) - 0.5).abs() <= 2 * ulp)


def _tie_input(m, k, seed):
    """fp32 activations with every 7th value placed on a rounding tie (q + 0.5) * s of its row's scale."""
    x = _x(m, k, seed=seed, dtype=torch.float32)
    qr, sr = w8a8.quantize_act_reference(x)
    x[:, 1::7] = (qr[:, 1::7].float().clamp(-126, 126) + 0.5) * sr[:, None]
    return x


@pytest.mark.parametrize("m,k", [(4, 512), (3, 2100)])
def test_act_quant_division_free_codes_exact_at_ties(m, k):
    """The default arithmetic (reciprocal + two corrections) gives x / s's codes even on ties, where a bare
    reciprocal multiply (``_rcp``) does differ; rows with a subnormal scale take the division branch."""
    ties = _tie_input(m, k, seed=3 * k)
    x = torch.cat([ties, ties[:1] * 1e-38])  # + a row whose scale is subnormal (1/s would overflow)
    qr, sr = w8a8.quantize_act_reference(x)
    assert 0 < float(sr[-1]) < 1e-38
    for c in w8a8.act_quant_candidates(m + 1, k, False)[:-1]:
        q, s = w8a8.quantize_act(x, impl=c.name)
        assert torch.equal(q, qr) and torch.equal(s, sr), c.name
    rcp_differs = []
    for c in w8a8.act_quant_candidates(m, k, False, div=2):
        q, s = w8a8.quantize_act(ties, impl=c.name)
        assert c.name.endswith("_rcp") and torch.equal(s, sr[:-1])
        rcp_differs.append(bool((q != qr[:-1]).any()))
    assert all(rcp_differs)  # so the exactness above is not vacuous


@pytest.mark.parametrize("m,k", [(4, 512), (3, 2100)])
def test_act_quant_reciprocal_variant(m, k):
    """x * (1/s): scales exact; codes differ from x / s by at most one step, and only next to a tie."""
    x = _tie_input(m, k, seed=3 * k)
    qr, sr = w8a8.quantize_act_reference(x)
    v = x / sr[:, None]
    for c in w8a8.act_quant_candidates(m, k, False, div=2):
        q, s = w8a8.quantize_act(x, impl=c.name)
        assert c.name.endswith("_rcp") and torch.equal(s, sr)
        d = (q.int() - qr.int()).abs()
        assert int(d.max()) == 1, c.name  # some codes differ (the test bites), by one step at most
        assert bool(_near_tie(v)[d > 0].all()), c.name


@pytest.mark.parametrize("with_bias", [False, True])
def test_cublas_int8_single_epilogue(with_bias):
    """torch._int_mm + the one-pass epilogue equals the four torch passes it replaces, bit for bit in fp32."""
    g = torch.Generator().manual_seed(11)
    m, n, k = 40, 72, 256
    qa, sa = w8a8.quantize_act_reference(_x(m, k, seed=9))
    qw = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    sw = torch.rand(n, generator=g) * 0.01
    b = torch.randn(n, generator=g) if with_bias else None
    y = w8a8._cublas_int8(qa, sa, qw, sw, b, torch.full((m, n), float("nan")))
    acc = torch._int_mm(qa, qw.t())
    ref = acc.float() * sa[:, None] * sw[None, :]
    if b is not None:
        ref = ref + b
    assert torch.equal(y, ref)
    exact = w8a8.scaled_mm_reference(qa, sa, qw, sw, b, torch.float64)
    assert float((y.double() - exact).norm() / exact.norm()) < 1e-6
    assert "cublas_int_mm" in [c.name for c in w8a8.mm_candidates(m, n, k, False, torch.bfloat16)]


def test_cublas_fp8_output_reaches_every_caller():
    # the cuBLAS FP8 candidate returns its own tensor (no out=, no copy): the entry point and the bound layer op
    # must return that tensor's values, not the unwritten y they allocated
    from hubquant_kernels import bound

    g = torch.Generator().manual_seed(9)
    x = _x(32, 128, seed=9)
    qa, sa = w8a8.quantize_act_reference(x, fp8=True)
    qw, sw = fp8.quantize_weight_fp8(torch.randn(48, 128, generator=g) * 0.05)
    y = torch.full((32, 48), float("nan"), dtype=torch.bfloat16)
    try:
        out = w8a8._cublas_fp8(qa, sa, qw, sw, None, y)
    except RuntimeError as e:  # a torch without a CPU _scaled_mm
        pytest.skip(f"torch._scaled_mm on CPU: {e}")
    exact = w8a8.scaled_mm_reference(qa, sa, qw, sw, None, torch.float64)
    assert float((out.double() - exact).norm() / exact.norm()) < 1e-2
    assert torch.equal(w8a8.scaled_mm(qa, sa, qw, sw, impl="cublas_scaled_mm"), out)
    # a bound op whose run returns a new tensor hands that tensor back (no plan)
    op = bound.Bound(128, 48, lambda x2, yy: out.clone(), (qw, sw))
    assert torch.equal(op(x), out) and op.plans() == 0


def test_fp8_candidates_under_deterministic_algorithms():
    # split-K atomics and cuBLAS's per-shape algorithms change FP8's fp32 sums between a fused q/k/v and its parts;
    # under torch.use_deterministic_algorithms only unsplit Triton kernels with one K block remain
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for m in (1, 40, 300, 4096):
            names = [c.name for c in w8a8.mm_candidates(m, 4096, 4096, True, torch.bfloat16)]
            assert names and all(n.startswith("triton_") and "x128_s1_" in n for n in names), (m, names)
        lin = [c.name for c in w8a8.linear_candidates(1, 4096, deterministic=True)]
        assert all("_s1_" in n for n in lin[:-1]) and lin[-1] == "two_launch"
        assert w8a8._det(True) == ("deterministic",) and w8a8._det(False) == ()
        # int8 keeps every candidate (int32 sums are exact in any order)
        assert any("_s2_" in c.name for c in w8a8.mm_candidates(1, 4096, 4096, False, torch.bfloat16))
    finally:
        torch.use_deterministic_algorithms(before)
