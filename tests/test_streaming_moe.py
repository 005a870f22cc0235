"""Streamed mixture-of-experts conversions: per-expert checkpoint tensors fused by transformers' own converters one
layer at a time, then the same per-expert quantization as in memory. The files are byte-identical to the in-memory
path's, and the routing statistics reach the log, hubquant.json and the card unchanged."""
from __future__ import annotations

import filecmp
import json
import re
import uuid

import pytest
import torch

from hubquant.convert import ConvertOptions, convert
from tests.helpers import save_tiny_repo

SMALL = dict(eval_windows=2, eval_seq_len=64, num_samples=4, seq_len=64, calib_dataset="fortunes", progress=False)
CASES = [("qwen3_moe", "rtn"), ("qwen3_moe", "gptq"), ("mixtral", "rtn"), ("mixtral", "gptq"),
         ("deepseek_v3", "rtn"), ("deepseek_v3", "gptq"), ("qwen2_moe", "gptq"), ("olmoe", "rtn"),
         ("glm4_moe", "gptq"), ("qwen3_moe", "awq"), ("deepseek_v3", "awq"), ("qwen3_moe", "smoothquant"),
         ("mixtral", "fp8"), ("deepseek_v3", "w8a8")]
INT4 = {"rtn", "gptq", "awq"}


def _routing_lines(logs: list[str]) -> list[str]:
    return [m for m in logs if m.startswith("moe:")]


@pytest.mark.parametrize("arch,method", CASES, ids=[f"{a}-{m}" for a, m in CASES])
def test_streamed_moe_is_byte_identical(hub_env, local_hub, tokenizer, tmp_path, arch, method):
    repo = f"alice/tiny-stream-{arch}-{uuid.uuid4().hex[:6]}"
    local_hub.hub.publish_folder(repo, save_tiny_repo(tmp_path / "base", arch, tokenizer, layers=3))
    logs, results = {}, {}
    for mode in ("off", "on"):
        logs[mode] = []
        results[mode] = convert(ConvertOptions(repo_id=repo, method=method, streaming=mode,
                                               group_size=32 if method in INT4 else None,
                                               output_dir=str(tmp_path / mode), **SMALL), log=logs[mode].append)
    off, on = tmp_path / "off", tmp_path / "on"
    assert any(m.startswith("streaming 3 decoder layers") for m in logs["on"])
    shards = sorted(p.name for p in off.glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in on.glob("*.safetensors"))
    for name in [*shards, "config.json"]:
        assert filecmp.cmp(off / name, on / name, shallow=False), name
    prov = {mode: json.loads((tmp_path / mode / "hubquant.json").read_text()) for mode in ("off", "on")}
    moe_off, moe_on = prov["off"]["moe"], prov["on"]["moe"]
    assert moe_on == moe_off
    checked = {mode: [m for m in logs[mode] if m.endswith("expert projections on disk match the evaluated model")]
               for mode in logs}
    assert checked["on"] == checked["off"] and len(checked["on"]) == 1 and int(checked["on"][0].split()[1]) > 0
    assert moe_on["expert_linears"] == moe_on["expert_linears_quantized"] > 0
    routing = [m for m in _routing_lines(logs["on"]) if "routed calibration tokens" in m]
    assert routing == [m for m in _routing_lines(logs["off"]) if "routed calibration tokens" in m]
    if method in ("gptq", "awq", "smoothquant"):  # calibrated: tokens routed to each expert
        assert len(routing) == 1 and moe_on["routing"]["experts"] > 0
        assert sum(map(sum, moe_on["routed_tokens"].values())) > 0
    card = {mode: (tmp_path / mode / "README.md").read_text() for mode in ("off", "on")}
    section = {mode: card[mode][card[mode].index("## Mixture of experts"):] for mode in card}
    assert section["on"] == section["off"]
    m_off, m_on = results["off"].metrics, results["on"].metrics
    assert m_on["perplexity"] == pytest.approx(m_off["perplexity"], rel=1e-3)
    assert abs(m_on["top1_agreement"] - m_off["top1_agreement"]) <= 0.02


def test_converter_runs_on_one_layers_keys(tmp_path):
    """A layer's fused experts come from that layer's per-expert checkpoint tensors only, with transformers' values."""
    from transformers import AutoModelForCausalLM

    from hubquant import moe
    from hubquant.streaming import open_checkpoint
    from tests.helpers import tiny_model

    tiny_model("mixtral", vocab=512, layers=2).to(torch.bfloat16).save_pretrained(tmp_path)
    weights, why = open_checkpoint(tmp_path, trust_remote_code=False, dtype=torch.bfloat16)
    assert why == ""
    conv = weights.converted["model.layers.1.mlp.experts.gate_up_proj"]
    assert {k for _, k in conv.sources} == {f"model.layers.1.block_sparse_moe.experts.{e}.{w}.weight"
                                            for e in range(4) for w in ("w1", "w3")}
    assert [re.search(r"experts\.(\d+)", k)[1] for p, k in conv.sources if p.endswith("w1.weight")] == list("0123")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    moe.unfuse_experts(weights.model)
    layer = weights.model.model.layers[1]
    weights.load(layer, "model.layers.1")
    fused = ref.model.layers[1].mlp.experts
    for e, mlp in enumerate(layer.mlp.experts):
        inter = fused.gate_up_proj.shape[1] // 2
        assert torch.equal(mlp.w1.weight, fused.gate_up_proj[e, :inter])
        assert torch.equal(mlp.w3.weight, fused.gate_up_proj[e, inter:])
        assert torch.equal(mlp.w2.weight, fused.down_proj[e])
    weights.release(layer)
    assert all(p.is_meta for p in layer.parameters())
    assert weights.model.model.layers[0].mlp.experts[0].w1.weight.is_meta  # the other layer was not read


@pytest.mark.parametrize("arch", ["mixtral", "llama"])
def test_streamed_corruption_fails_the_smoke_check(hub_env, local_hub, tokenizer, tmp_path, monkeypatch, arch):
    """A layer whose evaluated weights are not what is written (MoE: checked per expert), or whose outputs are not
    finite (any model), fails the streamed conversion with exit 6."""
    from hubquant.errors import QualityGateError
    from hubquant.streaming.session import Session

    repo = f"alice/tiny-corrupt-{arch}-{uuid.uuid4().hex[:6]}"
    local_hub.hub.publish_folder(repo, save_tiny_repo(tmp_path / "base", arch, tokenizer))
    real = Session.after

    def corrupting(self, index, name, layer, _real=real):
        if index == 0:
            lin = layer.mlp.experts[0].w1 if arch == "mixtral" else layer.mlp.down_proj
            lin.weight.data = torch.full_like(lin.weight, float("nan"))
        return _real(self, index, name, layer)

    monkeypatch.setattr(Session, "after", corrupting)
    logs: list[str] = []
    with pytest.raises(QualityGateError) as e:
        convert(ConvertOptions(repo_id=repo, method="rtn", group_size=32, output_dir=str(tmp_path / "o"),
                               streaming="on", **SMALL), log=logs.append)
    expected = "the evaluated weight is not the dequantized stored one" if arch == "mixtral" else "not finite"
    assert e.value.exit_code == 6 and expected in str(e.value), e.value
    assert any(m.startswith("streaming 2 decoder layers") for m in logs)
