"""AWQ numerics: the scale search on a constructed case, exact folding, clip search, mappings, the model walk."""
import copy

import pytest
import torch

from hubquant.errors import UnsupportedError, UsageError
from hubquant.methods import QuantJob
from hubquant.methods.awq import apply_scale, fake_quant, output_error, run, search_clip, search_scale, weight_mean
from hubquant.methods.scaling import ARCHITECTURES as AWQ_MAPPINGS
from hubquant.methods.scaling import mappings_for
from hubquant.quant import QuantScheme, WeightScheme, rtn_quantize
from tests.helpers import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _salient_case(seed=0, n=4096, d_in=128, d_out=96, hot=17, boost=30.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    x[:, hot] *= boost  # one input channel with large activations
    w = torch.randn(d_out, d_in, generator=g) * 0.02
    return x, w


def test_output_error_equals_explicit_activation_error():
    x, w = _salient_case()
    w_hat = fake_quant(w, WeightScheme(bits=4, group_size=32))
    explicit = (x.double() @ (w - w_hat).double().T).pow(2).sum()
    assert float(output_error(w, w_hat, x.T @ x)) == pytest.approx(float(explicit), rel=1e-4)


def test_search_finds_the_salient_channel_and_lowers_the_error():
    x, w = _salient_case()
    scheme = WeightScheme(bits=4, group_size=32, symmetric=False)
    h = x.T @ x
    x_mean = x.abs().mean(0)
    s, ratio, loss = search_scale([w], x_mean, h, scheme, grid=20)
    assert int(torch.argmax(s)) == 17  # the channel with large activations gets the largest scale
    assert ratio > 0
    plain = float(output_error(w, fake_quant(w, scheme), h))
    assert loss < 0.8 * plain
    # the chosen ratio is the grid's best: brute force over the same grid with explicit activations
    w_mean = weight_mean([w], 32)
    best = None
    for k in range(20):
        r = k / 20
        c = (x_mean.pow(r) / (w_mean.pow(1 - r) + 1e-4)).clamp(min=1e-4)
        c = c / (c.max() * c.min()).sqrt()
        err = float((x.double() @ (w - fake_quant(w * c, scheme) / c).double().T).pow(2).sum())
        best = min(best or (err, r), (err, r))
    assert ratio == best[1]


def test_without_activation_outliers_search_stays_near_one():
    x, w = _salient_case(boost=1.0)
    s, _, _ = search_scale([w], x.abs().mean(0), x.T @ x, WeightScheme(bits=4, group_size=32, symmetric=False))
    assert float(s.max() / s.min()) < 3.0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "mistral"])
def test_folding_leaves_float_outputs_unchanged(arch):
    model = tiny_model(arch, vocab=1000, layers=1)
    layer = model.model.layers[0]
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        before = model(ids).logits
    g = torch.Generator().manual_seed(0)
    for m in mappings_for(arch):
        smooth = layer.get_submodule(m.smooth)
        first = layer.get_submodule(m.balance[0])
        if isinstance(smooth, torch.nn.Linear) and smooth.out_features != first.in_features:
            continue
        s = torch.rand(first.in_features, generator=g) * 3 + 0.2
        apply_scale(layer, m, s)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_clip_search_never_hurts_a_group():
    x, w = _salient_case(1, boost=1.0)
    w[:, 5] *= 10  # outlier weights: clipping helps
    scheme = WeightScheme(bits=4, group_size=32, symmetric=False)
    h = x.T @ x
    ratio = search_clip(w, h, scheme)
    assert ratio.shape == (96, 4) and float(ratio.min()) >= 0.5 and float(ratio.max()) <= 1.0
    assert float(output_error(w, fake_quant(w, scheme, clip_ratio=ratio), h)) <= float(
        output_error(w, fake_quant(w, scheme), h))


def test_unknown_architecture_suggests_gptq_or_rtn():
    with pytest.raises(UnsupportedError) as e:
        mappings_for("gpt2")
    assert "gptq" in e.value.hint and "rtn" in e.value.hint
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"} <= set(AWQ_MAPPINGS)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_run_beats_rtn_and_sets_dequantized_weights(arch):
    base = tiny_model(arch, vocab=1000)
    calib = torch.randint(0, 1000, (8, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(calib).logits
    scheme = QuantScheme(weights=WeightScheme(bits=4, group_size=32, symmetric=False))
    model = copy.deepcopy(base)
    out = run(model, QuantJob(scheme=scheme, calib=calib, progress=False))
    for name, qw in out.items():
        assert qw.zero_point is not None and qw.zero_point.dtype == torch.int8
        assert torch.equal(model.get_submodule(name).weight.data, qw.dequantize(torch.float32))
    rtn = copy.deepcopy(base)
    for name in out:
        lin = rtn.get_submodule(name)
        lin.weight.data = rtn_quantize(lin.weight.data, scheme.weights).dequantize()
    with torch.no_grad():
        e_awq = float((model(calib).logits - ref).pow(2).mean())
        e_rtn = float((rtn(calib).logits - ref).pow(2).mean())
    assert e_awq < 0.9 * e_rtn, (e_awq, e_rtn)


def test_options_are_checked():
    model = tiny_model("llama", vocab=1000, layers=1)
    scheme = QuantScheme(weights=WeightScheme(bits=4, group_size=32, symmetric=False))
    with pytest.raises(UsageError):
        run(model, QuantJob(scheme=scheme, calib=None))
    with pytest.raises(UsageError, match="grids"):
        run(model, QuantJob(scheme=scheme, calib=torch.zeros(1, 8, dtype=torch.long), options={"grids": 3}))
