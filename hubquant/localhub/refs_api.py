"""Refs and pull requests on the local Hub: list_repo_refs, branches, tags, and the discussions API as far as
huggingface_hub needs it for pull requests (create, list, details). A pull request's commits live on
`refs/pr/N`; `create_commit(create_pr=True)` opens one (write_api.commit). Writing needs write access to the
repo's namespace, also for pull requests (the real Hub also takes pull requests from other users)."""
from __future__ import annotations

from starlette.responses import JSONResponse, Response

from hubquant.localhub.objects import PR_REF_RE, Discussion
from hubquant.localhub.protocol import Ctx, HubHTTPError, flag, json_body
from hubquant.localhub.store import Repo

DISCUSSIONS_PAGE = 50  # the Hub's page size for GET /discussions


def _body(ctx: Ctx) -> dict:
    return json_body(ctx, default={})


def _one_name(rest: list, what: str) -> str:
    if len(rest) != 1 or not rest[0]:
        raise HubHTTPError(404, f"expected /{what}/{{name}}")
    return rest[0]


def refs(ctx: Ctx, rtype: str, repo_id: str, rest: list) -> Response:
    repo = ctx.repo(rtype, repo_id)
    out: dict[str, list] = {"branches": [], "converts": [], "tags": []}
    prs = []
    for ref, oid in ctx.store.refs(repo).items():
        if ref.startswith("refs/heads/"):
            out["branches"].append({"name": ref.removeprefix("refs/heads/"), "ref": ref, "targetCommit": oid})
        elif ref.startswith("refs/tags/"):
            out["tags"].append({"name": ref.removeprefix("refs/tags/"), "ref": ref, "targetCommit": oid})
        elif m := PR_REF_RE.match(ref):
            prs.append((int(m.group(1)), {"name": ref, "ref": ref, "targetCommit": oid}))
    if flag(ctx.request.query_params.get("include_prs")):
        out["pullRequests"] = [d for _, d in sorted(prs, key=lambda x: x[0])]
    return JSONResponse(out)


def create_branch(ctx: Ctx, rtype: str, repo_id: str, rest: list) -> Response:
    repo = ctx.writable(rtype, repo_id)
    start = _body(ctx).get("startingPoint")
    if start is not None and not isinstance(start, str):
        raise HubHTTPError(400, "startingPoint must be a revision (string)")
    ctx.store.create_branch(repo, _one_name(rest, "branch"), start)
    return JSONResponse({})


def delete_branch(ctx: Ctx, rtype: str, repo_id: str, rest: list) -> Response:
    repo = ctx.writable(rtype, repo_id)
    branch = _one_name(rest, "branch")
    if branch.removeprefix("refs/heads/") == "main":
        raise HubHTTPError(403, "Cannot delete the main branch: it is protected")
    ctx.store.delete_branch(repo, branch)
    return JSONResponse({})


def create_tag(ctx: Ctx, rtype: str, repo_id: str, rest: list) -> Response:
    repo = ctx.writable(rtype, repo_id)
    revision = _one_name(rest, "tag")
    tag = _body(ctx).get("tag")
    if not isinstance(tag, str) or not tag:
        raise HubHTTPError(400, 'expected a JSON body {"tag": NAME, "message"?: TEXT}')
    ctx.store.create_tag(repo, tag, revision)
    return JSONResponse({})


def delete_tag(ctx: Ctx, rtype: str, repo_id: str, rest: list) -> Response:
    repo = ctx.writable(rtype, repo_id)
    ctx.store.delete_tag(repo, _one_name(rest, "tag"))
    return JSONResponse({})


def discussion_url(ctx: Ctx, repo: Repo, num: int) -> str:
    return f"{ctx.repo_url(repo)}/discussions/{num}"


def _summary_json(ctx: Ctx, repo: Repo, d: Discussion) -> dict:
    return {
        "num": d.num, "title": d.title, "status": d.status, "isPullRequest": d.is_pull_request,
        "createdAt": d.created_at, "author": {"name": d.author, "type": "user"},
        "repo": {"name": repo.repo_id, "type": repo.type}, "url": discussion_url(ctx, repo, d.num),
    }


def _details_json(ctx: Ctx, repo: Repo, d: Discussion) -> dict:
    out = _summary_json(ctx, repo, d)
    events = [{
        "id": f"{repo.uid}-{d.num}-0", "type": "comment", "createdAt": d.created_at,
        "author": {"name": d.author, "type": "user"},
        "data": {"edited": False, "hidden": False, "latest": {"raw": d.description}},
    }]
    if d.is_pull_request:
        head = ctx.store.resolve(repo, d.git_ref)
        pushed = []
        for c in ctx.store.history(head):
            if c.oid == d.start:
                break
            pushed.append(c)
        events += [{
            "id": f"{repo.uid}-{d.num}-{c.oid[:12]}", "type": "commit", "createdAt": c.created_at,
            "author": {"name": c.author, "type": "user"}, "data": {"subject": c.title, "oid": c.oid},
        } for c in reversed(pushed)]
        out["changes"] = {"base": d.base, "headCommit": head}
        out["filesWithConflicts"] = []
    out["events"] = events
    return out


def create_discussion(ctx: Ctx, rtype: str, repo_id: str, rest: list) -> Response:
    repo = ctx.writable(rtype, repo_id)
    p = _body(ctx)
    title = str(p.get("title") or "").strip()
    if not 3 <= len(title) <= 200:
        raise HubHTTPError(400, "the title must be 3 to 200 characters long")
    d, _ = ctx.store.open_discussion(repo, title=title, description=str(p.get("description") or ""),
                                     author=ctx.who.user, pull_request=bool(p.get("pullRequest")))
    return JSONResponse({"num": d.num, "url": discussion_url(ctx, repo, d.num),
                         **({"pullRequestRef": d.git_ref} if d.is_pull_request else {})})


def discussions(ctx: Ctx, rtype: str, repo_id: str, rest: list) -> Response:
    repo = ctx.repo(rtype, repo_id)
    if rest:
        if len(rest) != 1 or not rest[0].isdigit():
            raise HubHTTPError(404, "expected /discussions/{num}")
        return JSONResponse(_details_json(ctx, repo, ctx.store.discussion(repo, int(rest[0]))))
    q = ctx.request.query_params
    kind, status, author = q.get("type", "all"), q.get("status", "all"), q.get("author")
    items = [
        d for d in ctx.store.discussions(repo)
        if (kind == "all" or d.is_pull_request == (kind == "pull_request"))
        and (status == "all" or (d.status in ("draft", "open")) == (status == "open"))
        and (author is None or d.author == author)
    ]
    try:
        page = max(0, int(q.get("p", "0")))
    except ValueError:
        raise HubHTTPError(400, "p must be an integer") from None
    start = page * DISCUSSIONS_PAGE
    return JSONResponse({"count": len(items), "start": start,
                         "discussions": [_summary_json(ctx, repo, d) for d in items[start:start + DISCUSSIONS_PAGE]]})
