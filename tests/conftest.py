"""Shared fixtures: the real SmolLM2 and its tokenizer, the local Hub; helpers live in tests/helpers.py."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest_plugins = ["tests.fixtures_hub"]  # local_hub, seeded_hub, hub_env (see tests/fixtures_hub.py)

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU the Triton kernels run in Triton's interpreter. triton.jit decides at import time, and test modules
# of other folders import hubquant_kernels before tests/kernels/conftest.py is read: set it before any of them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from hubquant.assets import smollm2_dir

    return smollm2_dir()


@pytest.fixture(scope="session")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture()
def cli_env(local_hub, tmp_path):
    """Environment for CLI runs against the local Hub as alice (offline, one thread, no tracebacks)."""
    env = dict(os.environ, HF_ENDPOINT=local_hub.endpoint, HF_TOKEN=local_hub.token("alice"),
               HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf"), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("HUBQUANT_DEBUG", None)
    return env
