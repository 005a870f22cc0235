"""A durable job queue in SQLite: jobs survive restarts, run at least once, and are idempotent.

Life of a job::

    queued --claim--> running --complete--> done
                        |  \\--fail (retryable, attempts left)--> queued (not before now + backoff)
                        |   \\-fail (final)--> failed (reason kept)
                        \\--lease expires (worker died)--> claimable again (attempt counted)

- Idempotency: every job has a `key` (base repo + sha + method + settings). Enqueueing a key that is
  already queued, running or done returns that job instead of adding another.
- At least once: a claim takes a lease (`lease_s`); a worker renews it with `heartbeat`. A worker that
  dies (SIGKILL, OOM, lost machine) stops renewing, and the job is handed to the next claimant. Only the
  lease holder can complete or fail a job, so a stale worker cannot overwrite a newer attempt.
- Retries: exponential backoff `backoff_s * 2**(attempt-1)` capped at `max_backoff_s`; after
  `max_attempts` the job lands in the failed list with its reason.

Every write is one short transaction (`BEGIN IMMEDIATE`), so several processes (HTTP app, worker
processes, the Ray dispatcher) can share one database file; WAL mode lets readers run alongside.
A webhook delivery is recorded in the same transaction that queues its jobs (`accept_delivery`), so a crash
leaves either both or neither; deliveries older than `delivery_retention_s` are pruned as new ones arrive.
The database is created 0600 (a folder the queue creates, 0700).
"""
from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hubquant.errors import NotFoundError, UsageError

STATUSES = ("queued", "running", "done", "failed")
QUEUE_SCHEMA_VERSION = 1
MAX_PAGE = 500  # jobs per listing page at most
DELIVERY_RETENTION_S = 7 * 24 * 3600
# fault-injection hooks for tests: seconds to sleep inside a delivery's transaction (after its first job is
# queued) and inside a listing
FAILPOINT_DELIVERY_ENV = "HUBQUANT_QUEUE_FAILPOINT_DELIVERY_SLEEP"
FAILPOINT_LIST_ENV = "HUBQUANT_QUEUE_FAILPOINT_LIST_SLEEP"


