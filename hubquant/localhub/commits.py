"""Commits of the local Hub, and pull requests with their first commit.

A commit is one SQLite transaction that inserts the commit row and its full file list and moves the ref
last, so a commit appears whole or not at all, also when the process is killed mid-commit (SQLite rolls
the unfinished transaction back on the next open). Opening a pull request with a commit numbers the pull
request, writes the commit and creates `refs/pr/N` in one such transaction. Blobs are written before that
transaction; an orphan blob is harmless.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import sys
import time
from collections.abc import Iterable

from hubquant.errors import NotFoundError, UsageError
from hubquant.localhub.objects import (
    PR_REF_RE,
    AddFile,
    Commit,
    CommitConflict,
    DeletePath,
    Discussion,
    EntryNotFound,
    FileEntry,
    Repo,
    RevisionNotFound,
    check_no_file_dir_clash,
    check_path,
    now_iso,
)
from hubquant.localhub.refs import SHORT_SHA_RE

FAILPOINT_ENV = "HUBQUANT_HUB_FAILPOINT_COMMIT_SLEEP"  # seconds to sleep inside a commit, before the ref moves


class CommitsMixin:
    """History, file lists, commits and pull requests (needs `_db`, `has_blob`, `blob_path`, `_commit_by_sha`)."""

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
            if parent is not None and not (parent == head or (SHORT_SHA_RE.match(parent) and head.startswith(parent))):
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

