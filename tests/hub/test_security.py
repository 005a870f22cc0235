"""The local Hub under attack and faults, over real HTTP on loopback: blob permissions, malformed bodies,
names git rejects, body limits, slow and idle clients, crashed uploads, files at rest, Xet clients."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from urllib.parse import urlsplit

import httpx
import pytest


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _auth(token: str | None) -> dict:
    return {"authorization": f"Bearer {token}"} if token else {}


def _batch(endpoint: str, token: str | None, repo_id: str, oid: str, size: int) -> httpx.Response:
    return httpx.post(f"{endpoint}/{repo_id}.git/info/lfs/objects/batch", headers=_auth(token), timeout=30,
                      json={"operation": "upload", "objects": [{"oid": oid, "size": size}], "hash_algo": "sha256"})


def _commit(endpoint: str, token: str, repo_id: str, ops: list[dict], raw: bytes | None = None) -> httpx.Response:
    lines = [{"key": "header", "value": {"summary": "t"}}] + ops
    body = raw if raw is not None else b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    return httpx.post(f"{endpoint}/api/models/{repo_id}/commit/main", content=body, timeout=30,
                      headers={**_auth(token), "content-type": "application/x-ndjson"})


def _create(endpoint: str, token: str, repo_id: str) -> None:
    ns, name = repo_id.split("/")
    r = httpx.post(f"{endpoint}/api/repos/create", json={"name": name, "organization": ns}, headers=_auth(token))
    assert r.status_code == 200, r.text


def test_gated_blobs_cannot_be_borrowed_through_the_shared_store(local_hub, tmp_path):
    ep, alice, bob = local_hub.endpoint, local_hub.token("alice"), local_hub.token("bob")
    secret = os.urandom(5000)
    oid, size = hashlib.sha256(secret).hexdigest(), len(secret)
    gated = f"hubquant-org/{_name('gated')}"
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "w.safetensors").write_bytes(secret)
    local_hub.hub.publish_folder(gated, tmp_path / "g")
    local_hub.hub.set_gated(gated, "manual")
    thief = f"bob/{_name('thief')}"
    _create(ep, bob, thief)
    # the gated repo's tree shows oid and size to anyone...
    tree = httpx.get(f"{ep}/api/models/{gated}/tree/main", headers=_auth(bob)).json()
    assert any(e.get("lfs", {}).get("oid") == oid for e in tree)
    # ...but the batch answer does not tell bob the bytes exist (an upload link, as for an unknown blob)
    objs = _batch(ep, bob, thief, oid, size).json()["objects"]
    assert "actions" in objs[0] and "upload" in objs[0]["actions"]
    assert "actions" not in _batch(ep, alice, gated, oid, size).json()["objects"][0]  # alice may read it
    # a commit pointing at the gated blob is refused exactly like one pointing at a blob that does not exist
    r = _commit(ep, bob, thief, [{"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256",
                                                                 "oid": oid, "size": size}}])
    fake = "0" * 64
    r2 = _commit(ep, bob, thief, [{"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256",
                                                                  "oid": fake, "size": size}}])
    assert r.status_code == r2.status_code == 400
    assert r.json()["error"].replace(oid, "X") == r2.json()["error"].replace(fake, "X")
    assert httpx.get(f"{ep}/{thief}/resolve/main/w.safetensors", headers=_auth(bob)).status_code == 404
    # verify does not confirm it either; anonymous callers get nothing
    verify = httpx.post(f"{ep}/_hubquant/lfs-verify/model/{thief}", json={"oid": oid, "size": size},
                        headers=_auth(bob))
    assert verify.status_code == 404
    assert _batch(ep, None, thief, oid, size).status_code == 401
    # uploading the bytes proves possession: then the commit goes through
    carol = local_hub.add_token(_name("carol"))
    carol_repo = f"{local_hub.hub.store.principal(carol).user}/{_name('own')}"
    _create(ep, carol, carol_repo)
    link = _batch(ep, carol, carol_repo, oid, size).json()["objects"][0]["actions"]["upload"]["href"]
    assert httpx.put(link, content=secret).status_code == 200
    ok = _commit(ep, carol, carol_repo, [{"key": "lfsFile", "value": {"path": "w.safetensors", "oid": oid,
                                                                         "size": size}}])
    assert ok.status_code == 200, ok.text
    # and a grant on the gated repo lets bob reference what he may now read
    local_hub.hub.grant_access(gated, "bob")
    ok = _commit(ep, bob, thief, [{"key": "lfsFile", "value": {"path": "w.safetensors", "oid": oid, "size": size}}])
    assert ok.status_code == 200, ok.text
    assert httpx.get(f"{ep}/{thief}/resolve/main/w.safetensors", headers=_auth(bob)).content == secret


def test_malformed_bodies_and_bad_names_get_4xx(local_hub):
    ep, alice = local_hub.endpoint, local_hub.token("alice")
    repo = f"alice/{_name('fuzz')}"
    _create(ep, alice, repo)
    deep = b"[" * 200_000
    api = f"{ep}/api/models/{repo}"
    h = _auth(alice)
    cases = [
        ("POST", f"{ep}/api/repos/create", deep), ("POST", f"{ep}/api/repos/create", b'"x"'),
        ("POST", f"{ep}/api/repos/create", b'{"name": ["x"]}'), ("POST", f"{ep}/api/repos/create", b"\xff\xfe"),
        ("POST", f"{ep}/api/repos/create", b'{"name": "bad\\n"}'),
        ("POST", f"{ep}/api/repos/create", b'{"name": "a\\\\b"}'),
        ("POST", f"{ep}/api/repos/create", b'{"name": "a\\u0001b"}'),
        ("POST", f"{ep}/api/validate-yaml", deep), ("POST", f"{api}/preupload/main", b'{"files": "x"}'),
        ("POST", f"{api}/preupload/main", b'{"files": [{"path": 3}]}'), ("POST", f"{api}/preupload/main", deep),
        ("POST", f"{ep}/{repo}.git/info/lfs/objects/batch", deep),
        ("POST", f"{ep}/{repo}.git/info/lfs/objects/batch", b'{"operation": "upload", "objects": "x"}'),
        ("POST", f"{api}/branch/b1", b'{"startingPoint": 5}'), ("PUT", f"{api}/settings", b"[]"),
        ("POST", f"{api}/paths-info/main", b'{"paths": [1]}'), ("GET", f"{api}/tree/main/a%00b", b""),
        ("GET", f"{ep}/{repo}/resolve/main/a%0Ab", b""),
    ]
    lines = [
        b"not json\n", b'{"key": "header", "value": "x"}\n', deep + b"\n", b'{"key": 1, "value": {}}\n',
        b'{"key": "file", "value": {"path": "a\\u0000b", "content": "YQ=="}}\n',
        b'{"key": "file", "value": {"path": "x.txt\\n", "content": "YQ=="}}\n',
        b'{"key": "file", "value": {"path": "dir\\\\x.txt", "content": "YQ=="}}\n',
        b'{"key": "file", "value": {"path": "' + b"d/" * 2100 + b'x", "content": "YQ=="}}\n',
        b'{"key": "file", "value": {"path": "x", "content": "!!!"}}\n',
        b'{"key": "file", "value": {"path": "x", "content": 5}}\n',
        b'{"key": "lfsFile", "value": {"path": "x", "oid": 5, "size": "a"}}\n', b'{"key": "deletedFile"}\n',
        b'{"key": "deletedFile", "value": [1]}\n', b'{"key": "lfsFile", "value": {"path": "x", "oid": {}}}\n',
    ]
    head = b'{"key": "header", "value": {"summary": "s"}}\n'
    for line in lines:
        cases.append(("POST", f"{api}/commit/main", head + line))
    cases.append(("POST", f"{api}/commit/main", b'{"key": "header", "value": {"parentCommit": []}}\n'))
    cases.append(("POST", f"{api}/commit/main", b""))
    with httpx.Client(timeout=60) as c:
        for method, url, body in cases:
            r = c.request(method, url, content=body, headers=h)
            assert 400 <= r.status_code < 500, (method, url, body[:80], r.status_code, r.text[:200])
        # the repo is untouched and the server still works
        files = c.get(f"{api}/tree/main", headers=h).json()
        assert [f["path"] for f in files] == [".gitattributes"]


def _raw(endpoint: str) -> socket.socket:
    u = urlsplit(endpoint)
    return socket.create_connection((u.hostname, u.port), timeout=10)


def _closed_within(s: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Read until the server closes (True) or `seconds` pass (False); returns what arrived."""
    s.settimeout(0.2)
    got, t0 = b"", time.monotonic()
    while time.monotonic() - t0 < seconds:
        try:
            block = s.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True, got
        if not block:
            return True, got
        got += block
    return False, got


