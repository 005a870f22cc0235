"""Durable storage of the local Hub: content-addressed blobs plus a SQLite index.

Layout under ROOT:
    blobs/ab/abcdef...   file contents, named by their sha256 (written to tmp/ then renamed)
    tmp/                 partial uploads; anything left here after a crash is garbage
    hub.sqlite           repos, commits (with parent), refs, files per commit, tokens (sha256 hashes only),
                         gated-access grants, discussions and pull requests

Refs are keyed as git names them, except branches, which keep their short name: `main`, `refs/tags/v1`,
`refs/pr/3`. Branch and tag names may not start with `refs/`, so the keys never collide.

A commit is one SQLite transaction that inserts the commit row and its full file list and moves the ref
last, so a commit appears whole or not at all, also when the process is killed mid-commit (SQLite rolls
the unfinished transaction back on the next open). Opening a pull request with a commit numbers the pull
request, writes the commit and creates `refs/pr/N` in one such transaction. Blobs are written before that
transaction; an orphan blob is harmless.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hubquant.errors import ConflictError, NotFoundError, UsageError
from hubquant.hub.server.objects import (
    DEFAULT_GITATTRIBUTES,
    GATED_MODES,
    NAME_RE,
    PR_REF_RE,
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
    check_no_file_dir_clash,
    check_path,
    check_ref_name,
    git_blob_oid,
    hash_token,
    lfs_pointer,
    now_iso,
    split_repo_id,
    wants_lfs,
)

FAILPOINT_ENV = "HUBQUANT_HUB_FAILPOINT_COMMIT_SLEEP"  # seconds to sleep inside a commit, before the ref moves
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_SHORT_SHA = re.compile(r"^[0-9a-f]{7,39}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20

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
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    orgs TEXT NOT NULL,
    write INTEGER NOT NULL,
    created_at TEXT NOT NULL
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


class Store:
    """The local Hub's storage. Thread-safe: every call opens its own SQLite connection."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"
        self.db_path = self.root / "hub.sqlite"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        init = sqlite3.connect(self.db_path, timeout=60)
        try:
            init.execute("PRAGMA journal_mode=WAL")
            init.executescript(_SCHEMA)
        finally:
            init.close()
        with self._db(immediate=True) as db:
            if db.execute("SELECT 1 FROM meta WHERE key='secret'").fetchone() is None:
                db.execute("INSERT INTO meta VALUES ('secret', ?)", (secrets.token_hex(32),))
        with self._db() as db:
            self._secret = bytes.fromhex(db.execute("SELECT value FROM meta WHERE key='secret'").fetchone()[0])

    # --- plumbing -------------------------------------------------------------------------------------
    @contextmanager
    def _db(self, *, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection inside one transaction: committed on success, rolled back on any error."""
        db = sqlite3.connect(self.db_path, timeout=60, isolation_level=None)
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

    def sign(self, message: str) -> str:
        """An HMAC of `message` with this Hub's secret (LFS upload links carry one instead of a token)."""
        return hmac.new(self._secret, message.encode(), hashlib.sha256).hexdigest()

    def check_signature(self, message: str, signature: str) -> bool:
        return hmac.compare_digest(self.sign(message), signature)

    def clean_tmp(self, *, max_age_s: float = 3600) -> int:
        """Delete partial uploads older than `max_age_s` (left by a crash); returns how many."""
        n = 0
        cutoff = time.time() - max_age_s
        for p in self.tmp.iterdir():
            try:
                if p.stat().st_mtime < cutoff:
                    p.unlink()
                    n += 1
            except FileNotFoundError:
                pass
        return n

    # --- tokens -----------------------------------------------------------------------------------------
    def add_token(self, user: str, *, orgs: Iterable[str] = (), write: bool = True) -> str:
        """Create a token for `user` (write access to `user` and `orgs` unless `write=False`); only its hash is kept.

        Returns:
            The token (`hf_...`), shown once.
        """
        for ns in (user, *orgs):
            if not NAME_RE.match(ns):
                raise UsageError(f"invalid user or org name {ns!r}", hint="use letters, digits, '.', '_' or '-'")
        token = "hf_" + secrets.token_urlsafe(30).replace("-", "A").replace("_", "B")
        with self._db() as db:
            db.execute(
                "INSERT INTO tokens VALUES (?, ?, ?, ?, ?)",
                (hash_token(token), user, json.dumps(list(orgs)), int(write), now_iso()),
            )
        return token

    def principal(self, token: str) -> Principal | None:
        """Who owns `token`, or None for an unknown token."""
        with self._db() as db:
            row = db.execute("SELECT * FROM tokens WHERE hash=?", (hash_token(token),)).fetchone()
        if row is None:
            return None
        return Principal(user=row["user"], orgs=tuple(json.loads(row["orgs"])), write=bool(row["write"]))

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

    def grant_access(self, repo_id: str, user: str, repo_type: str = "model") -> None:
        repo = self.get_repo(repo_id, repo_type)
        with self._db() as db:
            db.execute("INSERT OR IGNORE INTO grants VALUES (?, ?)", (repo.id, user))

    def has_grant(self, repo: Repo, user: str) -> bool:
        with self._db() as db:
            return db.execute("SELECT 1 FROM grants WHERE repo=? AND user=?", (repo.id, user)).fetchone() is not None

    def count_download(self, repo: Repo) -> None:
        with self._db() as db:
            db.execute("UPDATE repos SET downloads = downloads + 1 WHERE id=?", (repo.id,))

    # --- revisions, commits, files -------------------------------------------------------------------------
    def refs(self, repo: Repo) -> dict[str, str]:
        """Every ref of the repo by its full git name (`refs/heads/main`, `refs/tags/v1`, `refs/pr/2`) -> sha."""
        with self._db() as db:
            rows = db.execute("SELECT name, oid FROM refs WHERE repo=?", (repo.id,)).fetchall()
        out = {(r["name"] if r["name"].startswith("refs/") else f"refs/heads/{r['name']}"): r["oid"] for r in rows}
        return dict(sorted(out.items()))

    @staticmethod
    def _ref_keys(revision: str) -> list[str]:
        """The refs-table keys a revision may name, in the order they are tried (branch before tag)."""
        if revision.startswith("refs/heads/"):
            return [revision[len("refs/heads/"):]]
        if revision.startswith("refs/tags/") or PR_REF_RE.match(revision):
            return [revision]
        if revision.startswith("refs/"):
            return []
        return [revision, f"refs/tags/{revision}"]

    def resolve(self, repo: Repo, revision: str) -> str:
        """A branch, tag or `refs/pr/N` (short or full git name), or a commit sha of this repo (full or at
        least 7 hex digits) -> the commit sha."""
        with self._db() as db:
            for key in self._ref_keys(revision):
                row = db.execute("SELECT oid FROM refs WHERE repo=? AND name=?", (repo.id, key)).fetchone()
                if row is not None:
                    return row["oid"]
            oid = self._commit_by_sha(db, repo, revision)
            if oid is not None:
                return oid
        raise RevisionNotFound(
            f"revision {revision!r} not found in {repo.repo_id}",
            hint="use a branch or tag name such as 'main', refs/pr/N, or a commit sha",
        )

    @staticmethod
    def _commit_by_sha(db: sqlite3.Connection, repo: Repo, sha: str) -> str | None:
        if _SHA1.match(sha):
            row = db.execute("SELECT oid FROM commits WHERE repo=? AND oid=?", (repo.id, sha)).fetchone()
            return None if row is None else row["oid"]
        if _SHORT_SHA.match(sha):
            rows = db.execute(
                "SELECT oid FROM commits WHERE repo=? AND oid >= ? AND oid < ? LIMIT 2", (repo.id, sha, sha + "g")
            ).fetchall()
            return rows[0]["oid"] if len(rows) == 1 else None
        return None

    def commit_info(self, oid: str) -> Commit:
        with self._db() as db:
            row = db.execute("SELECT * FROM commits WHERE oid=?", (oid,)).fetchone()
        if row is None:
            raise RevisionNotFound(f"commit {oid} not found", hint="use a commit sha of this repo")
        return Commit(**{k: row[k] for k in ("oid", "parent", "title", "message", "author", "created_at")})

    def history(self, oid: str) -> list[Commit]:
        """The commit `oid` and its ancestors, newest first."""
        out: list[Commit] = []
        cur: str | None = oid
        while cur is not None:
            c = self.commit_info(cur)
            out.append(c)
            cur = c.parent
        return out

    def files(self, oid: str) -> dict[str, FileEntry]:
        """Every file of commit `oid`, by path (sorted)."""
        with self._db() as db:
            rows = db.execute("SELECT * FROM files WHERE commit_oid=? ORDER BY path", (oid,)).fetchall()
        return {
            r["path"]: FileEntry(path=r["path"], sha256=r["sha256"], size=r["size"], lfs=bool(r["lfs"]),
                                 git_oid=r["git_oid"])
            for r in rows
        }

    def file(self, oid: str, path: str) -> FileEntry:
        with self._db() as db:
            r = db.execute("SELECT * FROM files WHERE commit_oid=? AND path=?", (oid, path)).fetchone()
        if r is None:
            raise EntryNotFound(f"{path} not found at commit {oid[:12]}", hint="list the repo's files")
        return FileEntry(path=r["path"], sha256=r["sha256"], size=r["size"], lfs=bool(r["lfs"]), git_oid=r["git_oid"])

    def read_small(self, entry: FileEntry, limit: int = 4 * 1024 * 1024) -> bytes | None:
        """The content of a small file (None when larger than `limit`)."""
        if entry.size > limit:
            return None
        return self.blob_path(entry.sha256).read_bytes()

    # --- blobs --------------------------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256[:2] / sha256

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        if not _SHA256.match(sha256):
            return False
        p = self.blob_path(sha256)
        return p.is_file() and (size is None or p.stat().st_size == size)

    def open_upload(self) -> BlobWriter:
        """A writer that streams bytes to a temp file and files them under their sha256 on `finish()`."""
        return BlobWriter(self)

    def write_blob(
        self, chunks: Iterable[bytes], *, sha256: str | None = None, size: int | None = None
    ) -> tuple[str, int]:
        """Store bytes; returns (sha256, size). Raises UsageError if `sha256`/`size` are given and differ."""
        w = self.open_upload()
        try:
            for c in chunks:
                w.write(c)
            return w.finish(sha256=sha256, size=size)
        finally:
            w.abort()

    def add_local_file(self, path: str | os.PathLike) -> tuple[str, int]:
        """Store a local file's bytes (streamed)."""
        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as f:
                while block := f.read(_CHUNK):
                    yield block

        return self.write_blob(chunks())

    # --- commits ---------------------------------------------------------------------------------------------
    def _new_commit_oid(self, repo_id: int, parent: str | None, title: str) -> str:
        seed = f"{repo_id}\0{parent}\0{title}\0{time.time_ns()}\0{secrets.token_hex(8)}"
        return hashlib.sha1(seed.encode()).hexdigest()

    def _check_ops(self, ops: Iterable[AddFile | DeletePath]) -> list[AddFile | DeletePath]:
        ops = list(ops)
        for op in ops:
            check_path(op.path.rstrip("/") if isinstance(op, DeletePath) else op.path)
            if isinstance(op, AddFile) and not self.has_blob(op.sha256, op.size):
                raise UsageError(
                    f"{op.path}: no uploaded object {op.sha256} of size {op.size}",
                    hint="upload the LFS object (batch + PUT) before committing",
                )
        return ops

    def _write_commit(
        self, db: sqlite3.Connection, repo: Repo, head: str, ops: list[AddFile | DeletePath], *,
        title: str, message: str, author: str, where: str,
    ) -> str:
        """Insert the commit `ops` make on top of `head` (row + full file list); no ref moves here."""
        current = {
            r["path"]: tuple(r)[1:]
            for r in db.execute(
                "SELECT path, sha256, size, lfs, git_oid FROM files WHERE commit_oid=?", (head,)
            ).fetchall()
        }
        for op in ops:
            if isinstance(op, DeletePath):
                p = op.path.rstrip("/")
                doomed = [k for k in current if k == p or k.startswith(p + "/")] if op.folder else (
                    [p] if p in current else [])
                if not doomed:
                    raise EntryNotFound(f"cannot delete {p}: not in {repo.repo_id}@{where}", hint="check the path")
                for k in doomed:
                    del current[k]
            else:
                current[op.path] = (op.sha256, op.size, int(op.lfs), op.git_oid)
        check_no_file_dir_clash(current)
        oid = self._new_commit_oid(repo.id, head, title)
        db.execute(
            "INSERT INTO commits VALUES (?, ?, ?, ?, ?, ?, ?)", (oid, repo.id, head, title, message, author, now_iso())
        )
        db.executemany(
            "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)",
            [(oid, p, *v) for p, v in sorted(current.items())],
        )
        delay = float(os.environ.get(FAILPOINT_ENV, "0") or 0)
        if delay > 0:  # test failpoint: the process can be killed here, before the ref moves
            print(f"failpoint: commit {oid} sleeps {delay:g} s before moving {where}", file=sys.stderr, flush=True)
            time.sleep(delay)
        return oid

    def commit(
        self,
        repo: Repo,
        ops: Iterable[AddFile | DeletePath],
        *,
        title: str,
        message: str = "",
        author: str,
        branch: str = "main",
        parent: str | None = None,
    ) -> str:
        """Apply `ops` on top of `branch` (a branch, or a pull request's `refs/pr/N`) as one new commit, atomically.

        Args:
            parent: if given (full sha or at least 7 hex digits), the commit is refused unless `branch` still
                points at it.

        Returns:
            The new commit's sha (40 hex).

        Raises:
            RevisionNotFound: `branch` is not a branch or pull request of the repo (tags and shas are not).
            CommitConflict: `parent` is not the branch head any more.
            EntryNotFound: a deleted path does not exist.
            UsageError: an invalid path, or a blob that was never uploaded.
        """
        ops = self._check_ops(ops)
        key = branch.removeprefix("refs/heads/")
        pr = PR_REF_RE.match(key)
        with self._db(immediate=True) as db:
            row = None if key.startswith("refs/") and not pr else db.execute(
                "SELECT oid FROM refs WHERE repo=? AND name=?", (repo.id, key)).fetchone()
            if row is None:
                raise RevisionNotFound(
                    f"branch {branch!r} not found in {repo.repo_id}",
                    hint="commit to a branch ('main' or one made with create_branch) or to refs/pr/N",
                )
            head = row["oid"]
            if parent is not None and not (parent == head or (_SHORT_SHA.match(parent) and head.startswith(parent))):
                raise CommitConflict(
                    f"parent commit {parent} is not the head of {branch} ({head}): the branch moved",
                    hint="fetch the new head and retry the commit",
                )
            oid = self._write_commit(db, repo, head, ops, title=title, message=message, author=author, where=branch)
            db.execute("UPDATE refs SET oid=? WHERE repo=? AND name=?", (oid, repo.id, key))
            if pr:
                db.execute("UPDATE discussions SET status='open' WHERE repo=? AND num=? AND status='draft'",
                           (repo.id, int(pr.group(1))))
            else:
                db.execute("UPDATE repos SET last_modified=? WHERE id=?", (now_iso(), repo.id))
        return oid

    # --- branches and tags -----------------------------------------------------------------------------------
    def create_branch(self, repo: Repo, branch: str, revision: str | None = None) -> str:
        """Point a new branch at `revision` (default: main's head).

        Raises:
            UsageError: an invalid branch name (e.g. `refs/pr/5`).
            RevisionNotFound: `revision` does not exist.
            ConflictError: the branch exists.
        """
        check_ref_name(branch, "branch")
        oid = self.resolve(repo, revision or "main")
        with self._db(immediate=True) as db:
            if db.execute("SELECT 1 FROM refs WHERE repo=? AND name=?", (repo.id, branch)).fetchone():
                raise ConflictError(f"branch {branch!r} already exists", hint="pick another name")
            db.execute("INSERT INTO refs VALUES (?, ?, ?)", (repo.id, branch, oid))
        return oid

    def delete_branch(self, repo: Repo, branch: str) -> None:
        """Remove a branch (its commits stay reachable by sha). `main` cannot be deleted (UsageError)."""
        branch = branch.removeprefix("refs/heads/")
        if branch.startswith("refs/"):  # tags and pull requests are not branches
            raise RevisionNotFound(f"branch {branch!r} not found in {repo.repo_id}", hint="list the repo's refs")
        if branch == "main":
            raise UsageError("the main branch cannot be deleted", hint="delete another branch")
        self._delete_ref(repo, branch, f"branch {branch!r}")

    def create_tag(self, repo: Repo, tag: str, revision: str | None = None) -> str:
        """Tag the commit `revision` names (default: main's head); returns its sha.

        Raises:
            UsageError: an invalid tag name.
            RevisionNotFound: `revision` does not exist.
            ConflictError: the tag exists.
        """
        check_ref_name(tag, "tag")
        oid = self.resolve(repo, revision or "main")
        with self._db(immediate=True) as db:
            if db.execute("SELECT 1 FROM refs WHERE repo=? AND name=?", (repo.id, f"refs/tags/{tag}")).fetchone():
                raise ConflictError(f"tag {tag!r} already exists in {repo.repo_id}",
                                    hint="delete it first or pick another name")
            db.execute("INSERT INTO refs VALUES (?, ?, ?)", (repo.id, f"refs/tags/{tag}", oid))
        return oid

    def delete_tag(self, repo: Repo, tag: str) -> None:
        tag = tag.removeprefix("refs/tags/")
        self._delete_ref(repo, f"refs/tags/{tag}", f"tag {tag!r}")

    def _delete_ref(self, repo: Repo, key: str, what: str) -> None:
        with self._db(immediate=True) as db:
            if db.execute("DELETE FROM refs WHERE repo=? AND name=?", (repo.id, key)).rowcount == 0:
                raise RevisionNotFound(f"{what} not found in {repo.repo_id}", hint="list the repo's refs")

    # --- discussions and pull requests ------------------------------------------------------------------------
    def open_discussion(
        self,
        repo: Repo,
        *,
        title: str,
        description: str = "",
        author: str,
        pull_request: bool = False,
        base: str = "main",
        ops: Iterable[AddFile | DeletePath] | None = None,
        parent: str | None = None,
    ) -> tuple[Discussion, str | None]:
        """Open a discussion, or a pull request against the branch `base` with its ref `refs/pr/N`.

        With `ops`, the pull request's first commit (titled `title`) is made in the same transaction, on top of
        `parent` (a commit of this repo) or else `base`'s head: the number, the ref and the commit appear
        together or not at all. Numbers count up per repo, shared by discussions and pull requests.

        Returns:
            (discussion, sha of the new commit or None).

        Raises:
            RevisionNotFound: `base` is not a branch, or `parent` is not a commit of this repo.
            EntryNotFound, UsageError: as `commit`.
        """
        ops = self._check_ops(ops or [])
        if ops and not pull_request:
            raise UsageError("only a pull request can carry commits", hint="pass pull_request=True")
        base_key = base.removeprefix("refs/heads/")
        with self._db(immediate=True) as db:
            start = None
            if pull_request:
                row = None if base_key.startswith("refs/") else db.execute(
                    "SELECT oid FROM refs WHERE repo=? AND name=?", (repo.id, base_key)).fetchone()
                if row is None:
                    raise RevisionNotFound(f"branch {base!r} not found in {repo.repo_id}",
                                           hint="open pull requests against a branch, e.g. 'main'")
                start = row["oid"] if parent is None else self._commit_by_sha(db, repo, parent)
                if start is None:
                    raise RevisionNotFound(f"parent commit {parent} not found in {repo.repo_id}",
                                           hint="use a commit sha of this repo")
            num = db.execute("SELECT COALESCE(MAX(num), 0) + 1 FROM discussions WHERE repo=?", (repo.id,)).fetchone()[0]
            d = Discussion(num=num, title=title, description=description, author=author,
                           is_pull_request=pull_request, status="open" if ops or not pull_request else "draft",
                           created_at=now_iso(), base=f"refs/heads/{base_key}" if pull_request else None, start=start)
            db.execute("INSERT INTO discussions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (repo.id, d.num, d.title, d.description, d.author, int(d.is_pull_request), d.status, d.base,
                        d.start, d.created_at))
            oid = None
            if ops:
                oid = self._write_commit(db, repo, start, ops, title=title, message=description, author=author,
                                         where=f"refs/pr/{num}")
            if pull_request:
                db.execute("INSERT INTO refs VALUES (?, ?, ?)", (repo.id, f"refs/pr/{num}", oid or start))
        return d, oid

    @staticmethod
    def _discussion(row: sqlite3.Row) -> Discussion:
        return Discussion(num=row["num"], title=row["title"], description=row["description"], author=row["author"],
                          is_pull_request=bool(row["is_pr"]), status=row["status"], created_at=row["created_at"],
                          base=row["base"], start=row["start"])

    def discussions(self, repo: Repo) -> list[Discussion]:
        """The repo's discussions and pull requests, newest first."""
        with self._db() as db:
            rows = db.execute("SELECT * FROM discussions WHERE repo=? ORDER BY num DESC", (repo.id,)).fetchall()
        return [self._discussion(r) for r in rows]

    def discussion(self, repo: Repo, num: int) -> Discussion:
        with self._db() as db:
            row = db.execute("SELECT * FROM discussions WHERE repo=? AND num=?", (repo.id, num)).fetchone()
        if row is None:
            raise NotFoundError(f"discussion {num} not found in {repo.repo_id}", hint="list the repo's discussions")
        return self._discussion(row)


