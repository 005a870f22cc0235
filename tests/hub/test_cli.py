"""`hubquant hub add-token | gate | seed | serve` and the seeded SmolLM2 repo."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download

from hubquant.localhub import LocalHub
from hubquant.localhub.cli import main as hub_main


def test_add_token_prints_only_the_token(tmp_path, capsys):
    root = tmp_path / "hub"
    assert hub_main(["hub", "add-token", "--root", str(root), "--user", "dave", "--orgs", "o1, o2"]) == 0
    out = capsys.readouterr().out
    assert re.fullmatch(r"hf_[A-Za-z0-9]{40}\n", out), out
    who = LocalHub(root).store.principal(out.strip())
    assert who.user == "dave" and who.orgs == ("o1", "o2") and who.write
    assert hub_main(["hub", "add-token", "--root", str(root), "--user", "eve", "--read-only"]) == 0
    assert not LocalHub(root).store.principal(capsys.readouterr().out.strip()).write
    assert hub_main(["hub", "add-token", "--root", str(root), "--user", "bad name"]) == 2  # UsageError exit code


def test_gate_cli(tmp_path, capsys):
    root = tmp_path / "hub"
    hub = LocalHub(root)
    hub.store.create_repo("dave/m")
    assert hub_main(["hub", "gate", "--root", str(root), "dave/m"]) == 0
    assert hub.store.get_repo("dave/m").gated == "manual"
    assert hub_main(["hub", "gate", "--root", str(root), "dave/m", "--grant", "eve", "--private"]) == 0
    repo = hub.store.get_repo("dave/m")
    assert repo.private and hub.store.has_grant(repo, "eve") and repo.gated == "manual"
    assert hub_main(["hub", "gate", "--root", str(root), "dave/m", "--mode", "off", "--public"]) == 0
    repo = hub.store.get_repo("dave/m")
    assert not repo.private and repo.gated is None
    assert capsys.readouterr().out.strip().endswith("dave/m: gated=False private=False")
    assert hub_main(["hub", "gate", "--root", str(root), "dave/missing"]) == 4  # NotFoundError exit code


def test_serve_prints_its_url(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "hubquant.localhub.cli", "hub", "serve", "--root", str(tmp_path / "hub"), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url = proc.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        for _ in range(100):
            try:
                r = httpx.get(url + "/api/models", timeout=2)
                break
            except httpx.ConnectError:
                import time

                time.sleep(0.05)
        assert r.status_code == 200 and r.json() == []
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_full_cli_has_hub_commands():
    out = subprocess.run([sys.executable, "-m", "hubquant.cli", "hub", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and all(c in out.stdout for c in ("serve", "add-token", "seed", "gate"))


def test_seeded_smollm2(seeded_hub, hub_env, tmp_path):
    from hubquant.assets import smollm2_dir

    src = smollm2_dir(verbose=False)
    api = HfApi()
    repo_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    info = api.model_info(repo_id)
    assert seeded_hub.seed_smollm2() == info.sha  # idempotent: no new commit
    assert hub_main(["hub", "seed", "--root", str(seeded_hub.root)]) == 0
    assert api.model_info(repo_id).sha == info.sha
    names = {s.rfilename for s in info.siblings}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "README.md"} <= names
    st = next(s for s in info.siblings if s.rfilename == "model.safetensors")
    assert st.lfs is not None and st.size == (src / "model.safetensors").stat().st_size
    assert {"safetensors", "transformers", "llama", "text-generation", "license:apache-2.0",
            "base_model:HuggingFaceTB/SmolLM2-135M"} <= set(info.tags)
    assert info.author == "HuggingFaceTB" and info.library_name == "transformers"
    assert [m.id for m in api.list_models(author="HuggingFaceTB")] == [repo_id]
    meta = api.get_safetensors_metadata(repo_id)  # Range reads of the safetensors header
    assert meta.parameter_count == {"BF16": 134515008}
    cfg = json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text())
    assert cfg["hidden_size"] == 576 and cfg["model_type"] == "llama"
    local = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.md"]))
    assert (local / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


@pytest.mark.slow  # ~17 s alone, ~40 s on 2 busy cores
def test_seeded_smollm2_loads_with_transformers(seeded_hub, hub_env):
    """The seeded weights download whole and load: the greedy next token matches the local copy's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hubquant.assets import smollm2_dir

    repo = snapshot_download("HuggingFaceTB/SmolLM2-135M-Instruct")
    tok = AutoTokenizer.from_pretrained(repo)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    a = AutoModelForCausalLM.from_pretrained(repo, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(smollm2_dir(verbose=False), dtype=torch.float32).eval()
    with torch.no_grad():
        la, lb = a(ids).logits[0, -1], b(ids).logits[0, -1]
    assert torch.equal(la, lb)
