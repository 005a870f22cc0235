"""End to end on the local Hub: `hubquant serve` converts a release it hears about by webhook (once, however
often the delivery comes), and a worker SIGKILLed mid-job is replaced and the job completes with one commit.

Conversions: tiny random Llama (hidden 64, 2 layers) published over HTTP, RTN W8 per channel, no evaluation.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from hubquant.service.jobs import JobSpec
from hubquant.service.queue import JobQueue, RetryPolicy
from tests.service.helpers import (
    FAST,
    REPO_ROOT,
    ServiceProcess,
    hubquant_commits,
    wait_for,
    webhook_payload,
)

SECRET = "e2e-secret"


def _provenance(repo_id: str) -> dict:
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(repo_id, "hubquant.json")).read_text())


def test_webhook_delivered_twice_gives_one_variant(publish_tiny, hub_env, tmp_path):
    repo, sha = publish_tiny(seed=1)
    config = tmp_path / "service.toml"  # the conversion settings from a config file
    config.write_text('methods = ["rtn"]\nschemes = ["W8A16"]\nnamespace = "alice"\nauthor = ["hubquant-org"]\n'
                      '[options]\nskip_eval = true\n')
    svc = ServiceProcess(
        ["--db", str(tmp_path / "svc.db"), "--workers", "1", "--config", str(config), "--lease", "30"],
        env={"HUBQUANT_WEBHOOK_SECRET": SECRET, "HUBQUANT_SERVICE_TOKEN": "tok"}, log_path=tmp_path / "svc.log")
    try:
        body = json.dumps(webhook_payload(repo, sha))
        headers = {"X-Webhook-Secret": SECRET, "content-type": "application/json"}
        r1 = httpx.post(svc.url + "/webhook", content=body, headers=headers, timeout=30)
        r2 = httpx.post(svc.url + "/webhook", content=body, headers=headers, timeout=30)
        assert r1.status_code == 202 and r2.status_code == 200 and r2.json()["duplicate"] is True
        job_id = r1.json()["jobs"][0]["id"]
        assert r2.json()["jobs"] == [job_id]
        bad = httpx.post(svc.url + "/webhook", content=body, headers={**headers, "X-Webhook-Secret": "no"})
        assert bad.status_code == 403

        auth = {"Authorization": "Bearer tok"}

        def finished():
            j = httpx.get(f"{svc.url}/jobs/{job_id}", headers=auth).json()
            return j if j["status"] in ("done", "failed") else None

        job = wait_for(finished, 240, "the webhook's job to finish")
        assert job["status"] == "done", (job, svc.log_path.read_text()[-3000:])
        target = job["result"]["target_repo"]
        assert target == f"alice/{repo.split('/')[1]}-W8A16-RTN"
        assert hubquant_commits(target) == [f"hubquant: W8A16 rtn of {repo}@{sha[:10]}"]
        prov = _provenance(target)
        assert prov["base_model"] == repo and prov["base_sha"] == sha
        assert prov["settings"]["scheme"]["weights"]["bits"] == 8
        listed = httpx.get(svc.url + "/jobs", headers=auth).json()
        assert listed["counts"] == {"queued": 0, "running": 0, "done": 1, "failed": 0}
        metrics = httpx.get(svc.url + "/metrics", headers=auth).text
        assert "hubquant_jobs_completed_total 1\n" in metrics
        assert 'hubquant_webhook_deliveries_total{result="duplicate"} 1\n' in metrics
        workers = _children(svc.proc.pid)
        assert len(workers) == 1
    finally:
        svc.stop()
    assert svc.proc.returncode is not None
    wait_for(lambda: not any(_alive(p) for p in workers), 15, "the worker to stop with the service")


def test_worker_killed_mid_job_is_retried_after_restart_with_one_commit(publish_tiny, hub_env, tmp_path):
    repo, sha = publish_tiny(seed=2)
    db = tmp_path / "q.db"
    queue = JobQueue(db, retry=RetryPolicy(max_attempts=3, backoff_s=1))
    spec = JobSpec(repo_id=repo, revision=sha, method="rtn", scheme="W8A16", namespace="alice", options=FAST)
    job, _ = queue.enqueue(spec.to_dict(), key=spec.key())

    def worker(name: str, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "hubquant.service.workers", "--db", str(db), "--id", name,
                                 "--lease", "3", "--poll", "0.2", *extra], cwd=REPO_ROOT, env=os.environ.copy())

    first = worker("w-doomed", "--claim-delay", "120")
    try:
        wait_for(lambda: queue.get(job.id).status == "running", 60, "the first worker to claim the job", every=0.1)
        first.send_signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
    assert queue.get(job.id).lease_owner == "w-doomed" and queue.get(job.id).status == "running"
    assert hubquant_commits_or_none(f"alice/{repo.split('/')[1]}-W8A16-RTN") == []

    second = worker("w-restarted", "--exit-when-idle")  # the restart: a new worker on the same database
    assert second.wait(240) == 0
    done = queue.get(job.id)
    assert done.status == "done" and done.attempts == 2 and done.lease_owner is None
    lines = [e["line"] for e in done.logs]
    assert "lease of w-doomed expired; job reclaimed" in lines
    assert "claimed by w-restarted (attempt 2)" in lines
    target = done.result["target_repo"]
    assert hubquant_commits(target) == [f"hubquant: W8A16 rtn of {repo}@{sha[:10]}"]
    assert _provenance(target)["base_sha"] == sha
    assert queue.counters()["lease_expired_total"] == 1


def hubquant_commits_or_none(repo_id: str) -> list[str]:
    from huggingface_hub import errors

    try:
        return hubquant_commits(repo_id)
    except errors.RepositoryNotFoundError:
        return []


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
