"""`hubquant convert` end to end against the local Hub: architectures, push, idempotency, the quality gate,
and every documented error with its exit code and no commit on the Hub."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
import torch

from hubquant.convert import ConvertOptions, convert
from hubquant.errors import ConflictError, QualityGateError, UsageError
from tests.helpers import save_tiny_repo

SMALL_EVAL = dict(eval_windows=2, eval_seq_len=64, progress=False)


def _uid() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def tiny_repos(local_hub, tokenizer, tmp_path_factory):
    """Tiny random models of five architectures published on the local Hub as alice/tiny-<arch>-<id>."""
    repos = {}
    for arch in ("llama", "qwen2", "mistral", "gemma", "phi3"):
        folder = save_tiny_repo(tmp_path_factory.mktemp(arch), arch, tokenizer)
        repo = f"alice/tiny-{arch}-{_uid()}"
        local_hub.hub.publish_folder(repo, folder)
        repos[arch] = repo
    return repos


def _commits(repo_id: str) -> list:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return HfApi().list_repo_commits(repo_id)
    except RepositoryNotFoundError:
        return []


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma", "phi3"])
def test_architectures_convert_and_load_exactly(hub_env, tiny_repos, tmp_path, arch):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    out = tmp_path / "variant"
    res = convert(ConvertOptions(repo_id=tiny_repos[arch], method="rtn", bits=4, group_size=32,
                                 output_dir=str(out), **SMALL_EVAL), log=lambda m: None)
    assert not res.skipped and res.commit_url is None
    m = res.metrics
    assert m["eval_tokens"] == 128
    assert m["perplexity"] > 0 and 0 <= m["top1_agreement"] <= 1 and m["mean_kl"] >= 0
    assert m["size_bytes"] < m["base_size_bytes"]
    loaded = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.bfloat16, quantization_config=CompressedTensorsConfig(run_compressed=False))
    prov = json.loads((out / "hubquant.json").read_text())
    assert prov["base_model"] == tiny_repos[arch] and prov["settings"]["method"] == "rtn"
    # weights equal our own dequantization of the same base
    from huggingface_hub import snapshot_download

    from hubquant.quant import WeightScheme, fake_quantize

    base = AutoModelForCausalLM.from_pretrained(snapshot_download(tiny_repos[arch]), dtype=torch.bfloat16)
    name = "model.layers.0.mlp.down_proj.weight"
    w = base.state_dict()[name]
    ours = fake_quantize(w, WeightScheme(bits=4, group_size=32), scale_dtype=torch.bfloat16)
    assert torch.equal(loaded.state_dict()[name], ours)
    assert "lm_head.weight" not in [k for k in loaded.state_dict() if k.endswith("weight_packed")]


def test_push_is_one_commit_and_rerun_makes_none(hub_env, tiny_repos):
    from huggingface_hub import HfApi, ModelCard

    target = f"alice/tiny-llama-w8-{_uid()}"
    opts = ConvertOptions(repo_id=tiny_repos["llama"], method="rtn", bits=8, push=True, target_repo=target,
                          **SMALL_EVAL)
    res = convert(opts, log=lambda m: None)
    assert res.commit_url and not res.skipped
    commits = _commits(target)
    files = set(HfApi().list_repo_files(target))
    assert {"model.safetensors", "config.json", "README.md", "hubquant.json", "tokenizer.json"} <= files
    card = ModelCard.load(target)
    card.validate()
    data = card.data.to_dict()
    assert data["base_model"] == tiny_repos["llama"] and data["base_model_relation"] == "quantized"
    assert data["library_name"] == "transformers" and data["license"] == "apache-2.0"
    assert {"hubquant", "rtn", "w8a16"} <= set(data["tags"])
    ppl = data["model-index"][0]["results"][0]["metrics"][0]
    assert ppl["type"] == "perplexity" and ppl["value"] == pytest.approx(res.metrics["perplexity"], rel=1e-3)
    info = HfApi().model_info(target)
    assert f"base_model:quantized:{tiny_repos['llama']}" in info.tags
    # the same base sha and settings again: no new commit
    again = convert(opts, log=lambda m: None)
    assert again.skipped and again.commit_url is None
    assert len(_commits(target)) == len(commits)
    # a target that holds a variant of another base is refused
    with pytest.raises(ConflictError):
        convert(ConvertOptions(repo_id=tiny_repos["qwen2"], method="rtn", bits=8, push=True, target_repo=target,
                               **SMALL_EVAL), log=lambda m: None)
    assert len(_commits(target)) == len(commits)


def test_explicit_token_is_used_and_never_logged(hub_env, tiny_repos, local_hub):
    """ConvertOptions(token=...) (the Space passes its visitor's token) overrides HF_TOKEN (alice's here)."""
    bob = local_hub.token("bob")
    lines: list[str] = []
    opts = ConvertOptions(repo_id=tiny_repos["llama"], method="rtn", bits=8, push=True, skip_eval=True,
                          progress=False, token=bob)
    res = convert(opts, log=lines.append)
    assert res.target_repo.startswith("bob/") and res.commit_url
    assert not res.out_dir.exists()  # the temp folder is gone once the Hub has the files
    assert bob not in "\n".join(lines) + repr(opts)


def test_quality_gate_refuses_to_push(hub_env, tiny_repos):
    target = f"alice/gated-out-{_uid()}"
    with pytest.raises(QualityGateError) as e:
        convert(ConvertOptions(repo_id=tiny_repos["llama"], method="rtn", bits=2, group_size=64, push=True,
                               target_repo=target, max_ppl_increase=0.001, **SMALL_EVAL), log=lambda m: None)
    assert e.value.exit_code == 6 and "nothing was pushed" in str(e.value)
    assert _commits(target) == []


def test_group_size_error_names_layers_and_sizes(hub_env, tiny_repos):
    with pytest.raises(UsageError) as e:
        convert(ConvertOptions(repo_id=tiny_repos["llama"], method="rtn", group_size=96, **SMALL_EVAL),
                log=lambda m: None)
    msg = str(e.value)
    assert "group size 96" in msg and "128" in msg and "--group-size 32 or 64 or 128" in msg


# ------------------------------------------------------------------------------------------ CLI errors


def _cli(args: list[str], env: dict, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hubquant.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def error_repos(local_hub, tokenizer, tmp_path_factory):
    """Repos that each trigger one error."""
    hub = local_hub.hub
    uid = _uid()
    good = save_tiny_repo(tmp_path_factory.mktemp("good"), "llama", tokenizer)
    names = {k: f"bob/{k}-{uid}" for k in ("gated", "private", "pickle", "t5", "corrupt", "good")}
    hub.publish_folder(names["good"], good)
    hub.publish_folder(names["gated"], good)
    hub.set_gated(names["gated"], "manual")
    hub.publish_folder(names["private"], good)
    hub.set_private(names["private"])
    # only pickled weights
    pk = tmp_path_factory.mktemp("pickle")
    (pk / "config.json").write_text((good / "config.json").read_text())
    (pk / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    hub.publish_folder(names["pickle"], pk)
    # an encoder-decoder architecture
    from transformers import T5Config

    t5 = tmp_path_factory.mktemp("t5")
    T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=128).save_pretrained(t5)
    from safetensors.torch import save_file

    save_file({"shared.weight": torch.randn(128, 32)}, t5 / "model.safetensors")
    hub.publish_folder(names["t5"], t5)
    # a truncated shard
    bad = tmp_path_factory.mktemp("corrupt")
    for f in good.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = (good / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    hub.publish_folder(names["corrupt"], bad)
    return names


@pytest.mark.parametrize("case,args,code,needle", [
    ("missing", ["convert", "nobody/no-such-model-x"], 4, "not found"),
    ("revision", ["convert", "{good}", "--revision", "no-such-branch"], 4, "revision"),
    ("gated", ["convert", "{gated}"], 3, "gated"),
    ("private", ["convert", "{private}"], 4, "not found"),
    ("pickle", ["convert", "{pickle}"], 5, "--allow-pickle"),
    ("t5", ["convert", "{t5}"], 5, "not a causal language model"),
    ("corrupt", ["convert", "{corrupt}"], 4, "corrupt"),
    ("write", ["convert", "{good}", "--skip-eval", "--push", "--target-repo", "bob/stolen-{uid}"], 3, "not allowed"),
    ("flags1", ["convert", "{good}", "--method", "fp8", "--bits", "4"], 2, "do not apply"),
    ("flags2", ["convert", "{good}", "--format", "awq", "--method", "gptq"], 2, "cannot be written"),
    ("flags3", ["convert", "{good}", "--target-repo", "alice/x"], 2, "--push"),
    ("flags4", ["convert", "{good}", "--bits", "5"], 2, "--bits"),
])
def test_cli_errors(cli_env, error_repos, case, args, code, needle):
    uid = _uid()
    args = [a.format(uid=uid, **{k: v for k, v in error_repos.items()}) for a in args]
    r = _cli(args, cli_env)
    assert r.returncode == code, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in r.stderr, r.stderr
    assert "fix:" in r.stderr
    assert "Traceback" not in r.stderr
    assert cli_env["HF_TOKEN"] not in r.stdout + r.stderr
    if case == "write":
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError

        with pytest.raises(RepositoryNotFoundError):
            HfApi(endpoint=cli_env["HF_ENDPOINT"], token=cli_env["HF_TOKEN"]).model_info(f"bob/stolen-{uid}")


def test_debug_shows_traceback(cli_env):
    r = _cli(["convert", "nobody/none"], dict(cli_env, HUBQUANT_DEBUG="1"))
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.slow
def test_smollm2_variant_generates_coherently_in_a_separate_process(seeded_hub, hub_env, tmp_path):
    """The real model: convert + push, then a fresh process downloads it, loads it with transformers +
    compressed-tensors and answers a question."""
    target = f"alice/SmolLM2-W8-{_uid()}"
    res = convert(ConvertOptions(repo_id="HuggingFaceTB/SmolLM2-135M-Instruct", method="rtn", bits=8, push=True,
                                 target_repo=target, eval_windows=2, eval_seq_len=256, progress=False),
                  log=lambda m: None)
    assert res.metrics["ppl_increase_pct"] < 2.0  # W8 per-channel RTN is near lossless
    assert res.metrics["top1_agreement"] > 0.9
    script = f"""
import torch
from huggingface_hub import snapshot_download
from transformers import AutoModelForCausalLM, AutoTokenizer
path = snapshot_download("{target}")
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
ids = tok.apply_chat_template([{{"role": "user", "content": "What is the capital of France?"}}],
                              add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
out = model.generate(ids, max_new_tokens=12, do_sample=False)
print("ANSWER:", tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
"""
    env = dict(os.environ, HF_ENDPOINT=seeded_hub.endpoint, HF_TOKEN=seeded_hub.token("alice"),
               HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "fresh-home"))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    answer = r.stdout.split("ANSWER:")[-1]
    assert "Paris" in answer, answer
