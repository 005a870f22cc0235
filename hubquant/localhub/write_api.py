"""Write handlers of the local Hub: create/delete repos, settings, preupload, the LFS batch API with its
signed upload links, and NDJSON commits (streamed line by line; `?create_pr=1` opens a pull request)."""
from __future__ import annotations

import base64
import binascii
import json
import time
from urllib.parse import quote, urlencode

from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from hubquant.localhub.protocol import LFS_LINK_TTL, Ctx, HubHTTPError, flag
from hubquant.localhub.refs_api import discussion_url
from hubquant.localhub.store import (
    REPO_TYPES,
    AddFile,
    DeletePath,
    git_blob_oid,
    lfs_pointer,
    split_repo_id,
    wants_lfs,
)


def create_repo(ctx: Ctx) -> Response:
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
    repo, created = ctx.store.create_repo(repo_id, rtype, private=private, author=ctx.who.user)
    url = ctx.repo_url(repo)
    if not created:
        raise HubHTTPError(409, f"You already created this {rtype} repo", body={"url": url})
    return JSONResponse({"url": url, "name": repo_id, "id": repo.uid})


def delete_repo(ctx: Ctx) -> Response:
    p = json.loads(ctx.body or b"{}")
    rtype = p.get("type") or "model"
    ns = p.get("organization") or (ctx.who.user if ctx.who else "")
    repo = ctx.writable(rtype, f"{ns}/{p.get('name', '')}")
    ctx.store.delete_repo(repo.repo_id, rtype)
    return Response(status_code=200)


def settings(ctx: Ctx, rtype: str, repo_id: str, rest: list) -> Response:
    repo = ctx.writable(rtype, repo_id)
    p = json.loads(ctx.body or b"{}")
    if "gated" in p:
        ctx.store.set_gated(repo.repo_id, p["gated"], rtype)
    if "private" in p or "visibility" in p:
        private = bool(p.get("private")) or p.get("visibility") in ("private", "protected")
        ctx.store.set_private(repo.repo_id, private, rtype)
    return JSONResponse({})


def preupload(ctx: Ctx, rtype: str, repo_id: str, rest: list) -> Response:
    repo = ctx.writable(rtype, repo_id)
    oid = ctx.resolve(repo, rest[0] if rest else "main")
    current = ctx.store.files(oid)
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


def lfs_batch(ctx: Ctx, rtype: str, repo_id: str) -> Response:
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
        if ctx.store.has_blob(oid, size):
            objects.append({"oid": oid, "size": size})  # already stored: no actions
            continue
        exp = int(time.time()) + LFS_LINK_TTL
        sig = ctx.store.sign(f"{oid}:{size}:{exp}")
        href = f"{ctx.base}/_hubquant/lfs/{oid}?{urlencode({'size': size, 'exp': exp, 'sig': sig})}"
        verify = f"{ctx.base}/_hubquant/lfs-verify/{rtype}/{quote(repo.namespace)}/{quote(repo.name)}"
        objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
            "upload": {"href": href, "expires_in": LFS_LINK_TTL},
            "verify": {"href": verify},
        }})
    return JSONResponse({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                        media_type="application/vnd.git-lfs+json")


async def lfs_put(ctx: Ctx, oid: str) -> Response:
    q = ctx.request.query_params
    try:
        size, exp = int(q["size"]), int(q["exp"])
    except (KeyError, ValueError):
        raise HubHTTPError(403, "upload link is missing its signature") from None
    if exp < time.time() or not ctx.store.check_signature(f"{oid}:{size}:{exp}", q.get("sig", "")):
        raise HubHTTPError(403, "upload link is invalid or expired: ask the LFS batch endpoint for a new one")
    writer = await run_in_threadpool(ctx.store.open_upload)
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


def lfs_verify(ctx: Ctx, rtype: str, repo_id: str) -> Response:
    ctx.writable(rtype, repo_id)
    p = json.loads(ctx.body or b"{}")
    if not ctx.store.has_blob(str(p.get("oid", "")), p.get("size")):
        raise HubHTTPError(404, f"LFS object {p.get('oid')} of size {p.get('size')} was not uploaded")
    return JSONResponse({"message": "Object verified"})


async def commit(ctx: Ctx, rtype: str, repo_id: str, rest: list) -> Response:
    repo = await run_in_threadpool(ctx.writable, rtype, repo_id)
    create_pr = flag(ctx.request.query_params.get("create_pr"))
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
            sha256, size = ctx.store.write_blob([data])
            ops.append(AddFile(path=value["path"], sha256=sha256, size=size, lfs=False, git_oid=git_blob_oid(data)))
        elif key == "lfsFile":
            oid = str(value.get("oid", ""))
            size = value.get("size")
            if size is None and ctx.store.has_blob(oid):
                size = ctx.store.blob_path(oid).stat().st_size
            if not ctx.store.has_blob(oid, size):
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
    title, message = str(header.get("summary") or "update"), str(header.get("description") or "")
    who, parent = ctx.who, header.get("parentCommit")
    if create_pr:  # a new refs/pr/N from `parent` or the branch head, numbered and committed in one transaction
        pr, oid = await run_in_threadpool(
            lambda: ctx.store.open_discussion(repo, title=title, description=message, author=who.user,
                                              pull_request=True, base=revision, ops=ops, parent=parent)
        )
        if oid is None:
            oid = pr.start
    else:
        oid = await run_in_threadpool(
            lambda: ctx.store.commit(repo, ops, title=title, message=message, author=who.user, branch=revision,
                                     parent=parent)
        )
    out = {"success": True, "commitOid": oid, "commitUrl": f"{ctx.repo_url(repo)}/commit/{oid}"}
    if create_pr:
        out["pullRequestUrl"] = discussion_url(ctx, repo, pr.num)
    return JSONResponse(out)
