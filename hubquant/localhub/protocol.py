"""What the local Hub's handlers share: error answers with the Hub's X-Error-Code, the per-request
context with its access checks, and Link-header paging."""
from __future__ import annotations

import json
import os
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse

from hubquant.errors import ConflictError, HubquantError, NotFoundError, UsageError
from hubquant.localhub.store import (
    CommitConflict,
    EntryNotFound,
    Principal,
    Repo,
    RepoNotFound,
    RevisionNotFound,
)

DROP_ENV = "HUBQUANT_HUB_FAILPOINT_DROP_DOWNLOAD"  # test failpoint: cut a file's first full GET after N bytes
PAGE_SIZE_ENV = "HUBQUANT_HUB_PAGE_SIZE"  # entries per page of tree/commits/list answers (the Hub: 1000)
LFS_LINK_TTL = 3600  # seconds an LFS upload link stays valid
CHUNK = 1 << 20
PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
INVALID_TOKEN = "Invalid credentials in Authorization header"
LFS_CLIENT_HEADER = "x-hubquant-transfer"  # "lfs": the client uploads LFS files through the LFS batch API
MAX_COMMIT_ENV = "HUBQUANT_HUB_MAX_COMMIT_BYTES"  # body limit of an NDJSON commit (default 4 GiB)
MAX_JSON_ENV = "HUBQUANT_HUB_MAX_JSON_BYTES"  # body limit of every other request but LFS uploads (default 16 MiB)


def body_limit(scope: dict) -> int | None:
    """The request-body limit of a route: commits, LFS uploads (bounded by their signed size), the rest."""
    path = scope.get("path", "")
    if scope.get("method") == "PUT" and path.startswith("/_hubquant/lfs/"):
        return None
    if "/commit/" in path or path.endswith("/commit"):
        return int(os.environ.get(MAX_COMMIT_ENV) or 4 << 30)
    return int(os.environ.get(MAX_JSON_ENV) or 16 << 20)


def json_body(ctx, *, default: dict | None = None) -> dict:
    """The request body as a JSON object; 400 for anything else (bad JSON, too deep, not an object)."""
    if not ctx.body.strip():
        if default is not None:
            return dict(default)
        raise HubHTTPError(400, "expected a JSON object body")
    try:
        p = json.loads(ctx.body)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise HubHTTPError(400, "the body is not valid JSON (or is nested too deeply)") from None
    if not isinstance(p, dict):
        raise HubHTTPError(400, "expected a JSON object body")
    return p


