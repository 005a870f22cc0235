"""Which MoE checkpoint layouts transformers 5.24 loads, and tripwires for the ones it cannot (docs/moe.md, "Checkpoint
layout, and why"): MXFP4A16 and W8A16 (pack-quantized) experts load exactly; NVFP4 experts lose their global
scale; W8A8 int8 experts and asymmetric int4 experts do not load; bitsandbytes leaves fused experts in float.
Each tripwire fails when upstream changes, which is the signal to lift the matching refusal in
hubquant.moe.checkpoint_scheme."""
from __future__ import annotations

import pytest
import torch

from hubquant import moe, moe_pipeline
from hubquant.errors import UnsupportedError
from hubquant.formats.compressed_tensors import write
from hubquant.methods import QuantJob, get_method
from hubquant.modeling import quantizable_linears
from hubquant.quant import QuantScheme, WeightScheme, sqnr_db
from tests.test_moe import calib_ids, logits, moe_model


def quantize(model, method: str, scheme: QuantScheme):
    spec = get_method(method)
    calib = calib_ids() if spec.needs_calibration(scheme) else None
    job = QuantJob(scheme=scheme, calib=calib, progress=False)
    return moe_pipeline.quantize_with_policy(model, job, spec.load(), log=lambda m: None)


def assert_fused_experts_equal(model, loaded) -> None:
    """transformers fused exactly hubquant's dequantized experts: every expert's gate/up and down, bit for bit."""
    for name, experts in moe.expert_modules(model).items():
        fused = loaded.get_submodule(name)
        for i, mlp in enumerate(experts):
            gate, up, down = mlp.projections()
            assert torch.equal(fused.gate_up_proj[i], torch.cat([gate.weight, up.weight]))
            assert torch.equal(fused.down_proj[i], down.weight)


def written(arch: str, method: str, scheme: QuantScheme, tmp_path, dtype=torch.float32):
    """(float logits, model after the method, quantized dict) with the variant written to tmp_path."""
    model = moe_model(arch).to(dtype)
    ref = logits(model)
    moe.unfuse_experts(model)
    quantized, _ = quantize(model, method, scheme)
    write(model, quantized, scheme=scheme, out_dir=tmp_path, method=method)
    return ref, model, quantized


