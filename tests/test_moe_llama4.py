"""Llama 4 (text): transposed fused experts whose router score scales the expert input, split into per-expert
Linears that compute transformers' logits exactly and see only their routed tokens; rtn, gptq and fp8 quantize every
expert projection, the router stays float, the checkpoint names experts per expert, and both hubquant.load and plain
transformers (its per-expert SequentialLlama4TextExperts) read it back with hubquant's logits; AWQ and SmoothQuant
move scale from each expert's up_proj to its down_proj (checked exact) and never from the norm the router reads;
streamed conversions write the in-memory bytes."""
from __future__ import annotations

import json

import pytest
import torch

from hubquant import moe, moe_scaling
from hubquant.errors import UnsupportedError
from hubquant.methods import get_method
from hubquant.modeling import quantizable_linears
from hubquant.quant import sqnr_db
from tests.test_moe import EVAL_IDS, calib_ids, quantize, scheme_of

pytestmark = pytest.mark.skipif(not hasattr(__import__("transformers"), "Llama4TextConfig"),
                                reason="transformers without Llama 4")

EXPERTS, SPARSE_LAYERS = 4, (1, 3)  # 4 layers, every second one sparse (interleave_moe_layer_step=2)
EXPERT_LINEARS = len(SPARSE_LAYERS) * EXPERTS * 3


def llama4_config(vocab: int = 512):
    """A tiny Llama 4 text config: layers 0 and 2 dense (intermediate_size_mlp), 1 and 3 sparse (4 experts of
    intermediate_size 64, top-1, a shared expert)."""
    from transformers import Llama4TextConfig

    return Llama4TextConfig(vocab_size=vocab, hidden_size=128, intermediate_size=64, intermediate_size_mlp=256,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                            num_local_experts=EXPERTS, num_experts_per_tok=1, interleave_moe_layer_step=2,
                            max_position_embeddings=256, attention_chunk_size=64, tie_word_embeddings=False,
                            pad_token_id=None, bos_token_id=1, eos_token_id=2, architectures=["Llama4ForCausalLM"])


