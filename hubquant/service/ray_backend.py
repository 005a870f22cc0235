"""Scale-out on Ray: the same queued jobs, each conversion run as a Ray task.

The dispatcher lives beside the HTTP app (in `hubquant serve --backend ray`): it claims jobs from the
SQLite queue, submits one task per job (asking for one GPU when the cluster has GPUs, else CPUs),
renews the jobs' leases while their tasks run, and records each result or failure in the queue, so
retries, backoff and the failed list work exactly as with local workers. If the dispatcher itself dies,
the leases run out and the jobs are claimed again after a restart (at least once; convert's
idempotency makes the second run a no-op on the Hub when the first one had pushed).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from hubquant.errors import missing_dependency
from hubquant.service.queue import JobQueue

# What a task needs from the driver's environment to reach the same Hub.
FORWARD_ENV = ("HF_ENDPOINT", "HF_TOKEN", "HF_HUB_DISABLE_XET", "HF_HOME", "HF_HUB_CACHE",
               "HF_HUB_DISABLE_TELEMETRY", "HUBQUANT_DEBUG")


def _import_ray():
    try:
        import ray
    except ImportError as e:
        raise missing_dependency("ray", "service", why="needed for --backend ray") from e
    return ray


def convert_task(spec: dict[str, Any]) -> dict[str, Any]:
    """Body of the Ray task: run one job, return the outcome as data (errors included, never raised)."""
    from hubquant.service.jobs import describe_error, is_retryable, run_job

    logs: list[str] = []
    try:
        result = run_job(spec, log=logs.append)
    except Exception as e:  # reported to the dispatcher, which decides retry vs failed
        return {"ok": False, "error": describe_error(e), "retryable": is_retryable(e), "logs": logs}
    return {"ok": True, "result": result, "logs": logs, "node": os.uname().nodename}


@dataclass(frozen=True, kw_only=True)
class RayOptions:
    """Where and how tasks run.

    Attributes:
        address: the cluster ("auto", "ray://host:10001", "host:6379"); None joins the Ray instance this
            process already started, or starts a local one.
        max_in_flight: tasks at once (None: the cluster's GPUs, else CPUs / cpus_per_task).
        cpus_per_task: CPUs each task asks for.
        lease_s: the job lease the dispatcher renews while a task runs.
        poll_s: how often the dispatcher looks for new jobs.
        node_ip_address: this machine's address as the cluster knows it (e.g. 127.0.0.1 for a head
            started with --node-ip-address 127.0.0.1); None lets Ray pick.
    """

    address: str | None = None
    node_ip_address: str | None = None
    max_in_flight: int | None = None
    cpus_per_task: float = 1.0
    lease_s: float = 120.0
    poll_s: float = 1.0
    job_timeout_s: float = 6 * 3600.0
    version: int = 2


class RayBackend:
    """Claims jobs from `queue` and runs them as Ray tasks.

    Raises:
        UnsupportedError: ray is not installed (fix: pip install 'hubquant[service]').
    """

    def __init__(self, queue: JobQueue, opts: RayOptions = RayOptions(), *, name: str = "ray-dispatcher"):
        self.ray = _import_ray()
        self.queue = queue
        self.opts = opts
        self.name = f"{name}-{os.getpid()}"
        if not self.ray.is_initialized():
            kw = {"_node_ip_address": opts.node_ip_address} if opts.node_ip_address else {}
            self.ray.init(address=opts.address, ignore_reinit_error=True, log_to_driver=False, **kw)
        res = self.ray.cluster_resources()
        self.gpus = int(res.get("GPU", 0))
        cpus = int(res.get("CPU", 1))
        self.capacity = opts.max_in_flight or self.gpus or max(1, int(cpus // opts.cpus_per_task))
        env = {k: os.environ[k] for k in FORWARD_ENV if k in os.environ}
        self._task = self.ray.remote(convert_task).options(
            num_gpus=1 if self.gpus else 0, num_cpus=opts.cpus_per_task, max_retries=0,
            runtime_env={"env_vars": env} if env else None)
        self.in_flight: dict[Any, tuple[str, int]] = {}  # ObjectRef -> (job id, attempt)
        self._started: dict[Any, float] = {}  # ObjectRef -> monotonic start
        self._last_beat = 0.0

    def describe(self) -> str:
        kind = f"{self.gpus} GPU(s), one per task" if self.gpus else "no GPUs, CPU tasks"
        nodes = sorted({n.get("NodeManagerAddress", "?") for n in self.ray.nodes() if n.get("Alive", True)})
        return f"Ray cluster: {kind}; up to {self.capacity} task(s) at once; nodes {', '.join(nodes)}"

    def step(self, wait_s: float = 1.0) -> int:
        """Submit what fits, collect what finished (waiting up to wait_s). Returns jobs finished."""
        while len(self.in_flight) < self.capacity:
            job = self.queue.claim(self.name, lease_s=self.opts.lease_s)
            if job is None:
                break
            self.queue.log(job.id, f"submitted as a Ray task ({'1 GPU' if self.gpus else 'CPU'})", attempt=job.attempts)
            ref = self._task.remote(job.spec)
            self.in_flight[ref] = (job.id, job.attempts)
            self._started[ref] = time.monotonic()
        if not self.in_flight:
            time.sleep(wait_s)
            return 0
        self._expire()
        if not self.in_flight:
            return 0
        now = time.time()
        if now - self._last_beat > self.opts.lease_s / 3:
            for job_id, _ in self.in_flight.values():
                self.queue.heartbeat(job_id, self.name, lease_s=self.opts.lease_s)
            self._last_beat = now
        ready, _ = self.ray.wait(list(self.in_flight), num_returns=1, timeout=wait_s)
        for ref in ready:
            job_id, attempt = self.in_flight.pop(ref)
            self._started.pop(ref, None)
            try:
                out = self.ray.get(ref)
            except Exception as e:  # the task's worker died (OOM, node lost): retry like a lost lease
                out = {"ok": False, "error": f"Ray task lost: {type(e).__name__}: {e}", "retryable": True, "logs": []}
            for line in out.get("logs", []):
                self.queue.log(job_id, line, attempt=attempt)
            if out["ok"]:
                self.queue.complete(job_id, self.name, out["result"])
            else:
                self.queue.fail(job_id, self.name, out["error"], retryable=out["retryable"])
        return len(ready)

    def _expire(self) -> None:
        """Cancel tasks past the job's wall-clock limit and fail them as transient (retried with backoff)."""
        now = time.monotonic()
        for ref, t0 in list(self._started.items()):
            if now - t0 < self.opts.job_timeout_s:
                continue
            job_id, _ = self.in_flight.pop(ref)
            del self._started[ref]
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - the task may have ended meanwhile
                pass
            self.queue.fail(job_id, self.name, f"JobTimeout: no result after {self.opts.job_timeout_s:g} s "
                                               "(the job's wall-clock limit)", retryable=True)

    def run(self, stop: threading.Event) -> None:
        """Dispatch until `stop` is set."""
        sys.stderr.write(self.describe() + "\n")  # one write: print() sends the newline apart, so another
        sys.stderr.flush()  # thread's line could land between them
        while not stop.is_set():
            self.step(wait_s=self.opts.poll_s)

    def drain(self, timeout: float = 600.0) -> bool:
        """Run until no job is queued or running (for tests and one-shot use). True when drained."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.step(wait_s=0.5)
            if not self.in_flight and self.queue.counts()["queued"] == 0 and self.queue.counts()["running"] == 0:
                return True
        return False
