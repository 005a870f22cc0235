"""The service's HTTP API over real HTTP (uvicorn on loopback): webhook auth and parsing, job API, metrics.

The Hub is not needed here (shas come in the payloads; a stub resolves the rest); the end-to-end tests
with conversions on the local Hub are in test_service_e2e.py.
"""
from __future__ import annotations

import json

import httpx
import pytest

from hubquant.service.app import ServiceConfig, create_app
from hubquant.service.queue import JobQueue
from tests.service.helpers import ServerThread, webhook_payload

SECRET = "s3cret-webhook-value"
TOKEN = "service-token-123"
SHA = "a" * 40


@pytest.fixture
def service(tmp_path):
    queue = JobQueue(tmp_path / "q.db")
    config = ServiceConfig(methods=("rtn", "w8a8"), schemes=("default",), namespace="alice",
                           authors=("hubquant-org", "meta-*"), webhook_secret=SECRET, api_token=TOKEN, workers=2)
    with ServerThread(create_app(queue, config, resolve_sha=lambda repo: "b" * 40)) as srv:
        yield srv.url, queue


def post_hook(url, body, *, secret: str | None = SECRET, headers=None):
    h = {"content-type": "application/json", **(headers or {})}
    if secret is not None:
        h["X-Webhook-Secret"] = secret
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + "/webhook", content=data, headers=h, timeout=10)


def test_missing_or_wrong_secret_is_refused_and_queues_nothing(service):
    url, queue = service
    body = webhook_payload("hubquant-org/new-model", SHA)
    r = post_hook(url, body, secret=None)
    assert r.status_code == 401 and "X-Webhook-Secret" in r.json()["error"]
    for wrong in ("", "s3cret-webhook-valuX", SECRET + "x", SECRET.upper()):
        r = post_hook(url, body, secret=wrong)
        assert r.status_code == 403, wrong
    assert queue.counts() == {"queued": 0, "running": 0, "done": 0, "failed": 0}
    assert queue.deliveries() == 0  # no delivery was recorded either


@pytest.mark.parametrize("body", [
    b"{not json",
    b"[1, 2, 3]",
    json.dumps({"event": {"action": "update", "scope": "repo.content"}}),  # no repo, no webhook
    json.dumps({**webhook_payload("o/m", SHA), "webhook": {"id": "x", "version": 2}}),  # unsupported version
    json.dumps({**webhook_payload("o/m", SHA), "event": {"action": "explode", "scope": "repo"}}),
])
def test_malformed_payload_is_400(service, body):
    url, queue = service
    r = post_hook(url, body)
    assert r.status_code == 400 and r.json()["error"].startswith("malformed payload")
    assert sum(queue.counts().values()) == 0


@pytest.mark.parametrize("payload, reason", [
    (webhook_payload("hubquant-org/m", SHA, repo_type="dataset"), "not a model repo"),
    (webhook_payload("hubquant-org/m", SHA, scope="discussion", action="create"), "not a release"),
    (webhook_payload("hubquant-org/m", SHA, tags=["hubquant", "rtn"]), "hubquant variant"),
    (webhook_payload("someone-else/m", SHA), "outside the watched"),
    ({**webhook_payload("hubquant-org/m", SHA), "updatedRefs": [{"ref": "refs/heads/dev", "newSha": SHA}]},
     "no new commit on main"),
])
def test_events_that_are_not_watched_releases_are_ignored(service, payload, reason):
    url, queue = service
    r = post_hook(url, payload)
    assert r.status_code == 202 and r.json()["accepted"] is False and reason in r.json()["reason"]
    assert sum(queue.counts().values()) == 0


def test_release_queues_one_job_per_method_and_a_repeated_delivery_adds_nothing(service):
    url, queue = service
    body = webhook_payload("meta-llama/Llama-9-1B", SHA)
    r1 = post_hook(url, body)
    assert r1.status_code == 202
    jobs = r1.json()["jobs"]
    assert len(jobs) == 2 and all(j["created"] for j in jobs) and r1.json()["sha"] == SHA
    r2 = post_hook(url, body)  # the Hub retries a delivery it thinks failed
    assert r2.status_code == 200 and r2.json()["duplicate"] is True
    assert r2.json()["jobs"] == [j["id"] for j in jobs]
    # the same release in another delivery (another body) maps to the same idempotency keys
    r3 = post_hook(url, {**body, "webhook": {"id": "another-hook", "version": 3}})
    assert r3.status_code == 202 and [j["created"] for j in r3.json()["jobs"]] == [False, False]
    assert queue.counts()["queued"] == 2
    specs = sorted(j.spec["method"] for j in queue.list())
    assert specs == ["rtn", "w8a8"]
    assert all(j.spec["revision"] == SHA and j.spec["namespace"] == "alice" for j in queue.list())


