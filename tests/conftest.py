"""Shared fixtures: tiny random models of real architectures, the real SmolLM2, a tokenizer."""
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

# architecture -> (config class name, extra config kwargs)
TINY_ARCHS = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "gemma": ("GemmaConfig", {"head_dim": 32}),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),
}


def tiny_config(arch: str = "llama", *, hidden: int = 128, intermediate: int = 256, layers: int = 2,
                vocab: int = 49152):
    import transformers

    cls_name, extra = TINY_ARCHS[arch]
    cls = getattr(transformers, cls_name)
    kw = dict(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    kw.update(extra)
    return cls(**kw)


def tiny_model(arch: str = "llama", seed: int = 0, **kw):
    """A random-weight causal LM of a real architecture (float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from hubquant.assets import smollm2_dir

    return smollm2_dir()


@pytest.fixture(scope="session")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def save_tiny_repo(path: Path, arch: str, tokenizer, seed: int = 0, dtype=torch.bfloat16, **kw) -> Path:
    """Write a tiny model as a Hub-style folder: safetensors, config, tokenizer, generation config, card."""
    model = tiny_model(arch, seed=seed, **kw).to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    (path / "README.md").write_text(f"---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# tiny {arch}\n")
    return path
