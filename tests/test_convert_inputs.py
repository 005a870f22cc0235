"""What a user meets at `hubquant convert`'s door: local folders as the base, checks that fail before any weight
is downloaded, an --output-dir that never loses the user's files, and one line plus a fix (never a traceback)
for every failure, with its exit code."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import uuid

import pytest

from tests.helpers import run_cli as _cli
from tests.helpers import save_tiny_repo


def _uid() -> str:
    return uuid.uuid4().hex[:8]




def _one_line_error(r: subprocess.CompletedProcess, code: int, needle: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], r.stderr
    assert "  fix: " in r.stderr and "Traceback" not in r.stderr


def _no_weights_downloaded(env: dict) -> None:
    from pathlib import Path

    assert list(Path(env["HF_HOME"]).rglob("*.safetensors")) == []


@pytest.fixture(scope="module")
def good_folder(tokenizer, tmp_path_factory):
    return save_tiny_repo(tmp_path_factory.mktemp("tiny") / "my-model", "llama", tokenizer)


@pytest.fixture(scope="module")
def repos(local_hub, good_folder, tmp_path_factory):
    """A good repo, and repos that each break one thing."""
    hub, uid = local_hub.hub, _uid()
    names = {k: f"alice/in-{k}-{uid}" for k in ("good", "badjson", "noconfig", "unknowntype", "tokenizer", "gpt2")}
    hub.publish_folder(names["good"], good_folder)

    def variant(key, edit):
        d = tmp_path_factory.mktemp(key)
        shutil.copytree(good_folder, d, dirs_exist_ok=True)
        edit(d)
        hub.publish_folder(names[key], d)

    variant("badjson", lambda d: (d / "config.json").write_text('{"model_type": "llama",'))
    variant("noconfig", lambda d: (d / "config.json").unlink())

    def retype(d, mtype):
        cfg = json.loads((d / "config.json").read_text())
        cfg["model_type"] = mtype
        cfg["architectures"] = ["GPT2LMHeadModel" if mtype == "gpt2" else "NoSuchModel"]
        (d / "config.json").write_text(json.dumps(cfg))

    variant("unknowntype", lambda d: retype(d, "no-such-architecture"))
    variant("gpt2", lambda d: retype(d, "gpt2"))
    variant("tokenizer", lambda d: (d / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"'))
    return names


# ------------------------------------------------------------------------------------------ local folders


def test_a_local_folder_is_a_base_identified_by_its_content(hub_env, cli_env, good_folder, tmp_path):
    from huggingface_hub import HfApi, ModelCard

    from hubquant.plan import folder_hash

    work = tmp_path / "work"
    shutil.copytree(good_folder, work / "my-model")
    r = _cli(["convert", "./my-model", "--skip-eval", "--quiet", "--output-dir", "out"], cli_env, cwd=work)
    assert r.returncode == 0, r.stderr
    prov = json.loads((work / "out" / "hubquant.json").read_text())
    assert prov["base_sha"] == "sha256:" + folder_hash(work / "my-model") and prov["base_model"] == "local:my-model"
    card = ModelCard.load(work / "out" / "README.md")
    assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()
    assert "a local model folder (my-model)" in card.text
    # naming the Hub model it derives from puts it on the card; pushed under the folder's name
    r = _cli(["convert", "./my-model", "--base-model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--skip-eval",
              "--quiet", "--bits", "8", "--push", "--json"], cli_env, cwd=work)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["target_repo"] == "alice/my-model-W8A16-RTN" and out["base_sha"].startswith("sha256:")
    pushed = ModelCard.load(out["target_repo"])
    assert pushed.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # the same folder content again: up to date; one byte changed: a new variant
    again = _cli(["convert", "./my-model", "--base-model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--skip-eval",
                  "--quiet", "--bits", "8", "--push"], cli_env, cwd=work)
    assert again.returncode == 0 and "is up to date" in again.stdout, again.stderr
    (work / "my-model" / "README.md").write_text("changed\n")
    api = HfApi(endpoint=cli_env["HF_ENDPOINT"], token=cli_env["HF_TOKEN"])
    n = len(api.list_repo_commits(out["target_repo"]))
    third = _cli(["convert", "./my-model", "--base-model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--skip-eval",
                  "--quiet", "--bits", "8", "--push"], cli_env, cwd=work)
    assert third.returncode == 0, third.stderr
    assert len(api.list_repo_commits(out["target_repo"])) == n + 1


def test_a_missing_folder_and_a_bad_repo_id_are_one_line(cli_env, tmp_path):
    _one_line_error(_cli(["convert", "./no-such-folder"], cli_env, cwd=tmp_path), 4, "does not exist")
    for bad in ("alice/bad..name", "alice/has space", "a/b/c"):
        _one_line_error(_cli(["convert", bad], cli_env), 2, "is not a valid repo id")


# ------------------------------------------------------------------------------------------ checked first


@pytest.mark.parametrize("case,args,code,needle", [
    ("group size", ["--group-size", "96"], 2, "group size 96 does not divide"),
    ("calibration file", ["--method", "gptq", "--calib-dataset", "./nope.txt"], 4, "no such file"),
    ("eval file", ["--eval-dataset", "missing.jsonl"], 4, "no such file"),
    ("rtn option", ["--method-option", "damp=0.1"], 2, "unknown option(s) for --method rtn: damp"),
    ("bnb option", ["--method", "bnb-nf4", "--method-option", "compute_dtype=int3"], 2,
     "compute_dtype='int3' is invalid for --method bnb-nf4"),
    ("bnb key", ["--method", "bnb-int8", "--method-option", "treshold=5"], 2, "--method bnb-int8: treshold"),
    ("gptq key", ["--method", "gptq", "--method-option", "dmap=0.1"], 2, "--method gptq: dmap"),
    ("smoothquant alpha", ["--method", "smoothquant", "--method-option", "alpha=2"], 2, "alpha=2 is invalid"),
    ("write access", ["--push", "--target-repo", "bob/not-yours"], 3, "not allowed to write to bob/not-yours"),
])
def test_checks_fail_before_any_weight_is_downloaded(cli_env, repos, case, args, code, needle):
    r = _cli(["convert", repos["good"], *args], cli_env)
    _one_line_error(r, code, needle)
    _no_weights_downloaded(cli_env)
    assert "base perplexity" not in r.stdout


def test_a_read_only_token_is_refused_before_download(cli_env, repos, local_hub):
    env = dict(cli_env, HF_TOKEN=local_hub.add_token("alice", write=False))
    _one_line_error(_cli(["convert", repos["good"], "--push"], env), 3, "read-only")
    _no_weights_downloaded(env)


@pytest.mark.parametrize("key,code,needle,before_download", [
    ("badjson", 4, "config.json of {repo} is not valid JSON", True),
    ("noconfig", 4, "has no config.json", True),
    ("unknowntype", 5, "unknown model_type 'no-such-architecture'", True),
    ("gpt2", 5, "AWQ has no scale mapping for architecture 'gpt2'", True),
    ("tokenizer", 4, "tokenizer", False),
])
def test_broken_bases_are_one_line_with_a_fix(cli_env, repos, key, code, needle, before_download):
    args = ["convert", repos[key], "--skip-eval"] + (["--method", "awq"] if key == "gpt2" else [])
    r = _cli(args, cli_env)
    _one_line_error(r, code, needle.format(repo=repos[key]))
    if before_download:
        _no_weights_downloaded(cli_env)


def test_an_unreachable_hub_is_exit_4(cli_env):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(cli_env, HF_ENDPOINT=f"http://127.0.0.1:{port}")
    _one_line_error(_cli(["convert", "alice/anything"], env, timeout=120), 4, "cannot be reached")


# ------------------------------------------------------------------------------------------ files


def test_a_full_disk_is_one_line_and_leaves_no_temp_folder(cli_env, repos, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(cli_env, HUBQUANT_FAULT="write:enospc", TMPDIR=str(tmp))
    _one_line_error(_cli(["convert", repos["good"], "--skip-eval", "--quiet"], env), 1, "no space left")
    assert [p.name for p in tmp.iterdir() if p.name.startswith("hubquant-")] == []
    env = dict(env, HUBQUANT_FAULT="download:enospc")
    _one_line_error(_cli(["convert", repos["good"], "--skip-eval", "--quiet"], env), 1, "no space left")
    # any other failure after the temp folder exists (here: the quality gate) removes it too
    env = dict(cli_env, TMPDIR=str(tmp))
    r = _cli(["convert", repos["good"], "--bits", "2", "--group-size", "32", "--max-ppl-increase", "0.0001",
              "--eval-windows", "2", "--eval-seq-len", "64", "--quiet"], env)
    _one_line_error(r, 6, "nothing was pushed")
    assert [p.name for p in tmp.iterdir() if p.name.startswith("hubquant-")] == []


def test_output_dir_never_deletes_files_hubquant_did_not_write(cli_env, repos, tmp_path):
    from huggingface_hub import HfApi

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work\n")
    r = _cli(["convert", repos["good"], "--skip-eval", "--output-dir", str(foreign)], cli_env)
    _one_line_error(r, 2, "is not empty and holds no hubquant output")
    assert (foreign / "thesis.tex").read_text() == "years of work\n"
    _no_weights_downloaded(cli_env)
    # a previous hubquant output is replaced file by file; what the user added stays (and is not pushed)
    out = tmp_path / "out"
    assert _cli(["convert", repos["good"], "--skip-eval", "--quiet", "--output-dir", str(out)], cli_env).returncode == 0
    (out / "notes.txt").write_text("mine\n")
    target = f"alice/outdir-{_uid()}"
    r = _cli(["convert", repos["good"], "--skip-eval", "--quiet", "--bits", "8", "--output-dir", str(out), "--push",
              "--target-repo", target], cli_env)
    assert r.returncode == 0, r.stderr
    assert (out / "notes.txt").read_text() == "mine\n"
    prov = json.loads((out / "hubquant.json").read_text())
    assert prov["settings"]["scheme"]["weights"]["bits"] == 8 and "notes.txt" not in prov["files"]
    files = set(HfApi(endpoint=cli_env["HF_ENDPOINT"], token=cli_env["HF_TOKEN"]).list_repo_files(target))
    assert "notes.txt" not in files and {"model.safetensors", "hubquant.json", "README.md"} <= files