def llama4_model(seed: int = 0, vocab: int = 512):
    """A tiny random Llama4ForCausalLM (`llama4_config`), float32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(llama4_config(vocab), dtype=torch.float32).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(EVAL_IDS).logits.float()


def unfused():
    model = llama4_model()
    moe.unfuse_experts(model)
    return model


def test_per_expert_linears_compute_transformers_logits():
    model = llama4_model()
    assert [layer.is_moe_layer for layer in model.model.layers] == [False, True, False, True]
    ref = logits(model)
    fused = model.model.layers[1].feed_forward.experts
    gate_up, down = fused.gate_up_proj.detach().clone(), fused.down_proj.detach().clone()
    assert moe.unfuse_experts(model) == 2
    err = float((logits(model) - ref).norm() / ref.norm())
    assert err < 1e-5, err
    e2 = model.model.layers[1].feed_forward.experts[2]
    assert torch.equal(e2.gate_proj.weight, gate_up[2][:, :64].t()) and torch.equal(e2.up_proj.weight,
                                                                                     gate_up[2][:, 64:].t())
    assert torch.equal(e2.down_proj.weight, down[2].t()) and e2.down_proj.weight.shape == (128, 64)
    names = set(quantizable_linears(model))
    assert len(moe.expert_linear_names(model)) == EXPERT_LINEARS and set(moe.expert_linear_names(model)) <= names
    assert "model.layers.1.feed_forward.shared_expert.up_proj" in names  # quantized like any MLP
    assert "model.layers.0.feed_forward.gate_proj" in names  # dense layer
    assert not [n for n in names if "router" in n]
    assert moe.float_module_names(model) == ["model.layers.1.feed_forward.router", "model.layers.3.feed_forward.router"]


def test_the_unfuse_check_runs_transformers_own_experts_and_catches_another_layout():
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    from hubquant import moe_llama4

    fused = llama4_model().model.layers[1].feed_forward.experts
    assert moe_llama4.check_unfused(fused, "llama4_text") < 1e-6
    with torch.device("meta"):  # a streamed or loader skeleton: random weights of the real shapes
        skeleton = Llama4TextExperts(llama4_config())
    assert moe_llama4.check_unfused(skeleton, "llama4_text") < 1e-6

    class UpFirst(Llama4TextExperts):  # a layout whose gate is the second half: per-expert Linears would be wrong
        def forward(self, hidden_states):
            x = hidden_states.view(self.gate_up_proj.shape[0], -1, self.hidden_size)
            up, gate = torch.bmm(x, self.gate_up_proj).chunk(2, dim=-1)
            return torch.bmm(up * self.act_fn(gate), self.down_proj).view(-1, self.hidden_size)

    other = UpFirst(llama4_config())
    other.load_state_dict(fused.state_dict())
    with pytest.raises(UnsupportedError) as e:
        moe_llama4.check_unfused(other, "llama4_text")
    assert e.value.exit_code == 5 and "llama4_text" in str(e.value)


def test_each_expert_sees_only_its_routed_tokens_scaled_by_their_score():
    model = unfused()
    block = model.model.layers[3].feed_forward
    seen: dict[int, list[torch.Tensor]] = {e: [] for e in range(EXPERTS)}
    hooks = [block.experts[e].up_proj.register_forward_pre_hook(lambda m, a, e=e: seen[e].append(a[0].clone()))
             for e in range(EXPERTS)]
    captured = {}
    hooks.append(block.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].reshape(-1, 128))))
    logits(model)
    for h in hooks:
        h.remove()
    x = captured["x"]
    scores, router_logits = block.router(x)
    chosen = router_logits.argmax(-1)
    for e in range(EXPERTS):
        rows = (chosen == e).nonzero().squeeze(1)
        got = torch.cat(seen[e]) if seen[e] else torch.empty(0, 128)
        assert got.shape[0] == rows.numel() == int((scores[:, e] > 0).sum())  # routed tokens only
        torch.testing.assert_close(got, x[rows] * scores[rows, e, None], rtol=0, atol=0)


def test_calibrate_all_experts_keeps_the_output():
    model = unfused()
    ref = logits(model)
    for m in moe.expert_modules(model).values():
        m.calibrate_all = True
    torch.testing.assert_close(logits(model), ref, rtol=1e-5, atol=1e-6)


# floors: measured logits SQNR against the float model (rtn 14.0, gptq 14.5, awq 15.2, fp8 23.0, w8a8 34.0,
# smoothquant 33.8 dB) minus a margin
@pytest.mark.parametrize("method,min_sqnr", [("rtn", 11.0), ("gptq", 11.0), ("awq", 12.0), ("fp8", 20.0),
                                             ("w8a8", 30.0), ("smoothquant", 30.0)])
def test_variant_names_experts_per_expert_and_loads_back(method, min_sqnr, tmp_path):
    from safetensors import safe_open

    import hubquant
    from hubquant.formats.compressed_tensors import write

    ref = logits(llama4_model())
    model = unfused()
    quantized, policy = quantize(model, method)
    assert set(quantized) == set(quantizable_linears(model))
    assert sum(n in quantized for n in moe.expert_linear_names(model)) == EXPERT_LINEARS
    if get_method(method).needs_calibration():  # per-expert token counts are the router's top-1 choices
        for name, counts in policy.counts.items():
            assert sum(counts) == calib_ids().numel(), name
    deq = logits(model)
    assert sqnr_db(ref, deq) > min_sqnr
    qc = write(model, quantized, scheme=scheme_of(method), out_dir=tmp_path, method=method)
    assert "model.layers.1.feed_forward.router" in qc["ignore"]
    keys = set(safe_open(tmp_path / "model.safetensors", "pt").keys())
    stored = "weight_packed" if scheme_of(method).weights.bits == 4 else "weight"
    for layer in SPARSE_LAYERS:
        for i in range(EXPERTS):
            for p in ("gate_proj", "up_proj", "down_proj"):
                name = f"model.layers.{layer}.feed_forward.experts.{i}.{p}"
                assert f"{name}.{stored}" in keys and f"{name}.weight_scale" in keys, name
    assert not [k for k in keys if k.endswith(("gate_up_proj", "experts.down_proj"))]
    assert "model.layers.1.feed_forward.router.weight" in keys
    assert "model.layers.1.feed_forward.shared_expert.gate_proj.weight_scale" in keys
    loaded, _ = hubquant.load(tmp_path, device="cpu", dtype=torch.float32, progress=False)
    assert loaded.hubquant_format["quantized_linears"] == len(quantized)
    weight_only = scheme_of(method).activations is None
    assert sqnr_db(deq, logits(loaded)) > (60 if weight_only else 40)
    # plain transformers, int8 experts included: activations quantized differently there (FP8 33.8 dB, W8A8 42.9 dB
    # measured against hubquant's model), weight-only bit-identical weights
    assert sqnr_db(deq, plain_transformers_logits(tmp_path)) > (60 if weight_only else 25)
    assert "from_pretrained` (transformers reads Llama 4's experts per expert)" in moe.card_section(model, quantized,
                                                                                                     policy)


def plain_transformers_logits(path) -> torch.Tensor:
    """Tripwire: transformers 5.25 loads compressed-tensors Llama 4 experts per expert (`SequentialLlama4TextExperts`
    replaces the fused `Llama4TextExperts`, quantizers/base.py) with no missing or unexpected keys. When this fails,
    transformers changed how it loads them: docs/moe.md's Llama 4 section and hubquant.moe_llama4 must follow."""
    from transformers import AutoModelForCausalLM

    loaded, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    experts = loaded.model.layers[1].feed_forward.experts
    assert type(experts).__name__ == "SequentialLlama4TextExperts" and len(experts) == EXPERTS
    return logits(loaded.eval())


