"""Pull requests (refs/pr/N), tags and branches on the local Hub, driven by unmodified huggingface_hub over HTTP.

The client session is tests/hub/test_refs_script.py, run under the installed huggingface_hub and under every
Python in HUBQUANT_HF_CLIENT_PYTHONS (scripts/test.sh points it at a venv with huggingface_hub 1.x)."""
from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import httpx
import pytest
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download

from hubquant.errors import UsageError
from hubquant.localhub import Store
from hubquant.localhub.objects import check_ref_name
from hubquant.localhub.store import (
    FAILPOINT_ENV,
    AddFile,
    RevisionNotFound,
    git_blob_oid,
)
from tests.fixtures_hub import HubProcess, commit_into_failpoint, point_hf_at

SCRIPT = Path(__file__).with_name("test_refs_script.py")
OTHER = [p for p in os.environ.get("HUBQUANT_HF_CLIENT_PYTHONS", "").split(":") if p]
PYTHONS = [sys.executable] + (OTHER or [None])

EXPECTED = {
    "main_after_prs": True,
    "pr1_files": ["pr1", True, True],
    "pr2_files": [".gitattributes", "b.txt"],  # opened from the initial commit (parent_commit)
    "pr1_head": ["more", "PR one", "v1", "initial commit"],
    "details": {
        "pr3": [3, "draft", True, "refs/pr/3", "refs/heads/main"],
        "pr1": ["PR one", "open", "alice", "refs/heads/main", "first", True],
        "listed": [[3, "Empty PR"], [2, "PR two"], [1, "PR one"]],
    },
    "tags": {
        "again": "HfHubHTTPError 409", "exist_ok": "ok", "read": ["v1", "v2", "v2"],
        "missing_revision": "RevisionNotFound 404", "bad_name": "BadRequest 400",
        "commit_to_tag": "RevisionNotFound 404", "after_delete": ["latest"],
        "read_deleted": "RevisionNotFound 404", "delete_again": "RevisionNotFound 404",
    },
    "refs": {
        "branches": [["main", "refs/heads/main"]],
        "tags": [["latest", "refs/tags/latest", False], ["v1.0", "refs/tags/v1.0", True]],
        "prs": [["refs/pr/1", "refs/pr/1"], ["refs/pr/2", "refs/pr/2"], ["refs/pr/3", "refs/pr/3"]],
        "pr_targets": True, "without_prs": None,
    },
    "branches": {
        "files": [".gitattributes", "b.txt", "d.txt"], "again": "HfHubHTTPError 409", "exist_ok": "ok",
        "pr_name": "BadRequest 400", "delete_main": "HfHubHTTPError 403", "after_delete": ["main"],
        "delete_again": "RevisionNotFound 404",
    },
    "unknown": {"pr_on_sha": "RevisionNotFound 404", "pr_on_missing": "RevisionNotFound 404",
                "download_pr99": "RevisionNotFound 404", "commit_pr99": "RevisionNotFound 404"},
    "bob": {
        "create_pr": "HfHubHTTPError 403", "pull_request": "HfHubHTTPError 403", "create_tag": "HfHubHTTPError 403",
        "delete_tag": "HfHubHTTPError 403", "create_branch": "HfHubHTTPError 403",
        "delete_branch": "HfHubHTTPError 403", "push_to_pr": "HfHubHTTPError 403",
        "refs": ["refs/pr/1", "refs/pr/2", "refs/pr/3"],
    },
    "final": {"main": "v2", "prs": [3, 2, 1], "tags": ["latest"]},
}


