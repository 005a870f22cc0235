"""FP4 weight-only kernels (NVFP4, MXFP4) against float64 and compressed-tensors' own packing and dequantization."""
from __future__ import annotations

import pytest
import torch

from hubquant.errors import UnsupportedError, UsageError
from hubquant_kernels import fp4


def _case(m, n, k, kind, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    if kind == "nvfp4":
        scale = (torch.rand(n, k // 16, generator=g) * 2 + 0.05).to(torch.float8_e4m3fn)
        gscale = torch.tensor([37.5])
    else:
        scale = torch.randint(120, 130, (n, k // 32), generator=g, dtype=torch.uint8)
        gscale = None
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    return x, packed, scale, gscale, b


def _rel(y, ref):
    return float((y.double() - ref).norm() / ref.norm())


def test_layout_matches_compressed_tensors():
    """Codes, nibble order and both scale conventions are compressed-tensors' (its packer and unpacker)."""
    helpers = pytest.importorskip("compressed_tensors.compressors.nvfp4.helpers")
    from compressed_tensors.compressors.mx_utils import decompress_mx_scale

    g = torch.Generator().manual_seed(0)
    vals = torch.tensor(fp4.E2M1_VALUES)[torch.randint(0, 8, (6, 64), generator=g)]
    vals = vals * torch.where(torch.rand(6, 64, generator=g) < 0.5, -1.0, 1.0)
    packed = helpers.pack_fp4_to_uint8(vals.to(torch.bfloat16))
    assert packed.shape == (6, 32) and packed.dtype == torch.uint8
    assert torch.equal(fp4.e2m1_to_float(fp4.unpack_codes(packed)), vals)
    assert torch.equal(helpers.unpack_fp4_from_uint8(packed, 6, 64).float(), vals)
    assert int(packed[0, 0]) & 0xF == int(fp4.unpack_codes(packed)[0, 0])  # even k in the low nibble
    e = torch.tensor([[100, 127, 130]], dtype=torch.uint8)
    assert torch.equal(fp4.block_scales(e, None, "mxfp4"), decompress_mx_scale(e).float())
    s8 = torch.tensor([[0.5, 448.0, 0.001953125]]).to(torch.float8_e4m3fn)  # the last one is subnormal
    assert torch.allclose(fp4.block_scales(s8, torch.tensor([2.0]), "nvfp4"), s8.float() / 2.0)


@pytest.mark.parametrize("kind", ["nvfp4", "mxfp4"])
def test_dequantize_matches_compressed_tensors_decompressor(kind):
    """W from fp4_dequantize_reference equals what compressed-tensors' decompressor gives for the same tensors."""
    mod = pytest.importorskip(f"compressed_tensors.compressors.{kind}.base")
    from compressed_tensors.quantization import preset_name_to_scheme

    _x, packed, scale, gscale, _ = _case(1, 8, 64, kind, 1)
    comp = mod.NVFP4PackedCompressor if kind == "nvfp4" else mod.MXFP4PackedCompressor
    scheme = preset_name_to_scheme("NVFP4A16" if kind == "nvfp4" else "MXFP4A16", ["Linear"])
    sd = {"weight_packed": packed, "weight_scale": scale}
    if gscale is not None:
        sd["weight_global_scale"] = gscale
    w = comp.decompress(sd, scheme)["weight"].float()
    assert torch.allclose(w, fp4.fp4_dequantize_reference(packed, scale, gscale, kind), rtol=1e-2, atol=0)


CASES = [(1, 72, 512, "nvfp4"), (1, 40, 1024, "mxfp4"), (3, 24, 512, "nvfp4"), (5, 48, 512, "mxfp4"),
         (20, 33, 512, "nvfp4")]


@pytest.mark.parametrize("m,n,k,kind", CASES)
def test_kernels_match_float64(m, n, k, kind):
    x, packed, scale, gscale, b = _case(m, n, k, kind, m * 7 + n)
    ref = x.double() @ fp4.fp4_dequantize_reference(packed, scale, gscale, kind).double().t() + b.double()
    picked, seen = [], set()
    for c in fp4.candidates(m, n, k):  # one of each family, split and not (the interpreter is slow)
        fam = (c.name.split("_")[0], "_s1_" in c.name)
        if fam not in seen:
            seen.add(fam)
            picked.append(c)
    assert len(picked) >= 2
    for c in picked:
        for _ in range(2):  # twice: the split-K workspace must come back zeroed
            y = fp4.fp4_linear(x, packed, scale, gscale, kind, b, impl=c.name)
            assert not torch.isnan(y).any(), c.name
            assert _rel(y, ref) < 1e-2, (c.name, _rel(y, ref))


def test_default_path_and_cpu_reference_agree():
    x, packed, scale, gscale, b = _case(2, 64, 256, "nvfp4", 3)
    y = fp4.fp4_linear(x.reshape(1, 2, 256), packed, scale, gscale, "nvfp4", b)
    assert y.shape == (1, 2, 64)
    ref = fp4.fp4_reference(x, packed, scale, gscale, "nvfp4", b)
    assert _rel(y.reshape(2, 64), ref.double()) < 1e-2


def test_fp4_on_a_trained_like_weight_beats_nothing_but_is_close():
    """Quantize a smooth weight to NVFP4 by hand: the kernel's output is within FP4's error of the float product."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(64, 256, generator=g) * torch.linspace(0.2, 2.0, 256)
    blocks = w.reshape(64, 16, 16)
    gscale = torch.tensor([448.0 * 6.0 / float(w.abs().max())])
    bscale = (blocks.abs().amax(-1) / 6.0 * gscale).to(torch.float8_e4m3fn)
    eff = bscale.float() / gscale
    q = blocks / eff[..., None]
    grid = torch.tensor(fp4.E2M1_VALUES)
    idx = (q.abs()[..., None] - grid).abs().argmin(-1)
    codes = (idx | ((q < 0).long() << 3)).reshape(64, 256).to(torch.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    x = torch.randn(1, 256, generator=g).to(torch.bfloat16)
    y = fp4.fp4_linear(x, packed, bscale, gscale, "nvfp4")
    exact = x.double() @ w.double().t()
    err = _rel(y, exact)
    assert 0.01 < err < 0.15  # FP4's rounding error: visible, bounded


def test_bad_arguments():
    x, packed, scale, gscale, _ = _case(1, 8, 64, "nvfp4", 0)
    with pytest.raises(UsageError):
        fp4.fp4_linear(x, packed, scale[:, :2], gscale, "nvfp4")
    with pytest.raises(UsageError):
        fp4.fp4_linear(x, packed, scale, gscale, "int4")
    with pytest.raises(UnsupportedError):
        fp4.fp4_linear(x, packed, scale.view(torch.uint8), gscale, "nvfp4")
    with pytest.raises(UsageError):
        fp4.fp4_linear(x[:, :32], packed, scale, gscale, "nvfp4")


def test_kernel_layout_entry_point_and_repack():
    """repack once + fp4_linear_kn gives what fp4_linear gives on the checkpoint tensors (Triton and CPU paths)."""
    x, packed, scale, gscale, b = _case(3, 40, 256, "nvfp4", 11)
    qw, s8 = fp4.repack(packed, scale)
    assert qw.shape == (32, 40) and qw.dtype == torch.int32 and s8.shape == (16, 40)
    y1 = fp4.fp4_linear(x, packed, scale, gscale, "nvfp4", b)
    y2 = fp4.fp4_linear_kn(x, qw, s8, gscale, "nvfp4", b)
    assert torch.equal(y1, y2)
    ref = fp4.fp4_reference(x, packed, scale, gscale, "nvfp4", b)
    assert _rel(y2, ref.double()) < 1e-2
