"""hubquant.load's FP4 Linear: the kernel layout (hubquant_kernels.fp4, Triton's interpreter on CPU) gives the same
outputs as the reference dequantization, and both give the checkpoint's weights back."""
from __future__ import annotations

import pytest
import torch

from hubquant import fp4
from hubquant.formats import ct_fp4
from hubquant.presets import get_preset
from hubquant.quant import sqnr_db
from hubquant.runtime.fp4 import Fp4Linear, build

k_fp4 = pytest.importorskip("hubquant_kernels.fp4")


@pytest.mark.parametrize("kind", ["nvfp4", "mxfp4"])
def test_kernel_layout_matches_the_reference(kind):
    torch.manual_seed(0)
    w = torch.randn(64, 96, dtype=torch.bfloat16) * 0.05
    qw = fp4.quantize(w, kind)
    scheme = get_preset("NVFP4A16" if kind == "nvfp4" else "MXFP4A16")
    t = {k.split(".", 1)[1]: v for k, v in ct_fp4.linear_tensors("lin", qw, scheme).items()}
    wargs = {"group_size": fp4.BLOCKS[kind]}
    ref = build(wargs, t, 96, 64, torch.bfloat16, "cpu")
    assert not ref.kernel_layout
    ker = Fp4Linear(96, 64, kind, packed=t["weight_packed"], block_scale=t["weight_scale"],
                    global_scale=t.get("weight_global_scale"), kernel_layout=True)
    assert ker.packed.dtype == torch.int32 and ker.packed.shape == (96 // 8, 64)
    packed, scale = ker.checkpoint_tensors()
    assert torch.equal(packed, t["weight_packed"]) and torch.equal(scale.view(torch.uint8),
                                                                   t["weight_scale"].view(torch.uint8))
    assert torch.equal(ker.dequantized_weight(torch.float32), qw.dequantize())
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    with torch.no_grad():
        a, b = ref(x).float(), ker(x).float()
    assert sqnr_db(a, b) > 40.0
    assert sqnr_db(x.float() @ w.float().T, a) > 15.0
