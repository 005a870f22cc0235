"""Mixture-of-experts architectures whose checkpoint layout comes from transformers' own conversion mapping
(hubquant.moe_arch): every expert projection is quantized and no router, plain transformers loads the variant and
computes what hubquant's dequantized model computes, the streamed conversion writes the same bytes, and a layout
the per-expert Linears would not reproduce stops with exit 5."""
from __future__ import annotations

import filecmp
import json

import pytest
import torch
from torch import nn

from hubquant import moe, moe_arch
from hubquant.errors import UnsupportedError
from hubquant.modeling import quantizable_linears
from hubquant.quant import sqnr_db
from tests.helpers import MOE_ARCHS, NEW_MOE_ARCHS, save_tiny_repo
from tests.test_moe import logits, moe_model, quantize, scheme_of

QWEN = ("gate_proj", "up_proj", "down_proj")
MIXTRAL = (("w1", "w3", "w2"), (".mlp.", ".block_sparse_moe."))
# what each architecture's Hub checkpoints call its experts (the names vLLM's loaders read too)
EXPECTED = {arch: (QWEN, None) for arch in (*NEW_MOE_ARCHS, *MOE_ARCHS)}
EXPECTED.update(mixtral=MIXTRAL, minimax_m2=MIXTRAL, phimoe=MIXTRAL)
# the router each architecture keeps float, relative to a sparse block
ROUTER = {"hunyuan_v1_moe": "gate.wg", "phimoe": "router"}


def fused_experts(model) -> tuple[str, nn.Module]:
    return next((n, m) for n, m in model.named_modules() if isinstance(getattr(m, "gate_up_proj", None), torch.Tensor))


@pytest.mark.parametrize("arch", [*NEW_MOE_ARCHS, *MOE_ARCHS[:-1]])
def test_layout_comes_from_transformers_conversion_mapping(arch):
    model = moe_model(arch)
    name, _ = fused_experts(model)
    layout = moe_arch.expert_layout(model, name)
    assert (layout.proj_names, layout.block_rename) == EXPECTED[arch]
    assert model.config.model_type not in moe_arch.OVERRIDES  # derived, not a hand-written entry


def test_converters_that_do_not_build_experts_from_per_expert_tensors_give_no_layout():
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    # Qwen3-VL-MoE checkpoints store the experts fused and transposed: transformers only transposes them
    assert moe_arch.derive_layout(get_checkpoint_conversion_mapping("qwen3_vl_moe"),
                                  "model.language_model.layers.0.mlp.experts") is None
    assert moe_arch.derive_layout([], "model.layers.0.mlp.experts") is None
    qwen = get_checkpoint_conversion_mapping("qwen2_moe")
    assert moe_arch.derive_layout(qwen, "model.layers.0.mlp.experts").proj_names == QWEN
    qwen[0].operations = qwen[0].operations[:1]  # stacked but not concatenated: not gate/up rows
    assert moe_arch.derive_layout(qwen, "model.layers.0.mlp.experts") is None


def _loop_experts(up_first: bool):
    """A fused experts forward written token by token; `up_first` reads the up rows before the gate rows."""
    def forward(self, hidden, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden)
        for t in range(hidden.shape[0]):
            for j in range(top_k_index.shape[1]):
                e = int(top_k_index[t, j])
                a, b = nn.functional.linear(hidden[t], self.gate_up_proj[e]).chunk(2, dim=-1)
                gate, up = (b, a) if up_first else (a, b)
                out[t] += top_k_weights[t, j] * nn.functional.linear(self.act_fn(gate) * up, self.down_proj[e])
        return out
    return forward


def test_unfuse_check_stops_experts_the_per_expert_linears_would_compute_wrong(monkeypatch):
    model = moe_model("hunyuan_v1_moe")
    _, fused = fused_experts(model)
    monkeypatch.setattr(type(fused), "forward", _loop_experts(up_first=False))
    assert moe.unfuse_experts(model) == 2  # the same arithmetic written another way passes
    model = moe_model("hunyuan_v1_moe")
    monkeypatch.setattr(type(fused), "forward", _loop_experts(up_first=True))
    with pytest.raises(UnsupportedError) as e:
        moe.unfuse_experts(model)
    assert e.value.exit_code == 5 and "'hunyuan_v1_moe'" in str(e.value) and "do not match" in str(e.value)
    assert "qwen3_next" in e.value.hint
    assert isinstance(fused_experts(model)[1], type(fused))  # nothing was replaced


def test_unfuse_check_refuses_transposed_or_biased_experts_and_runs_on_the_meta_device():
    model = moe_model("dots1")
    _, fused = fused_experts(model)
    fused.is_transposed = True
    with pytest.raises(UnsupportedError) as e:
        moe.unfuse_experts(model)
    assert e.value.exit_code == 5 and "is_transposed=True" in str(e.value)

    from transformers import AutoModelForCausalLM

    from tests.helpers import tiny_config

    def skeleton():  # a streamed conversion's model: no weights; the check runs on random ones of the real shapes
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(tiny_config("dots1", vocab=512))

    assert moe.unfuse_experts(skeleton()) == 1
    with pytest.MonkeyPatch.context() as mp:  # arithmetic per-expert Linears do not reproduce, on the skeleton
        mp.setattr(type(fused), "forward", _loop_experts(up_first=True))
        with pytest.raises(UnsupportedError) as e:
            moe.unfuse_experts(skeleton())
    assert e.value.exit_code == 5 and "do not match" in str(e.value)


