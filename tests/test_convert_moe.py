"""The whole pipeline on mixtures of experts and on the other architectures: convert -> card -> evaluation ->
plain transformers loads the variant; corruption fails the conversion; encoders stop with exit 5."""
from __future__ import annotations

import json
import uuid

import pytest
import torch

from hubquant.convert import ConvertOptions, convert
from hubquant.errors import QualityGateError, UnsupportedError
from tests.helpers import save_tiny_repo

FAST = dict(num_samples=8, seq_len=64, calib_dataset="fortunes", eval_windows=2, eval_seq_len=64, progress=False)


def publish(local_hub, tokenizer, tmp_path, arch: str) -> str:
    repo = f"alice/tiny-{arch}-{uuid.uuid4().hex[:6]}"
    local_hub.hub.publish_folder(repo, save_tiny_repo(tmp_path / arch, arch, tokenizer))
    return repo


def test_moe_gptq_end_to_end(hub_env, local_hub, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    repo = publish(local_hub, tokenizer, tmp_path, "qwen3_moe")
    out = tmp_path / "out"
    logs: list[str] = []
    res = convert(ConvertOptions(repo_id=repo, method="gptq", group_size=32, output_dir=str(out), **FAST),
                  log=logs.append)
    prov = json.loads((out / "hubquant.json").read_text())
    moe = prov["moe"]
    assert moe["expert_linears"] == moe["expert_linears_quantized"] == 2 * 8 * 3
    r = moe["routing"]
    assert r["experts"] == 16 and r["min"] <= r["median"] <= r["max"] and sum(map(sum, moe["routed_tokens"].values())) \
        == 2 * 8 * 64 * 2  # layers x calibration tokens x top-2
    assert any(line.startswith("moe: routed calibration tokens per expert") for line in logs)
    card = (out / "README.md").read_text()
    assert "Mixture of experts" in card and "routers and shared-expert gates decide" in card
    assert res.metrics["top1_agreement"] > 0.5 and res.metrics["ppl_increase_pct"] < 60
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 1000, (1, 16))).logits).all()


def test_moe_awq_with_calibrate_all_experts(hub_env, local_hub, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    repo = publish(local_hub, tokenizer, tmp_path, "deepseek_v3")
    out = tmp_path / "out"
    logs: list[str] = []
    res = convert(ConvertOptions(repo_id=repo, method="awq", group_size=32, output_dir=str(out),
                                 method_options={"calibrate_all_experts": "true"}, **FAST), log=logs.append)
    prov = json.loads((out / "hubquant.json").read_text())
    r = prov["moe"]["routing"]
    assert r["calibrate_all_experts"] and r["fallback_linears"] == 0 and r["layers"] == 1  # first layer is dense
    assert prov["settings"]["method_options"] == {"calibrate_all_experts": "true"}
    assert prov["settings"]["scheme"]["weights"]["symmetric"]  # experts symmetric: transformers needs no zero point
    assert "moe: experts are written with symmetric groups" in "\n".join(logs)
    assert "calibrate_all_experts=true" in (out / "README.md").read_text()
    assert res.metrics["ppl_increase_pct"] < 60
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 1000, (1, 16))).logits).all()


@pytest.mark.parametrize("arch", ["mixtral", "llama"])
def test_corrupted_variant_fails_the_smoke_check(hub_env, local_hub, tokenizer, tmp_path, monkeypatch, arch):
    from hubquant import moe, moe_pipeline

    repo = publish(local_hub, tokenizer, tmp_path, arch)
    real = moe_pipeline.quantize_with_policy

    def corrupting(model, job, fn, **kw):
        result = real(model, job, fn, **kw)
        experts = moe.expert_modules(model)
        lin = next(iter(experts.values()))[0].w1 if experts else model.model.layers[0].mlp.down_proj
        lin.weight.data.fill_(float("nan"))
        return result

    monkeypatch.setattr(moe_pipeline, "quantize_with_policy", corrupting)
    with pytest.raises(QualityGateError) as e:
        convert(ConvertOptions(repo_id=repo, method="rtn", group_size=32, output_dir=str(tmp_path / "o"),
                               streaming="off", **FAST), log=lambda m: None)  # (streamed: tests/test_streaming_moe.py)
    # MoE: the written experts are checked against the model first; any model: the evaluation is not finite
    expected = "the evaluated weight is not the dequantized stored one" if arch == "mixtral" else "not finite"
    assert e.value.exit_code == 6 and expected in str(e.value), e.value


