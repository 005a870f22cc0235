"""AWQ and SmoothQuant on the mixture-of-experts architectures whose scaling map hubquant.moe_scaling builds from
each layer's structure: every expert projection is quantized and no router, the variant loads (plain transformers
for W4A16, hubquant.load for W8A8 int8 experts) and computes what hubquant's model computes, AWQ is no worse than
round-to-nearest, and the moves that are not exact (Qwen3-Next's gated linear-attention norm, DeepSeek-V3.2's
indexer reading the norms, routers reading a norm through a cast) are dropped, never applied."""
from __future__ import annotations

import filecmp
import inspect
import json

import pytest
import torch

import hubquant
from hubquant import moe, moe_scaling
from hubquant.formats.compressed_tensors import write
from hubquant.methods import get_method
from hubquant.methods.scaling import ScaleMapping, fold
from hubquant.modeling import quantizable_linears
from hubquant.quant import sqnr_db
from tests.helpers import NEW_MOE_ARCHS, save_tiny_repo
from tests.test_moe import EVAL_IDS, check_int8_experts, logits, moe_model, quantize, scheme_of, write_and_load

FAST = dict(eval_windows=2, eval_seq_len=64, num_samples=4, seq_len=64, calib_dataset="fortunes", progress=False)
AWQ_MARGIN_DB = 0.5  # AWQ against the float model may trail RTN by this much on random weights (no outliers)


def _quantized_with(arch: str, method: str, **options):
    model = moe_model(arch)
    ref = logits(model)
    moe.unfuse_experts(model)
    wanted = set(quantizable_linears(model))
    quantized, _ = quantize(model, method, **options)
    return model, ref, wanted, quantized


def _quantized(arch: str, method: str):
    return _quantized_with(arch, method)


def _assert_experts_and_routers(model, quantized, wanted) -> None:
    experts = set(moe.expert_linear_names(model))
    assert experts and experts <= set(quantized) and set(quantized) == wanted
    routers = moe.float_module_names(model)
    assert routers and not set(routers) & set(quantized)


def _assert_every_expert_scaled(model) -> None:
    """Each expert's up -> down move was checked exact and kept, in every sparse layer structure."""
    rec = moe_scaling.record(model)
    assert rec is not None and rec.kept
    for layer, kept in rec.kept.items():
        smooths = {m.smooth for m in kept}
        for ename, experts in moe.expert_modules(model.get_submodule(layer)).items():
            _, up, _ = experts[0].names
            assert {f"{ename}.{i}.{up}" for i in range(experts.num_experts)} <= smooths, layer


@pytest.mark.parametrize("arch", NEW_MOE_ARCHS)
def test_awq_quantizes_every_expert_loads_with_transformers_and_is_not_worse_than_rtn(arch, tmp_path):
    model, ref, wanted, quantized = _quantized(arch, "awq")
    _assert_experts_and_routers(model, quantized, wanted)
    _assert_every_expert_scaled(model)
    deq = logits(model)
    loaded, qc = write_and_load(model, quantized, "awq", tmp_path)
    assert {moe.checkpoint_name(model, r) for r in moe.float_module_names(model)} <= set(qc["ignore"])
    assert sqnr_db(deq, logits(loaded)) > 60, "the loaded variant must compute what hubquant's model computes"
    rtn_model, _, _, _ = _quantized(arch, "rtn")
    awq_db, rtn_db = sqnr_db(ref, deq), sqnr_db(ref, logits(rtn_model))
    assert awq_db > rtn_db - AWQ_MARGIN_DB, (awq_db, rtn_db)


@pytest.mark.parametrize("arch", NEW_MOE_ARCHS)
def test_smoothquant_quantizes_every_expert_and_hubquant_load_computes_it(arch, tmp_path):
    model, ref, wanted, quantized = _quantized(arch, "smoothquant")
    _assert_experts_and_routers(model, quantized, wanted)
    _assert_every_expert_scaled(model)
    deq = logits(model)
    assert sqnr_db(ref, deq) > 12
    write(model, quantized, scheme=scheme_of("smoothquant"), out_dir=tmp_path, method="smoothquant")
    _, checked = check_int8_experts(model, tmp_path)  # compressed-tensors' compressor gives hubquant's weights
    assert checked == len(moe.expert_linear_names(model))
    loaded, _ = hubquant.load(tmp_path, device="cpu", dtype=torch.float32, progress=False)
    # both quantize activations per token, each in its own arithmetic: an int8 rounding tie now and then tips a router
    # (Qwen3-Next's tiny model: 36 dB, the others 40-65 dB)
    assert sqnr_db(deq, logits(loaded)) > 30


def _moves(model, layer: str) -> dict[str, ScaleMapping]:
    return {m.smooth: m for m in moe_scaling.record(model).kept[layer]}