def test_routers_are_found_by_shape_and_kept_float():
    model = moe_model("hunyuan_v1_moe")  # its router is an nn.Linear under mlp.gate, no name pattern knows it
    moe.unfuse_experts(model)
    linears = quantizable_linears(model)
    assert not [n for n in linears if n.endswith("gate.wg")]
    assert "model.layers.0.mlp.gate.wg" in moe.float_module_names(model)
    model = moe_model("qwen3_next")
    moe.unfuse_experts(model)
    assert {"model.layers.0.mlp.gate", "model.layers.0.mlp.shared_expert_gate"} <= set(moe.float_module_names(model))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("arch", NEW_MOE_ARCHS)
def test_every_expert_is_quantized_and_plain_transformers_loads_it(arch, method, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from hubquant.formats.compressed_tensors import write

    model = moe_model(arch)
    ref = logits(model)
    moe.unfuse_experts(model)
    experts = moe.expert_linear_names(model)
    mods = moe.expert_modules(model)
    assert len(experts) == 3 * sum(m.num_experts for m in mods.values()) > 0
    quantized, _ = quantize(model, method)
    assert set(experts) <= set(quantized) and set(quantized) == set(quantizable_linears(model))
    routers = moe.float_module_names(model)
    assert len(routers) >= len(mods) and not set(routers) & set(quantized)
    deq = logits(model)
    qc = write(model, quantized, scheme=scheme_of(method), out_dir=tmp_path, method=method)
    assert {moe.checkpoint_name(model, r) for r in routers} <= set(qc["ignore"])
    keys = set(safe_open(tmp_path / "model.safetensors", "pt").keys())
    assert all(f"{moe.checkpoint_name(model, n)}.weight_packed" in keys for n in experts)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert_fused_equal(model, loaded)
    out = logits(loaded.eval())
    assert sqnr_db(deq, out) > 60, "the loaded variant must compute what hubquant's dequantized model computes"
    # random weights, W4 groups of 32: 10-16 dB; FlexOlmo's attention alone loses 6 dB to W4 on random weights
    assert sqnr_db(ref, deq) > (4 if arch == "flex_olmo" else 8)
    section = moe.card_section(model, quantized, None)
    key = ROUTER.get(arch, "gate")
    assert f"{len(experts)} of {len(experts)} expert projections" in section and f".{key}`" in section


def assert_fused_equal(model, loaded) -> None:
    """transformers fused hubquant's dequantized experts again, bit for bit."""
    for name, per_expert in moe.expert_modules(model).items():
        fused = loaded.get_submodule(name)
        for i, mlp in enumerate(per_expert):
            gate, up, down = mlp.projections()
            assert torch.equal(fused.gate_up_proj[i].float(), torch.cat([gate.weight, up.weight]).float())
            assert torch.equal(fused.down_proj[i].float(), down.weight.float())


@pytest.mark.parametrize("arch", ["qwen3_next", "minimax_m2", "deepseek_v32", "phimoe"])
def test_fp8_and_w8a8_experts(arch, tmp_path):
    """FP8 experts load with plain transformers (bit-identical weights; transformers runs them on unquantized
    activations, hubquant and vLLM quantize those per token); W8A8 int8 experts (vLLM's layout) with hubquant.load."""
    from transformers import AutoModelForCausalLM

    import hubquant
    from hubquant.formats.compressed_tensors import write

    for method in ("fp8", "w8a8"):
        model = moe_model(arch)
        moe.unfuse_experts(model)
        quantized, _ = quantize(model, method)
        assert set(moe.expert_linear_names(model)) <= set(quantized)
        write(model, quantized, scheme=scheme_of(method), out_dir=tmp_path / method, method=method)
        if method == "fp8":
            loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / method, dtype=torch.float32,
                                                                output_loading_info=True)
            assert not info["missing_keys"] and not info["unexpected_keys"], info
            assert_fused_equal(model, loaded)
        else:
            loaded, _ = hubquant.load(tmp_path / method, device="cpu", dtype=torch.float32, progress=False)
            assert sqnr_db(logits(model), logits(loaded)) > 40


FAST = dict(eval_windows=2, eval_seq_len=64, num_samples=4, seq_len=64, calib_dataset="fortunes", progress=False)


