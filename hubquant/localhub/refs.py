"""Refs of the local Hub: branches (keyed by their short name: `main`), tags (`refs/tags/v1`) and pull
requests (`refs/pr/3`), and how a revision (a ref's short or full git name, or a commit sha) resolves.
Branch and tag names may not start with `refs/`, so the keys never collide."""
from __future__ import annotations

import re
import sqlite3

from hubquant.errors import ConflictError, UsageError
from hubquant.localhub.objects import PR_REF_RE, Repo, RevisionNotFound, check_ref_name

SHA1_RE = re.compile(r"\A[0-9a-f]{40}\Z")
SHORT_SHA_RE = re.compile(r"\A[0-9a-f]{7,39}\Z")


class RefsMixin:
    """Reading and moving refs (needs `_db`)."""

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
        if SHA1_RE.match(sha):
            row = db.execute("SELECT oid FROM commits WHERE repo=? AND oid=?", (repo.id, sha)).fetchone()
            return None if row is None else row["oid"]
        if SHORT_SHA_RE.match(sha):
            rows = db.execute(
                "SELECT oid FROM commits WHERE repo=? AND oid >= ? AND oid < ? LIMIT 2", (repo.id, sha, sha + "g")
            ).fetchall()
            return rows[0]["oid"] if len(rows) == 1 else None
        return None

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

