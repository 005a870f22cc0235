"""Streamed conversion (one decoder layer in memory at a time): the same bytes as the in-memory path, the same
quality numbers, and a peak resident size below the model's size."""
from __future__ import annotations

import filecmp
import json
import os
import uuid
from pathlib import Path

import pytest
import torch

from hubquant.convert import ConvertOptions, convert
from tests.helpers import save_tiny_repo

SMALL = dict(eval_windows=2, eval_seq_len=64, num_samples=4, seq_len=64, calib_dataset="fortunes", progress=False)


@pytest.fixture(scope="module")
def tiny_repo(local_hub, tokenizer, tmp_path_factory):
    folder = save_tiny_repo(tmp_path_factory.mktemp("llama"), "llama", tokenizer, layers=3, vocab=49152)
    repo = f"alice/tiny-stream-{uuid.uuid4().hex[:8]}"
    local_hub.hub.publish_folder(repo, folder)
    return repo


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "hubquant.json" and p.name != "README.md")


CASES = [
    ("rtn", "compressed-tensors", {}),
    ("rtn", "gptq", {}),
    ("rtn", "awq", dict(symmetric=False)),
    ("rtn", "compressed-tensors", dict(ignore=("down_proj",))),  # lm_head quantized, one Linear kind kept float
    ("gptq", "compressed-tensors", {}),
    ("gptq", "gptq", {}),
    ("awq", "awq", {}),
    ("awq", "compressed-tensors", {}),
    ("smoothquant", "compressed-tensors", dict(group_size=None)),  # smoothing folds within each decoder layer
    ("w8a8", "compressed-tensors", dict(group_size=None)),  # no calibration: rounded layer by layer
    ("fp8", "compressed-tensors", dict(group_size=None)),
    ("fp8", "compressed-tensors", dict(group_size=None, activations="static")),  # per-Linear input scales
]


@pytest.mark.parametrize("method,fmt,extra", CASES, ids=[f"{m}-{f}-{i}" for i, (m, f, _) in enumerate(CASES)])
def test_streamed_files_are_byte_identical(hub_env, tiny_repo, tmp_path, method, fmt, extra):
    logs = {}
    results = {}
    for mode in ("off", "on"):
        logs[mode] = []
        results[mode] = convert(ConvertOptions(repo_id=tiny_repo, method=method, format=fmt, streaming=mode,
                                               output_dir=str(tmp_path / mode), **SMALL, **{"group_size": 32, **extra}),
                                log=logs[mode].append)
    off, on = tmp_path / "off", tmp_path / "on"
    assert any("streaming 3 decoder layers" in m for m in logs["on"])
    assert not any("streaming" in m for m in logs["off"])
    assert _files(off) == _files(on) and any(f.endswith(".safetensors") for f in _files(on))
    for name in _files(off):
        assert filecmp.cmp(off / name, on / name, shallow=False), name
    m_off, m_on = results["off"].metrics, results["on"].metrics
    assert m_on["perplexity"] == pytest.approx(m_off["perplexity"], rel=1e-3)
    assert m_on["base_perplexity"] == pytest.approx(m_off["base_perplexity"], rel=1e-3)
    assert abs(m_on["top1_agreement"] - m_off["top1_agreement"]) <= 0.02
    assert m_on["mean_kl"] == pytest.approx(m_off["mean_kl"], rel=0.05, abs=1e-4)
    leak_off = json.loads((off / "hubquant.json").read_text())["leak_check"]
    leak_on = json.loads((on / "hubquant.json").read_text())["leak_check"]
    if method == "gptq":
        assert leak_on["leak_score"] == pytest.approx(leak_off["leak_score"], abs=0.02)
    # the card names the same unquantized Linears
    assert "down_proj" not in extra.get("ignore", ()) or "down_proj" in (on / "README.md").read_text()


