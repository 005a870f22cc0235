"""Read handlers of the local Hub: whoami, validate-yaml, repo info, tree, paths-info, commits, list, and
file downloads (HEAD/GET resolve with Range). Each takes the request context first. Refs: refs_api.py."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs

import yaml
from starlette.responses import JSONResponse, Response, StreamingResponse

from hubquant.localhub import repoinfo
from hubquant.localhub.protocol import (
    CHUNK,
    DROP_ENV,
    Ctx,
    HubHTTPError,
    flag,
    from_store_error,
    json_body,
    paged,
)
from hubquant.localhub.store import EntryNotFound, git_blob_oid


def root(ctx: Ctx) -> Response:
    return JSONResponse({"hub": "hubquant local Hub", "api": "huggingface_hub compatible"})


def whoami(ctx: Ctx) -> Response:
    who = ctx.who
    if who is None:
        raise HubHTTPError(401, "Invalid username or password.")
    role = "write" if who.write else "read"
    if who.repo is not None:  # a trusted publisher's token: a fine-grained token on one repo
        name = who.user.split(":", 1)[1]
        return JSONResponse({"type": "user", "id": who.user, "name": "[OIDC]", "fullname": "[OIDC]", "orgs": [],
                             "auth": {"type": "access_token", "accessToken": {
                                 "displayName": "trusted publisher", "role": "fineGrained", "fineGrained": {
                                     "scoped": [{"entity": {"type": "model", "name": name},
                                                 "permissions": ["repo.content.read", "repo.write"]}]}}}})
    return JSONResponse({
        "type": "user", "id": who.user, "name": who.user, "fullname": who.user, "email": None,
        "emailVerified": False, "canPay": False, "isPro": False, "periodEnd": None, "avatarUrl": "",
        "orgs": [{"type": "org", "id": o, "name": o, "fullname": o, "roleInOrg": role} for o in who.orgs],
        "auth": {"type": "access_token", "accessToken": {"displayName": "hubquant-local", "role": role}},
    })


def validate_yaml(ctx: Ctx) -> Response:
    payload = json_body(ctx, default={})
    try:
        card = repoinfo.parse_card(str(payload.get("content", "")))
    except (yaml.YAMLError, ValueError, RecursionError) as e:
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


def info(ctx: Ctx, rtype: str, repo_id: str, rest: list) -> Response:
    repo = ctx.repo(rtype, repo_id)
    if rest and len(rest) != 1:
        raise HubHTTPError(404, "expected /revision/{revision}")
    oid = ctx.resolve(repo, rest[0] if rest else "main")
    return JSONResponse(repoinfo.repo_json(ctx.store, repo, oid))


def _entries(files: dict, prefix: str, recursive: bool) -> list[dict]:
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


def tree(ctx: Ctx, rtype: str, repo_id: str, rest: list) -> Response:
    repo = ctx.repo(rtype, repo_id)
    if not rest:
        raise HubHTTPError(404, "expected /tree/{revision}[/{path}]")
    oid = ctx.resolve(repo, rest[0])
    prefix = "/".join(rest[1:]).strip("/")
    files = ctx.store.files(oid)
    if prefix and prefix in files:
        raise HubHTTPError(404, f"{prefix} is a file, not a folder", "EntryNotFound")
    entries = _entries(files, prefix, flag(ctx.request.query_params.get("recursive", "false")))
    if prefix and not entries:
        raise HubHTTPError(404, f"folder {prefix} not found at {rest[0]}", "EntryNotFound")
    return paged(ctx, entries)


def paths_info(ctx: Ctx, rtype: str, repo_id: str, rest: list) -> Response:
    repo = ctx.repo(rtype, repo_id)
    oid = ctx.resolve(repo, rest[0] if rest else "main")
    if ctx.body.strip().startswith(b"{"):
        form = {"paths": json_body(ctx).get("paths", [])}
    else:
        form = parse_qs(ctx.body.decode("utf-8", "replace"), keep_blank_values=True)
    if not isinstance(form.get("paths", []), list) or not all(isinstance(p, str) for p in form.get("paths", [])):
        raise HubHTTPError(400, "paths must be a list of strings")
    files = ctx.store.files(oid)
    out = []
    for p in form.get("paths", []):
        p = p.strip("/")
        if p in files:
            out.append(repoinfo.tree_entry_json(files[p]))
        elif any(f.startswith(p + "/") for f in files):
            out.append({"type": "directory", "path": p, "oid": git_blob_oid(p.encode()), "size": 0})
    return JSONResponse(out)


def commits(ctx: Ctx, rtype: str, repo_id: str, rest: list) -> Response:
    repo = ctx.repo(rtype, repo_id)
    oid = ctx.resolve(repo, rest[0] if rest else "main")
    items = [repoinfo.commit_json(c) for c in ctx.store.history(oid)]
    if "formatted" in ctx.request.query_params.getlist("expand[]"):
        for c in items:
            c["formatted"] = {"title": c["title"], "message": c["message"]}
    return paged(ctx, items)


def list_repos(ctx: Ctx, rtype: str) -> Response:
    q = ctx.request.query_params
    author, search = q.get("author"), (q.get("search") or "").lower()
    filters = [f for v in q.getlist("filter") for f in v.split(",") if f]
    sort, direction = q.get("sort"), q.get("direction", "-1")
    full, card = flag(q.get("full")), flag(q.get("cardData"))
    rows = []
    for repo in ctx.store.list_repos(rtype):
        if author and repo.namespace.lower() != author.lower():
            continue
        if search and search not in repo.repo_id.lower():
            continue
        if repo.private and not (ctx.who is not None and ctx.who.member_of(repo.namespace)):
            continue
        oid = ctx.store.resolve(repo, "main")
        d = repoinfo.repo_json(ctx.store, repo, oid, siblings=full, card_data=card, full=True)
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
    return paged(ctx, items)


def resolve_file(ctx: Ctx, rtype: str, repo_id: str, revision: str, path: str) -> Response:
    repo = ctx.repo(rtype, repo_id, content=True)
    oid = ctx.resolve(repo, revision)
    try:
        entry = ctx.store.file(oid, path)
    except EntryNotFound as e:
        err = from_store_error(e, ctx.who).response()
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
        ctx.store.count_download(repo)
    body = _read_range(ctx.store.blob_path(entry.sha256), start, length)
    drop = int(os.environ.get(DROP_ENV, "0") or 0)
    if drop and not rng and entry.size > drop and entry.sha256 not in ctx.hub.dropped:
        ctx.hub.dropped.add(entry.sha256)
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
            block = f.read(min(CHUNK, left))
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
