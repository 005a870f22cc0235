"""Other huggingface_hub releases against the local Hub: tests/hub/client_script.py under another Python.

Set HUBQUANT_HF_CLIENT_PYTHONS to a colon-separated list of Python executables, each with a huggingface_hub
release installed (e.g. a venv with huggingface_hub==1.33.0); without it only the installed release runs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("client_script.py")
PYTHONS = [sys.executable] + [p for p in os.environ.get("HUBQUANT_HF_CLIENT_PYTHONS", "").split(":") if p]


@pytest.mark.parametrize("python", PYTHONS, ids=lambda p: "installed" if p == sys.executable else p)
def test_client_release_against_local_hub(local_hub, tmp_path, python):
    env = {**os.environ, "HF_ENDPOINT": local_hub.endpoint, "HF_TOKEN": local_hub.token("alice"),
           "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": ""}
    out = subprocess.run([python, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["commit"] and r["roundtrip"] and r["lfs_sha"] and r["tags"] and r["listed"], r
    assert r["card"] == "mit"
    assert r["errors"] == {"repo": "ok", "revision": "ok", "entry": "ok", "stale": 412}, r
    assert r["commits"] == ["up", "initial commit"]