def test_sharded_output_is_byte_identical(tmp_path, tokenizer, monkeypatch):
    """Shard split and index as save_tensors writes them (small shard limit), without the Hub."""
    from transformers import AutoModelForCausalLM

    from hubquant.formats import common, get_format
    from hubquant.formats.shards import ShardWriter
    from hubquant.methods import QuantJob
    from hubquant.methods.rtn import run as rtn_run
    from hubquant.quant import QuantScheme, WeightScheme
    from hubquant.streaming import EvalStreams, open_checkpoint, quantize_and_write

    folder = save_tiny_repo(tmp_path / "base", "qwen2", tokenizer, layers=2, vocab=1024)
    scheme = QuantScheme(weights=WeightScheme(bits=4, group_size=32, symmetric=True))
    job = QuantJob(scheme=scheme, progress=False)
    monkeypatch.setattr(common.write_model, "__kwdefaults__", {"max_shard_bytes": 200_000})
    monkeypatch.setattr(ShardWriter.finish, "__kwdefaults__", {"max_shard_bytes": 200_000})
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    q = rtn_run(model, job)
    get_format("compressed-tensors")(model, q, scheme=scheme, out_dir=tmp_path / "mem", method="rtn", options={})
    weights, _ = open_checkpoint(folder, trust_remote_code=False, dtype=torch.bfloat16)
    quantize_and_write(weights, job, method="rtn", fmt="compressed-tensors", out_dir=tmp_path / "str",
                       streams=EvalStreams())
    names = sorted(os.listdir(tmp_path / "mem"))
    assert len([n for n in names if n.endswith(".safetensors")]) > 2
    assert names == sorted(os.listdir(tmp_path / "str"))
    for n in names:
        assert filecmp.cmp(tmp_path / "mem" / n, tmp_path / "str" / n, shallow=False), n


def test_auto_streams_whenever_it_can_and_says_which_path(tmp_path, tokenizer):
    """auto: one log line naming the path and why; a MoE checkpoint (per-expert tensors that transformers fuses on
    load) streams; a format written from the whole model falls back (auto) or is refused (on)."""
    from hubquant.errors import UnsupportedError
    from hubquant.streaming import open_for

    folder = save_tiny_repo(tmp_path / "moe", "mixtral", tokenizer, layers=2, vocab=1024)
    logs: list[str] = []
    weights = open_for("auto", method="gptq", fmt="compressed-tensors", path=folder, trust_remote_code=False,
                       log=logs.append)
    assert weights is not None and len(logs) == 1 and logs[0].startswith("streaming 2 decoder layers")
    assert "model.layers.0.mlp.experts.gate_up_proj" in weights.converted
    assert open_for("auto", method="rtn", fmt="gguf", path=folder, trust_remote_code=False, log=logs.append)
    assert logs[-1].startswith("streaming 2 decoder layers")  # GGUF streams its experts too
    assert open_for("auto", method="gptq", fmt="bitsandbytes", path=folder, trust_remote_code=False,
                    log=logs.append) is None
    assert logs[-1] == "loading the whole model in memory: --format bitsandbytes is written from the model in memory"
    assert open_for("auto", method="bnb-nf4", fmt="bitsandbytes", path=folder, trust_remote_code=False,
                    log=logs.append) is None
    assert "--method bnb-nf4 runs on the model in memory" in logs[-1]
    with pytest.raises(UnsupportedError, match="cannot stream"):
        open_for("on", method="gptq", fmt="gguf", path=folder, trust_remote_code=False)
    assert open_for("off", method="rtn", fmt="compressed-tensors", path=folder, trust_remote_code=False,
                    log=logs.append) is None and len(logs) == 4


