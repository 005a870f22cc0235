"""A built wheel installed into a fresh virtualenv (no checkout on the path): `hubquant` and `optimum-cli hubquant`
work, the card template comes from the wheel, and `hubquant convert --push` reaches the local Hub.

Offline and fast: the fresh venv installs only the wheel (`--no-deps --no-index`); its dependencies come from
the running interpreter's site-packages through a path entry, as a `pip install` would have resolved them."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import uuid
from pathlib import Path

import pytest

from tests.helpers import save_tiny_repo

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SKIP = shutil.ignore_patterns(".git", ".venv", ".cache", "build", "dist", "*.egg-info", "__pycache__", "artifacts",
                              "img", "bench")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_TOKEN")}
    env.update(extra)
    return env


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("env", _env())
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=SKIP)  # a clean tree: no stale build/ from earlier builds
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          str(src), "-w", str(tmp / "dist")])
    wheel = next((tmp / "dist").glob("hubquant-*.whl"))
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    py = venv / "bin" / "python"
    site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)])
    # then the dependencies: this interpreter's packages, after the fresh venv's own, as a folder of links (no
    # editable hubquant, and no optimum-cli registration that an older hubquant wrote into optimum's folder)
    deps = tmp / "deps"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if entry.name == "optimum":
            shutil.copytree(entry, deps / "optimum", ignore=shutil.ignore_patterns("register_hubquant.py"))
        elif not entry.name.startswith(("hubquant", "__editable__")) and entry.suffix != ".pth":
            (deps / entry.name).symlink_to(entry)
    (Path(site) / "zz_deps.pth").write_text(f"{deps}\n")
    return venv, Path(site), wheel


def test_wheel_carries_cards_and_the_optimum_registration(wheel_venv, tmp_path):
    venv, site, wheel = wheel_venv
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"hubquant/cards/variant.md.j2", "optimum/commands/register/register_hubquant.py"} <= names
    assert not any(n.startswith("optimum/") and n.endswith("__init__.py") for n in names)  # PEP 420 portion
    assert (site / "optimum" / "commands" / "register" / "register_hubquant.py").is_file()
    py = str(venv / "bin" / "python")
    where = _run([py, "-c", "import hubquant, hubquant.card as c; print(hubquant.__file__); print(c.template_path())"],
                 cwd=tmp_path, env=_env()).stdout.split()
    assert all(p.startswith(str(site)) for p in where), where
    assert "hubquant" in _run([str(venv / "bin" / "hubquant"), "--version"], cwd=tmp_path, env=_env()).stdout
    # optimum-cli as installed: its console script runs optimum.commands.optimum_cli:main
    out = _run([py, "-c", "import sys; from optimum.commands.optimum_cli import main; sys.argv=['optimum-cli', "
                "'hubquant', 'convert', '--help']; main()"], cwd=tmp_path, env=_env()).stdout
    assert "--method" in out and "--push" in out


def test_wheel_converts_and_pushes_to_the_local_hub(wheel_venv, local_hub, tokenizer, tmp_path):
    venv, _, _ = wheel_venv
    repo = f"alice/tiny-wheel-{uuid.uuid4().hex[:8]}"
    local_hub.hub.publish_folder(repo, save_tiny_repo(tmp_path / "base", "llama", tokenizer))
    target = f"{repo}-w4"
    env = _env(HF_ENDPOINT=local_hub.endpoint, HF_TOKEN=local_hub.token("alice"), HF_HUB_DISABLE_XET="1",
               HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")
    proc = _run([str(venv / "bin" / "hubquant"), "convert", repo, "--method", "rtn", "--bits", "4", "--group-size",
                 "32", "--eval-windows", "2", "--eval-seq-len", "64", "--push", "--target-repo", target, "--quiet",
                 "--json"], cwd=tmp_path, env=env)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["commit_url"] and result["metrics"]["perplexity"] > 0
    card = _run([str(venv / "bin" / "python"), "-c", f"from huggingface_hub import ModelCard; "
                 f"print(ModelCard.load('{target}').content)"], cwd=tmp_path, env=env).stdout
    assert "base_model_relation: quantized" in card and "## Measured quality" in card
