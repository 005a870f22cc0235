"""Who may do what on the local Hub: tokens (stored as sha256 hashes), gated-access grants, signed LFS upload
links, and which blobs a user may put into a commit.

The blob store is shared by every repo, so a blob id is not a capability: a commit may reference an LFS
object only if its author uploaded those bytes (recorded per user when an upload link is used) or can
already read them in some repo (`may_use_blob`); the LFS batch answer hides blobs the caller cannot use.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterable

from hubquant.errors import UsageError
from hubquant.localhub.objects import NAME_RE, Principal, Repo, hash_token, now_iso


def can_read_content(repo: Repo, who: Principal | None, granted: bool) -> bool:
    """Whether `who` may download files of `repo` (`granted`: `who` holds a grant for the gated repo)."""
    if who is not None and who.holds(repo):
        return True
    if repo.private:
        return False
    return not repo.gated or (who is not None and granted)


class AuthMixin:
    """Tokens, grants, link signatures and blob permissions of a Store (needs `_db`, `_secret`, `_repo`)."""

    def sign(self, message: str) -> str:
        """An HMAC of `message` with this Hub's secret (LFS upload links carry one instead of a token)."""
        return hmac.new(self._secret, message.encode(), hashlib.sha256).hexdigest()

    def check_signature(self, message: str, signature: str) -> bool:
        return hmac.compare_digest(self.sign(message), signature)

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
        """Who owns `token`, or None for an unknown (or expired) token."""
        with self._db() as db:
            row = db.execute("SELECT * FROM tokens WHERE hash=?", (hash_token(token),)).fetchone()
            scoped = None if row else db.execute(
                "SELECT t.repo, t.expires, r.namespace, r.name FROM repo_tokens t JOIN repos r ON r.id = t.repo"
                " WHERE t.hash=?", (hash_token(token),)).fetchone()
        if row is not None:
            return Principal(user=row["user"], orgs=tuple(json.loads(row["orgs"])), write=bool(row["write"]))
        if scoped is None or scoped["expires"] <= time.time():
            return None
        # pushes are attributed to a synthetic user per repo (its uploads are that repo's alone)
        return Principal(user=f"[OIDC]:{scoped['namespace']}/{scoped['name']}", repo=scoped["repo"])

    # --- trusted publishers ----------------------------------------------------------------------------------
    def add_publisher(self, repo_id: str, repo_type: str = "model", *, issuer: str, claims: dict[str, str]) -> None:
        """Trust OIDC id tokens of `issuer` whose claims equal `claims` (e.g. repository, workflow) to write to
        the repo (see localhub/oidc.py)."""
        if not claims or not all(isinstance(v, str) and v for v in claims.values()):
            raise UsageError("a trusted publisher needs at least one claim", hint="e.g. repository=OWNER/REPO")
        repo = self.get_repo(repo_id, repo_type)
        with self._db() as db:
            db.execute("INSERT OR IGNORE INTO publishers VALUES (?, ?, ?)",
                       (repo.id, issuer, json.dumps(claims, sort_keys=True)))

    def publishers(self, repo_id: str, repo_type: str = "model") -> list[tuple[str, dict[str, str]]]:
        """(issuer, claims) of every trusted publisher of the repo."""
        repo = self.get_repo(repo_id, repo_type)
        with self._db() as db:
            rows = db.execute("SELECT issuer, claims FROM publishers WHERE repo=?", (repo.id,)).fetchall()
        return [(r["issuer"], json.loads(r["claims"])) for r in rows]

    def add_repo_token(self, repo_id: str, repo_type: str = "model", *, ttl: float, issuer: str, subject: str) -> str:
        """A token that may read and write this one repo for `ttl` seconds; only its hash is kept."""
        repo = self.get_repo(repo_id, repo_type)
        token = "hf_jwt_" + secrets.token_urlsafe(32)
        with self._db() as db:
            db.execute("DELETE FROM repo_tokens WHERE expires < ?", (time.time(),))
            db.execute("INSERT INTO repo_tokens VALUES (?, ?, ?, ?, ?)",
                       (hash_token(token), repo.id, issuer, subject, time.time() + ttl))
        return token

    # --- access to content -------------------------------------------------------------------------------
    def grant_access(self, repo_id: str, user: str, repo_type: str = "model") -> None:
        repo = self.get_repo(repo_id, repo_type)
        with self._db() as db:
            db.execute("INSERT OR IGNORE INTO grants VALUES (?, ?)", (repo.id, user))

    def has_grant(self, repo: Repo, user: str) -> bool:
        with self._db() as db:
            return db.execute("SELECT 1 FROM grants WHERE repo=? AND user=?", (repo.id, user)).fetchone() is not None


    def record_upload(self, sha256: str, user: str) -> None:
        """Remember that `user` sent the bytes of `sha256` (so that they may commit it)."""
        with self._db() as db:
            db.execute("INSERT OR IGNORE INTO uploads VALUES (?, ?, ?)", (sha256, user, now_iso()))

    def may_use_blob(self, sha256: str, who: Principal | None) -> bool:
        """Whether `who` may reference the blob `sha256` in a commit: they uploaded it, or some repo that holds
        it lets them download it. Anonymous callers may use nothing."""
        if who is None:
            return False
        with self._db() as db:
            if db.execute("SELECT 1 FROM uploads WHERE sha256=? AND user=?", (sha256, who.user)).fetchone():
                return True
            rows = db.execute(
                "SELECT DISTINCT r.* FROM files f JOIN commits c ON c.oid = f.commit_oid JOIN repos r ON r.id = c.repo"
                " WHERE f.sha256=?", (sha256,)).fetchall()
            for row in rows:
                repo = self._repo(row)
                granted = db.execute("SELECT 1 FROM grants WHERE repo=? AND user=?",
                                     (repo.id, who.user)).fetchone() is not None
                if can_read_content(repo, who, granted):
                    return True
        return False
