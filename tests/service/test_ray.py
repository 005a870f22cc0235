"""The Ray backend: `hubquant serve --backend ray --ray-address` against a local Ray instance the test
starts (2 CPUs, no GPU, on loopback): jobs from the queue run as Ray tasks, results and failures land in
the queue. Without a GPU machine, a fake cluster with GPUs shows the tasks ask for one GPU each."""
from __future__ import annotations

import os
import shutil
import sys

import pytest

from hubquant.service.queue import JobQueue
from tests.service.helpers import hubquant_commits

ray = pytest.importorskip("ray", reason="pip install 'hubquant[service]'")


# Keep Ray on loopback: on Linux it otherwise swaps 127.0.0.1 for the machine's interface address.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def test_ray_task_asks_for_a_gpu_when_the_cluster_has_them(tmp_path, monkeypatch):
    """Without a GPU machine: a fake `ray` module reports a 2-GPU cluster; the task options must say num_gpus=1."""
    import types

    from hubquant.service import ray_backend

    seen = {}

    class Remote:
        def options(self, **kw):
            seen.update(kw)
            return self

    fake = types.SimpleNamespace(is_initialized=lambda: True, cluster_resources=lambda: {"CPU": 32.0, "GPU": 2.0},
                                 remote=lambda fn: Remote(), nodes=lambda: [{"NodeManagerAddress": "10.0.0.7"}])
    monkeypatch.setattr(ray_backend, "_import_ray", lambda: fake)
    b = ray_backend.RayBackend(JobQueue(tmp_path / "q.db"))
    assert seen["num_gpus"] == 1 and seen["max_retries"] == 0 and b.capacity == 2
    assert b.describe() == "Ray cluster: 2 GPU(s), one per task; up to 2 task(s) at once; nodes 10.0.0.7"


def test_a_ray_task_past_the_job_timeout_is_cancelled_and_retried(tmp_path, monkeypatch):
    """A task that never finishes (a fake cluster whose tasks hang): past `job_timeout_s` the dispatcher cancels
    it, stops renewing the lease and fails the attempt as transient (queued again)."""
    import time
    import types

    from hubquant.service import ray_backend
    from hubquant.service.queue import RetryPolicy

    cancelled = []

    class Remote:
        def options(self, **kw):
            return self

        def remote(self, spec):
            return object()  # a task that never completes

    fake = types.SimpleNamespace(is_initialized=lambda: True, cluster_resources=lambda: {"CPU": 1.0},
                                 remote=lambda fn: Remote(), nodes=lambda: [],
                                 wait=lambda refs, num_returns, timeout: ([], refs),
                                 cancel=lambda ref, force: cancelled.append(ref))
    monkeypatch.setattr(ray_backend, "_import_ray", lambda: fake)
    q = JobQueue(tmp_path / "q.db", retry=RetryPolicy(backoff_s=300))
    job, _ = q.enqueue({"repo_id": "o/m"}, key="k")
    b = ray_backend.RayBackend(q, ray_backend.RayOptions(job_timeout_s=0.3, lease_s=60))
    b.step(wait_s=0)
    assert q.get(job.id).status == "running" and len(b.in_flight) == 1
    time.sleep(0.4)
    b.step(wait_s=0)
    j = q.get(job.id)
    assert j.status == "queued" and "JobTimeout" in j.error and j.lease_owner is None
    assert len(cancelled) == 1 and not b.in_flight


def test_missing_ray_names_the_extra(monkeypatch):
    import builtins

    from hubquant.errors import UnsupportedError
    from hubquant.service import ray_backend

    real = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(UnsupportedError) as e:
        ray_backend._import_ray()
    assert e.value.hint == "run: pip install 'hubquant[service]'" and e.value.exit_code == 5


@pytest.mark.slow
def test_serve_dispatches_to_a_ray_cluster_by_address(publish_tiny, hub_env, tmp_path):
    """`hubquant serve --backend ray --ray-address` against a Ray head this test starts (2 CPUs, no GPU)."""
    import secrets
    import signal
    import socket
    import subprocess
    import tempfile
    import time

    import httpx

    from tests.service.helpers import ServiceProcess, free_port, wait_for

    repo, sha = publish_tiny(seed=8)
    port = free_port()
    # the cluster's auth token, handed to the head and to the service (nothing read from or left in ~/.ray)
    ray_env = {**LOOPBACK_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    temp = tempfile.mkdtemp(prefix="rq", dir="/tmp")  # Ray's socket paths must stay short
    head = subprocess.Popen(
        [shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray") or "ray", "start", "--head",
         "--block", "--port", str(port), "--num-cpus", "2",
         "--num-gpus", "0", "--include-dashboard", "false", "--disable-usage-stats", "--node-ip-address",
         "127.0.0.1", "--object-store-memory", str(80 * 1024 * 1024), "--temp-dir", temp],
        stdout=open(tmp_path / "ray.log", "wb"), stderr=subprocess.STDOUT, env={**os.environ, **ray_env})
    svc = None
    try:
        def gcs_up():
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0
        wait_for(gcs_up, 90, "the Ray head to listen")
        time.sleep(2)
        svc = ServiceProcess(["--db", str(tmp_path / "svc.db"), "--backend", "ray",
                              "--ray-address", f"127.0.0.1:{port}",
                              "--ray-node-ip", "127.0.0.1",
                              "--namespace", "alice", "--option", "skip_eval=true"],
                             env={"HUBQUANT_SERVICE_TOKEN": "tok", **ray_env}, log_path=tmp_path / "svc.log")
        auth = {"Authorization": "Bearer tok"}
        r = httpx.post(svc.url + "/jobs", json={"repo_id": repo, "method": "rtn", "scheme": "W4A16-G32"},
                       headers=auth, timeout=30)
        assert r.status_code == 201, r.text
        job_id = r.json()["job"]["id"]
        def finished():
            j = httpx.get(f"{svc.url}/jobs/{job_id}", headers=auth).json()
            return j if j["status"] in ("done", "failed") else None

        good = wait_for(finished, 300, "the Ray job")
        assert good["status"] == "done", (good, svc.log_path.read_text()[-3000:])
        assert good["spec"]["revision"] == sha  # POST /jobs pins the head sha
        assert any(e["line"] == "submitted as a Ray task (CPU)" for e in good["logs"])
        assert any(e["line"].startswith("pushed: ") for e in good["logs"])  # the task's log came back
        assert hubquant_commits(good["result"]["target_repo"]) == [f"hubquant: W4A16-G32 rtn of {repo}@{sha[:10]}"]
        # 2 CPU tasks at once, and the whole cluster on loopback
        assert "Ray cluster: no GPUs, CPU tasks; up to 2 task(s) at once; nodes 127.0.0.1\n" in svc.log_path.read_text()
    finally:
        if svc is not None:
            svc.stop()
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp, ignore_errors=True)

