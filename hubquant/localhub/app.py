"""The local Hub's HTTP API (Starlette): what unmodified huggingface_hub speaks (see shared/HUB_API.md).

Routing reads the raw (still percent-encoded) path, because huggingface_hub quotes revisions with
`safe=""` (`refs%2Fheads%2Fmain`) and a decoded path could not tell them from file paths.
Errors carry the status and `X-Error-Code` the real Hub sends, so that `hf_raise_for_status` raises
its own typed errors (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError, GatedRepoError).
Handlers live in read_api.py and write_api.py; sync ones run in a worker thread.
"""
from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Callable
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from hubquant.errors import HubquantError
from hubquant.localhub import oidc, read_api, refs_api, write_api
from hubquant.localhub.protocol import (
    INVALID_TOKEN,
    PLURAL,
    Ctx,
    HubHTTPError,
    body_limit,
    from_store_error,
)
from hubquant.localhub.serving import BodyGuard, BodyIdle, BodyTooLarge
from hubquant.localhub.store import Principal, Store

log = logging.getLogger("hubquant.localhub")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class HubApp:
    """Builds the Starlette app around one Store."""

    def __init__(self, store: Store):
        self.store = store
        self.dropped: set[str] = set()  # files the download failpoint already cut
        self.app = Starlette(routes=[
            Route("/{path:path}", self.dispatch, methods=["GET", "HEAD", "POST", "PUT", "DELETE"]),
        ])

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
            return from_store_error(e, who).response()
        except BodyTooLarge as e:
            return HubHTTPError(413, str(e)).response()
        except BodyIdle as e:
            return HubHTTPError(408, str(e)).response()
        except Exception as e:  # a bug: an answer, not a dropped connection; the log keeps the traceback
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            return HubHTTPError(500, f"internal error ({type(e).__name__})").response()

    def _who(self, request: Request) -> Principal | None:
        auth = request.headers.get("authorization")
        if not auth:
            return None
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HubHTTPError(401, INVALID_TOKEN)
        who = self.store.principal(token.strip())
        if who is None:
            raise HubHTTPError(401, INVALID_TOKEN)
        return who

    def _route(self, method: str, raw_path: str) -> tuple[Callable, tuple]:
        raw_path = raw_path.split("?", 1)[0]
        segs = [unquote(s) for s in raw_path.split("/")[1:]]
        if any(_CONTROL.search(s) for s in segs):
            raise HubHTTPError(400, "the URL path holds a control character (NUL, newline...)")
        if segs and segs[-1] == "" and len(segs) > 1:
            segs = segs[:-1]
        m = method
        if segs == [""] and m in ("GET", "HEAD"):
            return read_api.root, ()
        if segs == ["oauth", "token"] and m == "POST":
            return oidc.token_exchange, ()
        if segs[:1] == ["api"]:
            rest = segs[1:]
            if rest == ["whoami-v2"] and m == "GET":
                return read_api.whoami, ()
            if rest == ["validate-yaml"] and m == "POST":
                return read_api.validate_yaml, ()
            if rest == ["repos", "create"] and m == "POST":
                return write_api.create_repo, ()
            if rest == ["repos", "delete"] and m == "DELETE":
                return write_api.delete_repo, ()
            if len(rest) == 1 and rest[0] in PLURAL and m == "GET":
                return read_api.list_repos, (PLURAL[rest[0]],)
            if len(rest) >= 3 and rest[0] in PLURAL:
                rtype, repo_id, sub = PLURAL[rest[0]], f"{rest[1]}/{rest[2]}", rest[3:]
                routes = {
                    ("GET", ""): read_api.info, ("GET", "revision"): read_api.info, ("GET", "tree"): read_api.tree,
                    ("POST", "paths-info"): read_api.paths_info, ("GET", "commits"): read_api.commits,
                    ("GET", "refs"): refs_api.refs, ("POST", "preupload"): write_api.preupload,
                    ("POST", "commit"): write_api.commit, ("PUT", "settings"): write_api.settings,
                    ("POST", "branch"): refs_api.create_branch, ("DELETE", "branch"): refs_api.delete_branch,
                    ("POST", "tag"): refs_api.create_tag, ("DELETE", "tag"): refs_api.delete_tag,
                    ("GET", "discussions"): refs_api.discussions,
                    ("GET", "xet-write-token"): write_api.xet_token, ("GET", "xet-read-token"): write_api.xet_token,
                }
                if (m, sub) == ("POST", ["discussions"]):
                    return refs_api.create_discussion, (rtype, repo_id, [])
                key = (m if m != "HEAD" else "GET", sub[0] if sub else "")
                if key in routes:
                    return routes[key], (rtype, repo_id, sub[1:])
        if segs[:2] == ["_hubquant", "lfs"] and len(segs) == 3 and m == "PUT":
            return write_api.lfs_put, (segs[2],)
        if segs[:2] == ["_hubquant", "lfs-verify"] and len(segs) == 5 and m == "POST":
            return write_api.lfs_verify, (segs[2], f"{segs[3]}/{segs[4]}")
        rtype = "model"
        if segs and segs[0] in PLURAL and segs[0] != "models":
            rtype, segs = PLURAL[segs[0]], segs[1:]
        lfs_batch = segs[2:] == ["info", "lfs", "objects", "batch"]
        if len(segs) == 6 and segs[1].endswith(".git") and lfs_batch and m == "POST":
            return write_api.lfs_batch, (rtype, f"{segs[0]}/{segs[1][:-4]}")
        if len(segs) >= 5 and segs[2] == "resolve" and m in ("GET", "HEAD"):
            return read_api.resolve_file, (rtype, f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]))
        raise HubHTTPError(404, f"no route for {method} {raw_path[:200]}")


def create_app(root: str | os.PathLike):
    """The local Hub as an ASGI app serving the store at `root`, with body limits and a body-idle deadline.
    Uploads left in tmp/ by processes that died (crashes, SIGKILL) are removed first."""
    store = Store(root)
    removed = store.clean_tmp()
    if removed:
        log.warning("removed %d partial upload(s) left by a crashed process", removed)
    return BodyGuard(HubApp(store).app, limit=body_limit)
