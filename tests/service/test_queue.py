"""The SQLite queue: idempotency, leases, retries with exponential backoff, the failed list, durability."""
from __future__ import annotations

import threading

import pytest

from hubquant.errors import NotFoundError, UsageError
from hubquant.service.queue import JobQueue, RetryPolicy


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def q(tmp_path, clock):
    return JobQueue(tmp_path / "q.db", retry=RetryPolicy(max_attempts=3, backoff_s=10, max_backoff_s=25), clock=clock)


def test_enqueue_is_idempotent_by_key(q):
    a, created_a = q.enqueue({"repo_id": "o/m"}, key="k1")
    b, created_b = q.enqueue({"repo_id": "o/m", "other": 1}, key="k1")
    c, created_c = q.enqueue({"repo_id": "o/n"}, key="k2")
    assert (created_a, created_b, created_c) == (True, False, True)
    assert a.id == b.id != c.id
    assert q.counts() == {"queued": 2, "running": 0, "done": 0, "failed": 0}


def test_claim_complete_and_done_key_not_requeued(q, clock):
    job, _ = q.enqueue({"x": 1}, key="k")
    got = q.claim("w1", lease_s=60)
    assert got.id == job.id and got.status == "running" and got.attempts == 1 and got.lease_owner == "w1"
    assert q.claim("w2") is None  # nothing else due
    clock.t += 12.5
    assert q.complete(job.id, "w1", {"target_repo": "a/b"}) is True
    done = q.get(job.id)
    assert done.status == "done" and done.result == {"target_repo": "a/b"} and done.finished == 1012.5
    again, created = q.enqueue({"x": 1}, key="k")
    assert not created and again.status == "done"
    assert q.counters()["duration_seconds_sum"] == pytest.approx(12.5)


def test_retry_backoff_doubles_then_caps_then_failed_list(q, clock):
    job, _ = q.enqueue({}, key="k")
    delays = []
    for attempt in (1, 2):
        got = q.claim("w")
        assert got.attempts == attempt
        assert q.fail(job.id, "w", f"boom {attempt}") == "queued"
        nb = q.get(job.id).not_before
        delays.append(nb - clock.t)
        assert q.claim("w") is None  # not due yet
        clock.t = nb
    assert delays == [10.0, 20.0]
    assert RetryPolicy(backoff_s=10, max_backoff_s=25).delay(3) == 25.0  # capped
    q.claim("w")
    assert q.fail(job.id, "w", "boom 3") == "failed"
    failed = q.list("failed")
    assert [j.id for j in failed] == [job.id] and failed[0].error == "boom 3" and failed[0].attempts == 3
    logs = [entry["line"] for entry in q.get(job.id).logs]
    assert "attempt 1 failed: boom 1" in logs and "retry in 20 s" in logs


def test_permanent_failure_skips_retries(q):
    job, _ = q.enqueue({}, key="k")
    q.claim("w")
    assert q.fail(job.id, "w", "UsageError: bad scheme", retryable=False) == "failed"
    assert q.get(job.id).attempts == 1
    # asking again with retry_failed gives the same job a fresh start
    again, created = q.enqueue({}, key="k", retry_failed=True)
    assert not created and again.id == job.id and again.status == "queued" and again.attempts == 0


def test_expired_lease_is_reclaimed_and_stale_worker_cannot_finish(q, clock):
    job, _ = q.enqueue({}, key="k")
    q.claim("dead", lease_s=30)
    clock.t += 29
    assert q.claim("alive", lease_s=30) is None  # lease still valid
    clock.t += 2
    got = q.claim("alive", lease_s=30)
    assert got.id == job.id and got.attempts == 2 and got.lease_owner == "alive"
    assert q.heartbeat(job.id, "dead") is False
    assert q.complete(job.id, "dead", {"r": 1}) is False
    assert q.fail(job.id, "dead", "late") is None
    assert q.complete(job.id, "alive", {"r": 2}) is True
    assert q.get(job.id).result == {"r": 2}
    assert q.counters()["lease_expired_total"] == 1


def test_heartbeat_keeps_the_lease(q, clock):
    job, _ = q.enqueue({}, key="k")
    q.claim("w", lease_s=30)
    for _ in range(5):
        clock.t += 20
        assert q.heartbeat(job.id, "w", lease_s=30)
        assert q.claim("other", lease_s=30) is None


def test_lost_lease_on_last_attempt_ends_in_failed_list(q, clock):
    job, _ = q.enqueue({}, key="k")
    for _ in range(3):
        assert q.claim("w", lease_s=10) is not None
        clock.t += 11
    assert q.claim("w") is None
    j = q.get(job.id)
    assert j.status == "failed" and "lease expired" in j.error and j.attempts == 3


def test_jobs_survive_reopening_and_retry_policy_is_shared(tmp_path, clock):
    path = tmp_path / "q.db"
    q1 = JobQueue(path, retry=RetryPolicy(max_attempts=5, backoff_s=7), clock=clock)
    job, _ = q1.enqueue({"repo_id": "o/m"}, key="k")
    q1.claim("w", lease_s=10)
    q1.close()
    q2 = JobQueue(path, clock=clock)  # e.g. a worker process: reads the service's policy
    assert q2.retry == RetryPolicy(max_attempts=5, backoff_s=7)
    j = q2.get(job.id)
    assert j.status == "running" and j.spec == {"repo_id": "o/m"} and j.max_attempts == 5
    clock.t += 11
    assert q2.claim("w2").id == job.id


def test_concurrent_claims_never_hand_out_a_job_twice(tmp_path):
    path = tmp_path / "q.db"
    q = JobQueue(path)
    for i in range(60):
        q.enqueue({"i": i}, key=f"k{i}")
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(name):
        mine = JobQueue(path)
        while (job := mine.claim(name)) is not None:
            with lock:
                claimed.append(job.id)
            mine.complete(job.id, name, {})

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == 60 and len(set(claimed)) == 60
    assert q.counts()["done"] == 60


def test_deliveries_and_errors(q):
    dup, jobs = q.accept_delivery("d1", [({"n": 1}, "k1"), ({"n": 2}, "k2")])
    assert dup is False and [created for _, created in jobs] == [True, True]
    assert q.accept_delivery("d1", [({"n": 3}, "k3")]) == (True, [j.id for j, _ in jobs])
    assert q.counts()["queued"] == 2
    with pytest.raises(NotFoundError):
        q.get("nope")
    with pytest.raises(UsageError):
        q.list("weird")
