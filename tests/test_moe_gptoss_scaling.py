"""AWQ and SmoothQuant on gpt-oss: hubquant.moe_scaling keeps the moves checked exact (input_layernorm -> q/k/v and
v_proj -> o_proj, biases and sinks included) and drops the rest (each expert's up -> down: the clamped `(up + 1)`
product; the norm the router reads); every expert projection is still quantized (AWQ's clip search, SmoothQuant's
W8A8), routers and sinks stay float, and hubquant.load computes what hubquant's model computes."""
from __future__ import annotations

import pytest
import torch

import hubquant
from hubquant import moe, moe_scaling
from hubquant.formats.compressed_tensors import write
from hubquant.methods import get_method
from hubquant.methods.scaling import ScaleMapping, fold
from hubquant.modeling import quantizable_linears
from hubquant.quant import sqnr_db
from tests.test_moe import check_int8_experts, logits, moe_model, quantize, scheme_of
from tests.test_moe_arch_scaling import fold_every_kept_move

pytestmark = pytest.mark.skipif(not hasattr(__import__("transformers"), "GptOssConfig"),
                                reason="transformers without gpt-oss")

LAYERS, EXPERTS = 2, 8
KEPT = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "self_attn.v_proj": ("self_attn.o_proj",)}
AWQ_MARGIN_DB = 0.5  # AWQ against the float model may trail RTN by this much on random weights (no outliers)


def _quantized(method: str):
    model = moe_model("gpt_oss")
    ref = logits(model)
    moe.unfuse_experts(model)
    wanted = set(quantizable_linears(model))
    sinks = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("sinks")}
    quantized, _ = quantize(model, method)
    return model, ref, wanted, sinks, quantized


def _check_quantized_and_moves(model, wanted, sinks, quantized) -> None:
    experts = set(moe.expert_linear_names(model))
    assert len(experts) == LAYERS * EXPERTS * 3 and experts <= set(quantized) and set(quantized) == wanted
    routers = moe.float_module_names(model)
    assert len(routers) == LAYERS and not set(routers) & set(quantized)
    assert sinks and all(torch.equal(p, sinks[n]) for n, p in model.named_parameters() if n.endswith("sinks"))
    rec = moe_scaling.record(model)
    assert list(rec.kept) == ["model.layers.0"]  # both layers share one checked map
    assert {m.smooth: m.balance for m in rec.kept["model.layers.0"]} == KEPT  # nothing inside the experts
    dropped = "; ".join(rec.dropped["model.layers.0"])
    assert "post_attention_layernorm -> mlp.router" in dropped
    for i in range(EXPERTS):
        assert f"mlp.experts.{i}.up_proj -> mlp.experts.{i}.down_proj: the output moves" in dropped


def test_awq_quantizes_every_expert_loads_in_hubquant_and_is_not_worse_than_rtn(tmp_path):
    model, ref, wanted, sinks, quantized = _quantized("awq")
    _check_quantized_and_moves(model, wanted, sinks, quantized)
    assert scheme_of("awq").weights.group_size == 32
    deq = logits(model)
    qc = write(model, quantized, scheme=scheme_of("awq"), out_dir=tmp_path, method="awq")
    assert "model.layers.0.mlp.router" in qc["ignore"]
    loaded, _ = hubquant.load(tmp_path, device="cpu", dtype=torch.float32, progress=False)
    assert loaded.hubquant_format["quantized_linears"] == len(quantized)
    assert sqnr_db(deq, logits(loaded)) > 60, "the loaded variant must compute what hubquant's model computes"
    rtn, _, _, _, _ = _quantized("rtn")
    awq_db, rtn_db = sqnr_db(ref, deq), sqnr_db(ref, logits(rtn))
    assert awq_db > rtn_db - AWQ_MARGIN_DB, (awq_db, rtn_db)


def test_smoothquant_quantizes_every_expert_and_hubquant_load_computes_it(tmp_path):
    model, ref, wanted, sinks, quantized = _quantized("smoothquant")
    _check_quantized_and_moves(model, wanted, sinks, quantized)
    deq = logits(model)
    w8a8, _, _, _, _ = _quantized("w8a8")
    assert sqnr_db(ref, deq) > 12 and sqnr_db(ref, logits(w8a8)) > 12
    write(model, quantized, scheme=scheme_of("smoothquant"), out_dir=tmp_path, method="smoothquant")
    _, checked = check_int8_experts(model, tmp_path)  # compressed-tensors' compressor gives hubquant's weights
    assert checked == LAYERS * EXPERTS * 3
    loaded, _ = hubquant.load(tmp_path, device="cpu", dtype=torch.float32, progress=False)
    assert loaded.hubquant_format["quantized_linears"] == len(quantized)
    assert sqnr_db(deq, logits(loaded)) > 30


def test_kept_moves_leave_the_float_model_unchanged():
    """The moves kept on gpt-oss, applied with random scales to every layer of the float32 model at once (v_proj's
    bias divided with its rows, one scale per KV channel), keep its logits: attention sinks and biases do not stop
    them. The expert moves the check drops would not."""
    model = moe_model("gpt_oss")
    moe.unfuse_experts(model)
    ref = logits(model)
    layers = model.model.layers
    assert all(layer.self_attn.v_proj.bias is not None for layer in layers)
    moved = fold_every_kept_move(model)
    assert moved == list(KEPT) * LAYERS and sqnr_db(ref, logits(model)) > 80
    e = layers[0].mlp.experts[0]  # the dropped move: up's rows (and bias) / s, down's columns * s
    fold(layers[0].mlp.experts, ScaleMapping(smooth="0.up_proj", balance=("0.down_proj",), extra=True),
         torch.full((e.up_proj.out_features,), 2.0), dtype=torch.float32)
    assert sqnr_db(ref, logits(model)) < 60


@pytest.mark.parametrize("method", ["awq", "smoothquant"])
def test_scaling_methods_pass_the_preflight(method):
    from types import SimpleNamespace

    get_method(method).check_architecture(SimpleNamespace(model_type="gpt_oss"), {})
    model = moe_model("gpt_oss")
    moe.unfuse_experts(model)
    assert moe.scale_mappings(model) is None  # built and checked per layer (hubquant.moe_scaling)
    assert isinstance(moe_scaling.scale_map(model), moe_scaling.StructuralMap)
