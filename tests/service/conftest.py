"""Fixtures for the service tests: tiny random Llama repos published to the local Hub."""
from __future__ import annotations

import uuid

import pytest

from tests.helpers import save_tiny_repo


@pytest.fixture
def publish_tiny(hub_env, tokenizer, tmp_path):
    """publish_tiny(owner, seed=0) -> (repo_id, sha): a new tiny Llama repo, uploaded over HTTP."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_env.endpoint, token=hub_env.token("alice"))

    def publish(owner: str = "hubquant-org", seed: int = 0, name: str | None = None) -> tuple[str, str]:
        repo_id = f"{owner}/{name or 'tiny-llama-' + uuid.uuid4().hex[:8]}"
        folder = save_tiny_repo(tmp_path / repo_id.replace("/", "--"), "llama", tokenizer, seed=seed,
                                hidden=64, intermediate=128, layers=2)
        api.create_repo(repo_id, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="tiny model")
        return repo_id, info.oid

    return publish