@pytest.mark.parametrize("method", ["awq", "smoothquant"])
def test_scaling_methods_move_scale_inside_every_expert_never_from_the_routers_norm(method):
    """Every expert's up_proj -> down_proj move (and the shared expert's, and attention's) is kept, checked exact on a
    float32 copy; post_attention_layernorm -> the sparse block is dropped (the router reads it, the score scales each
    expert's input). AWQ is not worse than RTN against the float model."""
    from types import SimpleNamespace

    for mtype in ("llama4_text", "llama4"):
        get_method(method).check_architecture(SimpleNamespace(model_type=mtype), {})  # no refusal before download
    ref = logits(llama4_model())
    model = unfused()
    quantized, _ = quantize(model, method)
    assert sum(n in quantized for n in moe.expert_linear_names(model)) == EXPERT_LINEARS
    smap = moe_scaling.record(model)
    sparse = [n for n in smap.kept if int(n.rpartition(".")[2]) in SPARSE_LAYERS]
    assert sparse, smap.kept
    for layer in sparse:
        kept = {(m.smooth, m.balance) for m in smap.kept[layer]}
        for p in [f"experts.{i}" for i in range(EXPERTS)] + ["shared_expert"]:
            assert (f"feed_forward.{p}.up_proj", (f"feed_forward.{p}.down_proj",)) in kept, (layer, p)
        assert ("self_attn.v_proj", ("self_attn.o_proj",)) in kept
        assert not [m for m in smap.kept[layer] if m.smooth == "post_attention_layernorm"]
        assert [d for d in smap.dropped[layer]
                if d.startswith("post_attention_layernorm -> feed_forward.router") and "also read(s) it" in d]
    assert moe.float_module_names(model) == ["model.layers.1.feed_forward.router", "model.layers.3.feed_forward.router"]
    if method == "awq":
        rtn = unfused()
        quantize(rtn, "rtn")
        assert sqnr_db(ref, logits(model)) > sqnr_db(ref, logits(rtn)) - 0.5


def test_kept_moves_leave_the_float_model_unchanged():
    """Every move moe_scaling keeps on Llama 4 (each layer checked with its own input), applied with random scales
    to every layer of the float32 model at once (grouped-query v -> o with one scale per KV channel), keeps its
    logits: the router still sees the unscaled norm output and each expert its scored input."""
    from tests.test_moe_arch_scaling import fold_every_kept_move

    model = unfused()
    ref = logits(model)
    moved = fold_every_kept_move(model)
    assert sum(".experts." in m for m in moved) == len(SPARSE_LAYERS) * EXPERTS
    assert len(moved) == 2 * 4 + len(SPARSE_LAYERS) * (2 + EXPERTS + 1) and sqnr_db(ref, logits(model)) > 80


@pytest.mark.parametrize("method,skip_eval", [("rtn", False), ("gptq", False), ("rtn", True),
                                                  ("awq", False)])
def test_streamed_conversion_writes_the_same_bytes(method, skip_eval, tokenizer, tmp_path):
    """--streaming on reads each layer's fused, transposed experts from the checkpoint and splits them as the
    in-memory conversion does: the same model.safetensors and config.json bytes (RTN without evaluation too, which
    reads other architectures' experts one projection at a time; AWQ with its checked scale moves)."""
    import filecmp

    from hubquant.convert import ConvertOptions, convert
    from tests.test_moe_arch import FAST

    base = tmp_path / "base"
    llama4_model(vocab=len(tokenizer)).to(torch.bfloat16).save_pretrained(base)
    tokenizer.save_pretrained(base)
    logs: dict[str, list[str]] = {}
    for mode in ("off", "on"):
        logs[mode] = []
        convert(ConvertOptions(repo_id=str(base), method=method, group_size=32, streaming=mode, skip_eval=skip_eval,
                               output_dir=str(tmp_path / mode), **FAST), log=logs[mode].append)
    assert any(m.startswith("streaming 4 decoder layers") for m in logs["on"]), logs["on"]
    for name in ("model.safetensors", "config.json"):
        assert filecmp.cmp(tmp_path / "off" / name, tmp_path / "on" / name, shallow=False), name
    rep = json.loads((tmp_path / "on" / "hubquant.json").read_text())["moe"]
    assert rep["expert_linears"] == rep["expert_linears_quantized"] == EXPERT_LINEARS
    assert rep["float_modules"]["router"] == len(SPARSE_LAYERS)
    card = (tmp_path / "on" / "README.md").read_text()
    assert "from_pretrained` (transformers reads Llama 4's experts per expert)" in card
    assert "model = AutoModelForCausalLM.from_pretrained(" in card