def _failpoint(env: str, what: str) -> None:
    delay = float(os.environ.get(env, "0") or 0)
    if delay > 0:
        print(f"failpoint: {what} sleeps {delay:g} s", file=sys.stderr, flush=True)
        time.sleep(delay)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id            TEXT PRIMARY KEY,
    key           TEXT NOT NULL,
    spec          TEXT NOT NULL,
    status        TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    max_attempts  INTEGER NOT NULL,
    not_before    REAL NOT NULL DEFAULT 0,
    lease_owner   TEXT,
    lease_expires REAL,
    created       REAL NOT NULL,
    started       REAL,
    finished      REAL,
    result        TEXT,
    error         TEXT,
    source        TEXT
);
CREATE INDEX IF NOT EXISTS jobs_key ON jobs(key);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, not_before);
CREATE TABLE IF NOT EXISTS logs (
    job_id  TEXT NOT NULL,
    ts      REAL NOT NULL,
    attempt INTEGER NOT NULL,
    line    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_job ON logs(job_id, ts);
CREATE TABLE IF NOT EXISTS deliveries (
    id       TEXT PRIMARY KEY,
    received REAL NOT NULL,
    job_ids  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often and how soon a failed job is tried again."""

    max_attempts: int = 3
    backoff_s: float = 30.0
    max_backoff_s: float = 3600.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** max(0, attempt - 1))


@dataclass(frozen=True, kw_only=True)
class Job:
    """One row of the queue, as read at one moment."""

    id: str
    key: str
    spec: dict[str, Any]
    status: str
    attempts: int
    max_attempts: int
    not_before: float
    lease_owner: str | None
    lease_expires: float | None
    created: float
    started: float | None
    finished: float | None
    result: dict[str, Any] | None
    error: str | None
    source: str | None
    logs: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self, *, with_logs: bool = False) -> dict[str, Any]:
        d = {
            "id": self.id, "key": self.key, "spec": self.spec, "status": self.status,
            "attempts": self.attempts, "max_attempts": self.max_attempts, "not_before": self.not_before,
            "lease_owner": self.lease_owner, "lease_expires": self.lease_expires, "created": self.created,
            "started": self.started, "finished": self.finished, "result": self.result, "error": self.error,
            "source": self.source,
        }
        if with_logs:
            d["logs"] = self.logs
        return d


def _row_to_job(row: sqlite3.Row, logs: list[dict] | None = None) -> Job:
    return Job(
        id=row["id"], key=row["key"], spec=json.loads(row["spec"]), status=row["status"],
        attempts=row["attempts"], max_attempts=row["max_attempts"], not_before=row["not_before"],
        lease_owner=row["lease_owner"], lease_expires=row["lease_expires"], created=row["created"],
        started=row["started"], finished=row["finished"],
        result=json.loads(row["result"]) if row["result"] else None, error=row["error"], source=row["source"],
        logs=logs or [],
    )


class JobQueue:
    """The SQLite-backed queue. Safe to share between threads and processes (one connection per thread).

    Args:
        path: the database file (created with its folder if missing).
        retry: the retry policy for jobs enqueued through this handle.
        clock: a time source (tests pass a fake one).
    """

    def __init__(self, path: str | Path, *, retry: RetryPolicy | None = None, clock=time.time,
                 delivery_retention_s: float = DELIVERY_RETENTION_S):
        self.path = Path(path)
        if not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, mode=0o700)
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))  # private before SQLite writes to it
        os.chmod(self.path, 0o600)
        self.clock = clock
        self.delivery_retention_s = delivery_retention_s
        self._local = threading.local()
        db = self._conn()
        db.executescript(_SCHEMA)  # idempotent (IF NOT EXISTS); executescript commits on its own
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO meta(name, value) VALUES ('schema_version', ?)",
                       (str(QUEUE_SCHEMA_VERSION),))
            if retry is not None:  # the service's policy, so that every worker process uses it
                db.execute("INSERT OR REPLACE INTO meta(name, value) VALUES ('retry', ?)",
                           (json.dumps(asdict(retry)),))
            else:
                row = db.execute("SELECT value FROM meta WHERE name='retry'").fetchone()
                retry = RetryPolicy(**json.loads(row["value"])) if row else RetryPolicy()
        self.retry = retry

    # -- plumbing -----------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- writes -------------------------------------------------------------------------------
    def enqueue(self, spec: dict[str, Any], *, key: str, source: str = "api",
                retry_failed: bool = False) -> tuple[Job, bool]:
        """Add a job unless one with the same key is already queued, running or done.

        Args:
            spec: JSON-serialisable job description (see hubquant.service.jobs.JobSpec.to_dict).
            key: the idempotency key.
            source: where the job came from ("webhook", "api", "watch"), for status pages.
            retry_failed: a failed job with this key is queued again (attempts reset) instead of returned.

        Returns:
            (job, created): created is False when an existing job was returned or re-queued.
        """
        with self._tx() as db:
            return self._enqueue(db, spec, key=key, source=source, retry_failed=retry_failed)

    def _enqueue(self, db: sqlite3.Connection, spec: dict[str, Any], *, key: str, source: str,
                 retry_failed: bool = False) -> tuple[Job, bool]:
        now = self.clock()
        row = db.execute("SELECT * FROM jobs WHERE key = ? ORDER BY created DESC LIMIT 1", (key,)).fetchone()
        if row is not None and (row["status"] != "failed" or not retry_failed):
            return _row_to_job(row), False
        if row is not None:  # failed, and asked to retry: same job id, fresh attempts
            db.execute("UPDATE jobs SET status='queued', attempts=0, not_before=?, error=NULL, "
                       "lease_owner=NULL, lease_expires=NULL, finished=NULL WHERE id=?", (now, row["id"]))
            job_id, created = row["id"], False
        else:
            job_id, created = uuid.uuid4().hex[:16], True
            db.execute(
                "INSERT INTO jobs(id, key, spec, status, max_attempts, not_before, created, source) "
                "VALUES (?, ?, ?, 'queued', ?, ?, ?, ?)",
                (job_id, key, json.dumps(spec, sort_keys=True), self.retry.max_attempts, now, now, source))
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _row_to_job(row), created

    def claim(self, worker: str, *, lease_s: float = 300.0) -> Job | None:
        """Take the oldest runnable job (queued and due, or running with an expired lease).

        The claim counts as an attempt. A job whose lease expired with no attempts left is marked failed.
        """
        now = self.clock()
        with self._tx() as db:
            expired = db.execute(
                "SELECT id, attempts, max_attempts FROM jobs WHERE status='running' AND lease_expires < ?",
                (now,)).fetchall()
            for r in expired:
                self._bump(db, "lease_expired_total")
                if r["attempts"] >= r["max_attempts"]:
                    db.execute("UPDATE jobs SET status='failed', finished=?, lease_owner=NULL, "
                               "error=COALESCE(error, '') || ? WHERE id=?",
                               (now, f"worker lost (lease expired) on attempt {r['attempts']}, no attempts left",
                                r["id"]))
                    self._bump(db, "failed_total")
            row = db.execute(
                "SELECT * FROM jobs WHERE (status='queued' AND not_before <= ?) "
                "OR (status='running' AND lease_expires < ?) ORDER BY not_before, created LIMIT 1",
                (now, now)).fetchone()
            if row is None:
                return None
            if row["status"] == "running":
                self._log(db, row["id"], row["attempts"], f"lease of {row['lease_owner']} expired; job reclaimed")
                self._bump(db, "retries_total")
            db.execute(
                "UPDATE jobs SET status='running', attempts=attempts+1, lease_owner=?, lease_expires=?, "
                "started=? WHERE id=?", (worker, now + lease_s, now, row["id"]))
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
            self._log(db, row["id"], row["attempts"], f"claimed by {worker} (attempt {row['attempts']})")
        return _row_to_job(row)

    def heartbeat(self, job_id: str, worker: str, *, lease_s: float = 300.0) -> bool:
        """Extend the lease; False when this worker no longer holds the job (it should stop)."""
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET lease_expires=? WHERE id=? AND status='running' AND lease_owner=?",
                             (self.clock() + lease_s, job_id, worker))
            return cur.rowcount == 1

    def complete(self, job_id: str, worker: str, result: dict[str, Any]) -> bool:
        """Mark done with its result; False (and no change) if the lease was lost meanwhile."""
        now = self.clock()
        with self._tx() as db:
            row = db.execute("SELECT started FROM jobs WHERE id=? AND status='running' AND lease_owner=?",
                             (job_id, worker)).fetchone()
            if row is None:
                return False
            db.execute("UPDATE jobs SET status='done', finished=?, result=?, lease_owner=NULL, lease_expires=NULL, "
                       "error=NULL WHERE id=?", (now, json.dumps(result, default=str), job_id))
            self._bump(db, "done_total")
            self._bump(db, "duration_seconds_sum", now - (row["started"] or now))
            self._bump(db, "duration_seconds_count")
        return True

    def fail(self, job_id: str, worker: str, reason: str, *, retryable: bool = True) -> str | None:
        """Record a failed attempt. Returns the new status ('queued' for a retry, 'failed'), None if not held."""
        now = self.clock()
        with self._tx() as db:
            row = db.execute("SELECT attempts, max_attempts FROM jobs WHERE id=? AND status='running' "
                             "AND lease_owner=?", (job_id, worker)).fetchone()
            if row is None:
                return None
            self._log(db, job_id, row["attempts"], f"attempt {row['attempts']} failed: {reason}")
            if retryable and row["attempts"] < row["max_attempts"]:
                delay = self.retry.delay(row["attempts"])
                db.execute("UPDATE jobs SET status='queued', not_before=?, error=?, lease_owner=NULL, "
                           "lease_expires=NULL WHERE id=?", (now + delay, reason, job_id))
                self._bump(db, "retries_total")
                self._log(db, job_id, row["attempts"], f"retry in {delay:.0f} s")
                return "queued"
            db.execute("UPDATE jobs SET status='failed', finished=?, error=?, lease_owner=NULL, "
                       "lease_expires=NULL WHERE id=?", (now, reason, job_id))
            self._bump(db, "failed_total")
            return "failed"

    def log(self, job_id: str, line: str, *, attempt: int = 0) -> None:
        """Append one log line to a job."""
        with self._tx() as db:
            self._log(db, job_id, attempt, line)

    def accept_delivery(self, delivery_id: str, jobs: list[tuple[dict[str, Any], str]], *,
                        source: str = "webhook") -> tuple[bool, list[tuple[Job, bool]] | list[str]]:
        """Record a webhook delivery and queue its jobs ((spec, key) pairs) in ONE transaction.

        Returns:
            (True, job ids of the earlier delivery) for a duplicate, else (False, [(job, created), ...]).
        """
        with self._tx() as db:
            row = db.execute("SELECT job_ids FROM deliveries WHERE id=?", (delivery_id,)).fetchone()
            if row is not None:
                return True, json.loads(row["job_ids"])
            out = []
            for spec, key in jobs:
                out.append(self._enqueue(db, spec, key=key, source=source))
                if len(out) == 1:
                    _failpoint(FAILPOINT_DELIVERY_ENV, f"delivery {delivery_id}")
            now = self.clock()
            db.execute("INSERT INTO deliveries(id, received, job_ids) VALUES (?, ?, ?)",
                       (delivery_id, now, json.dumps([j.id for j, _ in out])))
            db.execute("DELETE FROM deliveries WHERE received < ?", (now - self.delivery_retention_s,))
            return False, out

    def deliveries(self) -> int:
        """How many webhook deliveries are remembered."""
        return self._conn().execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]

    def bump(self, name: str, by: float = 1.0) -> None:
        """Add to a named counter (exported by /metrics)."""
        with self._tx() as db:
            self._bump(db, name, by)

    @staticmethod
    def _bump(db: sqlite3.Connection, name: str, by: float = 1.0) -> None:
        db.execute("INSERT INTO counters(name, value) VALUES (?, ?) "
                   "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (name, by))

    def _log(self, db: sqlite3.Connection, job_id: str, attempt: int, line: str) -> None:
        db.execute("INSERT INTO logs(job_id, ts, attempt, line) VALUES (?, ?, ?, ?)",
                   (job_id, self.clock(), attempt, line[:4000]))

    # -- reads --------------------------------------------------------------------------------
    def get(self, job_id: str, *, with_logs: bool = True) -> Job:
        """One job (with its logs). Raises NotFoundError for an unknown id."""
        db = self._conn()
        row = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no job '{job_id}'", hint="list jobs with GET /jobs")
        logs = []
        if with_logs:
            logs = [dict(ts=r["ts"], attempt=r["attempt"], line=r["line"]) for r in
                    db.execute("SELECT ts, attempt, line FROM logs WHERE job_id=? ORDER BY rowid", (job_id,))]
        return _row_to_job(row, logs)

    def list(self, status: str | None = None, *, limit: int = 100, cursor: str | None = None) -> list[Job]:
        """Jobs, newest first, optionally only one status; at most MAX_PAGE (see `page`)."""
        return self.page(status, limit=limit, cursor=cursor)[0]

    def page(self, status: str | None = None, *, limit: int = 100,
             cursor: str | None = None) -> tuple[list[Job], str | None]:
        """One page of jobs, newest first: (jobs, cursor of the next page or None).

        Raises:
            UsageError: an unknown status, a limit below 1, or a malformed cursor.
        """
        if status is not None and status not in STATUSES:
            raise UsageError(f"unknown status '{status}'", hint=f"use one of: {', '.join(STATUSES)}")
        if limit < 1:
            raise UsageError("limit must be at least 1", hint=f"use 1 to {MAX_PAGE}")
        limit = min(limit, MAX_PAGE)
        where, args = [], []
        if status:
            where.append("status=?")
            args.append(status)
        if cursor:
            try:
                created, job_id = cursor.split("~", 1)
                created_f = float(created)
            except ValueError:
                raise UsageError("malformed cursor", hint="pass the 'next' value of the previous page") from None
            where.append("(created < ? OR (created = ? AND id < ?))")
            args += [created_f, created_f, job_id]
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        rows = self._conn().execute(sql + " ORDER BY created DESC, id DESC LIMIT ?", (*args, limit + 1)).fetchall()
        _failpoint(FAILPOINT_LIST_ENV, "job listing")
        jobs = [_row_to_job(r) for r in rows[:limit]]
        nxt = f"{jobs[-1].created!r}~{jobs[-1].id}" if len(rows) > limit else None
        return jobs, nxt

    def counts(self) -> dict[str, int]:
        """Number of jobs per status (every status present, 0 when none)."""
        out = dict.fromkeys(STATUSES, 0)
        for r in self._conn().execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status"):
            out[r["status"]] = r["n"]
        return out

    def counters(self) -> dict[str, float]:
        return {r["name"]: r["value"] for r in self._conn().execute("SELECT name, value FROM counters")}

    def pending(self) -> int:
        """Jobs that are queued or running (what a drain waits for)."""
        c = self.counts()
        return c["queued"] + c["running"]
