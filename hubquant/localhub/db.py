"""The local Hub's SQLite index: its schema, transactions, and the files at rest kept private.

hub.sqlite holds repos, commits (with parent), refs, the files of every commit, who uploaded which blob,
tokens (sha256 hashes only), trusted publishers and the short-lived repo tokens they were given (hashes only),
gated-access grants, discussions, and the secret that signs LFS upload links.
It is created 0600 inside a 0700 root (SQLite gives its -wal and -shm files the database's mode).
"""
from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS repos (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    uid TEXT NOT NULL,
    type TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    private INTEGER NOT NULL DEFAULT 0,
    gated TEXT,
    created_at TEXT NOT NULL,
    last_modified TEXT NOT NULL,
    downloads INTEGER NOT NULL DEFAULT 0,
    likes INTEGER NOT NULL DEFAULT 0,
    UNIQUE (type, namespace, name)
);
CREATE TABLE IF NOT EXISTS commits (
    oid TEXT PRIMARY KEY,
    repo INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
    parent TEXT,
    title TEXT NOT NULL,
    message TEXT NOT NULL,
    author TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS refs (
    repo INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    oid TEXT NOT NULL,
    PRIMARY KEY (repo, name)
);
CREATE TABLE IF NOT EXISTS files (
    commit_oid TEXT NOT NULL REFERENCES commits(oid) ON DELETE CASCADE,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    lfs INTEGER NOT NULL,
    git_oid TEXT NOT NULL,
    PRIMARY KEY (commit_oid, path)
);
CREATE INDEX IF NOT EXISTS files_blob ON files(sha256);
CREATE TABLE IF NOT EXISTS uploads (
    sha256 TEXT NOT NULL,
    user TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (sha256, user)
);
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    orgs TEXT NOT NULL,
    write INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS publishers (
    repo INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
    issuer TEXT NOT NULL,
    claims TEXT NOT NULL,
    PRIMARY KEY (repo, issuer, claims)
);
CREATE TABLE IF NOT EXISTS repo_tokens (
    hash TEXT PRIMARY KEY,
    repo INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
    issuer TEXT NOT NULL,
    subject TEXT NOT NULL,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS grants (
    repo INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
    user TEXT NOT NULL,
    PRIMARY KEY (repo, user)
);
CREATE TABLE IF NOT EXISTS discussions (
    repo INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
    num INTEGER NOT NULL,
    title TEXT NOT NULL,
    description TEXT NOT NULL,
    author TEXT NOT NULL,
    is_pr INTEGER NOT NULL,
    status TEXT NOT NULL,
    base TEXT,
    start TEXT,
    created_at TEXT NOT NULL,
    PRIMARY KEY (repo, num)
);
"""



def private_dir(path: Path) -> Path:
    """Create `path` (and parents) if needed and make it 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def private_file(path: Path) -> Path:
    """Create `path` empty if missing and make it 0600 (before SQLite opens it, so nothing is ever readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)
    return path


class Database:
    """The SQLite file at `path`: schema on open, one transaction per `tx()`, the link-signing secret."""

    def __init__(self, path: Path):
        self.path = private_file(Path(path))
        for suffix in ("-wal", "-shm"):
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                os.chmod(side, 0o600)
        init = sqlite3.connect(self.path, timeout=60)
        try:
            init.execute("PRAGMA journal_mode=WAL")
            init.executescript(_SCHEMA)
        finally:
            init.close()
        with self.tx(immediate=True) as db:
            if db.execute("SELECT 1 FROM meta WHERE key='secret'").fetchone() is None:
                db.execute("INSERT INTO meta VALUES ('secret', ?)", (secrets.token_hex(32),))
        with self.tx() as db:
            self.secret = bytes.fromhex(db.execute("SELECT value FROM meta WHERE key='secret'").fetchone()[0])

    @contextmanager
    def tx(self, *, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection inside one transaction: committed on success, rolled back on any error."""
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.row_factory = sqlite3.Row
            db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()
