"""Workers that drain the queue: one loop per process, and a pool that keeps N such processes alive.

Each worker is its own process (`python -m hubquant.service.workers --db PATH --id NAME`), so a crash,
an OOM kill or a SIGKILL takes down one job attempt and nothing else: the job's lease runs out and the
next worker claims it again. With CUDA present the pool starts one worker per GPU and pins each to its
card (CUDA_VISIBLE_DEVICES), so a conversion never shares a GPU.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hubquant.service.jobs import describe_error, is_retryable, run_job
from hubquant.service.queue import JobQueue


@dataclass(frozen=True, kw_only=True)
class WorkerOptions:
    """How a worker claims and holds jobs."""

    lease_s: float = 120.0
    poll_s: float = 1.0
    claim_delay_s: float = 0.0  # pause after a claim before working (chaos tests kill a worker here)
    job_timeout_s: float = 6 * 3600.0  # wall-clock limit of one attempt; then it is failed and retried
    version: int = 2


JOB_SLEEP_ENV = "HUBQUANT_SERVICE_FAILPOINT_JOB_SLEEP"  # test hook: a job hangs this many seconds first


class JobTimeout(TimeoutError):
    """An attempt ran past the job's wall-clock limit (transient: the job is retried)."""


def visible_gpus() -> list[str]:
    """Ids of the CUDA GPUs this process may use ([] without CUDA): CUDA_VISIBLE_DEVICES when set, else
    nvidia-smi's list. The parent never initialises CUDA itself (each worker does, on its own card)."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        ids = [v.strip() for v in vis.split(",")]
        out = []
        for v in ids:  # CUDA stops at the first invalid entry
            if v in ("", "-1"):
                break
            out.append(v)
        return out
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        if out.returncode == 0:
            listed = [ln for ln in out.stdout.splitlines() if ln.startswith("GPU ")]
            return [str(i) for i in range(len(listed))]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return []


def gpu_count() -> int:
    """Number of visible CUDA GPUs (0 without CUDA)."""
    return len(visible_gpus())


def default_workers() -> int:
    """One worker per GPU, else one (a conversion already uses every CPU core)."""
    return max(1, gpu_count())


def work_one(queue: JobQueue, worker: str, opts: WorkerOptions = WorkerOptions(),
             runner: Callable[..., dict] = run_job, on_timeout: Callable[[str], None] | None = None) -> str | None:
    """Claim and run at most one job. Returns the job id, or None when nothing was due.

    The heartbeat renews the job's lease until the attempt's wall-clock limit (`opts.job_timeout_s`); past
    it, the attempt is failed as JobTimeout (retried with backoff like any transient error) and the lease is
    no longer renewed, so a hung attempt cannot hold its job. `on_timeout(job_id)` then runs (a worker process
    exits, so the pool replaces it and the hung work stops with it).
    """
    job = queue.claim(worker, lease_s=opts.lease_s)
    if job is None:
        return None
    stop = threading.Event()
    deadline = time.monotonic() + opts.job_timeout_s

    def beat():
        while not stop.wait(max(0.05, min(opts.lease_s / 3, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                err = JobTimeout(f"no result after {opts.job_timeout_s:g} s (the job's wall-clock limit)")
                status = queue.fail(job.id, worker, describe_error(err), retryable=is_retryable(err))
                print(f"[{worker}] job {job.id} timed out ({status})", file=sys.stderr, flush=True)
                if on_timeout is not None:
                    on_timeout(job.id)
                return
            if not queue.heartbeat(job.id, worker, lease_s=opts.lease_s):
                return

    hb = threading.Thread(target=beat, name=f"heartbeat-{job.id}", daemon=True)
    hb.start()
    try:
        if opts.claim_delay_s:
            queue.log(job.id, f"{worker}: waiting {opts.claim_delay_s:.0f} s before starting", attempt=job.attempts)
            time.sleep(opts.claim_delay_s)
        hang = float(os.environ.get(JOB_SLEEP_ENV, "0") or 0)
        if hang > 0:
            queue.log(job.id, f"failpoint: sleeping {hang:g} s", attempt=job.attempts)
            time.sleep(hang)

        def log(line: str) -> None:
            queue.log(job.id, str(line), attempt=job.attempts)

        try:
            result = runner(job.spec, log=log)
        except Exception as e:  # every failure is recorded on the job; the worker lives on
            status = queue.fail(job.id, worker, describe_error(e), retryable=is_retryable(e))
            print(f"[{worker}] job {job.id} failed ({status}): {describe_error(e)}", file=sys.stderr, flush=True)
        else:
            if not queue.complete(job.id, worker, result):
                print(f"[{worker}] job {job.id}: lease lost before completion; result dropped",
                      file=sys.stderr, flush=True)
    finally:
        stop.set()
    return job.id


def worker_loop(db: str | Path, worker: str, opts: WorkerOptions = WorkerOptions(), *,
                stop: threading.Event | None = None, max_jobs: int | None = None,
                exit_when_idle: bool = False, on_timeout: Callable[[str], None] | None = None) -> int:
    """Run jobs until `stop` is set (or `max_jobs` ran, or the queue is idle with exit_when_idle)."""
    queue = JobQueue(db)
    stop = stop or threading.Event()
    done = 0
    while not stop.is_set():
        job_id = work_one(queue, worker, opts, on_timeout=on_timeout)
        if job_id is None:
            if exit_when_idle and queue.pending() == 0:
                break
            stop.wait(opts.poll_s)
            continue
        done += 1
        if max_jobs is not None and done >= max_jobs:
            break
    queue.close()
    return done


class WorkerPool:
    """Keeps `n` worker processes running against one queue database; restarts any that die.

    Args:
        db: the queue database.
        n: number of workers (None: one per GPU, else one).
        opts: worker options passed to each process.
        env: extra environment for the workers (HF_ENDPOINT, HF_TOKEN are inherited anyway).
    """

    def __init__(self, db: str | Path, n: int | None = None, opts: WorkerOptions = WorkerOptions(),
                 env: dict[str, str] | None = None, log_dir: str | Path | None = None):
        self.db = str(db)
        self.gpu_ids = visible_gpus()
        self.gpus = len(self.gpu_ids)
        self.n = n or max(1, self.gpus)
        self.opts = opts
        self.env = env or {}
        self.log_dir = Path(log_dir) if log_dir else None
        self.procs: dict[int, subprocess.Popen] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.restarts = 0

    def command(self, idx: int) -> tuple[list[str], dict[str, str]]:
        """The command line and environment of worker `idx` (pinned to GPU idx % gpus when there are GPUs)."""
        name = f"{socket.gethostname()}-w{idx}"
        env = {**os.environ, **self.env}
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu_ids[idx % self.gpus]
        cmd = [sys.executable, "-m", "hubquant.service.workers", "--db", self.db, "--id", name,
               "--lease", str(self.opts.lease_s), "--poll", str(self.opts.poll_s),
               "--job-timeout", str(self.opts.job_timeout_s), "--die-with-parent"]
        return cmd, env

    def _spawn(self, idx: int) -> subprocess.Popen:
        cmd, env = self.command(idx)
        out = None
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"worker-{idx}.log", "ab")  # noqa: SIM115 (the child keeps it)
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
        if out:
            out.close()
        self.procs[idx] = proc
        return proc

    def start(self) -> WorkerPool:
        for i in range(self.n):
            self._spawn(i)
        self._thread = threading.Thread(target=self._supervise, name="worker-pool", daemon=True)
        self._thread.start()
        return self

    def _supervise(self) -> None:
        while not self._stop.wait(1.0):
            for idx, proc in list(self.procs.items()):
                if proc.poll() is not None and not self._stop.is_set():
                    print(f"worker {idx} exited with {proc.returncode}; restarting", file=sys.stderr, flush=True)
                    self.restarts += 1
                    self._spawn(idx)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every worker (a running job finishes its current step or is retried after its lease)."""
        self._stop.set()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.time() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _die_with_parent() -> None:
    """Linux: have the kernel send SIGTERM when the parent (the service) dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the parent was already gone before the call
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hubquant.service.workers", description="one queue worker")
    p.add_argument("--db", required=True)
    p.add_argument("--id", default=f"{socket.gethostname()}-{os.getpid()}")
    p.add_argument("--lease", type=float, default=WorkerOptions.lease_s)
    p.add_argument("--poll", type=float, default=WorkerOptions.poll_s)
    p.add_argument("--claim-delay", type=float, default=0.0)
    p.add_argument("--job-timeout", type=float, default=WorkerOptions.job_timeout_s,
                   help="wall-clock limit of one attempt in seconds; then it is failed, retried, and this worker "
                        "exits (its pool starts a fresh one)")
    p.add_argument("--max-jobs", type=int, default=None)
    p.add_argument("--exit-when-idle", action="store_true")
    p.add_argument("--die-with-parent", action="store_true", help="SIGTERM this worker when its parent dies")
    a = p.parse_args(argv)
    if a.die_with_parent:
        _die_with_parent()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    opts = WorkerOptions(lease_s=a.lease, poll_s=a.poll, claim_delay_s=a.claim_delay, job_timeout_s=a.job_timeout)

    def exit_hung(job_id: str) -> None:  # the hung attempt cannot be interrupted from here: end the process
        print(f"[{a.id}] exiting: job {job_id} ran past its limit", file=sys.stderr, flush=True)
        os._exit(75)

    worker_loop(a.db, a.id, opts, stop=stop, max_jobs=a.max_jobs, exit_when_idle=a.exit_when_idle,
                on_timeout=exit_hung)
    return 0


if __name__ == "__main__":
    sys.exit(main())