def test_repo_created_without_sha_resolves_it(service):
    url, queue = service
    r = post_hook(url, webhook_payload("hubquant-org/fresh", None, scope="repo", action="create"))
    assert r.status_code == 202 and r.json()["sha"] == "b" * 40 and len(r.json()["jobs"]) == 2


def test_jobs_api_needs_the_token_and_is_idempotent(service):
    url, queue = service
    body = {"repo_id": "hubquant-org/m", "revision": SHA, "method": "rtn", "scheme": "W4A16-G32"}
    assert httpx.post(url + "/jobs", json=body).status_code == 401
    assert httpx.post(url + "/jobs", json=body, headers={"Authorization": "Bearer nope"}).status_code == 403
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r1 = httpx.post(url + "/jobs", json=body, headers=auth)
    r2 = httpx.post(url + "/jobs", json=body, headers=auth)
    assert (r1.status_code, r2.status_code) == (201, 200)
    job = r1.json()["job"]
    assert r2.json()["job"]["id"] == job["id"] and job["spec"]["namespace"] == "alice"
    bad = httpx.post(url + "/jobs", json={**body, "scheme": "W5Z"}, headers=auth)
    assert bad.status_code == 400 and "scheme" in bad.json()["error"]
    typo = httpx.post(url + "/jobs", json={**body, "methd": "rtn"}, headers=auth)
    assert typo.status_code == 400 and "methd" in typo.json()["error"]
    listed = httpx.get(url + "/jobs", headers=auth).json()
    assert listed["counts"]["queued"] == 1 and [j["id"] for j in listed["jobs"]] == [job["id"]]
    assert httpx.get(url + "/jobs?status=done", headers=auth).json()["jobs"] == []
    assert httpx.get(url + "/jobs?status=bogus", headers=auth).status_code == 400
    one = httpx.get(url + f"/jobs/{job['id']}", headers=auth).json()
    assert one["status"] == "queued" and isinstance(one["logs"], list)
    assert httpx.get(url + "/jobs/doesnotexist", headers=auth).status_code == 404


def test_metrics_are_prometheus_text_with_the_numbers(service):
    url, queue = service
    post_hook(url, webhook_payload("hubquant-org/a", SHA))
    post_hook(url, webhook_payload("hubquant-org/a", SHA))
    post_hook(url, b"nope")
    post_hook(url, webhook_payload("hubquant-org/a", SHA), secret="wrong")
    job = queue.claim("w")
    queue.fail(job.id, "w", "boom", retryable=False)
    r = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values["hubquant_queue_depth"] == 1
    assert values['hubquant_jobs{status="failed"}'] == 1
    assert values["hubquant_jobs_failed_total"] == 1
    assert values['hubquant_webhook_deliveries_total{result="accepted"}'] == 1
    assert values['hubquant_webhook_deliveries_total{result="duplicate"}'] == 1
    assert values['hubquant_webhook_deliveries_total{result="malformed"}'] == 1
    assert values['hubquant_webhook_deliveries_total{result="forbidden"}'] == 1
    assert values["hubquant_workers"] == 2


def test_webhook_without_a_configured_secret_is_503(tmp_path):
    queue = JobQueue(tmp_path / "q.db")
    with ServerThread(create_app(queue, ServiceConfig(webhook_secret=None))) as srv:
        r = post_hook(srv.url, webhook_payload("o/m", SHA), secret="anything")
        assert r.status_code == 503 and "HUBQUANT_WEBHOOK_SECRET" in r.json()["hint"]
        assert httpx.post(srv.url + "/jobs", json={"repo_id": "o/m"},
                          headers={"Authorization": "Bearer x"}).status_code == 403
    assert sum(queue.counts().values()) == 0


def test_a_delivery_that_could_not_be_resolved_is_not_remembered(tmp_path):
    from hubquant.errors import NotFoundError

    calls = []

    def flaky(repo):
        calls.append(repo)
        if len(calls) == 1:
            raise NotFoundError(f"repository {repo} not found", hint="check the repo id")
        return "c" * 40

    queue = JobQueue(tmp_path / "q.db")
    config = ServiceConfig(webhook_secret=SECRET)
    with ServerThread(create_app(queue, config, resolve_sha=flaky)) as srv:
        body = webhook_payload("o/new", None, scope="repo", action="create")
        r1 = post_hook(srv.url, body)
        assert r1.status_code == 502 and "not found" in r1.json()["error"]
        r2 = post_hook(srv.url, body)  # the Hub retries the same delivery: this time it goes through
        assert r2.status_code == 202 and r2.json()["sha"] == "c" * 40 and len(r2.json()["jobs"]) == 1
    assert queue.counts()["queued"] == 1
