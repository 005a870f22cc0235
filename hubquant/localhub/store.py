"""Durable storage of the local Hub: content-addressed blobs plus a SQLite index, split along its seams.

    db.py        the SQLite schema, transactions, private files at rest
    blobs.py     blobs/ and tmp/ (uploads in flight, cleaned after a crash)
    auth.py      tokens, grants, signed upload links, which blobs a user may commit
    refs.py      branches, tags, pull-request refs, revision resolution
    commits.py   history, file lists, atomic commits, pull requests
    store.py     `Store`: all of the above over one root, plus the repos themselves

Everything under ROOT is private to its owner (folders 0700, files 0600).
"""
from __future__ import annotations

import os
import sqlite3
import uuid
from pathlib import Path

from hubquant.errors import UsageError
from hubquant.localhub.auth import AuthMixin
from hubquant.localhub.blobs import BlobStore, BlobWriter
from hubquant.localhub.commits import FAILPOINT_ENV, CommitsMixin
from hubquant.localhub.db import Database, private_dir
from hubquant.localhub.objects import (
    DEFAULT_GITATTRIBUTES,
    GATED_MODES,
    REPO_TYPES,
    AddFile,
    Commit,
    CommitConflict,
    DeletePath,
    Discussion,
    EntryNotFound,
    FileEntry,
    Principal,
    Repo,
    RepoNotFound,
    RevisionNotFound,
    git_blob_oid,
    lfs_pointer,
    now_iso,
    split_repo_id,
    wants_lfs,
)
from hubquant.localhub.refs import RefsMixin


class Store(AuthMixin, RefsMixin, CommitsMixin, BlobStore):
    """The local Hub's storage. Thread-safe: every call opens its own SQLite connection."""

    def __init__(self, root: str | os.PathLike):
        self.root = private_dir(Path(root))
        BlobStore.__init__(self, self.root)
        self.database = Database(self.root / "hub.sqlite")
        self.db_path = self.database.path
        self._secret = self.database.secret

    def _db(self, *, immediate: bool = False):
        """A connection inside one transaction (see Database.tx)."""
        return self.database.tx(immediate=immediate)

    # --- repos --------------------------------------------------------------------------------------------
    @staticmethod
    def _repo(row: sqlite3.Row) -> Repo:
        return Repo(
            id=row["id"], uid=row["uid"], type=row["type"], namespace=row["namespace"], name=row["name"],
            private=bool(row["private"]), gated=row["gated"], created_at=row["created_at"],
            last_modified=row["last_modified"], downloads=row["downloads"], likes=row["likes"],
        )

    def get_repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        """The repo, or RepoNotFound."""
        ns, name = repo_id.split("/", 1) if "/" in repo_id else ("", repo_id)
        with self._db() as db:
            row = db.execute(
                "SELECT * FROM repos WHERE type=? AND namespace=? AND name=?", (repo_type, ns, name)
            ).fetchone()
        if row is None:
            raise RepoNotFound(f"{repo_type} repo {repo_id} not found", hint="check the repo id and repo type")
        return self._repo(row)

    def list_repos(self, repo_type: str = "model") -> list[Repo]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM repos WHERE type=? ORDER BY id", (repo_type,)).fetchall()
        return [self._repo(r) for r in rows]

    def create_repo(
        self, repo_id: str, repo_type: str = "model", *, private: bool = False, author: str = "hubquant"
    ) -> tuple[Repo, bool]:
        """Create a repo with the Hub's initial commit (a default .gitattributes).

        Returns:
            (repo, created): `created` is False when it already existed (nothing changed then).
        """
        if repo_type not in REPO_TYPES:
            raise UsageError(f"unknown repo type {repo_type!r}", hint=f"use one of {', '.join(REPO_TYPES)}")
        ns, name = split_repo_id(repo_id)
        try:
            return self.get_repo(repo_id, repo_type), False
        except RepoNotFound:
            pass
        data = DEFAULT_GITATTRIBUTES.encode()
        sha256, size = self.write_blob([data])
        ts = now_iso()
        with self._db(immediate=True) as db:
            if db.execute(
                "SELECT 1 FROM repos WHERE type=? AND namespace=? AND name=?", (repo_type, ns, name)
            ).fetchone():
                return self.get_repo(repo_id, repo_type), False
            cur = db.execute(
                "INSERT INTO repos (uid, type, namespace, name, private, gated, created_at, last_modified)"
                " VALUES (?, ?, ?, ?, ?, NULL, ?, ?)",
                (uuid.uuid4().hex[:24], repo_type, ns, name, int(private), ts, ts),
            )
            rid = cur.lastrowid
            oid = self._new_commit_oid(rid, None, "initial commit")
            db.execute(
                "INSERT INTO commits VALUES (?, ?, NULL, ?, '', ?, ?)", (oid, rid, "initial commit", author, ts)
            )
            db.execute(
                "INSERT INTO files VALUES (?, '.gitattributes', ?, ?, 0, ?)", (oid, sha256, size, git_blob_oid(data))
            )
            db.execute("INSERT INTO refs VALUES (?, 'main', ?)", (rid, oid))
        return self.get_repo(repo_id, repo_type), True

    def delete_repo(self, repo_id: str, repo_type: str = "model") -> None:
        """Delete the repo, its commits, refs and grants (blobs stay: other repos may share them)."""
        repo = self.get_repo(repo_id, repo_type)
        with self._db(immediate=True) as db:
            db.execute("DELETE FROM repos WHERE id=?", (repo.id,))

    def set_private(self, repo_id: str, private: bool, repo_type: str = "model") -> Repo:
        repo = self.get_repo(repo_id, repo_type)
        with self._db() as db:
            db.execute("UPDATE repos SET private=? WHERE id=?", (int(private), repo.id))
        return self.get_repo(repo_id, repo_type)

    def set_gated(self, repo_id: str, gated: str | bool | None, repo_type: str = "model") -> Repo:
        """Gate the repo (`"auto"`, `"manual"`, or True for manual) or ungate it (False/None)."""
        if gated is True:
            gated = "manual"
        if gated not in (*GATED_MODES, False, None):
            raise UsageError(f"invalid gated mode {gated!r}", hint="use 'auto', 'manual' or False")
        repo = self.get_repo(repo_id, repo_type)
        with self._db() as db:
            db.execute("UPDATE repos SET gated=? WHERE id=?", (gated or None, repo.id))
        return self.get_repo(repo_id, repo_type)

    def count_download(self, repo: Repo) -> None:
        with self._db() as db:
            db.execute("UPDATE repos SET downloads = downloads + 1 WHERE id=?", (repo.id,))


__all__ = [  # the records, errors and helpers of objects.py are re-exported for callers of the store
    "DEFAULT_GITATTRIBUTES", "FAILPOINT_ENV", "GATED_MODES", "REPO_TYPES",
    "AddFile", "BlobWriter", "Commit", "CommitConflict", "DeletePath", "Discussion", "EntryNotFound", "FileEntry",
    "Principal",
    "Repo", "RepoNotFound", "RevisionNotFound", "Store", "git_blob_oid", "lfs_pointer", "split_repo_id", "wants_lfs",
]
