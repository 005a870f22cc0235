"""The service under attack and faults: atomic deliveries across a SIGKILL, 400 before recording, read
auth, capped and paged listings, SQLite off the event loop, the option allow-list, job wall-clock limits,
pruning and private files (real servers on loopback, real processes and signals, fault-injection hooks)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from hubquant.service.app import ServiceConfig, create_app
from hubquant.service.queue import JobQueue, RetryPolicy
from tests.service.helpers import REPO_ROOT, ServerThread, ServiceProcess, wait_for, webhook_payload

SECRET, TOKEN, READ = "hook-secret", "svc-token", "read-only-token"
SHA = "c" * 40
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _hook(url: str, body, delivery: str | None = None, timeout: float = 30) -> httpx.Response:
    h = {"content-type": "application/json", "X-Webhook-Secret": SECRET}
    if delivery:
        h["X-Webhook-Delivery"] = delivery
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + "/webhook", content=data, headers=h, timeout=timeout)


@pytest.fixture
def service(tmp_path):
    queue = JobQueue(tmp_path / "q.db")
    config = ServiceConfig(methods=("rtn", "w8a8"), namespace="alice", webhook_secret=SECRET, api_token=TOKEN,
                           read_token=READ, options={"skip_eval": True})
    with ServerThread(create_app(queue, config, resolve_sha=lambda repo: SHA)) as srv:
        yield srv.url, queue


def test_a_delivery_killed_mid_transaction_is_queued_whole_on_retry(tmp_path):
    db = tmp_path / "svc.db"
    args = ["--db", str(db), "--workers", "1", "--methods", "rtn", "w8a8", "--namespace", "alice"]
    env = {"HUBQUANT_WEBHOOK_SECRET": SECRET, "HUBQUANT_SERVICE_TOKEN": TOKEN,
           "HUBQUANT_SERVICE_FAILPOINT_JOB_SLEEP": "600", "HF_ENDPOINT": "http://127.0.0.1:9"}
    svc = ServiceProcess(args, {**env, "HUBQUANT_QUEUE_FAILPOINT_DELIVERY_SLEEP": "60"}, tmp_path / "svc1.log")
    body = webhook_payload("hubquant-org/m", SHA)
    try:
        t = threading.Thread(target=lambda: pytest.raises(httpx.HTTPError, _hook, svc.url, body, "d-1", 90),
                             daemon=True)
        t.start()
        wait_for(lambda: "failpoint: delivery d-1" in svc.log_path.read_text(), 60, "the delivery's failpoint")
        svc.proc.kill()  # SIGKILL inside the transaction: one job queued, delivery not yet recorded
        svc.proc.wait(10)
        t.join(30)
    finally:
        svc.stop()
    svc = ServiceProcess(args, env, tmp_path / "svc2.log")
    try:
        r = _hook(svc.url, body, "d-1")  # the Hub retries the same delivery
        assert r.status_code == 202 and r.json()["duplicate"] is False, r.text
        ids = [j["id"] for j in r.json()["jobs"]]
        assert len(ids) == 2 and all(j["created"] for j in r.json()["jobs"])
        again = _hook(svc.url, body, "d-1")
        assert again.status_code == 200 and again.json()["jobs"] == ids
        listed = httpx.get(svc.url + "/jobs", headers=AUTH).json()
        assert sorted(j["id"] for j in listed["jobs"]) == sorted(ids)
    finally:
        svc.stop()


def test_bad_payloads_are_400_before_anything_is_recorded(service):
    url, queue = service
    bad = [
        webhook_payload("no-namespace", SHA),  # once recorded the delivery and lost its jobs for good
        webhook_payload("hubquant-org/a\nb", SHA),
        {**webhook_payload("hubquant-org/m", SHA), "updatedRefs": [{"ref": "refs/heads/main", "oldSha": "0",
                                                                   "newSha": "../../etc"}]},
    ]
    for i, body in enumerate(bad):
        r = _hook(url, body, f"bad-{i}")
        assert r.status_code == 400, (body, r.text)
    deep = b'{"event": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    assert _hook(url, deep[: (1 << 20) - 10], "deep").status_code in (400, 413)
    assert _hook(url, b"[" * 100_000, "deep2").status_code == 400
    assert _hook(url, b'{"x": "' + b"a" * (2 << 20) + b'"}', "big").status_code == 413
    assert queue.deliveries() == 0 and sum(queue.counts().values()) == 0
    ok = _hook(url, webhook_payload("hubquant-org/m", SHA), "good")
    assert ok.status_code == 202 and len(ok.json()["jobs"]) == 2


def test_reads_need_a_token_and_listings_are_capped_and_paged(service):
    url, queue = service
    for i in range(1200):  # bounded load: 1200 jobs
        queue.enqueue({"n": i}, key=f"k{i}")
    assert httpx.get(url + "/jobs").status_code == 401
    assert httpx.get(url + "/jobs", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert httpx.get(url + "/jobs/x").status_code == 401 and httpx.get(url + "/metrics").status_code == 401
    read = {"Authorization": f"Bearer {READ}"}
    assert httpx.post(url + "/jobs", json={"repo_id": "o/m"}, headers=read).status_code == 403  # read-only
    assert "hubquant_queue_depth 1200" in httpx.get(url + "/metrics", headers=read).text
    first = httpx.get(url + "/jobs?limit=100000", headers=read, timeout=30).json()
    assert len(first["jobs"]) == 500 and first["next"]
    seen, cursor = [], None
    while True:
        q = f"/jobs?limit=400{'&cursor=' + cursor if cursor else ''}"
        page = httpx.get(url + q, headers=read, timeout=30).json()
        seen += [j["spec"]["n"] for j in page["jobs"]]
        cursor = page["next"]
        if not cursor:
            break
    assert seen == list(range(1199, -1, -1))  # each job once, newest first
    assert httpx.get(url + "/jobs?limit=0", headers=read).status_code == 400
    assert httpx.get(url + "/jobs?cursor=zzz", headers=read).status_code == 400


def test_sqlite_work_does_not_block_the_event_loop(service, monkeypatch):
    url, _ = service
    monkeypatch.setenv("HUBQUANT_QUEUE_FAILPOINT_LIST_SLEEP", "3")  # a listing that takes 3 s in SQLite
    t = threading.Thread(target=lambda: httpx.get(url + "/jobs", headers=AUTH, timeout=30), daemon=True)
    t.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    assert httpx.get(url + "/healthz", timeout=10).status_code == 200
    r = _hook(url, webhook_payload("hubquant-org/m", SHA), "during-listing")
    assert r.status_code == 202
    assert time.monotonic() - t0 < 1.5  # answered while the listing was still running
    t.join(30)


def test_job_options_go_through_an_allow_list(service):
    url, queue = service
    post = lambda body: httpx.post(url + "/jobs", json=body, headers=AUTH, timeout=30)  # noqa: E731
    r = post({})
    assert r.status_code == 400 and "repo_id" in r.json()["error"]
    base = {"repo_id": "hubquant-org/m", "revision": SHA}
    for opts in ({"token": "hf_x"}, {"trust_remote_code": True}, {"allow_pickle": True}, {"output_dir": "/"},
                 {"device": "cuda:7"}, {"num_samples": "many"}, {"num_samples": 10**9}, {"skip_eval": "yes"},
                 {"calib_dataset": "/etc/passwd"}, {"calib_dataset": "../secrets.txt"}, {"ignore": "lm_head"},
                 {"method_options": {"x": {"nested": 1}}}, "not-an-object"):
        r = post({**base, "options": opts})
        assert r.status_code == 400, (opts, r.text)
        key = next(iter(opts)) if isinstance(opts, dict) else "options"
        assert key in r.json()["error"], (opts, r.json())
    for field in ("output_dir", "token", "trust_remote_code"):
        r = post({**base, field: "x"})
        assert r.status_code == 400 and field in r.json()["error"]
    assert post({**base, "repo_id": "../../x"}).status_code == 400
    assert post({**base, "method": "no-such-method"}).status_code == 400
    assert httpx.post(url + "/jobs", content=b"[" * 50_000, headers=AUTH).status_code == 400
    assert httpx.post(url + "/jobs", content=b" " * 100_000, headers=AUTH).status_code == 413
    assert sum(queue.counts().values()) == 0
    ok = post({**base, "options": {"num_samples": 8, "calib_dataset": "wikitext:wikitext-2-raw-v1:train"}})
    assert ok.status_code == 201, ok.text
    assert ok.json()["job"]["spec"]["options"] == {"skip_eval": True, "num_samples": 8,
                                                   "calib_dataset": "wikitext:wikitext-2-raw-v1:train"}


def test_a_hung_job_is_failed_and_retried_and_its_lease_not_renewed(tmp_path):
    db = tmp_path / "q.db"
    q = JobQueue(db, retry=RetryPolicy(max_attempts=3, backoff_s=300))
    job, _ = q.enqueue({"repo_id": "o/m"}, key="hang")
    env = {**os.environ, "HUBQUANT_SERVICE_FAILPOINT_JOB_SLEEP": "600"}
    t0 = time.monotonic()
    w = subprocess.Popen([sys.executable, "-m", "hubquant.service.workers", "--db", str(db), "--id", "w1",
                          "--lease", "1.5", "--poll", "0.2", "--job-timeout", "3"], cwd=REPO_ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        j = wait_for(lambda: (x := q.get(job.id)).status != "running" and x.attempts == 1 and x, 40,
                     "the hung attempt to be failed")
        took = time.monotonic() - t0
        assert j.status == "queued" and "JobTimeout" in j.error and j.lease_owner is None, j
        assert 3 <= took < 30
        assert w.wait(20) == 75  # the worker gave up the hung attempt by exiting (its pool starts a fresh one)
        assert q.counters().get("retries_total") == 1
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()


def test_deliveries_are_pruned_and_the_queue_file_is_private(tmp_path):
    now = [1_000_000.0]
    old = os.umask(0o022)
    try:
        q = JobQueue(tmp_path / "new" / "q.db", clock=lambda: now[0], delivery_retention_s=3600)
    finally:
        os.umask(old)
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "new" / "q.db").stat().st_mode & 0o777 == 0o600
    q.accept_delivery("d-old", [({"n": 1}, "k1")])
    now[0] += 1800
    q.accept_delivery("d-mid", [])
    now[0] += 2000
    q.accept_delivery("d-new", [])
    assert q.deliveries() == 2  # d-old is past the retention
    assert q.accept_delivery("d-mid", [])[0] is True and q.accept_delivery("d-old", [])[0] is False