def test_streamed_activations_stay_on_the_conversion_device(tmp_path, tokenizer, monkeypatch):
    """The evaluation activations and the final norm/lm_head go to the job's device, not a hard-coded CPU: run with
    the device spelled `cpu:0`, every move the streamed evaluation makes names that device."""
    from hubquant import evaluate
    from hubquant.methods import QuantJob
    from hubquant.quant import QuantScheme, WeightScheme
    from hubquant.streaming import activations, eval_streams, evaluate_streams, open_checkpoint, quantize_and_write

    folder = save_tiny_repo(tmp_path / "base", "llama", tokenizer, layers=2, vocab=1024)
    weights, _ = open_checkpoint(folder, trust_remote_code=False, dtype=torch.bfloat16)
    eval_set = evaluate.build_eval_set(tokenizer, ["a b c d e f g h " * 40] * 4, spec="t", description="t",
                                       n_windows=2, seq_len=32)
    moved: list[str] = []
    real = activations.non_layers_to
    monkeypatch.setattr(activations, "non_layers_to", lambda m, d: (moved.append(str(d)), real(m, d))[1])
    advanced: list[str] = []
    real_advance = activations.Stream.advance
    monkeypatch.setattr(activations.Stream, "advance",
                        lambda self, i, layer, d: (advanced.append(str(d)), real_advance(self, i, layer, d))[1])
    job = QuantJob(scheme=QuantScheme(weights=WeightScheme(bits=4, group_size=32, symmetric=True)), progress=False,
                   device="cpu:0")
    streams = eval_streams(weights, eval_set, tokenizer, job.device)
    assert str(streams.device) == "cpu:0"
    quantize_and_write(weights, job, method="rtn", fmt="compressed-tensors", out_dir=tmp_path / "out", streams=streams)
    evaluate_streams(weights, streams, variant=True)
    assert advanced == ["cpu:0"] * 4  # base and variant through each of the 2 layers
    assert [d for d in moved if d != "cpu"] == ["cpu:0", "cpu:0"]  # base, then variant evaluation on the device
    assert streams.compare.perplexity > 0 and streams.reference.perplexity > 0


@pytest.mark.slow  # ~1 min alone, ~4 min on 2 busy cores
def test_streamed_peak_rss_below_model_size(hub_env, local_hub, tmp_path):
    """`hubquant convert` (RTN, streamed) of a ~1 GB model in a child process: its peak resident size stays below a
    budget smaller than the model (the in-memory path needs about three times the model)."""
    from bench.memory.peak import run_cli
    from bench.memory.synthetic import write_checkpoint

    shape = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4)
    model_bytes = write_checkpoint(tmp_path / "base", 48, shape=shape)
    repo = f"alice/big-stream-{uuid.uuid4().hex[:8]}"
    local_hub.hub.publish_folder(repo, tmp_path / "base")
    budget = 800 * 1024**2
    assert model_bytes > budget * 1.15
    out = tmp_path / "out"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(root), str(root / "kernels")])}
    rc, peak = run_cli(["convert", repo, "--method", "rtn", "--skip-eval", "--quiet", "--output-dir", str(out),
                        "--streaming", "on"], env=env, cwd=root, log=tmp_path / "log")
    assert rc == 0, (tmp_path / "log").read_text()[-2000:]
    assert 100e6 < peak < budget, f"peak RSS {peak / 1e6:.0f} MB for a {model_bytes / 1e6:.0f} MB model"
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert 0.25 * model_bytes < written < 0.45 * model_bytes  # 4-bit layers, bf16 embeddings and lm_head


def test_experts_outside_the_plain_fused_layout_load_in_memory(tmp_path, tokenizer):
    """gpt-oss keeps transposed, interleaved, biased experts: hubquant.moe unfuses them in memory, so auto loads the
    model and says why (on refuses)."""
    from hubquant.errors import UnsupportedError
    from hubquant.streaming import open_for

    folder = save_tiny_repo(tmp_path / "gptoss", "gpt_oss", tokenizer, layers=2, vocab=1024)
    logs: list[str] = []
    assert open_for("auto", method="rtn", fmt="compressed-tensors", path=folder, trust_remote_code=False,
                    log=logs.append) is None
    assert logs == ["loading the whole model in memory: the experts of model.layers.0.mlp.experts (GptOssExperts) "
                    "are not in the plain fused layout"]
    with pytest.raises(UnsupportedError, match="plain fused layout"):
        open_for("on", method="rtn", fmt="compressed-tensors", path=folder, trust_remote_code=False)
