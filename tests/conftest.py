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


