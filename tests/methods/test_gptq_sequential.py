"""GPTQ's CPU speed mechanisms: one decoder-layer forward per layer (true-sequential with one calibration batch),
statistics passes that stop after the last wanted input, the same statistics with several batches, and the
group-major clip search / transposed column loop giving the numbers of the reference code."""
import copy

import pytest
import torch

from hubquant.engine import run_layers
from hubquant.methods import QuantJob
from hubquant.methods.awq import search_clip
from hubquant.methods.gptq import (
    _block_static,
    _block_step,
    clip_ratios,
    gptq_quantize,
    run,
)
from hubquant.modeling import decoder_layers
from hubquant.quant import QuantScheme, WeightScheme, rtn_quantize
from tests.helpers import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _count_calls(model):
    """Calls of every decoder layer (begun, whether or not a hook stops them) and finished forwards of every
    Linear, by module name."""
    calls = {}

    def count(name):
        return lambda *_: calls.__setitem__(name, calls.get(name, 0) + 1)

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_hook(count(name))
        elif any(mod is layer for layer in decoder_layers(model)):
            mod.register_forward_pre_hook(count(name))
    return calls


def _calib(n=4, L=64):
    return torch.randint(0, 1000, (n, L), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("true_sequential,layer_calls,down_calls", [(True, 1, 1), (False, 2, 1)])
def test_gptq_runs_each_layer_once_when_true_sequential(true_sequential, layer_calls, down_calls):
    model = tiny_model("llama", vocab=1000, layers=2)
    calls = _count_calls(model)
    scheme = QuantScheme(weights=WeightScheme(bits=4, group_size=32))
    out = run(model, QuantJob(scheme=scheme, calib=_calib(), progress=False,
                              options={"true_sequential": true_sequential}))
    assert len(out) == 14
    for i in range(2):
        p = f"model.layers.{i}"
        # the capture of layer 0's inputs stops inside layer 0 without running it (a catcher stands in)
        assert calls[p] == layer_calls, calls
        # true-sequential: every Linear once, already quantized; otherwise the statistics pass stops at
        # down_proj's input (down_proj runs only in the rerun) and the other Linears run twice
        assert calls[f"{p}.mlp.down_proj"] == down_calls
        assert calls[f"{p}.self_attn.q_proj"] == layer_calls
    for name, qw in out.items():  # the model holds the dequantized weights
        assert torch.equal(model.get_submodule(name).weight.data, qw.dequantize(torch.float32))


def test_single_forward_outputs_are_the_quantized_layers_outputs():
    """With true-sequential the engine keeps the single forward's outputs: layer 1 must see exactly what the
    quantized layer 0 computes."""
    model = tiny_model("llama", vocab=1000, layers=2)
    calib = _calib()
    scheme = QuantScheme(weights=WeightScheme(bits=4, group_size=32))
    seen = {}
    layers = decoder_layers(model)

    def keep(m, a, kw):
        seen.setdefault("x1", (a[0] if a else kw["hidden_states"]).clone())

    layers[1].register_forward_pre_hook(keep, with_kwargs=True)
    run(model, QuantJob(scheme=scheme, calib=calib, progress=False))
    with torch.no_grad():
        hs = model(calib, output_hidden_states=True).hidden_states  # the quantized model
    torch.testing.assert_close(seen["x1"], hs[1], rtol=1e-5, atol=1e-5)


def _sequential_stats(model, calib, tokens_per_batch):
    """Run LayerWork.sequential with an RTN callback; record each group's Hessian statistics and the calls."""
    got = {}

    def on_layer(work):
        def on_group(names, st):
            got.setdefault(work.index, []).append((list(names), st.xtx.clone(), st.count))
            for n in names:
                lin = work.linears[n]
                lin.weight.data = rtn_quantize(lin.weight.data, WeightScheme(bits=3, group_size=32)).dequantize()

        work.sequential(on_group)
        got[f"calls{work.index}"] = work.forward_calls
        got[f"final{work.index}"] = work.outputs_final

    run_layers(model, calib, on_layer=on_layer, progress=False, tokens_per_batch=tokens_per_batch)
    return got


def test_sequential_statistics_match_with_one_or_several_batches():
    base = tiny_model("llama", vocab=1000, layers=2)
    calib = _calib(n=4, L=32)
    one = _sequential_stats(copy.deepcopy(base), calib, tokens_per_batch=4 * 32)
    two = _sequential_stats(copy.deepcopy(base), calib, tokens_per_batch=2 * 32)
    p = "model.layers.0"
    groups = [names for names, _, _ in one[0]]
    # one batch: one call per Linear (shared inputs pass the same stats object); in run order
    assert groups == [[f"{p}.self_attn.q_proj"], [f"{p}.self_attn.k_proj"], [f"{p}.self_attn.v_proj"],
                      [f"{p}.self_attn.o_proj"], [f"{p}.mlp.gate_proj"], [f"{p}.mlp.up_proj"], [f"{p}.mlp.down_proj"]]
    assert [names for names, _, _ in two[0]] == [
        [f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj"], [f"{p}.self_attn.o_proj"],
        [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], [f"{p}.mlp.down_proj"]]
    assert one["calls0"] == 1 and one["final0"] is True
    assert two["calls0"] == 4 * 2 and two["final0"] is False  # a (stopped) pass over both batches per group
    for layer in (0, 1):
        by_first = {names[0]: (xtx, count) for names, xtx, count in one[layer]}
        for names, xtx, count in two[layer]:
            ref, ref_count = by_first[names[0]]
            assert count == ref_count == 4 * 32
            torch.testing.assert_close(xtx, ref, rtol=1e-5, atol=1e-5)
    # the statistics are those of the changed layer: o_proj's input comes from the quantized q/k/v
    base_o = _plain_o_proj_xtx(copy.deepcopy(base), calib)
    o_seq = next(x for names, x, _ in one[0] if names[0].endswith("o_proj"))
    assert not torch.allclose(o_seq, base_o, rtol=1e-3, atol=1e-3)


def _plain_o_proj_xtx(model, calib):
    got = {}

    def on_layer(work):
        st = work.collect([f"{work.name}.self_attn.o_proj"])
        got.setdefault("x", st[f"{work.name}.self_attn.o_proj"].xtx)

    run_layers(model, calib, on_layer=on_layer, progress=False)
    return got["x"]


def test_collect_stops_after_the_last_wanted_input():
    model = tiny_model("llama", vocab=1000, layers=1)
    calls = _count_calls(model)
    p = "model.layers.0"
    got = {}

    def on_layer(work):
        got["stats"] = work.collect([f"{p}.self_attn.q_proj", f"{p}.mlp.up_proj"])
        got["calls"] = work.forward_calls
        got["kept"] = work.collect([f"{p}.mlp.up_proj"], keep_outputs=True)

    run_layers(model, _calib(n=4, L=32), on_layer=on_layer, progress=False, tokens_per_batch=64, rerun=False)
    assert got["calls"] == 2  # two batches
    assert calls[f"{p}.mlp.down_proj"] == 2  # only the keep_outputs pass (2 batches) ran it
    assert calls[f"{p}.mlp.up_proj"] == 2  # stopped in its pre-hook in the first pass, ran in the second
    assert calls[f"{p}.mlp.gate_proj"] == 4  # gate_proj runs before up_proj
    assert got["stats"][f"{p}.mlp.up_proj"].count == 128
    torch.testing.assert_close(got["stats"][f"{p}.mlp.up_proj"].xtx, got["kept"][f"{p}.mlp.up_proj"].xtx)


@pytest.mark.parametrize("sym", [True, False])
def test_group_major_clip_search_equals_awq_search(sym):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 256, generator=g)
    x[:, :3] *= 6
    h = 2 * x.T @ x / 512
    w = torch.randn(96, 256, generator=g) * 0.05
    scheme = WeightScheme(bits=4, group_size=64, symmetric=sym)
    blocks = torch.stack([h[i: i + 64, i: i + 64] for i in range(0, 256, 64)])
    ratios = clip_ratios(w, blocks, scheme)
    assert torch.equal(ratios, search_clip(w, h, scheme))
    assert float(ratios.min()) < 1.0  # the search does shrink some ranges


@pytest.mark.parametrize("sym", [True, False])
def test_transposed_column_loop_matches_the_reference_loop(sym):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1024, 128, generator=g)
    h = 2 * x.T @ x / 1024 + 0.01 * torch.eye(128)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    w = torch.randn(200, 128, generator=g) * 0.05
    scheme = WeightScheme(bits=4, group_size=32, symmetric=sym)
    cs = w.abs().amax(1, keepdim=True).expand(200, 128) / 7.5
    cz = None if sym else torch.round(torch.rand(200, 1, generator=g) * 4 - 2).expand(200, 128)
    q_ref, e_ref = torch.empty(200, 128), torch.empty(200, 128)
    _block_step(w.clone(), hinv, cs.contiguous(), torch.zeros(200, 128) if sym else cz.contiguous(), q_ref, e_ref,
                None, None, gs_dyn=0, bits=4, symmetric=sym, qmin=scheme.qmin, qmax=scheme.qmax,
                scale_dtype=torch.float32)
    qt, et = torch.empty(128, 200), torch.empty(128, 200)
    _block_static(w.T.contiguous(), hinv, cs.T.contiguous(), None if sym else cz.T.contiguous(), qt, et,
                  qmin=scheme.qmin, qmax=scheme.qmax)
    assert float((qt.T == q_ref).float().mean()) > 0.999
    torch.testing.assert_close(et.T, e_ref, rtol=1e-4, atol=1e-5)


def test_shared_hessian_prep_gives_the_joint_result():
    """q/k/v quantized one by one from one HessianPrep equal q/k/v quantized as one matrix."""
    from hubquant.methods.gptq import prepare_hessian

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2048, 128, generator=g)
    h = 2 * x.T @ x / 2048
    w = torch.randn(96, 128, generator=g) * 0.05
    scheme = WeightScheme(bits=4, group_size=32)
    joint, _ = gptq_quantize(w, h, scheme, clip=True)
    prep = prepare_hessian(h.clone(), scheme, clip=True, inplace=True)
    parts = [gptq_quantize(w[r], None, scheme, clip=True, prep=prep)[0] for r in (slice(0, 64), slice(64, 96))]
    assert torch.equal(joint.qweight, torch.cat([p.qweight for p in parts]))
    assert torch.equal(joint.scale, torch.cat([p.scale for p in parts]))
