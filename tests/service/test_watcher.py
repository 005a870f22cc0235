"""`hubquant watch` on the local Hub: a new model appears -> planned (dry run) -> converted -> up to date;
an update of the base -> converted again; unsupported repos are filtered with the reason."""
from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

import pytest

from hubquant.cli import run
from hubquant.errors import UsageError
from hubquant.service.watcher import (
    WatchOptions,
    WatchRow,
    parse_count,
    parse_since,
    summary_markdown,
)
from tests.service.helpers import hubquant_commits


def _watch(tag: str, tmp_path, *extra: str) -> tuple[int, list[dict]]:
    out = tmp_path / f"watch-{uuid.uuid4().hex[:6]}.json"
    code = run(["watch", "--author", "hubquant-org", "--filter", tag, "--methods", "rtn", "--schemes", "W8A16",
                "--namespace", "alice", "--option", "skip_eval=true", "--json", str(out), *extra])
    return code, json.loads(out.read_text())


def test_new_model_is_converted_once_and_again_after_an_update(publish_tiny, hub_env, tmp_path):
    from huggingface_hub import HfApi

    tag = "watch" + uuid.uuid4().hex[:6]
    repo, sha = publish_tiny(seed=3, name=f"{tag}-llama")
    # a repo that is not a causal LM, and one that is already quantized: both filtered, with the reason
    api = HfApi()
    for name, cfg in ((f"{tag}-bert", {"model_type": "bert", "architectures": ["BertModel"]}),
                      (f"{tag}-q", {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                    "quantization_config": {"quant_method": "gptq"}}),
                      (f"{tag}-oss", {"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"],
                                      "quantization_config": {"quant_method": "mxfp4"}})):
        api.create_repo(f"hubquant-org/{name}")
        api.upload_file(path_or_fileobj=json.dumps(cfg).encode(), path_in_repo="config.json",
                        repo_id=f"hubquant-org/{name}")
    target = f"alice/{tag}-llama-W8A16-RTN"

    code, rows = _watch(tag, tmp_path, "--dry-run")
    by_repo = {r["repo_id"]: r for r in rows}
    assert code == 0 and len(rows) == 4
    assert by_repo[repo]["action"] == "convert" and by_repo[repo]["target_repo"] == target
    assert by_repo[repo]["base_sha"] == sha and by_repo[repo]["reason"] == "no variant yet"
    assert "not a causal LM" in by_repo[f"hubquant-org/{tag}-bert"]["reason"]
    assert "already quantized (gptq)" in by_repo[f"hubquant-org/{tag}-q"]["reason"]
    # gpt-oss's own MXFP4 releases are sources (dequantized on load); this one has no weights, so it stops there
    assert by_repo[f"hubquant-org/{tag}-oss"]["reason"] == "no safetensors weights"
    assert not api.repo_exists(target)  # the dry run made nothing

    summary = tmp_path / "summary.md"
    code, rows = _watch(tag, tmp_path, "--summary", str(summary))
    assert code == 0
    done = [r for r in rows if r["action"] == "done"]
    assert len(done) == 1 and done[0]["target_repo"] == target and done[0]["commit_url"]
    assert hubquant_commits(target) == [f"hubquant: W8A16 rtn of {repo}@{sha[:10]}"]
    text = summary.read_text()
    assert f"| {repo} | rtn | W8A16 | ✅ done | [{target}](" in text and "Totals: done 1, filtered 3" in text

    code, rows = _watch(tag, tmp_path)  # nothing changed: nothing to do, no commit
    assert [r["action"] for r in rows if r["repo_id"] == repo] == ["up-to-date"]
    assert len(hubquant_commits(target)) == 1

    new_sha = api.upload_file(path_or_fileobj=b"# tiny llama, v2\n", path_in_repo="NOTES.md", repo_id=repo).oid
    code, rows = _watch(tag, tmp_path, "--dry-run")
    row = next(r for r in rows if r["repo_id"] == repo)
    assert row["action"] == "convert" and row["reason"].startswith(f"new base commit {new_sha[:10]}")
    code, rows = _watch(tag, tmp_path)
    assert code == 0 and [r["action"] for r in rows if r["repo_id"] == repo] == ["done"]
    assert hubquant_commits(target) == [f"hubquant: W8A16 rtn of {repo}@{new_sha[:10]}",
                                        f"hubquant: W8A16 rtn of {repo}@{sha[:10]}"]
    # the variant itself is never a candidate (it carries hubquant.json and the hubquant tag)
    out = tmp_path / "variants.json"
    assert run(["watch", "--author", "alice", "--filter", tag, "--dry-run", "--json", str(out)]) == 0
    assert [(r["repo_id"], r["action"], r["reason"]) for r in json.loads(out.read_text())] == [
        (target, "filtered", "a hubquant variant")]


def test_filters_since_license_and_failures_exit_code(publish_tiny, hub_env, tmp_path):
    tag = "watchf" + uuid.uuid4().hex[:6]
    repo, _ = publish_tiny(seed=4, name=f"{tag}-llama")
    code, rows = _watch(tag, tmp_path, "--dry-run", "--since", "2999-01-01")
    assert code == 0 and rows[0]["action"] == "filtered" and "before --since" in rows[0]["reason"]
    code, rows = _watch(tag, tmp_path, "--dry-run", "--license", "mit")
    assert rows[0]["action"] == "filtered" and rows[0]["reason"] == "license apache-2.0 not in mit"
    code, rows = _watch(tag, tmp_path, "--dry-run", "--max-params", "1M")
    assert rows[0]["action"] == "filtered" and "B parameters > limit" in rows[0]["reason"]
    # a scheme the model cannot take (group 48 does not divide 64) fails that job with the usage exit code
    code, rows = _watch(tag, tmp_path, "--schemes", "W4A16-G48")
    assert code == 2 and rows[-1]["action"] == "failed" and "group size 48" in rows[-1]["reason"]


def test_parsers_and_options():
    assert parse_count("135M") == 135_000_000 and parse_count("8b") == 8_000_000_000 and parse_count("12") == 12
    assert parse_since("2026-11-01") == datetime(2026, 11, 1, tzinfo=timezone.utc)
    with pytest.raises(UsageError):
        parse_count("lots")
    with pytest.raises(UsageError):
        WatchOptions()
    with pytest.raises(UsageError):
        WatchOptions(authors=("a",), methods=("nope",))
    md = summary_markdown([WatchRow(repo_id="o/m", action="failed", reason="x | y")],
                          WatchOptions(authors=("o",), dry_run=True), "http://hub")
    assert "### hubquant watch (dry run)" in md and "| o/m |  |  | ❌ failed |  | x \\| y |" in md


def test_quality_gate_blocks_the_push_and_exits_6(publish_tiny, hub_env, tmp_path):
    from huggingface_hub import HfApi

    tag = "watchq" + uuid.uuid4().hex[:6]
    repo, _ = publish_tiny(seed=7, name=f"{tag}-llama")
    out = tmp_path / "gate.json"
    # a gate no variant can pass (perplexity must fall by half): the variant is measured, then not pushed
    code = run(["watch", "--author", "hubquant-org", "--filter", tag, "--methods", "rtn", "--schemes", "W4A16-G32",
                "--namespace", "alice", "--max-ppl-increase", "-50", "--option", "eval_windows=2",
                "--option", "eval_seq_len=64", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert code == 6 and rows[0]["action"] == "failed"
    assert rows[0]["reason"].startswith("QualityGateError: perplexity rose") and "(gate: -50.0%)" in rows[0]["reason"]
    assert not HfApi().repo_exists(f"alice/{tag}-llama-W4A16-G32-RTN")