def test_qwen3_next_layers_get_their_own_moves():
    model, _, _, _ = _quantized("qwen3_next", "smoothquant")
    rec = moe_scaling.record(model)
    linear, full = _moves(model, "model.layers.0"), _moves(model, "model.layers.1")  # linear, then full attention
    assert linear["input_layernorm"].balance == ("linear_attn.in_proj_qkvz", "linear_attn.in_proj_ba")
    assert full["input_layernorm"].balance == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    assert linear["input_layernorm"].norm_offset == 1.0  # Qwen3-Next norms scale by (1 + weight)
    assert "self_attn.v_proj" in full and "mlp.shared_expert.up_proj" in full
    assert "linear_attn.norm" not in linear and "post_attention_layernorm" not in full  # router reads that norm
    dropped = "; ".join(rec.dropped["model.layers.0"])
    assert "linear_attn.norm -> linear_attn.out_proj" in dropped and "mlp.gate" in dropped


def test_norms_the_indexer_reads_are_left_alone():
    model = moe_model("deepseek_v32")
    moe.unfuse_experts(model)
    layer = model.model.layers[1]
    before = {n: layer.get_submodule(n).weight.clone() for n in ("input_layernorm", "self_attn.q_a_layernorm",
                                                                 "self_attn.kv_a_layernorm")}
    quantize(model, "awq")
    dropped = "; ".join(moe_scaling.record(model).dropped["model.layers.1"])
    assert "self_attn.indexer.wk" in dropped and "self_attn.indexer.wq_b" in dropped
    assert torch.equal(layer.input_layernorm.weight, before["input_layernorm"])
    assert torch.equal(layer.self_attn.q_a_layernorm.weight, before["self_attn.q_a_layernorm"])
    assert not torch.equal(layer.self_attn.kv_a_layernorm.weight, before["self_attn.kv_a_layernorm"])  # kv_b only


def test_a_reader_the_hooks_miss_is_caught_by_the_output_check():
    """ERNIE-4.5's router reads post_attention_layernorm's output through a float32 copy (no hook sees it): the
    candidate norm -> shared experts move changes the layer's output and is dropped."""
    model, _, _, _ = _quantized("ernie4_5_moe", "awq")
    dropped = moe_scaling.record(model).dropped["model.layers.1"]
    assert any(d.startswith("post_attention_layernorm -> mlp.shared_experts.gate_proj") and "moves by" in d
               for d in dropped), dropped
    assert "post_attention_layernorm" not in _moves(model, "model.layers.1")


