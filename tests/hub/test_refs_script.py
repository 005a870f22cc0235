"""A huggingface_hub session with pull requests, tags and branches against HF_ENDPOINT, as alice (HF_TOKEN) and bob
(HUBQUANT_TEST_TOKEN_BOB, no write access to alice's repos). Standard library + huggingface_hub only: tests/hub/
test_refs.py runs it under every Python in HUBQUANT_HF_CLIENT_PYTHONS (e.g. huggingface_hub 1.x) and under the
installed one. It holds no tests itself; run as a script it prints one JSON line of what it saw."""
from __future__ import annotations

import json
import os
import sys
import tempfile
import uuid

import huggingface_hub
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    BadRequestError,
    HfHubHTTPError,
    RevisionNotFoundError,
)


def _error(fn) -> str:
    """What `fn()` raised: the exception's class name and HTTP status ('ok' when nothing was raised)."""
    try:
        fn()
    except RevisionNotFoundError as e:
        return f"RevisionNotFound {e.response.status_code}"
    except BadRequestError as e:
        return f"BadRequest {e.response.status_code}"
    except HfHubHTTPError as e:
        return f"{type(e).__name__} {e.response.status_code}"
    return "ok"


def session(tmp: str) -> dict:
    api = HfApi()
    bob = HfApi(token=os.environ["HUBQUANT_TEST_TOKEN_BOB"])
    repo = f"alice/refs-{uuid.uuid4().hex[:8]}"
    api.create_repo(repo)
    c0 = api.model_info(repo).sha
    weights = os.urandom(200_000)
    c1 = api.create_commit(repo, [CommitOperationAdd("a.txt", b"v1")], commit_message="v1").oid

    def read(path: str, revision: str | None = None) -> bytes:
        with open(hf_hub_download(repo, path, revision=revision, cache_dir=f"{tmp}/c"), "rb") as f:
            return f.read()

    out: dict = {"version": huggingface_hub.__version__}
    # pull requests from create_commit(create_pr=True): refs/pr/N on top of main's head (or parent_commit)
    pr1 = api.create_commit(repo, [CommitOperationAdd("a.txt", b"pr1"), CommitOperationAdd("w.safetensors", weights)],
                            commit_message="PR one", commit_description="first", create_pr=True)
    pr2 = api.create_commit(repo, [CommitOperationAdd("b.txt", b"pr2")], commit_message="PR two", create_pr=True,
                            parent_commit=c0)
    out["pr"] = [(pr1.pr_num, pr1.pr_revision, pr1.pr_url.split("/", 3)[3]), (pr2.pr_num, pr2.pr_revision)]
    out["main_after_prs"] = api.model_info(repo).sha == c1 and read("a.txt") == b"v1"
    snap = snapshot_download(repo, revision="refs/pr/1", cache_dir=f"{tmp}/s")
    with open(f"{snap}/w.safetensors", "rb") as f:
        out["pr1_files"] = [read("a.txt", "refs/pr/1").decode(), f.read() == weights,
                            api.model_info(repo, revision="refs/pr/1").sha == pr1.oid]
    out["pr2_files"] = sorted(api.list_repo_files(repo, revision="refs/pr/2"))
    pushed = api.create_commit(repo, [CommitOperationAdd("c.txt", b"c")], commit_message="more",
                               revision="refs/pr/1").oid
    out["pr1_head"] = [c.title for c in api.list_repo_commits(repo, revision="refs/pr/1")]
    pr3 = api.create_pull_request(repo, "Empty PR", description="nothing yet")
    d1 = api.get_discussion_details(repo, 1)
    out["details"] = {
        "pr3": [pr3.num, pr3.status, pr3.is_pull_request, pr3.git_reference, pr3.target_branch],
        "pr1": [d1.title, d1.status, d1.author, d1.target_branch, d1.events[0].content,
                [e.oid for e in d1.events if e.type == "commit"] == [pr1.oid, pushed]],
        "listed": [(d.num, d.title) for d in api.get_repo_discussions(repo)],
    }
    # tags: at a short sha, at main by default, 409 when it exists, downloads at a tag, delete
    api.create_tag(repo, tag="v1.0", revision=c1[:7])
    api.create_commit(repo, [CommitOperationAdd("a.txt", b"v2")], commit_message="v2")
    api.create_tag(repo, tag="latest", tag_message="the newest")
    out["tags"] = {
        "again": _error(lambda: api.create_tag(repo, tag="v1.0")),
        "exist_ok": _error(lambda: api.create_tag(repo, tag="v1.0", exist_ok=True)),
        "read": [read("a.txt", "v1.0").decode(), read("a.txt", "latest").decode(), read("a.txt").decode()],
        "missing_revision": _error(lambda: api.create_tag(repo, tag="t", revision="nope")),
        "bad_name": _error(lambda: api.create_tag(repo, tag="a..b")),
        "commit_to_tag": _error(lambda: api.create_commit(repo, [CommitOperationAdd("x", b"x")], commit_message="x",
                                                           revision="v1.0")),
    }
    refs = api.list_repo_refs(repo, include_pull_requests=True)
    out["refs"] = {
        "branches": [(r.name, r.ref) for r in refs.branches],
        "tags": [(r.name, r.ref, r.target_commit == c1) for r in refs.tags],
        "prs": [(r.name, r.ref) for r in refs.pull_requests],
        "pr_targets": [r.target_commit for r in refs.pull_requests] == [pushed, pr2.oid, c1],
        "without_prs": api.list_repo_refs(repo).pull_requests,
    }
    api.delete_tag(repo, tag="v1.0")
    out["tags"]["after_delete"] = [r.name for r in api.list_repo_refs(repo).tags]
    out["tags"]["read_deleted"] = _error(lambda: api.model_info(repo, revision="v1.0"))
    out["tags"]["delete_again"] = _error(lambda: api.delete_tag(repo, tag="v1.0"))
    # branches
    api.create_branch(repo, branch="dev", revision="refs/pr/2")
    api.create_commit(repo, [CommitOperationAdd("d.txt", b"d")], commit_message="on dev", revision="dev")
    out["branches"] = {
        "files": sorted(api.list_repo_files(repo, revision="dev")),
        "again": _error(lambda: api.create_branch(repo, branch="dev")),
        "exist_ok": _error(lambda: api.create_branch(repo, branch="dev", exist_ok=True)),
        "pr_name": _error(lambda: api.create_branch(repo, branch="refs/pr/5")),
        "delete_main": _error(lambda: api.delete_branch(repo, branch="main")),
    }
    api.delete_branch(repo, branch="dev")
    out["branches"]["after_delete"] = [r.name for r in api.list_repo_refs(repo).branches]
    out["branches"]["delete_again"] = _error(lambda: api.delete_branch(repo, branch="dev"))
    # unknown revisions and pull requests against something that is not a branch
    add = [CommitOperationAdd("e.txt", b"e")]
    out["unknown"] = {
        "pr_on_sha": _error(lambda: api.create_commit(repo, add, commit_message="e", revision=c1, create_pr=True)),
        "pr_on_missing": _error(lambda: api.create_commit(repo, add, commit_message="e", revision="nope",
                                                          create_pr=True)),
        "download_pr99": _error(lambda: read("a.txt", "refs/pr/99")),
        "commit_pr99": _error(lambda: api.create_commit(repo, add, commit_message="e", revision="refs/pr/99")),
    }
    # bob cannot write to alice's repo: 403 for every write, reads work
    out["bob"] = {
        "create_pr": _error(lambda: bob.create_commit(repo, add, commit_message="e", create_pr=True)),
        "pull_request": _error(lambda: bob.create_pull_request(repo, "from bob")),
        "create_tag": _error(lambda: bob.create_tag(repo, tag="bob")),
        "delete_tag": _error(lambda: bob.delete_tag(repo, tag="latest")),
        "create_branch": _error(lambda: bob.create_branch(repo, branch="bob")),
        "delete_branch": _error(lambda: bob.delete_branch(repo, branch="main")),
        "push_to_pr": _error(lambda: bob.create_commit(repo, add, commit_message="e", revision="refs/pr/1")),
        "refs": [r.name for r in bob.list_repo_refs(repo, include_pull_requests=True).pull_requests],
    }
    out["final"] = {"main": read("a.txt").decode(), "prs": [d.num for d in api.get_repo_discussions(repo)],
                    "tags": [r.name for r in api.list_repo_refs(repo).tags]}
    return out


if __name__ == "__main__":
    try:
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(session(d)))
    except Exception as e:  # noqa: BLE001 - report any failure to the calling test
        print(json.dumps({"failure": repr(e)}))
        sys.exit(1)
