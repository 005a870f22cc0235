"""Workers: one job at a time with the right outcome per error type, GPU-aware pools, restarts of dead workers."""
from __future__ import annotations

import os
import signal
import stat

import pytest

from hubquant.errors import (
    AuthError,
    ConflictError,
    HubUnreachableError,
    QualityGateError,
    UsageError,
)
from hubquant.service.queue import JobQueue, RetryPolicy
from hubquant.service.workers import (
    WorkerOptions,
    WorkerPool,
    default_workers,
    visible_gpus,
    work_one,
)
from tests.service.helpers import wait_for


@pytest.fixture
def q(tmp_path):
    return JobQueue(tmp_path / "q.db", retry=RetryPolicy(max_attempts=3, backoff_s=60))


def test_work_one_records_result_and_logs(q):
    job, _ = q.enqueue({"repo_id": "o/m"}, key="k")

    def runner(spec, log):
        log("step one")
        return {"target_repo": "a/o-m", "skipped": False, "spec_seen": spec["repo_id"]}

    assert work_one(q, "w", runner=runner) == job.id
    done = q.get(job.id)
    assert done.status == "done" and done.result["spec_seen"] == "o/m"
    assert [e["line"] for e in done.logs] == ["claimed by w (attempt 1)", "step one"]
    assert work_one(q, "w", runner=runner) is None  # nothing left


@pytest.mark.parametrize("exc, status, attempts_left", [
    (UsageError("bad", hint="h"), "failed", False),
    (AuthError("no write", hint="h"), "failed", False),
    (QualityGateError("ppl +30%", hint="h"), "failed", False),
    (ConflictError("branch moved", hint="run again"), "queued", True),
    (HubUnreachableError("the Hub did not answer", hint="h"), "queued", True),
    (ConnectionResetError("reset by peer"), "queued", True),
    (RuntimeError("a bug, not a hiccup"), "failed", False),
    (KeyError("model.layers.0"), "failed", False),
])
def test_errors_are_retried_only_when_another_attempt_can_help(q, exc, status, attempts_left):
    job, _ = q.enqueue({}, key="k")

    def runner(spec, log):
        raise exc

    work_one(q, "w", runner=runner)
    j = q.get(job.id)
    assert j.status == status and j.attempts == 1
    assert j.error.startswith(type(exc).__name__)
    if status == "failed" and hasattr(exc, "hint"):
        assert "(fix: h)" in j.error


def test_pool_is_gpu_aware(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpus() == ["2", "3"] and default_workers() == 2
    pool = WorkerPool(tmp_path / "q.db")
    assert pool.n == 2
    pinned = [pool.command(i)[1]["CUDA_VISIBLE_DEVICES"] for i in range(3)]
    assert pinned == ["2", "3", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == [] and default_workers() == 1
    cpu_pool = WorkerPool(tmp_path / "q.db", 3)
    assert cpu_pool.n == 3 and cpu_pool.command(0)[1]["CUDA_VISIBLE_DEVICES"] == ""  # inherited, not pinned


def test_gpus_come_from_nvidia_smi_when_no_mask_is_set(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-a)'\n"
                    "echo 'GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-b)'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    assert visible_gpus() == ["0", "1"] and default_workers() == 2


def test_pool_restarts_a_killed_worker(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    JobQueue(tmp_path / "q.db")
    pool = WorkerPool(tmp_path / "q.db", 1, WorkerOptions(poll_s=0.2), log_dir=tmp_path / "logs").start()
    try:
        first = pool.procs[0]
        first.send_signal(signal.SIGKILL)
        wait_for(lambda: pool.restarts == 1 and pool.procs[0] is not first, 30, "the pool to restart the worker")
        assert pool.procs[0].poll() is None
    finally:
        pool.stop()
    assert all(p.poll() is not None for p in pool.procs.values())


def test_pool_workers_die_with_a_killed_service(tmp_path):
    """The service SIGKILLed: its workers get SIGTERM from the kernel (no orphans polling the queue)."""
    import subprocess
    import sys

    JobQueue(tmp_path / "q.db")
    code = ("import sys, time; from hubquant.service.workers import WorkerPool, WorkerOptions; "
            f"p = WorkerPool({str(tmp_path / 'q.db')!r}, 1, WorkerOptions(poll_s=0.2)).start(); "
            "print(p.procs[0].pid, flush=True); time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    try:
        child = int(parent.stdout.readline())
        wait_for(lambda: "--die-with-parent" in open(f"/proc/{child}/cmdline").read().replace("\0", " "), 10,
                 "the worker to start")
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)

        def gone():
            try:
                return open(f"/proc/{child}/stat").read().split()[2] == "Z"
            except FileNotFoundError:
                return True
        wait_for(gone, 20, "the orphaned worker to exit")
    finally:
        if parent.poll() is None:
            parent.kill()
