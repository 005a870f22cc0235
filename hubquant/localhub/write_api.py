"""Write handlers of the local Hub: create/delete repos, settings, preupload, the LFS batch API with its
signed upload links, the Xet token endpoints, and NDJSON commits (streamed line by line; `?create_pr=1` opens
a pull request).

The local Hub speaks LFS, not Xet. huggingface_hub 2.x with `hf_xet` installed sends every file that
preupload marks `lfs` through Xet and never falls back to the LFS batch API, and its requests do not say
whether it will. So preupload marks files `regular` (their bytes travel base64 inside the commit, and the
server still stores the Hub's LFS files as LFS) unless the client announces with `X-Hubquant-Transfer: lfs`
that it uploads through the LFS batch API (hubquant's own client does). The Xet token endpoints answer
what the Hub answers for a repo without Xet storage: 404 with a message.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from urllib.parse import quote, urlencode

from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from hubquant.errors import UsageError
from hubquant.localhub.objects import check_path
from hubquant.localhub.protocol import (
    LFS_CLIENT_HEADER,
    LFS_LINK_TTL,
    Ctx,
    HubHTTPError,
    flag,
    json_body,
)
from hubquant.localhub.refs_api import discussion_url
from hubquant.localhub.store import (
    REPO_TYPES,
    AddFile,
    DeletePath,
    FileEntry,
    git_blob_oid,
    lfs_pointer,
    split_repo_id,
    wants_lfs,
)

MAX_COMMIT_OPS = 100_000


def create_repo(ctx: Ctx) -> Response:
    p = json_body(ctx)
    rtype = p.get("type") or "model"
    if rtype not in REPO_TYPES:
        raise HubHTTPError(400, f"invalid repo type {rtype!r}")
    if ctx.who is None:
        raise HubHTTPError(401, "You must be authenticated to create a repo. Pass a token (HF_TOKEN).")
    ns, name = p.get("organization") or ctx.who.user, p.get("name", "")
    if not isinstance(ns, str) or not isinstance(name, str):
        raise HubHTTPError(400, "name and organization must be strings")
    repo_id = f"{ns}/{name}"
    split_repo_id(repo_id)
    ctx.require_write(ns, f"create a {rtype} under the namespace {ns}")
    private = bool(p.get("private")) or p.get("visibility") in ("private", "protected")
    repo, created = ctx.store.create_repo(repo_id, rtype, private=private, author=ctx.who.user)
    url = ctx.repo_url(repo)
    if not created:
        raise HubHTTPError(409, f"You already created this {rtype} repo", body={"url": url})
    return JSONResponse({"url": url, "name": repo_id, "id": repo.uid})


def delete_repo(ctx: Ctx) -> Response:
    p = json_body(ctx)
    rtype = p.get("type") or "model"
    if rtype not in REPO_TYPES:
        raise HubHTTPError(400, f"invalid repo type {rtype!r}")
    ns = p.get("organization") or (ctx.who.user if ctx.who else "")
    repo = ctx.writable(rtype, f"{ns}/{p.get('name', '')}", admin=True)
    ctx.store.delete_repo(repo.repo_id, rtype)
    return Response(status_code=200)


def settings(ctx: Ctx, rtype: str, repo_id: str, rest: list) -> Response:
    repo = ctx.writable(rtype, repo_id, admin=True)
    p = json_body(ctx, default={})
    if "gated" in p:
        ctx.store.set_gated(repo.repo_id, p["gated"], rtype)
    if "private" in p or "visibility" in p:
        private = bool(p.get("private")) or p.get("visibility") in ("private", "protected")
        ctx.store.set_private(repo.repo_id, private, rtype)
    return JSONResponse({})


def _content_git_oid(ctx: Ctx, entry: FileEntry) -> str:
    """The git blob id of a file's content (an LFS file's id is its pointer's; this is the content's)."""
    if not entry.lfs:
        return entry.git_oid
    h = hashlib.sha1(b"blob %d\0" % entry.size)
    with open(ctx.store.blob_path(entry.sha256), "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def preupload(ctx: Ctx, rtype: str, repo_id: str, rest: list) -> Response:
    repo = ctx.writable(rtype, repo_id)
    oid = ctx.resolve(repo, rest[0] if rest else "main")
    current = ctx.store.files(oid)
    files = json_body(ctx).get("files", [])
    if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(f.get("path"), str) for f in files):
        raise HubHTTPError(400, 'expected {"files": [{"path", "sample", "size"}, ...]}')
    lfs_client = ctx.request.headers.get(LFS_CLIENT_HEADER, "").lower() == "lfs"
    out = []
    for f in files:
        path = check_path(f["path"])
        try:
            size = int(f.get("size", 0))
            sample = base64.b64decode(str(f.get("sample", "")))
        except (ValueError, TypeError, binascii.Error):
            size, sample = 0, b""
        old = current.get(path)
        lfs = lfs_client and ((old is not None and old.lfs) or wants_lfs(path, size, sample))
        remote = None if old is None else (old.sha256 if lfs else _content_git_oid(ctx, old))
        out.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                    "oid": remote})
    return JSONResponse({"files": out, "commitOid": oid})


def xet_token(ctx: Ctx, rtype: str, repo_id: str, rest: list) -> Response:
    ctx.repo(rtype, repo_id)
    raise HubHTTPError(404, f"{rtype} {repo_id} does not use Xet storage on this Hub: upload through the LFS API "
                            "(set HF_HUB_DISABLE_XET=1)")


def lfs_batch(ctx: Ctx, rtype: str, repo_id: str) -> Response:
    repo = ctx.writable(rtype, repo_id)
    p = json_body(ctx)
    if p.get("operation") != "upload":
        raise HubHTTPError(400, "the local Hub's LFS endpoint takes uploads only; download via /resolve/")
    if not isinstance(p.get("objects", []), list):
        raise HubHTTPError(400, "objects must be a list")
    objects = []
    for o in p.get("objects", []):
        o = o if isinstance(o, dict) else {}
        oid, size = str(o.get("oid", "")), o.get("size")
        if len(oid) != 64 or any(c not in "0123456789abcdef" for c in oid) or not isinstance(size, int) or size < 0:
            objects.append({"oid": oid[:64], "size": size if isinstance(size, int) else 0,
                            "error": {"code": 422, "message": "invalid oid or size"}})
            continue
        # "already stored" only for bytes this caller may use: anything else gets an upload link, whether the
        # blob exists or not, so the answer tells nothing about other users' files
        if ctx.store.has_blob(oid, size) and ctx.store.may_use_blob(oid, ctx.who):
            objects.append({"oid": oid, "size": size})
            continue
        exp = int(time.time()) + LFS_LINK_TTL
        user = ctx.who.user
        sig = ctx.store.sign(f"{oid}:{size}:{exp}:{user}")
        href = f"{ctx.base}/_hubquant/lfs/{oid}?{urlencode({'size': size, 'exp': exp, 'user': user, 'sig': sig})}"
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
        size, exp, user = int(q["size"]), int(q["exp"]), q["user"]
    except (KeyError, ValueError):
        raise HubHTTPError(403, "upload link is missing its signature") from None
    if exp < time.time() or not ctx.store.check_signature(f"{oid}:{size}:{exp}:{user}", q.get("sig", "")):
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
    await run_in_threadpool(ctx.store.record_upload, oid, user)
    return Response(status_code=200)


def lfs_verify(ctx: Ctx, rtype: str, repo_id: str) -> Response:
    ctx.writable(rtype, repo_id)
    p = json_body(ctx)
    oid, size = str(p.get("oid", "")), p.get("size")
    if not (isinstance(size, int) and ctx.store.has_blob(oid, size) and ctx.store.may_use_blob(oid, ctx.who)):
        raise HubHTTPError(404, f"LFS object {oid[:64]} of size {size} was not uploaded")
    return JSONResponse({"message": "Object verified"})


class CommitReader:
    """Turns NDJSON commit lines into the header and the operations, checking each as it arrives."""

    def __init__(self, ctx: Ctx):
        self.ctx, self.header, self.ops = ctx, None, []

    def line(self, raw: bytes) -> None:
        if not raw.strip():
            return
        try:
            item = json.loads(raw)
            key, value = item["key"], item["value"]
        except (ValueError, KeyError, TypeError, RecursionError):
            raise HubHTTPError(400, "commit payload: each line must be {\"key\", \"value\"} JSON") from None
        if not isinstance(value, dict) or not isinstance(key, str):
            raise HubHTTPError(400, "commit payload: each line's value must be a JSON object")
        if len(self.ops) >= MAX_COMMIT_OPS:
            raise HubHTTPError(400, f"commit payload: more than {MAX_COMMIT_OPS} operations")
        if key == "header":
            self.header = value
        elif key == "file":
            self._file(value)
        elif key == "lfsFile":
            self._lfs_file(value)
        elif key in ("deletedFile", "deletedFolder"):
            folder = key == "deletedFolder"
            self.ops.append(DeletePath(path=self._path(value, folder=folder), folder=folder))
        else:
            raise HubHTTPError(400, f"commit payload: unsupported operation {key[:100]!r}")

    @staticmethod
    def _path(value: dict, *, folder: bool = False) -> str:
        path = value.get("path")
        if not isinstance(path, str):
            raise HubHTTPError(400, "commit payload: every operation needs a string path")
        try:
            return check_path(path.rstrip("/") if folder else path)
        except UsageError as e:
            raise HubHTTPError(400, f"commit payload: {e.message}") from None

    def _file(self, value: dict) -> None:
        path = self._path(value)
        if value.get("encoding", "base64") != "base64" or not isinstance(value.get("content"), str):
            raise HubHTTPError(400, f"commit payload: the content of {path} must be a base64 string")
        try:
            data = base64.b64decode(value["content"], validate=True)
        except (binascii.Error, ValueError):
            raise HubHTTPError(400, f"commit payload: bad base64 for {path}") from None
        sha256, size = self.ctx.store.write_blob([data])
        self._add(path, sha256, size, data[:512], lambda: git_blob_oid(data))

    def inline_file(self, inline: InlineFile, tail: bytes) -> None:
        """A `file` line whose content was streamed into `inline`'s blob; `tail` follows the content."""
        try:
            item = json.loads(inline.head + b'"' + tail)
            value = item["value"]
            path = self._path(value)
        except (ValueError, KeyError, TypeError, RecursionError):
            inline.writer.abort()
            raise HubHTTPError(400, "commit payload: a file line is not valid JSON") from None
        if inline.carry or value.get("encoding", "base64") != "base64":
            inline.writer.abort()
            raise HubHTTPError(400, f"commit payload: the content of {path} must be base64")
        sha256, size = inline.writer.finish()
        self._add(path, sha256, size, inline.sample, lambda: _content_git_oid(
            self.ctx, FileEntry(path=path, sha256=sha256, size=size, lfs=True, git_oid="")))

    def _add(self, path: str, sha256: str, size: int, sample: bytes, content_oid) -> None:
        if wants_lfs(path, size, sample):  # the Hub keeps such files in LFS however they arrived
            self.ops.append(AddFile(path=path, sha256=sha256, size=size, lfs=True,
                                    git_oid=git_blob_oid(lfs_pointer(sha256, size))))
        else:
            self.ops.append(AddFile(path=path, sha256=sha256, size=size, lfs=False, git_oid=content_oid()))

    def _lfs_file(self, value: dict) -> None:
        path, store = self._path(value), self.ctx.store
        oid, size = value.get("oid"), value.get("size")
        if not isinstance(oid, str) or not (size is None or (isinstance(size, int) and size >= 0)):
            raise HubHTTPError(400, f"commit payload: {path} needs a sha256 oid and an integer size")
        # one answer whether the blob is missing or belongs to someone else: a commit cannot probe the store
        if not (store.has_blob(oid, size) and store.may_use_blob(oid, self.ctx.who)):
            raise HubHTTPError(400, f"commit payload: LFS object {oid[:64]} for {path} was not uploaded")
        size = store.blob_path(oid).stat().st_size if size is None else size
        self.ops.append(AddFile(path=path, sha256=oid, size=size, lfs=True,
                                git_oid=git_blob_oid(lfs_pointer(oid, size))))


