"""FP8 e4m3 W8A8: weight codes and scales, per-token and static activations, model output SQNR."""
from __future__ import annotations

import torch

from hubquant.methods import METHODS, QuantJob
from hubquant.methods.fp8 import FP8_MAX, fp8_fake_quant_per_token, fp8_fake_quant_static, fp8_quantize_weight
from hubquant.quant import ActivationScheme, QuantScheme, sqnr_db
from tests.helpers import tiny_model

FP8 = METHODS["fp8"].default_scheme
FP8_STATIC = QuantScheme(weights=FP8.weights,
                         activations=ActivationScheme(type="float", dynamic=False, strategy="tensor"))


def test_weight_codes_and_scales():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)
    w[3] *= 1e5  # beyond e4m3's exponent range relative to the other rows
    qw = fp8_quantize_weight(w, FP8.weights)
    assert qw.qweight.dtype == torch.float8_e4m3fn and qw.scale.shape == (64, 1)
    torch.testing.assert_close(qw.scale, w.abs().amax(1, keepdim=True) / 448.0)
    assert qw.qweight.float().abs().amax() == FP8_MAX  # every row's absmax maps to 448 exactly
    # e4m3 keeps 3 mantissa bits: ~31.5 dB on Gaussian weights (int8 per channel gives ~40 dB), any row range
    assert 30 < sqnr_db(w, qw.dequantize()) < 33
    assert sqnr_db(w[0], qw.dequantize()[0]) > 30
    per_tensor = fp8_quantize_weight(w, FP8.weights, per_tensor=True)
    assert per_tensor.scale.shape == (1, 1)
    # a float format tolerates range differences up to its exponent range; 1e5 pushes row 0 into subnormals
    assert sqnr_db(w[0], per_tensor.dequantize()[0]) < 15


def test_activation_quantization():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 256, generator=g)
    x[0, 0] *= 1e5  # one loud token does not hurt the others (per token)
    fq = fp8_fake_quant_per_token(x)
    assert sqnr_db(x[1], fq[1]) > 30 and sqnr_db(x[0, 0], fq[0, 0]) > 30
    scale = torch.tensor([x.abs().max() / 448.0])
    st = fp8_fake_quant_static(x, scale)
    assert sqnr_db(x[0, 0], st[0, 0]) > 30
    assert sqnr_db(x[1], st[1]) < 25  # a static scale sized for the outlier token crushes the quiet ones


def test_fp8_model_output_sqnr_dynamic_and_static():
    ids = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(1))
    calib = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(2))
    for scheme in (FP8, FP8_STATIC):
        m = tiny_model("llama", vocab=1000)
        with torch.no_grad():
            ref = m(ids).logits
        q = METHODS["fp8"].load()(m, QuantJob(scheme=scheme, calib=calib, progress=False))
        qw = q["model.layers.1.self_attn.o_proj"]
        assert qw.qweight.dtype == torch.float8_e4m3fn
        if scheme.activations.dynamic:
            assert qw.input_scale is None and qw.scale.shape == (128, 1)
        else:
            assert qw.input_scale.shape == (1,) and qw.scale.shape == (1, 1)
        with torch.no_grad():
            out = m(ids).logits
        assert sqnr_db(ref, out) > 22, scheme.name  # W8A8 e4m3 through 2 layers: ~25 dB measured