def test_body_limits_and_slow_or_idle_clients(own_hub):
    root, token, start = own_hub
    p = start(HUBQUANT_HUB_MAX_COMMIT_BYTES="100000", HUBQUANT_HUB_MAX_JSON_BYTES="10000",
              HUBQUANT_HTTP_HEADER_TIMEOUT="1", HUBQUANT_HTTP_BODY_IDLE_TIMEOUT="1")
    ep = p.endpoint
    _create(ep, token, "alice/limits")
    big = b'{"key": "header", "value": {"summary": "s"}}\n' + b"x" * 200_000
    assert _commit(ep, token, "alice/limits", [], raw=big).status_code == 413

    def chunks():
        yield big[:50_000]
        yield big[50_000:]

    r = httpx.post(f"{ep}/api/models/alice/limits/commit/main", content=chunks(), headers=_auth(token), timeout=30)
    assert r.status_code == 413  # no Content-Length: counted as it arrives
    r = httpx.post(f"{ep}/api/repos/create", content=b'{"name": "' + b"a" * 20_000 + b'"}', headers=_auth(token))
    assert r.status_code == 413
    # idle connections (nothing sent) and trickled request heads are closed; bounded: 40 sockets, a few seconds
    t0 = time.monotonic()
    idle = [_raw(ep) for _ in range(40)]
    trickle = _raw(ep)
    trickle.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
    cut = False
    for _ in range(10):  # one header line every 0.3 s: the head never completes
        try:
            trickle.sendall(b"X-a: b\r\n")
        except (BrokenPipeError, ConnectionResetError):
            cut = True
            break
        time.sleep(0.3)
    assert cut or _closed_within(trickle, 3)[0]
    assert all(_closed_within(s, 3)[0] for s in idle)
    assert time.monotonic() - t0 < 15
    # a body that stops arriving gets 408
    slow = _raw(ep)
    slow.sendall(b"POST /api/models/alice/limits/commit/main HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                 + token.encode() + b"\r\nContent-Length: 1000\r\n\r\n" + b"{" * 10)
    closed, got = _closed_within(slow, 5)
    assert b" 408 " in got.split(b"\r\n", 1)[0], got[:200]
    for s in (*idle, trickle, slow):
        s.close()
    assert httpx.get(ep + "/", timeout=5).status_code == 200


def _upload_files(root) -> list:
    return [f for d in (root / "tmp").iterdir() if d.is_dir() for f in d.iterdir() if f.name.startswith("upload-")]


def test_crashed_uploads_are_cleaned_at_restart_and_files_are_private(own_hub):
    root, token, start = own_hub
    old = os.umask(0o022)  # a permissive umask: the Hub must not rely on it
    try:
        p = start()
    finally:
        os.umask(old)
    ep = p.endpoint
    _create(ep, token, "alice/crash")
    data = os.urandom(1 << 20)
    oid = hashlib.sha256(data).hexdigest()
    href = _batch(ep, token, "alice/crash", oid, len(data)).json()["objects"][0]["actions"]["upload"]["href"]
    u = urlsplit(href)
    s = _raw(ep)
    s.sendall(f"PUT {u.path}?{u.query} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode()
              + data[: 300_000])
    t0 = time.monotonic()
    while not [f for f in _upload_files(root) if f.stat().st_size > 0]:
        assert time.monotonic() - t0 < 20, "the upload never reached the server's tmp folder"
        time.sleep(0.05)
    p.kill()  # SIGKILL mid-upload
    s.close()
    assert _upload_files(root)
    p2 = start()
    assert _upload_files(root) == []
    assert "removed 1 partial upload" in (root / "server.log").read_text()
    ok = _commit(p2.endpoint, token, "alice/crash", [{"key": "file", "value": {
        "path": "w.safetensors", "content": base64.b64encode(data).decode()}}])
    assert ok.status_code == 200, ok.text
    # files at rest: the database (it holds the link-signing secret), blobs and folders are the owner's alone
    assert root.stat().st_mode & 0o777 == 0o700
    for f in [*root.glob("hub.sqlite*"), *root.glob("blobs/*/*")]:
        assert f.stat().st_mode & 0o777 == 0o600, f
    for d in [root / "blobs", root / "tmp", *root.glob("blobs/*"), *root.glob("tmp/*")]:
        assert d.stat().st_mode & 0o777 == 0o700, d


XET_CLIENT = r"""
import hashlib, json, os, sys
from pathlib import Path
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.utils._runtime import is_xet_available
folder = Path(sys.argv[1])
api = HfApi()
api.create_repo("alice/xet", exist_ok=True)
api.upload_folder(repo_id="alice/xet", folder_path=str(folder))
out = Path(snapshot_download("alice/xet"))
tree = {e.path: e for e in api.list_repo_tree("alice/xet")}
print(json.dumps({"xet": is_xet_available(), "same": (out / "w.safetensors").read_bytes()
                  == (folder / "w.safetensors").read_bytes(),
                  "lfs": tree["w.safetensors"].lfs.sha256, "config_lfs": tree["config.json"].lfs is not None}))
"""


def test_plain_client_with_xet_uploads_without_disabling_it(local_hub, tmp_path):
    pytest.importorskip("hf_xet")
    folder = tmp_path / "m"
    folder.mkdir()
    weights = os.urandom(3 << 20)
    (folder / "w.safetensors").write_bytes(weights)
    (folder / "config.json").write_text('{"model_type": "llama"}\n')
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_XET"}
    env.update(HF_ENDPOINT=local_hub.endpoint, HF_TOKEN=local_hub.token("alice"), HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run([sys.executable, "-c", XET_CLIENT, str(folder)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"xet": True, "same": True, "lfs": hashlib.sha256(weights).hexdigest(), "config_lfs": False}