_FILE_HEAD = re.compile(rb'\A\s*\{\s*"key"\s*:\s*"file"\s*,\s*"value"\s*:\s*\{\s*"content"\s*:\s*"')
STREAM_LINE_AFTER = 1 << 20  # a "file" line longer than this has its base64 content streamed into a blob
MAX_TAIL = 64 << 10


class InlineFile:
    """A large base64 `file` line on its way into a blob: its head (up to the content's opening quote), the
    decoded bytes streamed into a BlobWriter, then the tail after the content's closing quote."""

    def __init__(self, store, head: bytes):
        self.head, self.writer, self.carry, self.sample, self.tail = head, store.open_upload(), b"", b"", None

    def feed(self, b64: bytes) -> None:
        data = self.carry + b64
        n = len(data) - len(data) % 4
        try:
            raw = base64.b64decode(data[:n], validate=True)
        except (binascii.Error, ValueError):
            raise HubHTTPError(400, "commit payload: bad base64 in a file's content") from None
        if len(self.sample) < 512:
            self.sample += raw[: 512 - len(self.sample)]
        self.writer.write(raw)
        self.carry = data[n:]


async def _read_ndjson(ctx: Ctx, reader: CommitReader) -> None:
    """Feed the request's NDJSON lines to `reader`. Memory stays bounded: a large inline file's content is
    decoded into a blob as it arrives instead of being held as one line."""
    buf, inline = bytearray(), None
    try:
        async for chunk in ctx.request.stream():
            buf += chunk
            while buf:
                if inline is not None and inline.tail is None:  # inside the base64 content
                    q = buf.find(b'"')
                    part = bytes(buf[: len(buf) if q < 0 else q])
                    del buf[: len(part) + (q >= 0)]
                    await run_in_threadpool(inline.feed, part)
                    if q < 0:
                        break
                    inline.tail = b""
                    continue
                nl = buf.find(b"\n")
                if inline is not None:  # after the content: the rest of the line (path, encoding)
                    if nl < 0:
                        if len(buf) > MAX_TAIL:
                            raise HubHTTPError(400, "commit payload: a file line's tail is too long")
                        break
                    tail = bytes(buf[:nl])
                    del buf[: nl + 1]
                    await run_in_threadpool(reader.inline_file, inline, tail)
                    inline = None
                    continue
                if nl < 0:
                    m = _FILE_HEAD.match(buf) if len(buf) > STREAM_LINE_AFTER else None
                    if m is None:
                        break
                    inline = await run_in_threadpool(InlineFile, ctx.store, bytes(buf[: m.end()]))
                    del buf[: m.end()]
                    continue
                line = bytes(buf[:nl])
                del buf[: nl + 1]
                await run_in_threadpool(reader.line, line)
        if inline is not None:
            if inline.tail is None:
                raise HubHTTPError(400, "commit payload: the body ended inside a file's content")
            await run_in_threadpool(reader.inline_file, inline, bytes(buf))
            inline = None
        else:
            await run_in_threadpool(reader.line, bytes(buf))
    finally:
        if inline is not None:
            inline.writer.abort()


async def commit(ctx: Ctx, rtype: str, repo_id: str, rest: list) -> Response:
    repo = await run_in_threadpool(ctx.writable, rtype, repo_id)
    create_pr = flag(ctx.request.query_params.get("create_pr"))
    revision = rest[0] if rest else "main"
    reader = CommitReader(ctx)
    await _read_ndjson(ctx, reader)
    header = reader.header
    if header is None:
        raise HubHTTPError(400, "commit payload: the first line must be the header")
    title, message = str(header.get("summary") or "update"), str(header.get("description") or "")
    who, parent, ops = ctx.who, header.get("parentCommit"), reader.ops
    if parent is not None and not isinstance(parent, str):
        raise HubHTTPError(400, "commit payload: parentCommit must be a commit sha")
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
