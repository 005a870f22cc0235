"""hubquant's compressed-tensors tensors equal, byte for byte, what compressed-tensors' own compressors write for
the same quantized weights."""
from __future__ import annotations

import pytest
import torch

from hubquant.formats import compressed_tensors as ct
from hubquant.quant import QuantScheme, WeightScheme, rtn_quantize


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, True), (4, 64, False), (4, -1, False), (8, -1, True),
                                                  (2, 32, False), (3, 32, True)])
def test_pack_quantized_equals_the_compressor(bits, group, symmetric):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantScheme(weights=WeightScheme(bits=bits, group_size=group, symmetric=symmetric))
    w = torch.randn(64, 192, generator=torch.Generator().manual_seed(bits))
    qw = rtn_quantize(w, scheme.weights, scale_dtype=torch.float32)
    ours = ct.linear_tensors("x", qw, scheme)
    fmt = ct.format_name(scheme)
    qc = ct.quantization_config(scheme)
    group_cfg = QuantizationScheme.model_validate(qc["config_groups"]["group_0"])
    state = {"weight": qw.dequantize(torch.float32), "weight_scale": qw.scale}
    if qw.zero_point is not None:
        state["weight_zero_point"] = qw.zero_point.to(torch.int8)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    try:
        theirs = compressor.compress(state, group_cfg)
    except TypeError:  # compressed-tensors < 0.20: compress_weight(weight, scale, zero_point, quantization_args)
        theirs = compressor().compress_weight(weight=state["weight"], scale=qw.scale,
                                              zero_point=state.get("weight_zero_point"),
                                              quantization_args=group_cfg.weights)
    for key, tensor in theirs.items():
        mine = ours[f"x.{key}"]
        if key == "weight_zero_point" and not tensor.is_floating_point() and tensor.dtype != mine.dtype:
            tensor = tensor.to(mine.dtype)
        assert mine.dtype == tensor.dtype and torch.equal(mine, tensor), key
    assert set(theirs) - {"weight_scale"} <= {k[2:] for k in ours}