def _convert_both(base, tmp_path, method: str, tag: str) -> dict:
    from hubquant.convert import ConvertOptions, convert

    logs = {}
    for mode in ("off", "on"):
        logs[mode] = []
        convert(ConvertOptions(repo_id=str(base), method=method, group_size=32, streaming=mode,
                               output_dir=str(tmp_path / f"{tag}-{mode}"), **FAST), log=logs[mode].append)
    assert any(m.startswith("streaming 2 decoder layers") for m in logs["on"])
    for name in ("model.safetensors", "config.json"):
        assert filecmp.cmp(tmp_path / f"{tag}-off" / name, tmp_path / f"{tag}-on" / name, shallow=False), name
    return json.loads((tmp_path / f"{tag}-on" / "hubquant.json").read_text())["moe"]


@pytest.mark.parametrize("arch", NEW_MOE_ARCHS)
def test_streamed_conversion_writes_the_same_bytes(arch, tokenizer, tmp_path):
    base = save_tiny_repo(tmp_path / "base", arch, tokenizer)
    for method in ("rtn", "gptq"):
        rep = _convert_both(base, tmp_path, method, method)
        assert rep["expert_linears"] == rep["expert_linears_quantized"] > 0
        assert rep["float_modules"]["router"] >= 1


def test_qwen3_5_moe_checkpoint_converts_with_its_vision_tower(tokenizer, tmp_path):
    """Qwen3.5-MoE checkpoints are vision-language models whose model_type also maps to a text-only causal LM class:
    the conversion keeps the vision tower (in memory; a streamed skeleton would drop it) and the variant loads with
    AutoModelForImageTextToText."""
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    from hubquant.convert import ConvertOptions, convert
    from tests.helpers import save_tiny_vl_repo

    base = save_tiny_vl_repo(tmp_path / "base", "qwen3_5_moe", tokenizer)
    logs: list[str] = []
    convert(ConvertOptions(repo_id=str(base), method="rtn", group_size=32, output_dir=str(tmp_path / "out"), **FAST),
            log=logs.append)
    assert any("vision-language model whose causal LM class has no vision tower" in m for m in logs)
    rep = json.loads((tmp_path / "out" / "hubquant.json").read_text())["moe"]
    assert rep["expert_linears"] == rep["expert_linears_quantized"] == 2 * 8 * 3
    keys = set(safe_open(tmp_path / "out" / "model.safetensors", "pt").keys())
    base_keys = set(safe_open(base / "model.safetensors", "pt").keys())
    visual = {k for k in base_keys if k.startswith("model.visual.")}
    assert visual and {k for k in keys if k.startswith("model.visual.")} == visual  # the vision tower, float
    assert all(k.startswith(("model.visual.", "model.language_model.", "lm_head.")) for k in keys)
    loaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert type(loaded).__name__ == "Qwen3_5MoeForConditionalGeneration"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with pytest.raises(UnsupportedError) as e:
        convert(ConvertOptions(repo_id=str(base), method="rtn", group_size=32, streaming="on",
                               output_dir=str(tmp_path / "on"), **FAST), log=lambda m: None)
    assert e.value.exit_code == 5


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_vision_language_moe_quantizes_the_language_models_experts(method, tokenizer, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    from hubquant.convert import ConvertOptions, convert
    from tests.helpers import save_tiny_vl_repo

    base = save_tiny_vl_repo(tmp_path / "base", "glm4v_moe", tokenizer)
    out = tmp_path / "out"
    convert(ConvertOptions(repo_id=str(base), method=method, group_size=32, output_dir=str(out), **FAST),
            log=lambda m: None)
    rep = json.loads((out / "hubquant.json").read_text())["moe"]
    assert rep["expert_linears"] == rep["expert_linears_quantized"] == 8 * 3  # one sparse layer of 8 experts
    keys = list(safe_open(out / "model.safetensors", "pt").keys())
    packed = [k for k in keys if k.endswith("weight_packed")]
    assert all(".language_model." in k for k in packed)
    assert len([k for k in packed if ".mlp.experts." in k]) == 24
    assert any(k.startswith("model.visual.") and k.endswith(".weight") for k in keys)  # vision tower float
    assert "model.language_model.layers.1.mlp.gate" in json.loads((out / "config.json").read_text())[
        "quantization_config"]["ignore"]
    loaded, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert type(loaded).__name__ == "Glm4vMoeForConditionalGeneration"
    assert not info["missing_keys"] and not info["unexpected_keys"], info


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_vision_language_moe_variant_computes_what_hubquant_computes(method, tmp_path):
    from transformers import AutoModelForImageTextToText

    from hubquant.formats.compressed_tensors import write
    from tests.helpers import tiny_vl_config

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(tiny_vl_config("glm4v_moe"), dtype=torch.float32).eval()
    assert moe.unfuse_experts(model) == 1
    quantized, _ = quantize(model, method)
    assert set(moe.expert_linear_names(model)) <= set(quantized)
    assert not [n for n in quantized if ".visual." in n or not n.startswith("model.language_model.")]
    deq = logits(model)
    write(model, quantized, scheme=scheme_of(method), out_dir=tmp_path, method=method)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert_fused_equal(model, loaded)
    assert sqnr_db(deq, logits(loaded)) > 60
