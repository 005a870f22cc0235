"""gpt-oss: biased, interleaved, clamped-SwiGLU experts quantized per expert (rtn, gptq, fp8), biases and routers
float, the variant read back by hubquant.load with the logits of hubquant's dequantized model (AWQ and SmoothQuant:
tests/test_moe_gptoss_scaling.py); plain transformers 5.24 cannot fuse per-expert gpt-oss tensors (tripwire);
MXFP4 source checkpoints are dequantized by transformers while loading."""
from __future__ import annotations

import json

import pytest
import torch

from hubquant import moe
from hubquant.errors import UnsupportedError
from hubquant.methods import get_method
from hubquant.modeling import quantizable_linears
from hubquant.quant import sqnr_db
from tests.test_moe import logits, moe_model, quantize, scheme_of

pytestmark = pytest.mark.skipif(not hasattr(__import__("transformers"), "GptOssConfig"),
                                reason="transformers without gpt-oss")

# random tiny gpt-oss is far more sensitive than the other architectures (1% weight noise: 15 dB against 35 dB for
# Qwen3-MoE, from v_proj/o_proj); the floors are measured values minus a margin
CASES = [("rtn", 7.0), ("gptq", 7.0), ("fp8", 10.0)]


def unfused():
    model = moe_model("gpt_oss")
    moe.unfuse_experts(model)
    return model


def test_per_expert_mlps_compute_the_fused_experts():
    model = moe_model("gpt_oss")
    ref = logits(model)
    fused = model.model.layers[0].mlp.experts
    gate_up, gate_up_b = fused.gate_up_proj.detach().clone(), fused.gate_up_proj_bias.detach().clone()
    moe.unfuse_experts(model)
    torch.testing.assert_close(logits(model), ref, rtol=1e-5, atol=1e-6)
    e3 = model.model.layers[0].mlp.experts[3]
    assert torch.equal(e3.gate_proj.weight, gate_up[3][:, ::2].t()) and torch.equal(e3.up_proj.bias, gate_up_b[3][1::2])
    names = quantizable_linears(model)
    assert len(moe.expert_linear_names(model)) == 2 * 8 * 3 and not [n for n in names if "router" in n]


@pytest.mark.parametrize("method,min_sqnr", CASES)
def test_gpt_oss_variant_loads_in_hubquant_with_float_biases(method, min_sqnr, tmp_path):
    from safetensors import safe_open

    import hubquant
    from hubquant.formats.compressed_tensors import write

    ref = logits(moe_model("gpt_oss"))
    model = unfused()
    biases = {n: m.bias.detach().clone() for n, m in quantizable_linears(model).items() if ".experts." in n}
    quantized, _ = quantize(model, method)
    assert set(quantized) == set(quantizable_linears(model))  # every expert projection and attention; no router
    deq = logits(model)
    assert sqnr_db(ref, deq) > min_sqnr
    qc = write(model, quantized, scheme=scheme_of(method), out_dir=tmp_path, method=method)
    assert "model.layers.0.mlp.router" in qc["ignore"]
    f = safe_open(tmp_path / "model.safetensors", "pt")
    keys = set(f.keys())
    stored = "weight_packed" if scheme_of(method).weights.bits == 4 else "weight"
    for i in (0, 7):
        for p in ("gate_proj", "up_proj", "down_proj"):
            name = f"model.layers.1.mlp.experts.{i}.{p}"
            assert f"{name}.{stored}" in keys and f"{name}.weight_scale" in keys
            bias = f.get_tensor(f"{name}.bias")  # expert biases stay float, unchanged
            assert bias.dtype == torch.float32 and torch.equal(bias, biases[name])
    assert "model.layers.1.mlp.router.weight" in keys and not any(k.startswith("model.layers.1.mlp.router.weight_")
                                                                  for k in keys)
    loaded, _ = hubquant.load(tmp_path, device="cpu", dtype=torch.float32, progress=False)
    assert loaded.hubquant_format["quantized_linears"] == len(quantized)
    out = logits(loaded)
    # weight-only: the same weights; FP8: hubquant's loader quantizes activations per token like the evaluation
    assert sqnr_db(deq, out) > (60 if scheme_of(method).activations is None else 40)


def test_plain_transformers_cannot_fuse_per_expert_gpt_oss_tensors(tmp_path):
    """Tripwire: transformers 5.24 has no conversion mapping for gpt-oss, so from_pretrained leaves the fused
    experts freshly initialized (missing keys). When this fails, transformers learned to fuse them: drop
    moe.NO_TRANSFORMERS_MAPPING['gpt_oss'] and test the logits instead (docs/moe.md)."""
    from transformers import AutoModelForCausalLM

    from hubquant.formats.compressed_tensors import write

    model = unfused()
    quantized, _ = quantize(model, "rtn")
    write(model, quantized, scheme=scheme_of("rtn"), out_dir=tmp_path, method="rtn")
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    missing = set(info["missing_keys"])
    assert "model.layers.0.mlp.experts.gate_up_proj" in missing and "model.layers.1.mlp.experts.down_proj" in missing
    assert "gpt_oss" in moe.NO_TRANSFORMERS_MAPPING