class HubHTTPError(Exception):
    """An error answer: status, message, and the Hub's X-Error-Code when it has one."""

    def __init__(self, status: int, message: str, code: str | None = None, body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.body = status, message, code, body or {}

    def response(self) -> JSONResponse:
        one_line = " ".join(self.message.split())[:1000]
        headers = {"X-Error-Message": one_line.encode("ascii", "replace").decode()}
        if self.code:
            headers["X-Error-Code"] = self.code
        return JSONResponse({"error": self.message, **self.body}, status_code=self.status, headers=headers)


def from_store_error(e: HubquantError, who: Principal | None) -> HubHTTPError:
    if isinstance(e, RepoNotFound):
        return HubHTTPError(401 if who is None else 404, e.message, "RepoNotFound")
    if isinstance(e, RevisionNotFound):
        return HubHTTPError(404, e.message, "RevisionNotFound")
    if isinstance(e, EntryNotFound):
        return HubHTTPError(404, e.message, "EntryNotFound")
    if isinstance(e, CommitConflict):
        return HubHTTPError(412, f"{e.message}. A commit has happened since. Please refresh and try again.")
    if isinstance(e, ConflictError):
        return HubHTTPError(409, e.message)
    if isinstance(e, NotFoundError):
        return HubHTTPError(404, e.message)
    if isinstance(e, UsageError):
        return HubHTTPError(400, e.message)
    return HubHTTPError(500, e.message)


def page_size() -> int:
    return max(1, int(os.environ.get(PAGE_SIZE_ENV, "1000")))


class Ctx:
    """One request: the parsed route, the caller, and helpers that check access."""

    def __init__(self, hub, request: Request, who: Principal | None):
        self.hub, self.store, self.request, self.who = hub, hub.store, request, who
        self.base = str(request.base_url).rstrip("/")
        self.body = b""

    def repo_url(self, repo: Repo) -> str:
        return f"{self.base}/{PREFIX[repo.type]}{repo.repo_id}"

    def repo(self, repo_type: str, repo_id: str, *, content: bool = False) -> Repo:
        """The repo if the caller may see it (and, with `content`, download from it)."""
        who = self.who
        try:
            repo = self.store.get_repo(repo_id, repo_type)
        except RepoNotFound as e:
            raise from_store_error(e, who) from e
        member = who is not None and who.holds(repo)
        if repo.private and not member:
            raise from_store_error(RepoNotFound(f"{repo_type} repo {repo_id} not found"), who)
        if content and repo.gated and not (member or (who is not None and self.store.has_grant(repo, who.user))):
            msg = (f"Access to {repo_type} {repo_id} is restricted. You must have access to it and be authenticated"
                   " to access it. Please log in." if who is None else
                   f"Access to {repo_type} {repo_id} is restricted and you are not in the authorized list. "
                   f"Ask for access (local Hub: `hubquant hub gate --root ROOT {repo_id} --grant USER`).")
            raise HubHTTPError(401 if who is None else 403, msg, "GatedRepo")
        return repo

    def writable(self, repo_type: str, repo_id: str, *, admin: bool = False) -> Repo:
        """The repo if the caller may write to it (`admin`: also delete it or change its settings)."""
        repo = self.repo(repo_type, repo_id)
        if self.who is not None and self.who.repo is not None:  # a trusted publisher's token: its repo's content
            if admin or not self.who.can_write_repo(repo):
                raise HubHTTPError(403, f"You don't have the rights to {'administer' if admin else 'write to'} "
                                        f"{repo_type} {repo_id} (a trusted publisher's token writes the content "
                                        "of its own repo only)")
            return repo
        self.require_write(repo.namespace, f"write to {repo_type} {repo_id}")
        return repo

    def require_write(self, namespace: str, what: str) -> Principal:
        if self.who is None:
            raise HubHTTPError(401, f"You must be authenticated to {what}. Pass a token (HF_TOKEN).")
        if not self.who.can_write(namespace):
            kind = "read-only token" if not self.who.write else f"user {self.who.user}"
            raise HubHTTPError(
                403, f"You don't have the rights to {what} ({kind} cannot write to namespace {namespace})"
            )
        return self.who

    def resolve(self, repo: Repo, revision: str) -> str:
        try:
            return self.store.resolve(repo, revision)
        except RevisionNotFound as e:
            raise from_store_error(e, self.who) from e


def paged(ctx: Ctx, items: list, page: int | None = None) -> JSONResponse:
    """A page of `items` from `?cursor=`, with a `Link: <...>; rel="next"` header when more remain."""
    page = page or page_size()
    try:
        start = int(ctx.request.query_params.get("cursor", "0"))
    except ValueError:
        raise HubHTTPError(400, "invalid cursor") from None
    chunk = items[start: start + page]
    headers = {}
    if start + page < len(items):
        params = [(k, v) for k, v in ctx.request.query_params.multi_items() if k != "cursor"]
        params.append(("cursor", str(start + page)))
        url = ctx.request.url
        next_url = f"{ctx.base}{url.path}?{urlencode(params)}"
        headers["Link"] = f'<{next_url}>; rel="next"'
    return JSONResponse(chunk, headers=headers)


def flag(v: str | None) -> bool:
    return v is not None and v.lower() in ("1", "true", "yes", "")
