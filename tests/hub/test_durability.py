"""The local Hub keeps its data across restarts, commits are atomic under SIGKILL, and big files stream."""
from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download

from hubquant.localhub.store import FAILPOINT_ENV
from tests.fixtures_hub import commit_into_failpoint, point_hf_at


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def test_restart_keeps_everything(own_hub, monkeypatch, tmp_path):
    root, token, start = own_hub
    p = start()
    point_hf_at(monkeypatch, p.endpoint, token, tmp_path / "hf1")
    api = HfApi()
    api.create_repo("alice/keep")
    data = os.urandom(1_500_000)
    ci = api.create_commit("alice/keep", [CommitOperationAdd("w.safetensors", data),
                                          CommitOperationAdd("README.md", b"---\nlicense: mit\n---\n")],
                           commit_message="weights")
    p.kill()  # SIGKILL, no shutdown hooks

    p2 = start()
    point_hf_at(monkeypatch, p2.endpoint, token, tmp_path / "hf2")
    api = HfApi()
    info = api.model_info("alice/keep")
    assert info.sha == ci.oid and "license:mit" in info.tags
    assert [c.title for c in api.list_repo_commits("alice/keep")] == ["weights", "initial commit"]
    assert Path(hf_hub_download("alice/keep", "w.safetensors")).read_bytes() == data
    assert api.whoami()["name"] == "alice"  # tokens survive too


def test_sigkill_mid_commit_leaves_the_old_commit(own_hub, monkeypatch, tmp_path):
    root, token, start = own_hub
    p = start()
    point_hf_at(monkeypatch, p.endpoint, token, tmp_path / "hf1")
    api = HfApi()
    api.create_repo("alice/atomic")
    before = api.create_commit("alice/atomic", [CommitOperationAdd("a.txt", b"old")], commit_message="old").oid
    p.kill()

    # a server that sleeps inside the commit transaction after writing the file rows, before moving the ref
    p = start(**{FAILPOINT_ENV: "60"})
    point_hf_at(monkeypatch, p.endpoint, token, tmp_path / "hf2")
    big = os.urandom(2_000_000)
    ops = [CommitOperationAdd("a.txt", b"new"), CommitOperationAdd("b.txt", b"b"),
           CommitOperationAdd("big.safetensors", big)]
    errors, log, t = commit_into_failpoint(root, lambda: HfApi().create_commit("alice/atomic", ops,
                                                                             commit_message="doomed"))
    doomed = log.split("failpoint: commit ", 1)[1].split()[0]
    p.kill()
    t.join(timeout=60)
    assert errors, "the commit must fail when the server dies"

    p = start()
    point_hf_at(monkeypatch, p.endpoint, token, tmp_path / "hf3")
    api = HfApi()
    assert api.model_info("alice/atomic").sha == before
    assert api.list_repo_files("alice/atomic") == [".gitattributes", "a.txt"]
    assert Path(hf_hub_download("alice/atomic", "a.txt")).read_bytes() == b"old"
    assert [c.title for c in api.list_repo_commits("alice/atomic")] == ["old", "initial commit"]
    db = sqlite3.connect(root / "hub.sqlite")
    assert db.execute("SELECT COUNT(*) FROM commits WHERE oid=?", (doomed,)).fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM files WHERE commit_oid=?", (doomed,)).fetchone()[0] == 0
    db.close()
    # and the repo takes the same commit again
    again = api.create_commit("alice/atomic", ops, commit_message="retry", parent_commit=before)
    assert api.model_info("alice/atomic").sha == again.oid
    assert Path(hf_hub_download("alice/atomic", "big.safetensors")).read_bytes() == big


def test_large_files_stream_through_the_server(own_hub, monkeypatch, tmp_path):
    """A 96 MiB LFS upload and download raise the server's peak memory by far less than the file."""
    root, token, start = own_hub
    p = start()
    point_hf_at(monkeypatch, p.endpoint, token, tmp_path / "hf")
    api = HfApi()
    api.create_repo("alice/stream")
    size = 96 * 1024 * 1024
    src = tmp_path / "big.safetensors"
    h = hashlib.sha256()
    with open(src, "wb") as f:
        for _ in range(size // (4 * 1024 * 1024)):
            block = os.urandom(4 * 1024 * 1024)
            h.update(block)
            f.write(block)
    base = _peak_rss_kb(p.proc.pid)
    api.upload_file(path_or_fileobj=src, path_in_repo="big.safetensors", repo_id="alice/stream")
    path = Path(hf_hub_download("alice/stream", "big.safetensors"))
    grew_mb = (_peak_rss_kb(p.proc.pid) - base) / 1024
    assert path.stat().st_size == size
    d = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            d.update(block)
    assert d.hexdigest() == h.hexdigest()
    assert grew_mb < 32, f"server peak RSS grew by {grew_mb:.0f} MiB for a {size >> 20} MiB file"