# ------------------------------------------------------------------------------------------ MXFP4 sources

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def decode_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Independent decoding of gpt-oss MXFP4: [E, out, in/32, 16] bytes (low nibble first) and E8M0 exponents
    [E, out, in/32] -> the fused parameter [E, in, out] (transformers keeps gpt-oss experts as x @ W)."""
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).reshape(*blocks.shape[:-1], 32).long()
    vals = E2M1[codes] * torch.exp2(scales.float() - 127)[..., None]
    return vals.reshape(*vals.shape[:2], -1).transpose(1, 2)


def save_mxfp4_gpt_oss(path, tokenizer, seed: int = 0):
    """A tiny gpt-oss checkpoint in the Hub's MXFP4 layout: experts as `*_blocks` (uint8) and `*_scales` (E8M0),
    everything else bf16, quantization_config quant_method mxfp4. Returns {fused param name: float weight}."""
    from safetensors.torch import load_file, save_file

    from tests.helpers import tiny_model

    tiny_model("gpt_oss", seed=seed).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    g = torch.Generator().manual_seed(seed + 1)
    expected = {}
    for key in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        w = tensors.pop(key)  # [E, in, out]
        e, n_in, n_out = w.shape
        blocks = torch.randint(0, 256, (e, n_out, n_in // 32, 16), generator=g, dtype=torch.uint8)
        scales = torch.randint(120, 124, (e, n_out, n_in // 32), generator=g, dtype=torch.uint8)
        tensors[f"{key}_blocks"], tensors[f"{key}_scales"] = blocks, scales
        expected[key] = decode_mxfp4(blocks, scales)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return expected


def test_mxfp4_source_is_dequantized_while_loading(tmp_path, tokenizer):
    from safetensors.torch import load_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from hubquant.stages import load_model

    expected = save_mxfp4_gpt_oss(tmp_path, tokenizer)
    tensors = load_file(tmp_path / "model.safetensors")
    key = "model.layers.1.mlp.experts.gate_up_proj"
    # our independent decoding of the layout agrees with transformers' own dequantizer
    theirs = convert_moe_packed_tensors(tensors[f"{key}_blocks"], tensors[f"{key}_scales"], dtype=torch.float32)
    assert torch.equal(theirs, expected[key])
    model, _ = load_model(tmp_path, trust_remote_code=False)
    assert not getattr(model.config, "quantization_config", None)
    for name, w in expected.items():  # E2M1 x 2^k with small k: exact in bf16
        assert torch.equal(model.get_parameter(name).float(), w), name


def test_other_quantized_sources_still_stop():
    from types import SimpleNamespace

    from hubquant import moe_gptoss

    with pytest.raises(UnsupportedError) as e:
        moe_gptoss.source_load_kwargs(SimpleNamespace(model_type="llama", quantization_config={"quant_method": "gptq"}))
    assert e.value.exit_code == 5 and "float" in e.value.hint
    kw = moe_gptoss.source_load_kwargs(SimpleNamespace(model_type="gpt_oss", quantization_config={"quant_method":
                                                                                                    "mxfp4"}))
    assert kw["quantization_config"].dequantize


# ------------------------------------------------------------------------------------------ gpt-oss's MXFP4 layout


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_gpt_oss_mxfp4_layout_loads_with_plain_transformers(method, tmp_path):
    """--format mxfp4: experts as gpt-oss's own blocks and E8M0 scales, attention float; plain from_pretrained
    (transformers dequantizes MXFP4 on CPU) computes what hubquant's dequantized model computes."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, Mxfp4Config
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from hubquant import moe_pipeline
    from hubquant.formats import get_format
    from hubquant.methods import QuantJob
    from hubquant.options import ConvertOptions
    from tests.test_moe import calib_ids

    ref_model = moe_model("gpt_oss")
    ref = logits(ref_model)
    model = unfused()
    spec = get_method(method)
    scheme = spec.resolve_scheme(preset="MXFP4A16")
    ignore = ConvertOptions(repo_id="x", format="mxfp4").ignored_patterns
    job = QuantJob(scheme=scheme, calib=calib_ids() if spec.needs_calibration(scheme) else None, ignore=ignore,
                   progress=False)
    quantized, _ = moe_pipeline.quantize_with_policy(model, job, spec.load(), log=lambda m: None)
    assert set(quantized) == set(moe.expert_linear_names(model))  # experts only: attention stays float
    deq = logits(model)
    qc = get_format("mxfp4")(model, quantized, scheme=scheme, out_dir=tmp_path, method=method)
    assert qc["quant_method"] == "mxfp4"
    tensors = load_file(tmp_path / "model.safetensors")
    key = "model.layers.1.mlp.experts"
    blocks, scales = tensors[f"{key}.gate_up_proj_blocks"], tensors[f"{key}.gate_up_proj_scales"]
    assert blocks.dtype == scales.dtype == torch.uint8 and blocks.shape == (8, 2 * 256, 128 // 32, 16)
    fused = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # transformers' own dequantizer
    e5 = model.get_submodule(key)[5]
    assert torch.equal(fused[5][:, ::2], e5.gate_proj.weight.t())  # gate even columns, up odd ones
    assert torch.equal(fused[5][:, 1::2], e5.up_proj.weight.t())
    assert torch.equal(tensors[f"{key}.gate_up_proj_bias"][5][1::2], e5.up_proj.bias)
    q_ref = ref_model.model.layers[1].self_attn.q_proj.weight
    assert torch.equal(tensors["model.layers.1.self_attn.q_proj.weight"], q_ref)  # float, untouched
    # transformers >= 5.25 installs `kernels` and then fetches gpt-oss's MXFP4 kernels from the Hub; offline, on CPU,
    # dequantize=True is the documented load (what earlier versions did by themselves without `kernels`)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True,
                                                        quantization_config=Mxfp4Config(dequantize=True))
    assert not info["missing_keys"] and not info["unexpected_keys"]
    out = logits(loaded)
    assert sqnr_db(deq, out) > 60
    assert sqnr_db(ref, out) > 9.0
