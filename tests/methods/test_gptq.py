"""GPTQ numerics: error vs RTN on the same weights and activations, act-order static groups, per-channel,
asymmetric, dead columns, damping retries, shared Hessians, and the model walk."""
import copy

import pytest
import torch

from hubquant.engine import run_layers
from hubquant.errors import UsageError
from hubquant.methods import QuantJob
from hubquant.methods.gptq import CholeskyFailed, gptq_quantize, inverse_hessian_cholesky, run
from hubquant.quant import QuantScheme, WeightScheme, minmax_qparams, rtn_quantize
from tests.helpers import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer_case(seed=0, n=2048, d_in=256, d_out=192):
    """Correlated activations with a few large channels (what real LLM inputs look like) and random weights."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g) / d_in**0.5
    x = torch.randn(n, d_in, generator=g) @ (torch.eye(d_in) + mix)
    x[:, :4] *= 8.0
    w = torch.randn(d_out, d_in, generator=g) * 0.05
    return x, w, 2 * x.T @ x / n


def _out_err(x, w, w_hat):
    return float((x @ (w - w_hat).T).pow(2).mean())


@pytest.mark.parametrize("bits,group,sym,actorder", [
    (4, 64, True, True), (4, 64, True, False), (4, -1, True, True), (4, 32, False, True), (3, 64, True, True),
    (4, 64, False, False),
])
def test_gptq_beats_rtn_on_layer_output(bits, group, sym, actorder):
    x, w, h = _layer_case()
    scheme = WeightScheme(bits=bits, group_size=group, symmetric=sym)
    qw, _ = gptq_quantize(w, h, scheme, actorder=actorder)
    rtn = rtn_quantize(w, scheme).dequantize()
    e_gptq, e_rtn = _out_err(x, w, qw.dequantize()), _out_err(x, w, rtn)
    assert e_gptq < 0.75 * e_rtn, (e_gptq, e_rtn)
    assert qw.qweight.dtype == torch.int8
    assert int(qw.qweight.min()) >= scheme.qmin and int(qw.qweight.max()) <= scheme.qmax
    assert (qw.zero_point is None) == sym


def test_actorder_uses_static_groups_from_the_original_weight():
    x, w, h = _layer_case(1)
    scheme = WeightScheme(bits=4, group_size=64, symmetric=True)
    qw, _ = gptq_quantize(w, h, scheme, actorder=True)
    ref_scale, _ = minmax_qparams(w, scheme)
    assert torch.equal(qw.scale, ref_scale)  # parameters of the original groups: no g_idx permutation needed
    assert qw.scale.shape == (w.shape[0], w.shape[1] // 64)
    # codes are in the original column order: dequantizing with the plain group layout reproduces the weight
    assert _out_err(x, w, qw.dequantize()) < 0.75 * _out_err(x, w, rtn_quantize(w, scheme).dequantize())


def test_scales_are_stored_in_the_model_dtype_and_used_as_stored():
    x, w, h = _layer_case(2)
    scheme = WeightScheme(bits=4, group_size=64)
    qw, _ = gptq_quantize(w.bfloat16(), h, scheme, scale_dtype=torch.bfloat16)
    assert qw.scale.dtype == torch.bfloat16
    deq = qw.dequantize()
    assert torch.equal(deq, ((qw.qweight.float().reshape(192, 4, 64)) * qw.scale.float()[..., None]).reshape(192, 256))


def test_dead_columns_are_zeroed_without_nans():
    x, w, _ = _layer_case(3)
    x[:, 10] = 0.0
    x[:, 77] = 0.0
    h = 2 * x.T @ x / x.shape[0]
    qw, loss = gptq_quantize(w, h, WeightScheme(bits=4, group_size=64), actorder=True)
    deq = qw.dequantize()
    assert torch.isfinite(deq).all() and torch.isfinite(torch.tensor(loss))
    assert torch.all(deq[:, [10, 77]] == 0)


def test_damping_is_retried_then_fails_clearly():
    h = torch.eye(8)
    h[0, 0] = -1e-4  # indefinite, fixed by more damping (mean diag ~0.875; 0.01 * 0.875 < 1e-4? no: retried up)
    _, used = inverse_hessian_cholesky(h.clone(), 0.0001)
    assert used > 0.0001
    with pytest.raises(CholeskyFailed):
        inverse_hessian_cholesky(-torch.eye(8), 0.01)


def test_gptq_failure_names_the_layer():
    model = tiny_model("llama", vocab=1000, layers=1)
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight.fill_(float("nan"))  # NaN Hessian for gate/up
    calib = torch.randint(0, 1000, (2, 32))
    scheme = QuantScheme(weights=WeightScheme(bits=4, group_size=32))
    with pytest.raises(UsageError) as e:
        run(model, QuantJob(scheme=scheme, calib=calib, progress=False))
    assert "model.layers.0.mlp.gate_proj" in str(e.value) and "--damp" in e.value.hint


def test_rows_are_independent_so_shared_hessian_linears_quantize_as_one_matrix():
    x, w, h = _layer_case(4)
    scheme = WeightScheme(bits=4, group_size=64)
    joint, _ = gptq_quantize(w, h, scheme)
    top, _ = gptq_quantize(w[:100], h, scheme)
    bottom, _ = gptq_quantize(w[100:], h, scheme)
    assert torch.equal(joint.qweight, torch.cat([top.qweight, bottom.qweight]))


def test_engine_shares_one_hessian_for_qkv_and_gate_up():
    model = tiny_model("llama", vocab=1000, layers=1)
    calib = torch.randint(0, 1000, (2, 32))
    seen = {}

    def on_layer(work):
        stats = work.collect(work.linears, hessian=True)
        p = work.name
        seen.update(stats=stats, prefix=p)

    run_layers(model, calib, on_layer=on_layer, progress=False)
    st, p = seen["stats"], seen["prefix"]
    q, k, v = (st[f"{p}.self_attn.{n}_proj"] for n in "qkv")
    assert q.xtx is k.xtx is v.xtx and k.shared_with == f"{p}.self_attn.q_proj"
    gate, up = st[f"{p}.mlp.gate_proj"], st[f"{p}.mlp.up_proj"]
    assert gate.xtx is up.xtx
    assert st[f"{p}.self_attn.o_proj"].xtx is not q.xtx and st[f"{p}.mlp.down_proj"].xtx is not gate.xtx
    assert q.count == 64 and q.xtx.shape == (128, 128) and q.xtx.dtype == torch.float32


@pytest.mark.parametrize("true_sequential", [False, True])
def test_run_quantizes_every_linear_and_beats_rtn_on_the_model(true_sequential):
    base = tiny_model("llama", vocab=1000)
    calib = torch.randint(0, 1000, (8, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(calib).logits
    scheme = QuantScheme(weights=WeightScheme(bits=4, group_size=32))
    model = copy.deepcopy(base)
    out = run(model, QuantJob(scheme=scheme, calib=calib, progress=False, options={"true_sequential": true_sequential}))
    assert len(out) == 2 * 7 and "lm_head" not in out
    for name, qw in out.items():
        lin = model.get_submodule(name)
        assert torch.equal(lin.weight.data, qw.dequantize(lin.weight.dtype))
    rtn = copy.deepcopy(base)
    for name in out:
        lin = rtn.get_submodule(name)
        lin.weight.data = rtn_quantize(lin.weight.data, scheme.weights).dequantize()
    with torch.no_grad():
        e_gptq = float((model(calib).logits - ref).pow(2).mean())
        e_rtn = float((rtn(calib).logits - ref).pow(2).mean())
    assert e_gptq < 0.6 * e_rtn, (e_gptq, e_rtn)


def test_options_are_checked():
    model = tiny_model("llama", vocab=1000, layers=1)
    scheme = QuantScheme(weights=WeightScheme(bits=4, group_size=32))
    with pytest.raises(UsageError):
        run(model, QuantJob(scheme=scheme, calib=None))
    with pytest.raises(UsageError, match="blocksize"):
        run(model, QuantJob(scheme=scheme, calib=torch.zeros(1, 8, dtype=torch.long), options={"blocksize": 3}))