@pytest.mark.parametrize("arch", ["qwen3", "gemma2", "gemma3_text", "phi3", "deepseek_v3", "olmoe"])
def test_architectures_convert_and_load(hub_env, local_hub, tokenizer, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    repo = publish(local_hub, tokenizer, tmp_path, arch)
    out = tmp_path / "out"
    res = convert(ConvertOptions(repo_id=repo, method="rtn", group_size=32, output_dir=str(out), **FAST),
                  log=lambda m: None)
    # random tiny models predict almost uniformly, so agreement is modest; the perplexity must barely move
    assert res.metrics["top1_agreement"] > 0.3 and res.metrics["ppl_increase_pct"] < 60, res.metrics
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert "lm_head" in qc["ignore"]


def test_encoder_stops_with_exit_5_naming_what_is_supported(hub_env, local_hub, tmp_path, tokenizer):
    from transformers import BertConfig, BertForMaskedLM

    path = tmp_path / "bert"
    BertForMaskedLM(BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                               vocab_size=49152)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    repo = f"alice/tiny-bert-{uuid.uuid4().hex[:6]}"
    local_hub.hub.publish_folder(repo, path)
    with pytest.raises(UnsupportedError) as e:
        convert(ConvertOptions(repo_id=repo, method="rtn", group_size=32, output_dir=str(tmp_path / "o"), **FAST),
                log=lambda m: None)
    assert e.value.exit_code == 5 and "qwen3_moe" in e.value.hint and "llava" in e.value.hint


@pytest.mark.parametrize("arch,method", [("qwen2_5_vl", "gptq"), ("gemma3", "rtn"), ("llava", "rtn")])
def test_vision_language_quantizes_the_language_model_only(hub_env, local_hub, tokenizer, tmp_path, arch, method):
    from huggingface_hub import ModelCard
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    from tests.helpers import save_tiny_vl_repo

    repo = f"alice/tiny-{arch}-{uuid.uuid4().hex[:6]}"
    local_hub.hub.publish_folder(repo, save_tiny_vl_repo(tmp_path / arch, arch, tokenizer))
    out = tmp_path / "out"
    res = convert(ConvertOptions(repo_id=repo, method=method, group_size=32, output_dir=str(out), **FAST),
                  log=lambda m: None)
    assert res.metrics["ppl_increase_pct"] < 60, res.metrics
    keys = list(safe_open(out / "model.safetensors", "pt").keys())
    packed = [k for k in keys if k.endswith("weight_packed")]
    assert packed and all(".language_model." in k for k in packed)  # vision tower and projector stay float
    assert any(("visual" in k or "vision_tower" in k) and k.endswith(".weight") for k in keys)
    assert (out / "preprocessor_config.json").is_file()
    assert ModelCard.load(out / "README.md").data.pipeline_tag == "image-text-to-text"
    assert "vision tower and projector" in (out / "README.md").read_text()
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert type(model).__name__ == json.loads((out / "config.json").read_text())["architectures"][0]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.randint(0, 1000, (1, 16))).logits).all()


def publish_mxfp4_gpt_oss(local_hub, tokenizer, tmp_path) -> str:
    """A tiny gpt-oss in the Hub's MXFP4 layout, published as alice's; skips without gpt-oss in transformers."""
    from tests.test_moe_gptoss import save_mxfp4_gpt_oss

    if not hasattr(__import__("transformers"), "GptOssConfig"):
        pytest.skip("transformers without gpt-oss")
    repo = f"alice/tiny-gpt-oss-mxfp4-{uuid.uuid4().hex[:6]}"
    save_mxfp4_gpt_oss(tmp_path / "src", tokenizer)
    local_hub.hub.publish_folder(repo, tmp_path / "src")
    return repo


@pytest.mark.parametrize("method", ["gptq", "fp8"])
def test_gpt_oss_mxfp4_source_converts_and_loads_in_hubquant(hub_env, local_hub, tokenizer, tmp_path, method):
    """The Hub's gpt-oss checkpoints are MXFP4: transformers dequantizes them while loading, every expert is
    quantized again, and hubquant.load computes what the evaluated model computed."""
    import hubquant
    from hubquant import moe_gptoss

    repo = publish_mxfp4_gpt_oss(local_hub, tokenizer, tmp_path)
    out = tmp_path / "out"
    logs: list[str] = []
    group = {"group_size": 32} if method == "gptq" else {}
    res = convert(ConvertOptions(repo_id=repo, method=method, output_dir=str(out), **group, **FAST), log=logs.append)
    prov = json.loads((out / "hubquant.json").read_text())
    assert prov["moe"]["expert_linears"] == prov["moe"]["expert_linears_quantized"] == 2 * 8 * 3
    assert any("plain transformers cannot load its experts" in line for line in logs)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and "model.layers.0.mlp.router" in qc["ignore"]
    assert res.metrics["ppl_increase_pct"] < 60, res.metrics
    assert moe_gptoss.is_mxfp4_source({"model_type": "gpt_oss", "quantization_config": {"quant_method": "mxfp4"}})
    model, _ = hubquant.load(out, device="cpu", progress=False)
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert "plain transformers" in (out / "README.md").read_text()