@pytest.mark.parametrize("arch,method", [("qwen3_moe", "rtn"), ("qwen3_moe", "gptq"), ("mixtral", "rtn")])
def test_mxfp4a16_experts_load_with_plain_transformers(arch, method, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    import hubquant

    scheme = get_method(method).resolve_scheme(preset="MXFP4A16")
    assert moe.checkpoint_scheme(moe_model(arch), scheme, "compressed-tensors", asym_requested=False) is scheme
    ref, model, quantized = written(arch, method, scheme, tmp_path, dtype=torch.bfloat16)
    assert set(quantized) == set(quantizable_linears(model))  # every expert and attention Linear, no router
    deq = logits(model)
    f = safe_open(tmp_path / "model.safetensors", "pt")
    block, proj = ("block_sparse_moe", "w1") if arch == "mixtral" else ("mlp", "gate_proj")
    key = f"model.layers.1.{block}.experts.3.{proj}"
    # vLLM's CompressedTensorsW4A4Mxfp4MoEMethod: w13_weight_packed uint8 [E, 2I, H/2], w13_weight_scale uint8
    # [E, 2I, H/32], filled per expert from these names
    packed, scale = f.get_tensor(f"{key}.weight_packed"), f.get_tensor(f"{key}.weight_scale")
    hidden = model.config.hidden_size
    assert packed.dtype == scale.dtype == torch.uint8 and packed.shape[1] == hidden // 2
    assert scale.shape[1] == hidden // 32
    assert not any(k.startswith(f"model.layers.1.{block}.gate.weight_") for k in f.keys())  # router float
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert_fused_experts_equal(model, loaded)
    out = logits(loaded)
    assert sqnr_db(deq, out) > 38  # bf16: transformers multiplies fused gate/up, hubquant the halves
    assert sqnr_db(ref, deq) > 10 and sqnr_db(ref, out) > 10
    assert "from_pretrained` (transformers fuses the experts again)" in moe.card_section(model, quantized, None)
    mine, _ = hubquant.load(tmp_path, device="cpu", dtype=torch.bfloat16, progress=False)
    assert sqnr_db(deq, logits(mine)) > 30  # bf16; its FP4 kernel accumulates in another order


def test_nvfp4_is_refused_on_moe_with_the_reason():
    model = moe_model("qwen3_moe")
    moe.unfuse_experts(model)
    for preset in ("NVFP4A16", "NVFP4"):
        with pytest.raises(UnsupportedError) as e:
            moe.checkpoint_scheme(model, get_method("rtn").resolve_scheme(preset=preset), "compressed-tensors",
                                  asym_requested=False)
        assert e.value.exit_code == 5 and "weight_global_scale" in str(e.value) and "MXFP4A16" in e.value.hint


def test_tripwire_transformers_drops_nvfp4_expert_global_scale(tmp_path):
    """transformers' CompressedTensorsDequantize rebuilds experts from weight_packed/weight_scale/weight_shape:
    the global scale never reaches the NVFP4 compressor, so each expert loads multiplied by it."""
    from transformers import AutoModelForCausalLM

    scheme = get_method("rtn").resolve_scheme(preset="NVFP4A16")
    _, model, quantized = written("qwen3_moe", "rtn", scheme, tmp_path, dtype=torch.bfloat16)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    name = "model.layers.0.mlp.experts"
    ours = model.get_submodule(name)[2].down_proj.weight.float()
    theirs = loaded.get_submodule(name).down_proj[2].float()
    gscale = quantized[f"{name}.2.down_proj"].global_scale.float()
    assert gscale > 100
    assert sqnr_db(ours, theirs) < 0  # when this fails, transformers applies the global scale: allow NVFP4
    torch.testing.assert_close(theirs, ours * gscale, rtol=2**-7, atol=0)


def test_tripwire_transformers_cannot_load_w8a8_int8_experts(tmp_path):
    """W8A8 int8 experts (`int-quantized`: int8 `weight` + `weight_scale` per expert, what vLLM's
    CompressedTensorsW8A8Int8MoEMethod reads): transformers' expert decompression handles FP8 pairs and
    `weight_packed` only, so its Concatenate gets no tensors. hubquant.load runs the variant."""
    from transformers import AutoModelForCausalLM

    import hubquant

    _, model, quantized = written("qwen3_moe", "w8a8", get_method("w8a8").default_scheme, tmp_path)
    with pytest.raises(RuntimeError, match="conversion"):
        AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert "cannot load W8A8 int8 experts" in moe.card_section(model, quantized, None)  # the card says what loads it
    mine, _ = hubquant.load(tmp_path, device="cpu", dtype=torch.float32, progress=False)
    assert mine.hubquant_format["quantized_linears"] == len(quantized)
    assert sqnr_db(logits(model), logits(mine)) > 25  # int8 activations


@pytest.mark.parametrize("arch,method,group_size", [("qwen3_moe", "rtn", -1), ("qwen3_moe", "gptq", 32),
                                                    ("mixtral", "rtn", 32)])
def test_w8a16_experts_load_with_plain_transformers(arch, method, group_size, tmp_path):
    """Weight-only int8 on a MoE model is written `pack-quantized` (weight_packed: four 8-bit codes an int32), the
    layout transformers' expert decompression takes and vLLM's WNA16 MoE path reads: transformers fuses exactly
    hubquant's dequantized experts, and the logits match hubquant's own model."""
    import json

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    import hubquant

    scheme = QuantScheme(weights=WeightScheme(bits=8, group_size=group_size))
    ref, model, quantized = written(arch, method, scheme, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["config_groups"]["group_0"]["weights"]["num_bits"] == 8
    f = safe_open(tmp_path / "model.safetensors", "pt")
    block, proj = ("block_sparse_moe", "w1") if arch == "mixtral" else ("mlp", "gate_proj")
    packed = f.get_tensor(f"model.layers.1.{block}.experts.3.{proj}.weight_packed")
    assert packed.dtype == torch.int32 and packed.shape[1] * 4 == model.config.hidden_size
    assert f.get_tensor("model.layers.1.self_attn.q_proj.weight_packed").dtype == torch.int32  # one format
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert_fused_experts_equal(model, loaded)
    deq = logits(model)
    assert sqnr_db(deq, logits(loaded)) > 60 and sqnr_db(ref, deq) > 25
    assert "from_pretrained` (transformers fuses the experts again)" in moe.card_section(model, quantized, None)
    mine, _ = hubquant.load(tmp_path, device="cpu", dtype=torch.float32, progress=False)
    assert mine.hubquant_format["quantized_linears"] == len(quantized)
    assert sqnr_db(deq, logits(mine)) > 60


def test_tripwire_transformers_drops_expert_zero_points(tmp_path):
    """Asymmetric int4 experts: transformers builds each expert's module without its weight_zero_point, and
    compressed-tensors asserts. MoE variants are therefore written with symmetric groups."""
    from transformers import AutoModelForCausalLM

    scheme = QuantScheme(weights=WeightScheme(bits=4, group_size=32, symmetric=False))
    written("qwen3_moe", "rtn", scheme, tmp_path)
    with pytest.raises(RuntimeError, match="conversion"):
        AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)


def test_tripwire_bitsandbytes_leaves_fused_experts_in_float(tmp_path):
    """transformers + bitsandbytes replace nn.Linear modules only: the fused experts (90%+ of a MoE's weights)
    stay bf16, and its bitsandbytes quantizers have no dequantize step to fuse per-expert tensors. So hubquant
    refuses bnb-int8/bnb-nf4 on MoE models (exit 5) instead of writing a mislabelled variant."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    moe_model("qwen3_moe").to(torch.bfloat16).save_pretrained(tmp_path)
    q = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    assert type(q.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    experts = q.model.layers[0].mlp.experts
    assert type(experts.gate_up_proj) is torch.nn.Parameter and experts.gate_up_proj.dtype == torch.bfloat16
    model = moe_model("qwen3_moe")
    moe.unfuse_experts(model)
    for method in ("bnb-nf4", "bnb-int8"):
        with pytest.raises(UnsupportedError) as e:
            moe.checkpoint_scheme(model, get_method(method).default_scheme, "bitsandbytes", asym_requested=False)
        assert e.value.exit_code == 5 and "rtn, gptq" in e.value.hint


def test_w8a16_moe_conversion_streamed_and_in_memory(tokenizer, tmp_path):
    """`hubquant convert --bits 8` of a MoE model: the same pack-quantized bytes streamed and in memory, and the
    card tells the loader transformers runs."""
    import filecmp
    import json

    from transformers import AutoModelForCausalLM

    from hubquant.convert import ConvertOptions, convert
    from tests.helpers import save_tiny_repo

    base = save_tiny_repo(tmp_path / "base", "qwen3_moe", tokenizer, layers=2)
    logs: dict[str, list[str]] = {}
    for mode in ("off", "on"):
        logs[mode] = []
        convert(ConvertOptions(repo_id=str(base), method="rtn", bits=8, group_size=32, streaming=mode,
                               output_dir=str(tmp_path / mode), eval_windows=2, eval_seq_len=64, num_samples=4,
                               seq_len=64, calib_dataset="fortunes", progress=False), log=logs[mode].append)
    assert any(m.startswith("streaming 2 decoder layers") for m in logs["on"])
    for name in ("model.safetensors", "config.json"):
        assert filecmp.cmp(tmp_path / "off" / name, tmp_path / "on" / name, shallow=False), name
    qc = json.loads((tmp_path / "on" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized"
    for mode in ("off", "on"):
        card = (tmp_path / mode / "README.md").read_text()
        assert "plain `AutoModelForCausalLM.from_pretrained` (transformers fuses the experts again)" in card
        assert "cannot load" not in card
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "on", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
