"""The local Hub's HTTP API (Starlette): what unmodified huggingface_hub speaks (see shared/HUB_API.md).

Routing reads the raw (still percent-encoded) path, because huggingface_hub quotes revisions with
`safe=""` (`refs%2Fheads%2Fmain`) and a decoded path could not tell them from file paths.
Errors carry the status and `X-Error-Code` the real Hub sends, so that `hf_raise_for_status` raises
its own typed errors (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError, GatedRepoError).
"""
from __future__ import annotations

import base64
import binascii
import inspect
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlencode

import yaml
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from hubquant.errors import ConflictError, HubquantError, NotFoundError, UsageError
from hubquant.hub.server import repoinfo
from hubquant.hub.server.store import (
    REPO_TYPES,
    AddFile,
    CommitConflict,
    DeletePath,
    EntryNotFound,
    Principal,
    Repo,
    RepoNotFound,
    RevisionNotFound,
    Store,
    git_blob_oid,
    lfs_pointer,
    split_repo_id,
    wants_lfs,
)

DROP_ENV = "HUBQUANT_HUB_FAILPOINT_DROP_DOWNLOAD"  # test failpoint: cut a file's first full GET after N bytes
PAGE_SIZE_ENV = "HUBQUANT_HUB_PAGE_SIZE"  # entries per page of tree/commits/list answers (the Hub: 1000)
LFS_LINK_TTL = 3600  # seconds an LFS upload link stays valid
_CHUNK = 1 << 20
_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_INVALID_TOKEN = "Invalid credentials in Authorization header"


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


def _from_store_error(e: HubquantError, who: Principal | None) -> HubHTTPError:
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


def _page_size() -> int:
    return max(1, int(os.environ.get(PAGE_SIZE_ENV, "1000")))


