"""Packing layouts and the RTN quantize+pack kernel (Triton interpreter) against compressed-tensors and
hubquant.quant."""
from __future__ import annotations

import pytest
import torch

from hubquant_kernels import pack


@pytest.mark.parametrize("cols", [8, 72, 100, 256])
def test_pack_rows_matches_compressed_tensors(cols):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(cols)
    q = torch.randint(-8, 8, (13, cols), generator=g, dtype=torch.int8)
    packed = pack.pack_rows(q)
    assert torch.equal(packed, pack_to_int32(q, 4))
    assert torch.equal(pack.unpack_rows(packed, cols), q)


def test_kernel_layout_is_ct_transposed():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-8, 8, (40, 96), generator=g, dtype=torch.int8)  # [N, K]
    kn = pack.ct_to_kernel_layout(pack.pack_rows(q), 96)
    assert kn.shape == (12, 40)
    assert torch.equal(kn, pack.pack_kn((q.to(torch.int32) + 8).t()))
    assert torch.equal(pack.unpack_kn(kn).to(torch.int32), (q.to(torch.int32) + 8).t())


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rtn_pack_kernel_bit_exact(group_size, symmetric, dtype):
    g = torch.Generator().manual_seed(group_size + symmetric)
    w = (torch.randn(37, 256, generator=g) * 0.05 + 0.01).to(dtype)  # odd rows, off-centre values
    got = pack.rtn_pack(w, group_size, symmetric)
    ref = pack.rtn_pack_reference(w, group_size, symmetric)
    assert torch.equal(got[0], ref[0])
    assert torch.equal(got[1], ref[1]) and got[1].dtype == dtype
    if symmetric:
        assert got[2] is None and ref[2] is None
    else:
        assert torch.equal(got[2], ref[2])
    # and the codes reconstruct the weight to 4-bit accuracy
    from hubquant.quant import dequantize, sqnr_db

    deq = dequantize(pack.unpack_rows(got[0], 256), got[1], got[2], group_size)
    assert sqnr_db(w.float(), deq) > (17.0 if group_size == -1 else 19.0)


def test_rtn_pack_rejects_bad_shapes():
    from hubquant.errors import UsageError

    with pytest.raises(UsageError, match="multiple"):
        pack.rtn_pack(torch.randn(8, 100), 32)