class BlobWriter:
    """Streams bytes into ROOT/tmp while hashing; `finish()` renames the file to its sha256 name."""

    def __init__(self, store: Store):
        self._store = store
        self._tmp = store.tmp / f"upload-{uuid.uuid4().hex}"
        self._f = open(self._tmp, "wb")
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._f.write(chunk)
        self._sha.update(chunk)
        self.size += len(chunk)

    def finish(self, *, sha256: str | None = None, size: int | None = None) -> tuple[str, int]:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        digest = self._sha.hexdigest()
        if (sha256 is not None and digest != sha256) or (size is not None and self.size != size):
            raise UsageError(
                f"uploaded bytes do not match: got sha256 {digest} size {self.size}, expected {sha256} size {size}",
                hint="upload the file again",
            )
        dest = self._store.blob_path(digest)
        dest.parent.mkdir(exist_ok=True)
        if dest.exists() and dest.stat().st_size == self.size:
            self._tmp.unlink()
        else:
            os.replace(self._tmp, dest)
        return digest, self.size

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)


__all__ = [  # the records, errors and helpers of objects.py are re-exported for callers of the store
    "DEFAULT_GITATTRIBUTES", "FAILPOINT_ENV", "GATED_MODES", "REPO_TYPES",
    "AddFile", "BlobWriter", "Commit", "CommitConflict", "DeletePath", "Discussion", "EntryNotFound", "FileEntry",
    "Principal",
    "Repo", "RepoNotFound", "RevisionNotFound", "Store", "git_blob_oid", "lfs_pointer", "split_repo_id", "wants_lfs",
]