@pytest.mark.parametrize("python", PYTHONS, ids=lambda p: "installed" if p == sys.executable else str(p))
def test_pull_requests_tags_branches_with_each_client(local_hub, tmp_path, python):
    if python is None:
        pytest.skip("HUBQUANT_HF_CLIENT_PYTHONS is not set (scripts/test.sh sets it to a huggingface_hub 1.x venv)")
    if not Path(python).exists():
        pytest.skip(f"{python} does not exist")
    env = {**os.environ, "HF_ENDPOINT": local_hub.endpoint, "HF_TOKEN": local_hub.token("alice"),
           "HUBQUANT_TEST_TOKEN_BOB": local_hub.token("bob"), "HF_HUB_DISABLE_XET": "1",
           "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": ""}
    out = subprocess.run([python, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if python != sys.executable:
        assert r["version"].split(".")[0] != __import__("huggingface_hub").__version__.split(".")[0]
    (n1, ref1, url1), (n2, ref2) = r.pop("pr")
    assert (n1, ref1, n2, ref2) == (1, "refs/pr/1", 2, "refs/pr/2") and url1.endswith("/discussions/1")
    r.pop("version")
    assert r == EXPECTED


def _ndjson(*lines: dict) -> bytes:
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def test_http_shapes_and_error_headers(hub_env):
    """The commit answer of create_pr, the refs answer, and X-Error-Code / X-Error-Message on refused calls."""
    api = HfApi()
    repo = f"alice/shapes-{uuid.uuid4().hex[:8]}"
    api.create_repo(repo)
    head = api.model_info(repo).sha
    alice = {"Authorization": f"Bearer {hub_env.token('alice')}"}
    bob = {"Authorization": f"Bearer {hub_env.token('bob')}"}
    base = f"{hub_env.endpoint}/api/models/{repo}"
    body = _ndjson({"key": "header", "value": {"summary": "raw PR", "description": "d"}},
                   {"key": "file", "value": {"path": "x.txt", "content": base64.b64encode(b"x").decode(),
                                             "encoding": "base64"}})
    r = httpx.post(f"{base}/commit/main?create_pr=1", content=body, headers={**alice,
                   "Content-Type": "application/x-ndjson"})
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["pullRequestUrl"] == f"{hub_env.endpoint}/{repo}/discussions/1"
    assert j["commitUrl"] == f"{hub_env.endpoint}/{repo}/commit/{j['commitOid']}" and len(j["commitOid"]) == 40
    refs = httpx.get(f"{base}/refs", headers=alice).json()
    assert refs == {"branches": [{"name": "main", "ref": "refs/heads/main", "targetCommit": head}],
                    "converts": [], "tags": []}
    refs = httpx.get(f"{base}/refs?include_prs=1", headers=alice).json()
    assert refs["pullRequests"] == [{"name": "refs/pr/1", "ref": "refs/pr/1", "targetCommit": j["commitOid"]}]
    # the file is on refs/pr/1 only
    assert httpx.get(f"{hub_env.endpoint}/{repo}/resolve/refs%2Fpr%2F1/x.txt", headers=alice).content == b"x"
    missing = httpx.get(f"{hub_env.endpoint}/{repo}/resolve/main/x.txt", headers=alice)
    assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "EntryNotFound"

    assert httpx.post(f"{base}/tag/main", json={"tag": "v1"}, headers=alice).status_code == 200
    again = httpx.post(f"{base}/tag/main", json={"tag": "v1"}, headers=alice)
    assert again.status_code == 409 and "already exists" in again.headers["X-Error-Message"]
    gone = httpx.delete(f"{base}/tag/nope", headers=alice)
    assert gone.status_code == 404 and gone.headers["X-Error-Code"] == "RevisionNotFound"
    assert "nope" in gone.headers["X-Error-Message"]
    bad_rev = httpx.post(f"{base}/tag/{'0' * 40}", json={"tag": "v2"}, headers=alice)
    assert bad_rev.status_code == 404 and bad_rev.headers["X-Error-Code"] == "RevisionNotFound"
    for method, url, kw in [("POST", f"{base}/tag/main", {"json": {"tag": "v3"}}),
                            ("DELETE", f"{base}/tag/v1", {}),
                            ("POST", f"{base}/branch/b", {"json": {}}),
                            ("POST", f"{base}/discussions", {"json": {"title": "hello", "pullRequest": True}}),
                            ("POST", f"{base}/commit/main?create_pr=1", {"content": body})]:
        r = httpx.request(method, url, headers=bob, **kw)
        assert r.status_code == 403, (method, url, r.status_code)
        assert "bob" in r.headers["X-Error-Message"] and "X-Error-Code" not in r.headers
        assert httpx.request(method, url, **kw).status_code == 401  # no token at all
    reader = {"Authorization": f"Bearer {hub_env.add_token('dave-ro', orgs=['alice'], write=False)}"}
    assert httpx.post(f"{base}/tag/main", json={"tag": "v4"}, headers=reader).status_code == 403
    assert [t["name"] for t in httpx.get(f"{base}/refs", headers=alice).json()["tags"]] == ["v1"]
    # a discussion (not a pull request) takes the next number and makes no ref
    d = httpx.post(f"{base}/discussions", json={"title": "question", "description": "?"}, headers=alice).json()
    assert d["num"] == 2
    assert [p["name"] for p in httpx.get(f"{base}/refs?include_prs=1").json()["pullRequests"]] == ["refs/pr/1"]
    listing = httpx.get(f"{base}/discussions?type=pull_request").json()
    assert listing["count"] == 1 and [x["num"] for x in listing["discussions"]] == [1]
    assert httpx.get(f"{base}/discussions/7").status_code == 404


def test_pull_request_numbers_are_unique_under_concurrency(hub_env):
    api = HfApi()
    repo = f"alice/race-{uuid.uuid4().hex[:8]}"
    api.create_repo(repo)
    main = api.model_info(repo).sha
    results: dict[int, object] = {}

    def open_pr(i: int) -> None:
        results[i] = HfApi().create_commit(repo, [CommitOperationAdd(f"f{i}.txt", str(i).encode())],
                                           commit_message=f"pr {i}", create_pr=True)

    threads = [threading.Thread(target=open_pr, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(r.pr_num for r in results.values()) == [1, 2, 3, 4, 5, 6]
    for i, r in results.items():  # each PR holds exactly its own file on top of main
        assert sorted(api.list_repo_files(repo, revision=r.pr_revision)) == [".gitattributes", f"f{i}.txt"]
        assert Path(hf_hub_download(repo, f"f{i}.txt", revision=r.pr_revision)).read_bytes() == str(i).encode()
    assert api.model_info(repo).sha == main


def test_sigkill_while_opening_a_pull_request_leaves_no_trace(own_hub, tmp_path, monkeypatch):
    root, token, start_server = own_hub
    started = []

    def start(**env) -> HubProcess:
        p = start_server(**env)
        started.append(p)
        point_hf_at(monkeypatch, p.endpoint, token, tmp_path / f"hf{len(started)}")
        return p

    p = start()
    api = HfApi()
    api.create_repo("alice/prkill")
    main = api.create_commit("alice/prkill", [CommitOperationAdd("a.txt", b"a")], commit_message="a").oid
    p.kill()
    p = start(**{FAILPOINT_ENV: "60"})
    errors, log, t = commit_into_failpoint(root, lambda: HfApi().create_commit(
        "alice/prkill", [CommitOperationAdd("a.txt", b"doomed")], commit_message="doomed", create_pr=True))
    assert "before moving refs/pr/1" in log
    p.kill()
    t.join(timeout=60)
    assert errors
    db = sqlite3.connect(root / "hub.sqlite")
    counts = [db.execute(q).fetchone()[0] for q in (
        "SELECT COUNT(*) FROM discussions", "SELECT COUNT(*) FROM refs WHERE name LIKE 'refs/%'",
        "SELECT COUNT(*) FROM commits WHERE title='doomed'")]
    db.close()
    assert counts == [0, 0, 0]
    start()
    api = HfApi()
    assert api.list_repo_refs("alice/prkill", include_pull_requests=True).pull_requests == []
    again = api.create_commit("alice/prkill", [CommitOperationAdd("a.txt", b"retry")], commit_message="retry",
                              create_pr=True)
    assert again.pr_num == 1 and api.model_info("alice/prkill").sha == main
    assert Path(hf_hub_download("alice/prkill", "a.txt", revision="refs/pr/1")).read_bytes() == b"retry"


def test_store_refs_and_names(tmp_path):
    store = Store(tmp_path / "hub")
    repo, _ = store.create_repo("alice/s")
    c0 = store.resolve(repo, "main")
    sha, size = store.write_blob([b"1"])
    c1 = store.commit(repo, [AddFile(path="a", sha256=sha, size=size, lfs=False, git_oid=git_blob_oid(b"1"))],
                      title="a", author="alice", parent=c0[:7])  # a short parent sha is accepted
    store.create_tag(repo, "v1", c0[:8])
    assert store.resolve(repo, "v1") == store.resolve(repo, "refs/tags/v1") == c0
    assert store.resolve(repo, "refs/heads/main") == store.resolve(repo, c1[:7]) == c1
    store.create_branch(repo, "v1", c1)  # a branch and a tag of one name: the branch wins, refs/tags/ reaches the tag
    assert store.resolve(repo, "v1") == c1 and store.resolve(repo, "refs/tags/v1") == c0
    assert store.refs(repo) == {"refs/heads/main": c1, "refs/heads/v1": c1, "refs/tags/v1": c0}
    for not_a_branch in ("refs/tags/v1", "refs/pr/1"):  # delete_branch never removes a tag or a pull request
        with pytest.raises(RevisionNotFound):
            store.delete_branch(repo, not_a_branch)
    for not_a_branch in ("refs/x/y", "refs/tags/v1", c0, "refs/pr/1"):
        with pytest.raises(RevisionNotFound):
            store.commit(repo, [], title="x", author="alice", branch=not_a_branch)
    for name in ("a..b", "-x", "x.lock", "x/", "/x", "a b", "a:b", "refs/pr/1", ".hidden", "x//y", "a@{1}", ""):
        with pytest.raises(UsageError):
            check_ref_name(name, "tag")
    for name in ("v1.0", "release/2026-11", "main_2", "a@b"):
        assert check_ref_name(name, "tag") == name