@pytest.mark.parametrize("method", ["gptq", "awq", "smoothquant"])
def test_vision_language_llama4_quantizes_the_language_models_experts(method, tokenizer, tmp_path):
    """Llama4ForConditionalGeneration: the vision tower and projector stay float (bit-identical), the language
    model's experts are written per expert under `language_model.model.layers.N.feed_forward.experts.{i}`, plain
    AutoModelForImageTextToText loads the variant with no missing or unexpected keys, and hubquant.load computes the
    same text logits (W8A8: activations quantized differently in transformers)."""
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText, Llama4Config

    import hubquant
    from hubquant.convert import ConvertOptions, convert
    from tests.test_moe_arch import FAST

    text = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=64, intermediate_size_mlp=256,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                num_local_experts=EXPERTS, num_experts_per_tok=1, interleave_moe_layer_step=2,
                max_position_embeddings=256, attention_chunk_size=64)
    vision = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=1, image_size=32,
                  patch_size=8, vision_output_dim=128, projector_input_dim=128, projector_output_dim=128)
    cfg = Llama4Config(text_config=text, vision_config=vision, architectures=["Llama4ForConditionalGeneration"],
                       tie_word_embeddings=False)
    torch.manual_seed(0)
    base, out = tmp_path / "base", tmp_path / "out"
    AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16).save_pretrained(base)
    tokenizer.save_pretrained(base)
    logs: list[str] = []
    group = {} if method == "smoothquant" else {"group_size": 32}  # W8A8: per-channel weights
    convert(ConvertOptions(repo_id=str(base), method=method, output_dir=str(out), **group, **FAST), log=logs.append)
    assert any("vision-language model whose causal LM class has no vision tower" in m for m in logs)
    card = (out / "README.md").read_text()  # the card loads it with the class that loads the base
    assert "model = AutoModelForImageTextToText.from_pretrained(" in card and "AutoModelForCausalLM" not in card
    rep = json.loads((out / "hubquant.json").read_text())["moe"]
    assert rep["expert_linears"] == rep["expert_linears_quantized"] == EXPERTS * 3
    assert rep["float_modules"]["router"] == 1 and rep["float_modules"]["vision"] > 0
    f, fb = safe_open(out / "model.safetensors", "pt"), safe_open(base / "model.safetensors", "pt")
    keys = set(f.keys())
    stored = "weight" if method == "smoothquant" else "weight_packed"
    for i in range(EXPERTS):
        for p in ("gate_proj", "up_proj", "down_proj"):
            assert f"language_model.model.layers.1.feed_forward.experts.{i}.{p}.{stored}" in keys
    visual = [k for k in fb.keys() if k.startswith(("vision_model.", "multi_modal_projector."))]
    assert visual and all(torch.equal(f.get_tensor(k), fb.get_tensor(k)) for k in visual)  # float, untouched
    loaded, info = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(loaded.language_model.model.layers[1].feed_forward.experts).__name__ == "SequentialLlama4TextExperts"
    ours, _ = hubquant.load(out, device="cpu", dtype=torch.float32, progress=False)  # the same class, vision included
    assert type(ours).__name__ == "Llama4ForConditionalGeneration"
    # text logits: the same dequantized weights (W8A8 measured 48.1 dB: activations quantized differently there)
    assert sqnr_db(logits(loaded.eval()), logits(ours)) > (25 if method == "smoothquant" else 60)
    if method != "gptq":  # the language model's checked moves: every expert's up -> down, not the router's norm
        moved = [m for m in logs if "scale moves kept" in m]  # dense layer: 4; sparse: q/k/v, v -> o, 5 up -> down
        assert moved and f"{4 + 2 + EXPERTS + 1} scale moves kept over 2" in moved[0], logs
        assert "1 dropped: post_attention_layernorm -> feed_forward.router" in moved[0], logs
        return
    with pytest.raises(UnsupportedError) as e:  # a streamed causal LM skeleton would drop the vision tower
        convert(ConvertOptions(repo_id=str(base), method="rtn", group_size=32, streaming="on",
                               output_dir=str(tmp_path / "on"), **FAST), log=lambda m: None)
    assert e.value.exit_code == 5
