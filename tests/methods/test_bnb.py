"""bitsandbytes methods: LLM.int8 codes and activation simulation, NF4 codes, model output SQNR."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

from hubquant.errors import UsageError  # noqa: E402
from hubquant.methods import METHODS, QuantJob  # noqa: E402
from hubquant.methods.actquant import detach_activation_quant  # noqa: E402
from hubquant.methods.bnb import BnbConfig, int8_quantize, llm_int8_fake_quant, nf4_quantize  # noqa: E402
from hubquant.quant import sqnr_db  # noqa: E402
from tests.helpers import tiny_model  # noqa: E402


def test_int8_codes_are_rowwise_absmax():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    qw = int8_quantize(w)
    absmax = w.half().float().abs().amax(1)
    torch.testing.assert_close(qw.extra["SCB"], absmax)
    torch.testing.assert_close(qw.qweight, torch.round(w.half().float() * 127 / absmax[:, None]).to(torch.int8),
                               atol=1, rtol=0)
    assert sqnr_db(w, qw.dequantize()) > 38


def test_llm_int8_activation_simulation_keeps_outlier_columns_in_float():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 64, generator=g)
    x[5, 7] = 20.0  # one outlier value puts column 7 in the float path
    fq = llm_int8_fake_quant(x, 6.0)
    assert torch.equal(fq[:, 7], x[:, 7])
    rest = torch.cat([x[:, :7], x[:, 8:]], 1)
    assert sqnr_db(rest, torch.cat([fq[:, :7], fq[:, 8:]], 1)) > 35
    # the row scale ignores the outlier value: row 5 is quantized as finely as the others
    assert sqnr_db(torch.cat([x[5, :7], x[5, 8:]]), torch.cat([fq[5, :7], fq[5, 8:]])) > 35
    assert sqnr_db(x, llm_int8_fake_quant(x, 0.0)) < sqnr_db(x, fq)  # threshold 0: no float path


def test_nf4_codes_and_double_quant_state():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 128, generator=g).to(torch.bfloat16)
    qw = nf4_quantize(w, BnbConfig())
    st = qw.extra["quant_state"]
    assert qw.qweight.dtype == torch.uint8 and qw.qweight.shape == (64 * 128 // 2, 1)
    assert qw.shape == (64, 128) and st.blocksize == 64 and st.nested and st.state2.blocksize == 256
    assert 19 < sqnr_db(w, qw.dequantize()) < 23  # NF4 on Gaussian weights: ~20 dB
    single = nf4_quantize(w, BnbConfig(double_quant=False))
    assert not single.extra["quant_state"].nested
    assert abs(sqnr_db(w, single.dequantize()) - sqnr_db(w, qw.dequantize())) < 0.3


@pytest.mark.parametrize("method,floor", [("bnb-int8", 33), ("bnb-nf4", 14)])
def test_model_output_sqnr(method, floor):
    ids = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(3))
    m = tiny_model("llama", vocab=1000)
    with torch.no_grad():
        ref = m(ids).logits
    spec = METHODS[method]
    q = spec.load()(m, QuantJob(scheme=spec.default_scheme, progress=False))
    assert len(q) == 14
    for name, qw in q.items():
        torch.testing.assert_close(m.get_submodule(name).weight.data, qw.dequantize(torch.float32))
    with torch.no_grad():
        out = m(ids).logits
    assert sqnr_db(ref, out) > floor
    assert detach_activation_quant(m) == 14


def test_bad_options():
    with pytest.raises(UsageError, match="compute_dtype"):
        BnbConfig.from_options({"compute_dtype": "int4"})
    assert BnbConfig.from_options({"compute_dtype": "torch.float16", "double_quant": "false"}) == BnbConfig(
        compute_dtype="float16", double_quant=False)
