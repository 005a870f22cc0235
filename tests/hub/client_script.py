"""A huggingface_hub client session against HF_ENDPOINT, run as a script by tests/hub/test_client_versions.py
under another Python that has another huggingface_hub release (e.g. 1.x). Standard library + huggingface_hub only.
Prints one JSON line with what it saw; exits non-zero on any failure."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import uuid

import huggingface_hub
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError


def main() -> None:
    api = HfApi()
    repo_id = f"alice/client-{uuid.uuid4().hex[:8]}"
    api.create_repo(repo_id)
    api.create_repo(repo_id, exist_ok=True)
    big = os.urandom(3 * 1024 * 1024 + 1)
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(f"{d}/up/sub")
        open(f"{d}/up/model.safetensors", "wb").write(big)
        open(f"{d}/up/sub/a.txt", "w").write("a\n")
        open(f"{d}/up/README.md", "w").write("---\nlicense: mit\ntags: [x]\n---\n# c\n")
        ci = api.upload_folder(repo_id=repo_id, folder_path=f"{d}/up", commit_message="up")
        local = snapshot_download(repo_id, cache_dir=f"{d}/cache")
        same = open(f"{local}/model.safetensors", "rb").read() == big
        info = api.model_info(repo_id)
        errors = {}
        for name, fn, exc in [
            ("repo", lambda: api.model_info(f"alice/missing-{uuid.uuid4().hex[:6]}"), RepositoryNotFoundError),
            ("revision", lambda: api.model_info(repo_id, revision="nope"), RevisionNotFoundError),
            ("entry", lambda: hf_hub_download(repo_id, "nope.txt", cache_dir=f"{d}/c2"), EntryNotFoundError),
        ]:
            try:
                fn()
                errors[name] = "no error"
            except exc:
                errors[name] = "ok"
        try:
            api.create_commit(repo_id, [CommitOperationAdd("z.txt", b"z")], commit_message="z",
                              parent_commit=info.sha[::-1])
            errors["stale"] = "no error"
        except HfHubHTTPError as e:
            errors["stale"] = e.response.status_code
        card = ModelCard.load(repo_id)
    print(json.dumps({
        "version": huggingface_hub.__version__, "commit": ci.oid == info.sha, "roundtrip": same,
        "lfs_sha": next(s.lfs.sha256 for s in info.siblings if s.rfilename == "model.safetensors")
        == hashlib.sha256(big).hexdigest(),
        "tags": "license:mit" in info.tags, "card": card.data.license, "errors": errors,
        "commits": [c.title for c in api.list_repo_commits(repo_id)],
        "listed": [m.id for m in api.list_models(search=repo_id.split("/")[1])] == [repo_id],
    }))


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - report any failure to the calling test
        print(json.dumps({"failure": repr(e)}))
        sys.exit(1)
