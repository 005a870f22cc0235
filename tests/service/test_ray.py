"""The Ray backend against a local Ray instance the test starts: jobs from the queue run as Ray tasks
(CPU tasks here: the instance has no GPU), results and failures land in the queue."""
from __future__ import annotations

import pytest

from hubquant.service.jobs import JobSpec
from hubquant.service.queue import JobQueue, RetryPolicy
from tests.service.conftest import FAST
from tests.service.helpers import hubquant_commits

ray = pytest.importorskip("ray", reason="pip install 'hubquant[service]'")


@pytest.fixture
def local_ray(hub_env):
    # hub_env first: the raylet and its workers inherit HF_ENDPOINT/HF_TOKEN/HF_HOME from this process
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=80 * 1024 * 1024,
             log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_jobs_run_as_ray_tasks(publish_tiny, hub_env, local_ray, tmp_path):
    from hubquant.service.ray_backend import RayBackend, RayOptions

    repo, sha = publish_tiny(seed=5)
    queue = JobQueue(tmp_path / "q.db", retry=RetryPolicy(max_attempts=2, backoff_s=1))
    good = JobSpec(repo_id=repo, revision=sha, method="rtn", scheme="W4A16-G32", namespace="alice", options=FAST)
    bad = JobSpec(repo_id=repo, revision=sha, method="rtn", scheme="W4A16-G48", namespace="alice", options=FAST)
    ok_job, _ = queue.enqueue(good.to_dict(), key=good.key())
    bad_job, _ = queue.enqueue(bad.to_dict(), key=bad.key())

    backend = RayBackend(queue, RayOptions(cpus_per_task=1, lease_s=60))
    assert backend.gpus == 0 and backend.capacity == 2
    assert backend.describe() == "Ray cluster: no GPUs, CPU tasks; up to 2 task(s) at once"
    assert backend.drain(timeout=300)

    done = queue.get(ok_job.id)
    assert done.status == "done", done.error
    target = done.result["target_repo"]
    assert target == f"alice/{repo.split('/')[1]}-W4A16-G32-RTN"
    assert hubquant_commits(target) == [f"hubquant: W4A16-G32 rtn of {repo}@{sha[:10]}"]
    assert any("submitted as a Ray task (CPU)" in e["line"] for e in done.logs)
    assert any(e["line"].startswith("pushed: ") for e in done.logs)  # the task's log came back

    failed = queue.get(bad_job.id)  # a usage error is permanent: one attempt, then the failed list
    assert failed.status == "failed" and failed.attempts == 1
    assert failed.error.startswith("UsageError: group size 48 does not divide")


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
                                 remote=lambda fn: Remote())
    monkeypatch.setattr(ray_backend, "_import_ray", lambda: fake)
    b = ray_backend.RayBackend(JobQueue(tmp_path / "q.db"))
    assert seen["num_gpus"] == 1 and seen["max_retries"] == 0 and b.capacity == 2
    assert b.describe() == "Ray cluster: 2 GPU(s), one per task; up to 2 task(s) at once"


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