def test_moe_mxfp4a16_converts_and_loads_with_plain_transformers(hub_env, local_hub, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    import hubquant
    from hubquant.quant import sqnr_db

    repo = publish(local_hub, tokenizer, tmp_path, "qwen3_moe")
    out = tmp_path / "out"
    res = convert(ConvertOptions(repo_id=repo, method="gptq", scheme="MXFP4A16", output_dir=str(out), **FAST),
                  log=lambda m: None)
    prov = json.loads((out / "hubquant.json").read_text())
    assert prov["moe"]["expert_linears"] == prov["moe"]["expert_linears_quantized"] == 2 * 8 * 3
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mxfp4-pack-quantized" and "model.layers.0.mlp.gate" in qc["ignore"]
    assert res.metrics["ppl_increase_pct"] < 60, res.metrics
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(out)(ids).logits.float()
        b = hubquant.load(out, device="cpu", progress=False)[0](ids).logits.float()
    assert sqnr_db(a, b) > 30


@pytest.mark.parametrize("method", ["awq", "smoothquant"])
def test_gpt_oss_scaling_methods_convert_from_the_cli(cli_env, local_hub, tokenizer, tmp_path, method):
    """AWQ and SmoothQuant on gpt-oss: the checked moves (attention) kept, every expert quantized, the moves no scale
    crosses exactly logged as dropped; the variant loads in hubquant.load."""
    import hubquant
    from tests.helpers import run_cli

    if not hasattr(__import__("transformers"), "GptOssConfig"):
        pytest.skip("transformers without gpt-oss")
    repo = publish(local_hub, tokenizer, tmp_path, "gpt_oss")
    out = tmp_path / "o"
    r = run_cli(["convert", repo, "--method", method, "--output-dir", str(out), "--num-samples", "8", "--seq-len", "64",
                 "--calib-dataset", "fortunes", "--eval-windows", "2", "--eval-seq-len", "64"], cli_env)
    assert r.returncode == 0, r.stderr
    logged = r.stdout + r.stderr
    assert "2 scale moves kept" in logged and "mlp.experts.7.up_proj -> mlp.experts.7.down_proj" in logged
    prov = json.loads((out / "hubquant.json").read_text())
    assert prov["moe"]["expert_linears"] == prov["moe"]["expert_linears_quantized"] == 2 * 8 * 3
    model, _ = hubquant.load(out, device="cpu", dtype=torch.float32, progress=False)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 1000, (1, 16))).logits).all()


def test_gpt_oss_mxfp4_to_mxfp4_with_gptq_loads_with_plain_transformers(hub_env, local_hub, tokenizer, tmp_path):
    """The Hub's MXFP4 gpt-oss, recalibrated: GPTQ on the MXFP4 grid, written in gpt-oss's own layout."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, Mxfp4Config


    repo = publish_mxfp4_gpt_oss(local_hub, tokenizer, tmp_path)
    out = tmp_path / "out"
    res = convert(ConvertOptions(repo_id=repo, method="gptq", scheme="MXFP4A16", format="mxfp4", output_dir=str(out),
                                 **FAST), log=lambda m: None)
    prov = json.loads((out / "hubquant.json").read_text())
    assert prov["moe"]["expert_linears"] == prov["moe"]["expert_linears_quantized"] == 2 * 8 * 3
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    keys = set(safe_open(out / "model.safetensors", "pt").keys())
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in keys and "model.layers.0.self_attn.q_proj.weight" in keys
    assert res.metrics["ppl_increase_pct"] < 60, res.metrics
    assert "gpt-oss's own MXFP4 layout" in (out / "README.md").read_text()
    # offline on CPU: dequantize on load (transformers >= 5.25 would otherwise fetch MXFP4 kernels from the Hub)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True,
                                                       quantization_config=Mxfp4Config(dequantize=True))
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 1000, (1, 16))).logits).all()


@pytest.mark.parametrize("args,code,needle", [
    (["--format", "mxfp4", "--scheme", "MXFP4A16"], 5, "gpt-oss's own checkpoint layout"),  # not gpt-oss
    (["--format", "mxfp4"], 2, "--scheme MXFP4A16"),  # W4A16 cannot be written in that layout
])
def test_mxfp4_format_errors_from_the_cli(cli_env, local_hub, tokenizer, tmp_path, args, code, needle):
    from tests.helpers import run_cli

    arch = "qwen3_moe" if code == 5 else "gpt_oss"
    repo = publish(local_hub, tokenizer, tmp_path, arch)
    r = run_cli(["convert", repo, "--method", "rtn", *args, "--output-dir", str(tmp_path / "o")], cli_env)
    assert r.returncode == code, r.stderr
    assert needle in r.stderr
