"""The Space runs from a copy of space/ alone, with hubquant installed as a package (no checkout beside it), and
its README front matter follows the Spaces conventions."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("gradio")
SPACE = Path(__file__).resolve().parents[2] / "space"


def test_front_matter_follows_spaces_conventions():
    meta = yaml.safe_load(SPACE.joinpath("README.md").read_text().split("---")[1])
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and meta["hf_oauth"] is True
    import gradio

    assert meta["sdk_version"] == gradio.__version__  # the version the tests run
    assert (SPACE / meta["app_file"]).is_file()
    assert SPACE.joinpath("requirements.txt").read_text().split()[-1] == "hubquant[space]"


def test_app_runs_from_a_copy_of_the_folder(tmp_path):
    copy = tmp_path / "space"
    shutil.copytree(SPACE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    code = ("import app, hqspace, hubquant; demo = app.build_app(); "
            "print(app.__file__); print(hqspace.__file__); print(type(demo).__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    app_file, hq_file, kind = out.stdout.split()[-3:]
    assert app_file.startswith(str(copy)) and hq_file.startswith(str(copy)) and kind == "Blocks"