def fold_every_kept_move(model) -> list[str]:
    """Apply every move moe_scaling.verified_mappings keeps, each layer checked with its own input (captured on
    EVAL_IDS), with random scales to every layer of the float32 model at once (grouped-query v -> o with one scale
    per KV channel, as SmoothQuant ties them). Returns the moved `smooth` modules, layer by layer."""
    from hubquant.methods.scaling import expand_kv
    from hubquant.methods.smoothing import head_dims

    layers, seen = model.model.layers, {}

    def capture(i):
        def hook(mod, args, kwargs):  # the layer's input by name: (hidden states, the other arguments)
            bound = dict(inspect.signature(mod.forward).bind(*args, **kwargs).arguments)
            bound.update(bound.pop("kwargs", {}))
            seen.setdefault(i, (bound.pop("hidden_states"), bound))
        return hook

    hooks = [layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(EVAL_IDS, use_cache=False)
    for h in hooks:
        h.remove()
    hd, n_kv = head_dims(model)
    lins, gen, moved = quantizable_linears(model), torch.Generator().manual_seed(3), []
    for i, layer in enumerate(layers):
        rel = frozenset(n[len(f"model.layers.{i}."):] for n in lins if n.startswith(f"model.layers.{i}."))
        kept, _ = moe_scaling.verified_mappings(layer, *seen[i], rel, head_dims=(hd, n_kv))
        for m in kept:
            smooth, cols = layer.get_submodule(m.smooth), layer.get_submodule(m.balance[0]).in_features
            rows = smooth.out_features if isinstance(smooth, torch.nn.Linear) else cols
            s_smooth = torch.exp(torch.empty(rows).uniform_(-0.7, 0.7, generator=gen))
            s = expand_kv(s_smooth, n_kv, cols // rows, hd) if rows != cols else s_smooth
            fold(layer, m, s, s_smooth=s_smooth, dtype=torch.float32)
            moved.append(m.smooth)
    return moved


@pytest.mark.parametrize("arch", ["qwen3_next", "deepseek_v32", "ernie4_5_moe"])
def test_kept_moves_leave_the_float_model_unchanged(arch):
    """Every move verified_mappings keeps, applied with random scales to every layer of the float32 model at once,
    keeps its logits."""
    model = moe_model(arch)
    moe.unfuse_experts(model)
    ref = logits(model)
    moved = fold_every_kept_move(model)
    assert len(moved) > 8 and sqnr_db(ref, logits(model)) > 80


def test_awq_converts_a_derived_moe_end_to_end_and_logs_the_moves(tokenizer, tmp_path):
    from hubquant.convert import ConvertOptions, convert

    base = save_tiny_repo(tmp_path / "base", "minimax_m2", tokenizer)
    logs: list[str] = []
    convert(ConvertOptions(repo_id=str(base), method="awq", group_size=32, output_dir=str(tmp_path / "out"), **FAST),
            log=logs.append)
    line = next(m for m in logs if m.startswith("moe: scaling:"))
    assert "kept" in line and "post_attention_layernorm -> mlp.gate" in line  # the router's norm, dropped
    rep = json.loads((tmp_path / "out" / "hubquant.json").read_text())["moe"]
    assert rep["expert_linears"] == rep["expert_linears_quantized"] > 0


def test_smoothquant_on_deepseek_v3_skips_the_v_to_o_move_mla_has_no_v_proj_for():
    model, ref, wanted, quantized = _quantized("deepseek_v3", "smoothquant")
    _assert_experts_and_routers(model, quantized, wanted)
    assert sqnr_db(ref, logits(model)) > 20


@pytest.mark.parametrize("arch", ["glm4v_moe", "qwen3_5_moe"])
def test_vision_language_moe_scales_the_language_model_only(arch, tmp_path):
    from transformers import AutoModelForImageTextToText

    from tests.helpers import tiny_vl_config

    for method in ("awq", "smoothquant"):
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(tiny_vl_config(arch), dtype=torch.float32).eval()
        vision = {n: p.clone() for n, p in model.named_parameters() if ".visual." in n}
        moe.unfuse_experts(model)
        quantized, _ = quantize(model, method)
        assert set(moe.expert_linear_names(model)) <= set(quantized)
        assert all(n.startswith("model.language_model.") for n in quantized)
        assert vision and all(torch.equal(p, vision[n]) for n, p in model.named_parameters() if n in vision)
        _assert_every_expert_scaled(model)
        if method == "awq":
            deq = logits(model)
            write(model, quantized, scheme=scheme_of(method), out_dir=tmp_path, method=method)
            loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32).eval()
            assert sqnr_db(deq, logits(loaded)) > 60


@pytest.mark.parametrize("method,options", [("fp8", {"alpha": 0.5}), ("smoothquant", {"alpha": "layer-search"}),
                                            ("smoothquant", {"smooth": "norms"})])
def test_smoothing_options_use_the_structural_map(method, options):
    from hubquant import moe_pipeline
    from hubquant.methods import QuantJob
    from tests.test_moe import calib_ids

    model = moe_model("qwen3_next")
    ref = logits(model)
    moe.unfuse_experts(model)
    job = QuantJob(scheme=scheme_of(method), calib=calib_ids(), options=options, progress=False)
    quantized, _ = moe_pipeline.quantize_with_policy(model, job, get_method(method).load(), log=lambda m: None)
    assert set(moe.expert_linear_names(model)) <= set(quantized)
    kept = [m for v in moe_scaling.record(model).kept.values() for m in v]
    assert kept and all(not m.extra for m in kept) == (options.get("smooth") == "norms")
    assert sqnr_db(ref, logits(model)) > 20


def test_experts_the_low_token_rule_rounds_get_no_scale():
    """Experts under min_expert_tokens are rounded to nearest from their float weights: no move touches them (the
    layer structure is still checked once, with every expert)."""
    awq, _, _, _ = _quantized_with("minimax_m2", "awq", min_expert_tokens=10**6)
    rtn, _, _, _ = _quantized_with("minimax_m2", "rtn")
    lins = quantizable_linears(rtn)
    for name, lin in quantizable_linears(awq).items():
        if ".experts." in name:
            assert torch.equal(lin.weight, lins[name].weight), name
    rec = moe_scaling.record(awq)
    assert list(rec.kept) == ["model.layers.0"]  # both layers share one checked map
    assert any(".experts." in m.smooth for m in rec.kept["model.layers.0"])


@pytest.mark.parametrize("arch", ["deepseek_v32", "qwen3_next"])
def test_streamed_scaling_writes_the_same_bytes(arch, tokenizer, tmp_path):
    """The per-layer checks run on the streamed layer too (its weights materialized): the same moves, the same
    bytes as the in-memory conversion."""
    from hubquant.convert import ConvertOptions, convert

    base = save_tiny_repo(tmp_path / "base", arch, tokenizer)
    for method, gs in (("awq", 32), ("smoothquant", None)):
        lines = {}
        for mode in ("off", "on"):
            logs: list[str] = []
            convert(ConvertOptions(repo_id=str(base), method=method, group_size=gs, streaming=mode,
                                   output_dir=str(tmp_path / f"{method}-{mode}"), **FAST), log=logs.append)
            lines[mode] = next(m for m in logs if m.startswith("moe: scaling:"))
        assert lines["on"] == lines["off"]
        for name in ("model.safetensors", "config.json"):
            assert filecmp.cmp(tmp_path / f"{method}-off" / name, tmp_path / f"{method}-on" / name,
                               shallow=False), (method, name)
        rep = json.loads((tmp_path / f"{method}-on" / "hubquant.json").read_text())["moe"]
        assert rep["expert_linears"] == rep["expert_linears_quantized"] > 0
