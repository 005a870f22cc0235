"""The local Hub's storage without HTTP: object ids, commits, revisions, tokens."""
from __future__ import annotations

import hashlib
import sqlite3

import pytest

from hubquant.errors import UsageError
from hubquant.localhub.store import (
    AddFile,
    CommitConflict,
    DeletePath,
    EntryNotFound,
    RepoNotFound,
    RevisionNotFound,
    Store,
    git_blob_oid,
    lfs_pointer,
    wants_lfs,
)


def _add(store: Store, path: str, data: bytes, lfs: bool = False) -> AddFile:
    sha, size = store.write_blob([data])
    oid = git_blob_oid(lfs_pointer(sha, size)) if lfs else git_blob_oid(data)
    return AddFile(path=path, sha256=sha, size=size, lfs=lfs, git_oid=oid)


def test_object_ids_match_git():
    # `git hash-object` of an empty file and of "hello\n"
    assert git_blob_oid(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    assert git_blob_oid(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"
    ptr = lfs_pointer("ab" * 32, 1234)
    assert ptr == b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"ab" * 32 + b"\nsize 1234\n"


def test_lfs_rule_like_the_hub():
    assert wants_lfs("model.safetensors", 10)
    assert wants_lfs("data/x.parquet", 10)
    assert not wants_lfs("config.json", 1000)
    assert wants_lfs("big.txt", 10 * 1024 * 1024)
    assert not wants_lfs("almost.txt", 10 * 1024 * 1024 - 1)
    assert wants_lfs("weird.dat", 100, sample=b"\x00\x01")


def test_blobs_are_content_addressed(tmp_path):
    store = Store(tmp_path)
    data = b"x" * 3_000_000
    sha, size = store.write_blob([data[:1000], data[1000:]])
    assert sha == hashlib.sha256(data).hexdigest() and size == len(data)
    assert store.blob_path(sha).read_bytes() == data
    def in_flight():
        return [f for d in store.tmp.iterdir() for f in d.iterdir() if f.name != ".lock"]

    assert in_flight() == []  # temp file was renamed
    with pytest.raises(UsageError):
        store.write_blob([b"abc"], sha256="0" * 64)
    assert in_flight() == []
    # this process's own upload folder is never cleaned while it lives; a dead process's folder is
    w = store.open_upload()
    w.write(b"partial")
    assert store.clean_tmp() == 0 and len(in_flight()) == 1
    w.abort()
    assert (store.blob_path(sha).stat().st_mode & 0o777) == 0o600
    assert (store.blobs.stat().st_mode & 0o777) == 0o700 and (tmp_path.stat().st_mode & 0o777) == 0o700


def test_commits_revisions_and_conflicts(tmp_path):
    store = Store(tmp_path)
    repo, created = store.create_repo("alice/m")
    assert created and store.create_repo("alice/m")[1] is False
    c0 = store.resolve(repo, "main")
    assert list(store.files(c0)) == [".gitattributes"]
    c1 = store.commit(repo, [_add(store, "a/x.txt", b"1"), _add(store, "a/y.bin", b"2" * 100, lfs=True),
                             _add(store, "b.txt", b"b")], title="one", author="alice")
    assert len(c1) == 40 and all(ch in "0123456789abcdef" for ch in c1)
    assert store.resolve(repo, "main") == store.resolve(repo, "refs/heads/main") == store.resolve(repo, c1) == c1
    assert store.resolve(repo, c0) == c0
    with pytest.raises(RevisionNotFound):
        store.resolve(repo, "nope")
    with pytest.raises(RevisionNotFound):
        store.resolve(repo, "f" * 40)
    # a stale parent is refused and changes nothing
    with pytest.raises(CommitConflict):
        store.commit(repo, [_add(store, "c.txt", b"c")], title="stale", author="alice", parent=c0)
    assert store.resolve(repo, "main") == c1
    c2 = store.commit(repo, [DeletePath(path="a", folder=True)], title="rm a", author="alice", parent=c1)
    assert sorted(store.files(c2)) == [".gitattributes", "b.txt"]
    assert sorted(store.files(c1)) == [".gitattributes", "a/x.txt", "a/y.bin", "b.txt"]  # history intact
    assert [c.title for c in store.history(c2)] == ["rm a", "one", "initial commit"]
    with pytest.raises(EntryNotFound):
        store.commit(repo, [DeletePath(path="missing.txt")], title="x", author="alice")
    with pytest.raises(UsageError):
        store.commit(repo, [_add(store, "../evil", b"e")], title="x", author="alice")
    with pytest.raises(UsageError):  # blob never uploaded
        store.commit(repo, [AddFile(path="z", sha256="1" * 64, size=3, lfs=True, git_oid="0" * 40)],
                     title="x", author="alice")
    with pytest.raises(UsageError):  # b.txt cannot also be a folder
        store.commit(repo, [_add(store, "b.txt/inner", b"i")], title="x", author="alice")
    store.delete_repo("alice/m")
    with pytest.raises(RepoNotFound):
        store.get_repo("alice/m")


def test_tokens_store_only_hashes(tmp_path):
    store = Store(tmp_path)
    token = store.add_token("alice", orgs=["org1"])
    ro = store.add_token("carol", write=False)
    who = store.principal(token)
    assert who.user == "alice" and who.can_write("alice") and who.can_write("org1") and not who.can_write("bob")
    assert not store.principal(ro).can_write("carol")
    assert store.principal("hf_not_a_token") is None
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("hub.sqlite*"))
    assert token.encode() not in raw
    db = sqlite3.connect(tmp_path / "hub.sqlite")
    stored = db.execute("SELECT hash FROM tokens WHERE user='alice'").fetchone()[0]
    assert stored == hashlib.sha256(token.encode()).hexdigest()


def test_concurrent_commits_on_one_parent_one_wins(tmp_path):
    """Eight writers race from the same parent: exactly one commit lands, the others get CommitConflict."""
    import threading

    store = Store(tmp_path)
    repo, _ = store.create_repo("alice/race")
    parent = store.resolve(repo, "main")
    ops = [[_add(store, f"f{i}.txt", str(i).encode())] for i in range(8)]
    results: list = [None] * 8
    start = threading.Barrier(8)

    def writer(i: int) -> None:
        start.wait()
        try:
            results[i] = store.commit(repo, ops[i], title=f"w{i}", author="alice", parent=parent)
        except CommitConflict as e:
            results[i] = e

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [r for r in results if isinstance(r, str)]
    assert len(won) == 1 and sum(isinstance(r, CommitConflict) for r in results) == 7
    assert store.resolve(repo, "main") == won[0]
    assert len(store.files(won[0])) == 2 and [c.title for c in store.history(won[0])][1:] == ["initial commit"]