class Ctx:
    """One request: the parsed route, the caller, and helpers that check access."""

    def __init__(self, hub: HubApp, request: Request, who: Principal | None):
        self.hub, self.store, self.request, self.who = hub, hub.store, request, who
        self.base = str(request.base_url).rstrip("/")
        self.body = b""

    def repo_url(self, repo: Repo) -> str:
        return f"{self.base}/{_PREFIX[repo.type]}{repo.repo_id}"

    def repo(self, repo_type: str, repo_id: str, *, content: bool = False) -> Repo:
        """The repo if the caller may see it (and, with `content`, download from it)."""
        who = self.who
        try:
            repo = self.store.get_repo(repo_id, repo_type)
        except RepoNotFound as e:
            raise _from_store_error(e, who) from e
        member = who is not None and who.member_of(repo.namespace)
        if repo.private and not member:
            raise _from_store_error(RepoNotFound(f"{repo_type} repo {repo_id} not found"), who)
        if content and repo.gated and not (member or (who is not None and self.store.has_grant(repo, who.user))):
            msg = (f"Access to {repo_type} {repo_id} is restricted. You must have access to it and be authenticated"
                   " to access it. Please log in." if who is None else
                   f"Access to {repo_type} {repo_id} is restricted and you are not in the authorized list. "
                   f"Ask for access (local Hub: `hubquant hub gate --root ROOT {repo_id} --grant USER`).")
            raise HubHTTPError(401 if who is None else 403, msg, "GatedRepo")
        return repo

    def writable(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repo(repo_type, repo_id)
        self.require_write(repo.namespace, f"write to {repo_type} {repo_id}")
        return repo

    def require_write(self, namespace: str, what: str) -> Principal:
        if self.who is None:
            raise HubHTTPError(401, f"You must be authenticated to {what}. Pass a token (HF_TOKEN).")
        if not self.who.can_write(namespace):
            kind = "read-only token" if not self.who.write else f"user {self.who.user}"
            raise HubHTTPError(403, f"You don't have the rights to {what} ({kind} cannot write to namespace {namespace})")
        return self.who

    def resolve(self, repo: Repo, revision: str) -> str:
        try:
            return self.store.resolve(repo, revision)
        except RevisionNotFound as e:
            raise _from_store_error(e, self.who) from e


def _paged(ctx: Ctx, items: list, page: int | None = None) -> JSONResponse:
    """A page of `items` from `?cursor=`, with a `Link: <...>; rel="next"` header when more remain."""
    page = page or _page_size()
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


def _flag(v: str | None) -> bool:
    return v is not None and v.lower() in ("1", "true", "yes", "")


class HubApp:
    """Builds the Starlette app around one Store."""

    def __init__(self, store: Store):
        self.store = store
        self._dropped: set[str] = set()
        self.app = Starlette(routes=[
            Route("/{path:path}", self.dispatch, methods=["GET", "HEAD", "POST", "PUT", "DELETE"]),
        ])

    # --- dispatch -------------------------------------------------------------------------------------------
    async def dispatch(self, request: Request) -> Response:
        who: Principal | None = None
        try:
            who = await run_in_threadpool(self._who, request)
            ctx = Ctx(self, request, who)
            handler, args = self._route(request.method, request.scope.get("raw_path", b"").decode("latin-1"))
            if inspect.iscoroutinefunction(handler):
                return await handler(ctx, *args)
            if request.method in ("POST", "PUT", "DELETE"):
                ctx.body = await request.body()
            return await run_in_threadpool(handler, ctx, *args)
        except HubHTTPError as e:
            return e.response()
        except HubquantError as e:
            return _from_store_error(e, who).response()

    def _who(self, request: Request) -> Principal | None:
        auth = request.headers.get("authorization")
        if not auth:
            return None
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HubHTTPError(401, _INVALID_TOKEN)
        who = self.store.principal(token.strip())
        if who is None:
            raise HubHTTPError(401, _INVALID_TOKEN)
        return who

    def _route(self, method: str, raw_path: str) -> tuple[Callable, tuple]:
        raw_path = raw_path.split("?", 1)[0]
        segs = [unquote(s) for s in raw_path.split("/")[1:]]
        if segs and segs[-1] == "" and len(segs) > 1:
            segs = segs[:-1]
        m = method
        if segs == [""] and m in ("GET", "HEAD"):
            return self.root, ()
        if segs[:1] == ["api"]:
            rest = segs[1:]
            if rest == ["whoami-v2"] and m == "GET":
                return self.whoami, ()
            if rest == ["validate-yaml"] and m == "POST":
                return self.validate_yaml, ()
            if rest == ["repos", "create"] and m == "POST":
                return self.create_repo, ()
            if rest == ["repos", "delete"] and m == "DELETE":
                return self.delete_repo, ()
            if len(rest) == 1 and rest[0] in _PLURAL and m == "GET":
                return self.list_repos, (_PLURAL[rest[0]],)
            if len(rest) >= 3 and rest[0] in _PLURAL:
                rtype, repo_id, sub = _PLURAL[rest[0]], f"{rest[1]}/{rest[2]}", rest[3:]
                routes = {
                    ("GET", ""): self.info, ("GET", "revision"): self.info, ("GET", "tree"): self.tree,
                    ("POST", "paths-info"): self.paths_info, ("GET", "commits"): self.commits,
                    ("GET", "refs"): self.refs, ("POST", "preupload"): self.preupload,
                    ("POST", "commit"): self.commit, ("PUT", "settings"): self.settings,
                    ("POST", "branch"): self.create_branch,
                }
                key = (m if m != "HEAD" else "GET", sub[0] if sub else "")
                if key in routes:
                    return routes[key], (rtype, repo_id, sub[1:])
        if segs[:2] == ["_hubquant", "lfs"] and len(segs) == 3 and m == "PUT":
            return self.lfs_put, (segs[2],)
        if segs[:2] == ["_hubquant", "lfs-verify"] and len(segs) == 5 and m == "POST":
            return self.lfs_verify, (segs[2], f"{segs[3]}/{segs[4]}")
        rtype = "model"
        if segs and segs[0] in _PLURAL and segs[0] != "models":
            rtype, segs = _PLURAL[segs[0]], segs[1:]
        if len(segs) == 6 and segs[1].endswith(".git") and segs[2:] == ["info", "lfs", "objects", "batch"] and m == "POST":
            return self.lfs_batch, (rtype, f"{segs[0]}/{segs[1][:-4]}")
        if len(segs) >= 5 and segs[2] == "resolve" and m in ("GET", "HEAD"):
            return self.resolve_file, (rtype, f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]))
        raise HubHTTPError(404, f"no route for {method} {raw_path}")

    # --- handlers (sync ones run in a thread) ----------------------------------------------------------------
    def root(self, ctx: Ctx) -> Response:
        return JSONResponse({"hub": "hubquant local Hub", "api": "huggingface_hub compatible"})

    def whoami(self, ctx: Ctx) -> Response:
        who = ctx.who
        if who is None:
            raise HubHTTPError(401, "Invalid username or password.")
        role = "write" if who.write else "read"
        return JSONResponse({
            "type": "user", "id": who.user, "name": who.user, "fullname": who.user, "email": None,
            "emailVerified": False, "canPay": False, "isPro": False, "periodEnd": None, "avatarUrl": "",
            "orgs": [{"type": "org", "id": o, "name": o, "fullname": o, "roleInOrg": role} for o in who.orgs],
            "auth": {"type": "access_token", "accessToken": {"displayName": "hubquant-local", "role": role}},
        })

    def validate_yaml(self, ctx: Ctx) -> Response:
        try:
            payload = json.loads(ctx.body or b"{}")
            card = repoinfo.parse_card(str(payload.get("content", "")))
        except (json.JSONDecodeError, AttributeError):
            raise HubHTTPError(400, "expected a JSON body {content, repoType}") from None
        except (yaml.YAMLError, ValueError) as e:
            raise HubHTTPError(400, f"Invalid metadata in README.md: {e}") from None
        errors = []
        for key in ("tags", "datasets", "language", "base_model", "license"):
            v = (card or {}).get(key)
            if v is not None and not isinstance(v, str | list):
                errors.append(f'"{key}" must be a string or a list of strings')
        for key in ("pipeline_tag", "library_name", "base_model_relation"):
            v = (card or {}).get(key)
            if v is not None and not isinstance(v, str):
                errors.append(f'"{key}" must be a string')
        if errors:
            raise HubHTTPError(400, "Invalid metadata in README.md.\n- " + "\n- ".join(errors),
                               body={"errors": [{"message": m} for m in errors]})
        return JSONResponse({"errors": [], "warnings": []})

    def create_repo(self, ctx: Ctx) -> Response:
        p = json.loads(ctx.body or b"{}")
        rtype = p.get("type") or "model"
        if rtype not in REPO_TYPES:
            raise HubHTTPError(400, f"invalid repo type {rtype!r}")
        if ctx.who is None:
            raise HubHTTPError(401, "You must be authenticated to create a repo. Pass a token (HF_TOKEN).")
        ns = p.get("organization") or ctx.who.user
        repo_id = f"{ns}/{p.get('name', '')}"
        split_repo_id(repo_id)
        ctx.require_write(ns, f"create a {rtype} under the namespace {ns}")
        private = bool(p.get("private")) or p.get("visibility") in ("private", "protected")
        repo, created = self.store.create_repo(repo_id, rtype, private=private, author=ctx.who.user)
        url = ctx.repo_url(repo)
        if not created:
            raise HubHTTPError(409, f"You already created this {rtype} repo", body={"url": url})
        return JSONResponse({"url": url, "name": repo_id, "id": repo.uid})

    def delete_repo(self, ctx: Ctx) -> Response:
        p = json.loads(ctx.body or b"{}")
        rtype = p.get("type") or "model"
        ns = p.get("organization") or (ctx.who.user if ctx.who else "")
        repo = ctx.writable(rtype, f"{ns}/{p.get('name', '')}")
        self.store.delete_repo(repo.repo_id, rtype)
        return Response(status_code=200)

    def settings(self, ctx: Ctx, rtype: str, repo_id: str, rest: list) -> Response:
        repo = ctx.writable(rtype, repo_id)
        p = json.loads(ctx.body or b"{}")
        if "gated" in p:
            self.store.set_gated(repo.repo_id, p["gated"], rtype)
        if "private" in p or "visibility" in p:
            private = bool(p.get("private")) or p.get("visibility") in ("private", "protected")
            self.store.set_private(repo.repo_id, private, rtype)
        return JSONResponse({})

    def info(self, ctx: Ctx, rtype: str, repo_id: str, rest: list) -> Response:
        repo = ctx.repo(rtype, repo_id)
        if rest and len(rest) != 1:
            raise HubHTTPError(404, "expected /revision/{revision}")
        oid = ctx.resolve(repo, rest[0] if rest else "main")
        return JSONResponse(repoinfo.repo_json(self.store, repo, oid))

    def _entries(self, files: dict, prefix: str, recursive: bool) -> list[dict]:
        """Tree entries under `prefix` ('' = root): files and folders, folders first at each level."""
        out: dict[str, dict] = {}
        dir_children: dict[str, list[str]] = {}
        for path, e in files.items():
            if prefix and not path.startswith(prefix + "/"):
                continue
            rel = path[len(prefix) + 1:] if prefix else path
            parts = rel.split("/")
            for i in range(1, len(parts)):
                d = "/".join(([prefix] if prefix else []) + parts[:i])
                dir_children.setdefault(d, []).append(e.git_oid)
                if (recursive or i == 1) and d not in out:
                    out[d] = {"type": "directory", "path": d, "size": 0}
            if recursive or len(parts) == 1:
                out[path] = repoinfo.tree_entry_json(e)
        for d, oids in dir_children.items():
            if d in out:
                out[d]["oid"] = git_blob_oid("".join(sorted(oids)).encode())
        return sorted(out.values(), key=lambda x: (x["type"] != "directory", x["path"]))

    def tree(self, ctx: Ctx, rtype: str, repo_id: str, rest: list) -> Response:
        repo = ctx.repo(rtype, repo_id)
        if not rest:
            raise HubHTTPError(404, "expected /tree/{revision}[/{path}]")
        oid = ctx.resolve(repo, rest[0])
        prefix = "/".join(rest[1:]).strip("/")
        files = self.store.files(oid)
        if prefix and prefix in files:
            raise HubHTTPError(404, f"{prefix} is a file, not a folder", "EntryNotFound")
        entries = self._entries(files, prefix, _flag(ctx.request.query_params.get("recursive", "false")))
        if prefix and not entries:
            raise HubHTTPError(404, f"folder {prefix} not found at {rest[0]}", "EntryNotFound")
        return _paged(ctx, entries)

    def paths_info(self, ctx: Ctx, rtype: str, repo_id: str, rest: list) -> Response:
        repo = ctx.repo(rtype, repo_id)
        oid = ctx.resolve(repo, rest[0] if rest else "main")
        form = parse_qs(ctx.body.decode(), keep_blank_values=True)
        if not form and ctx.body.strip().startswith(b"{"):
            form = {"paths": json.loads(ctx.body).get("paths", [])}
        files = self.store.files(oid)
        out = []
        for p in form.get("paths", []):
            p = p.strip("/")
            if p in files:
                out.append(repoinfo.tree_entry_json(files[p]))
            elif any(f.startswith(p + "/") for f in files):
                out.append({"type": "directory", "path": p, "oid": git_blob_oid(p.encode()), "size": 0})
        return JSONResponse(out)

    def commits(self, ctx: Ctx, rtype: str, repo_id: str, rest: list) -> Response:
        repo = ctx.repo(rtype, repo_id)
        oid = ctx.resolve(repo, rest[0] if rest else "main")
        items = [repoinfo.commit_json(c) for c in self.store.history(oid)]
        if "formatted" in ctx.request.query_params.getlist("expand[]"):
            for c in items:
                c["formatted"] = {"title": c["title"], "message": c["message"]}
        return _paged(ctx, items)

    def refs(self, ctx: Ctx, rtype: str, repo_id: str, rest: list) -> Response:
        repo = ctx.repo(rtype, repo_id)
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": o} for n, o in self.store.refs(repo).items()]
        return JSONResponse({"branches": branches, "converts": [], "tags": []})

    def create_branch(self, ctx: Ctx, rtype: str, repo_id: str, rest: list) -> Response:
        repo = ctx.writable(rtype, repo_id)
        if len(rest) != 1:
            raise HubHTTPError(404, "expected /branch/{name}")
        p = json.loads(ctx.body or b"{}")
        self.store.create_branch(repo, rest[0], p.get("startingPoint"))
        return JSONResponse({})

    def list_repos(self, ctx: Ctx, rtype: str) -> Response:
        q = ctx.request.query_params
        author, search = q.get("author"), (q.get("search") or "").lower()
        filters = [f for v in q.getlist("filter") for f in v.split(",") if f]
        sort, direction = q.get("sort"), q.get("direction", "-1")
        full, card = _flag(q.get("full")), _flag(q.get("cardData"))
        rows = []
        for repo in self.store.list_repos(rtype):
            if author and repo.namespace.lower() != author.lower():
                continue
            if search and search not in repo.repo_id.lower():
                continue
            if repo.private and not (ctx.who is not None and ctx.who.member_of(repo.namespace)):
                continue
            oid = self.store.resolve(repo, "main")
            d = repoinfo.repo_json(self.store, repo, oid, siblings=full, card_data=card, full=True)
            if not all(f in d["tags"] or f == d.get("pipeline_tag") for f in filters):
                continue
            rows.append((repo, d))
        if sort:
            keys = {
                "createdAt": lambda r: r[0].created_at, "lastModified": lambda r: r[0].last_modified,
                "downloads": lambda r: (r[0].downloads, r[0].created_at), "likes": lambda r: (r[0].likes, r[0].created_at),
                "trendingScore": lambda r: (r[0].likes, r[0].created_at), "id": lambda r: r[0].repo_id.lower(),
            }
            if sort not in keys:
                raise HubHTTPError(400, f"invalid sort {sort!r}: use one of {', '.join(keys)}")
            rows.sort(key=keys[sort], reverse=str(direction) != "1")
        items = [d for _, d in rows]
        limit = q.get("limit")
        if limit is not None:
            try:
                items = items[: max(0, int(limit))]
            except ValueError:
                raise HubHTTPError(400, "limit must be an integer") from None
        return _paged(ctx, items)

    def preupload(self, ctx: Ctx, rtype: str, repo_id: str, rest: list) -> Response:
        repo = ctx.writable(rtype, repo_id)
        if _flag(ctx.request.query_params.get("create_pr")):
            raise HubHTTPError(400, "the local Hub does not support pull requests (create_pr)")
        oid = ctx.resolve(repo, rest[0] if rest else "main")
        current = self.store.files(oid)
        p = json.loads(ctx.body or b"{}")
        out = []
        for f in p.get("files", []):
            path, size = f["path"], int(f.get("size", 0))
            try:
                sample = base64.b64decode(f.get("sample", ""))
            except binascii.Error:
                sample = b""
            old = current.get(path)
            lfs = (old is not None and old.lfs) or wants_lfs(path, size, sample)
            remote = None if old is None else (old.sha256 if old.lfs else old.git_oid)
            out.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": remote})
        return JSONResponse({"files": out, "commitOid": oid})

    def lfs_batch(self, ctx: Ctx, rtype: str, repo_id: str) -> Response:
        repo = ctx.writable(rtype, repo_id)
        p = json.loads(ctx.body or b"{}")
        if p.get("operation") != "upload":
            raise HubHTTPError(400, "the local Hub's LFS endpoint takes uploads only; download via /resolve/")
        objects = []
        for o in p.get("objects", []):
            oid, size = str(o.get("oid", "")), o.get("size")
            if len(oid) != 64 or any(c not in "0123456789abcdef" for c in oid) or not isinstance(size, int) or size < 0:
                objects.append({"oid": oid, "size": size if isinstance(size, int) else 0,
                                "error": {"code": 422, "message": "invalid oid or size"}})
                continue
            if self.store.has_blob(oid, size):
                objects.append({"oid": oid, "size": size})  # already stored: no actions
                continue
            exp = int(time.time()) + LFS_LINK_TTL
            sig = self.store.sign(f"{oid}:{size}:{exp}")
            href = f"{ctx.base}/_hubquant/lfs/{oid}?{urlencode({'size': size, 'exp': exp, 'sig': sig})}"
            verify = f"{ctx.base}/_hubquant/lfs-verify/{rtype}/{quote(repo.namespace)}/{quote(repo.name)}"
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                "upload": {"href": href, "expires_in": LFS_LINK_TTL},
                "verify": {"href": verify},
            }})
        return JSONResponse({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                            media_type="application/vnd.git-lfs+json")

    async def lfs_put(self, ctx: Ctx, oid: str) -> Response:
        q = ctx.request.query_params
        try:
            size, exp = int(q["size"]), int(q["exp"])
        except (KeyError, ValueError):
            raise HubHTTPError(403, "upload link is missing its signature") from None
        if exp < time.time() or not self.store.check_signature(f"{oid}:{size}:{exp}", q.get("sig", "")):
            raise HubHTTPError(403, "upload link is invalid or expired: ask the LFS batch endpoint for a new one")
        writer = await run_in_threadpool(self.store.open_upload)
        try:
            async for chunk in ctx.request.stream():
                if chunk:
                    writer.write(chunk)
                    if writer.size > size:
                        raise HubHTTPError(400, f"more than the announced {size} bytes")
            await run_in_threadpool(writer.finish, sha256=oid, size=size)
        finally:
            writer.abort()
        return Response(status_code=200)

    def lfs_verify(self, ctx: Ctx, rtype: str, repo_id: str) -> Response:
        ctx.writable(rtype, repo_id)
        p = json.loads(ctx.body or b"{}")
        if not self.store.has_blob(str(p.get("oid", "")), p.get("size")):
            raise HubHTTPError(404, f"LFS object {p.get('oid')} of size {p.get('size')} was not uploaded")
        return JSONResponse({"message": "Object verified"})

    async def commit(self, ctx: Ctx, rtype: str, repo_id: str, rest: list) -> Response:
        repo = await run_in_threadpool(ctx.writable, rtype, repo_id)
        if _flag(ctx.request.query_params.get("create_pr")):
            raise HubHTTPError(400, "the local Hub does not support pull requests (create_pr)")
        revision = rest[0] if rest else "main"
        header: dict | None = None
        ops: list[AddFile | DeletePath] = []
        buf = b""

        def handle(line: bytes) -> None:
            nonlocal header
            if not line.strip():
                return
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise HubHTTPError(400, "commit payload: each line must be {\"key\", \"value\"} JSON") from None
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubHTTPError(400, "commit payload: file content must be base64")
                try:
                    data = base64.b64decode(value["content"], validate=True)
                except (binascii.Error, KeyError):
                    raise HubHTTPError(400, f"commit payload: bad base64 for {value.get('path')}") from None
                sha256, size = self.store.write_blob([data])
                ops.append(AddFile(path=value["path"], sha256=sha256, size=size, lfs=False, git_oid=git_blob_oid(data)))
            elif key == "lfsFile":
                oid = str(value.get("oid", ""))
                size = value.get("size")
                if size is None and self.store.has_blob(oid):
                    size = self.store.blob_path(oid).stat().st_size
                if not self.store.has_blob(oid, size):
                    raise HubHTTPError(400, f"commit payload: LFS object {oid} for {value.get('path')} was not uploaded")
                ops.append(AddFile(path=value["path"], sha256=oid, size=size, lfs=True,
                                   git_oid=git_blob_oid(lfs_pointer(oid, size))))
            elif key in ("deletedFile", "deletedFolder"):
                ops.append(DeletePath(path=value["path"], folder=key == "deletedFolder"))
            else:
                raise HubHTTPError(400, f"commit payload: unsupported operation {key!r}")

        async for chunk in ctx.request.stream():
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                await run_in_threadpool(handle, line)
        await run_in_threadpool(handle, buf)
        if header is None:
            raise HubHTTPError(400, "commit payload: the first line must be the header")
        who = ctx.who
        oid = await run_in_threadpool(
            lambda: self.store.commit(
                repo, ops, title=str(header.get("summary") or "update"), message=str(header.get("description") or ""),
                author=who.user, branch=revision, parent=header.get("parentCommit"),
            )
        )
        return JSONResponse({"success": True, "commitOid": oid, "commitUrl": f"{ctx.repo_url(repo)}/commit/{oid}"})

    def resolve_file(self, ctx: Ctx, rtype: str, repo_id: str, revision: str, path: str) -> Response:
        repo = ctx.repo(rtype, repo_id, content=True)
        oid = ctx.resolve(repo, revision)
        try:
            entry = self.store.file(oid, path)
        except EntryNotFound as e:
            err = _from_store_error(e, ctx.who).response()
            err.headers["X-Repo-Commit"] = oid
            return err
        etag = entry.sha256 if entry.lfs else entry.git_oid
        headers = {"X-Repo-Commit": oid, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(entry.size)})
        start, end, status = 0, entry.size - 1, 200
        rng = ctx.request.headers.get("range")
        if rng:
            parsed = _parse_range(rng, entry.size)
            if parsed is None:
                headers["Content-Range"] = f"bytes */{entry.size}"
                return Response(status_code=416, headers=headers)
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        length = max(0, end - start + 1)
        headers["Content-Length"] = str(length)
        if ctx.request.method == "HEAD":
            return Response(status_code=status, headers=headers)
        if rtype == "model" and path == "config.json" or rtype != "model" and path == "README.md":
            self.store.count_download(repo)
        body = _read_range(self.store.blob_path(entry.sha256), start, length)
        drop = int(os.environ.get(DROP_ENV, "0") or 0)
        if drop and not rng and entry.size > drop and entry.sha256 not in self._dropped:
            self._dropped.add(entry.sha256)
            body = _cut_after(body, drop)
        return StreamingResponse(body, status_code=status, headers=headers)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """`bytes=a-b`, `bytes=a-` or `bytes=-n` -> (first, last) inclusive; None if unsatisfiable."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    a, _, b = spec.strip().partition("-")
    try:
        if a == "":
            n = int(b)
            return (max(0, size - n), size - 1) if n > 0 and size > 0 else None
        first = int(a)
        last = min(int(b), size - 1) if b else size - 1
    except ValueError:
        return None
    if first >= size or last < first:
        return None
    return first, last


def _read_range(path: Path, start: int, length: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        left = length
        while left > 0:
            block = f.read(min(_CHUNK, left))
            if not block:
                break
            left -= len(block)
            yield block


def _cut_after(chunks: Iterator[bytes], n: int) -> Iterator[bytes]:
    """Yield `n` bytes, then fail: the client sees the connection end before Content-Length."""
    for c in chunks:
        if len(c) >= n:
            yield c[:n]
            raise ConnectionAbortedError(f"failpoint {DROP_ENV}: download cut after {n} bytes")
        n -= len(c)
        yield c


def create_app(root: str | os.PathLike) -> Starlette:
    """The local Hub as an ASGI app serving the store at `root`."""
    return HubApp(Store(root)).app
