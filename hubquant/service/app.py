"""The conversion service's HTTP face (Starlette): Hub webhooks in, jobs out, status and metrics.

Routes:
    POST /webhook      a Hub webhook (X-Webhook-Secret checked in constant time); new releases -> jobs
    POST /jobs         submit one job by hand (Authorization: Bearer <HUBQUANT_SERVICE_TOKEN>)
    GET  /jobs         jobs as JSON, newest first (?status=queued|running|done|failed&limit=N&cursor=C);
                       at most 500 per page, `next` is the cursor of the following page
    GET  /jobs/{id}    one job with its logs
    GET  /metrics      Prometheus text: queue depth, job counts, durations, retries, failures, deliveries
    GET  /healthz      liveness (no data)

Reads need `Authorization: Bearer <token>` with HUBQUANT_SERVICE_TOKEN or the read-only
HUBQUANT_SERVICE_READ_TOKEN (for Prometheus: see docs/security.md). Status codes of /webhook: 401 no
secret sent, 403 wrong secret, 400 malformed payload (nothing recorded), 413 body over 1 MiB, 503 no secret
configured on the server, 200 a duplicate delivery (the earlier jobs are returned), 202 accepted (the
delivery and its jobs recorded in one transaction, or the event ignored with a reason). Every SQLite call
runs in a worker thread, never on the event loop.
"""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import hmac
import json
import os
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from hubquant.errors import HubquantError, NotFoundError, UsageError
from hubquant.localhub.serving import BodyGuard
from hubquant.service.jobs import JobSpec, check_options
from hubquant.service.queue import MAX_PAGE, STATUSES, JobQueue

SECRET_ENV = "HUBQUANT_WEBHOOK_SECRET"
TOKEN_ENV = "HUBQUANT_SERVICE_TOKEN"
READ_TOKEN_ENV = "HUBQUANT_SERVICE_READ_TOKEN"
WEBHOOK_MAX_BYTES = 1 << 20
JOBS_MAX_BYTES = 64 << 10
DELIVERY_HEADERS = ("x-webhook-delivery", "x-request-id", "x-amzn-trace-id")


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    """What the service converts and who may ask.

    Attributes:
        methods, schemes: every new release gets one job per (method, scheme).
        namespace: where variants go (None: the token's user).
        private: create variant repos private.
        max_ppl_increase: quality gate in percent (None: none).
        authors, models: fnmatch patterns a webhook's repo must match (both empty: any model).
        options: extra ConvertOptions fields for every job.
        webhook_secret: the shared secret (default: $HUBQUANT_WEBHOOK_SECRET).
        api_token: the bearer token for POST /jobs and reads (default: $HUBQUANT_SERVICE_TOKEN).
        read_token: a bearer token for reads only: GET /jobs, /jobs/{id}, /metrics
            (default: $HUBQUANT_SERVICE_READ_TOKEN).
        workers: how many workers run jobs (reported by /metrics).
    """

    methods: tuple[str, ...] = ("rtn",)
    schemes: tuple[str, ...] = ("default",)
    namespace: str | None = None
    private: bool = False
    max_ppl_increase: float | None = None
    authors: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    options: dict | None = None
    webhook_secret: str | None = None
    api_token: str | None = None
    read_token: str | None = None
    workers: int = 1
    version: int = 1

    @classmethod
    def from_env(cls, **kw) -> ServiceConfig:
        kw.setdefault("webhook_secret", os.environ.get(SECRET_ENV) or None)
        kw.setdefault("api_token", os.environ.get(TOKEN_ENV) or None)
        kw.setdefault("read_token", os.environ.get(READ_TOKEN_ENV) or None)
        return cls(**kw)

    def watches(self, repo_id: str) -> bool:
        if not self.authors and not self.models:
            return True
        owner = repo_id.split("/", 1)[0]
        return (any(fnmatch.fnmatchcase(owner, a) for a in self.authors)
                or any(fnmatch.fnmatchcase(repo_id, m) for m in self.models))

    def specs_for(self, repo_id: str, sha: str | None) -> list[JobSpec]:
        """One job per (method, scheme). Raises UsageError for a repo id or sha JobSpec refuses."""
        return [JobSpec(repo_id=repo_id, revision=sha, method=m, scheme=s, namespace=self.namespace,
                        private=self.private, max_ppl_increase=self.max_ppl_increase,
                        options=dict(self.options or {}))
                for m in self.methods for s in self.schemes]


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _bearer(request: Request, *tokens: str | None) -> JSONResponse | None:
    """None when the request carries one of `tokens` as its bearer token, else the error answer."""
    tokens = tuple(t for t in tokens if t)
    if not tokens:
        return _error(403, "this route is disabled: no token is configured",
                      hint=f"set {TOKEN_ENV} (or {READ_TOKEN_ENV} for reads) and restart the service")
    auth = request.headers.get("authorization", "")
    if not auth.lower().startswith("bearer "):
        return _error(401, "missing bearer token", hint=f"send Authorization: Bearer ${TOKEN_ENV}")
    given = auth[7:].strip()
    if not any([_same(given, t) for t in tokens]):  # every comparison runs: no early exit to time
        return _error(403, "wrong token", hint=f"use the value of {TOKEN_ENV} or {READ_TOKEN_ENV}")
    return None


def _body_limit(scope: dict) -> int:
    return WEBHOOK_MAX_BYTES if scope.get("path") == "/webhook" else JOBS_MAX_BYTES


def _error(status: int, message: str, hint: str | None = None) -> JSONResponse:
    body = {"error": message}
    if hint:
        body["hint"] = hint
    return JSONResponse(body, status_code=status)


def release_sha(raw: dict, payload) -> tuple[bool, str | None, str]:
    """Is this event a new release of a model, and at which sha? Returns (is_release, sha, reason)."""
    if payload.repo.type != "model":
        return False, None, f"not a model repo ({payload.repo.type})"
    scope, action = payload.event.scope, payload.event.action
    head = (raw.get("repo") or {}).get("headSha") or payload.repo.head_sha
    if scope == "repo" and action == "create":
        return True, head, "repo created"
    if scope == "repo.content" and action in ("create", "update"):
        for ref in payload.updatedRefs or []:
            if ref.ref in ("refs/heads/main", "main") and ref.newSha:
                return True, ref.newSha, "new commit on main"
        return False, None, "no new commit on main"
    return False, None, f"event {scope}/{action} is not a release"


def _resolve_sha(repo_id: str) -> str:
    from hubquant.hub.client import api, hub_errors

    with hub_errors(repo_id):
        return api().model_info(repo_id).sha


def _parse_webhook(body: bytes):
    """(raw dict, WebhookPayload) of a Hub webhook body. Raises ValueError for anything else."""
    from huggingface_hub import WebhookPayload
    from pydantic import ValidationError

    try:
        raw = json.loads(body)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None
    if not isinstance(raw, dict):
        raise ValueError("the payload is not a JSON object")
    try:
        payload = WebhookPayload.model_validate(raw)
    except ValidationError as e:
        raise ValueError(f"not a Hub webhook payload: {e.error_count()} field error(s), first: "
                         f"{'.'.join(map(str, e.errors()[0]['loc']))}: {e.errors()[0]['msg']}") from e
    except RecursionError:
        raise ValueError("the payload is nested too deeply") from None
    return raw, payload


class _Routes:
    """The service's handlers over one queue and config."""

    def __init__(self, queue: JobQueue, config: ServiceConfig, resolve_sha):
        self.queue, self.config, self.resolve_sha = queue, config, resolve_sha

    def db(self, fn, *args, **kw):  # SQLite work runs in a worker thread, never on the event loop
        return run_in_threadpool(fn, *args, **kw)

    async def webhook(self, request: Request):
        if not self.config.webhook_secret:
            return _error(503, "the webhook is not configured", hint=f"set {SECRET_ENV} and restart the service")
        given = request.headers.get("x-webhook-secret")
        if given is None:
            await self.db(self.queue.bump, "webhook_unauthorized_total")
            return _error(401, "missing X-Webhook-Secret header", hint="set the webhook's secret on the Hub")
        if not _same(given, self.config.webhook_secret):
            await self.db(self.queue.bump, "webhook_forbidden_total")
            return _error(403, "wrong webhook secret", hint=f"use the value of {SECRET_ENV} as the webhook secret")
        body = await request.body()
        try:
            raw, payload = _parse_webhook(body)
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            await self.db(self.queue.bump, "webhook_malformed_total")
            return _error(400, f"malformed payload: {e}", hint="send the Hub's webhook payload (version 3)")
        delivery = next((request.headers[h] for h in DELIVERY_HEADERS if h in request.headers), None)
        delivery = (delivery or "sha256:" + hashlib.sha256(body).hexdigest())[:200]
        repo_id = payload.repo.name
        is_release, sha, reason = release_sha(raw, payload)
        if is_release and "hubquant" in (payload.repo.tags or []):
            is_release, reason = False, "a hubquant variant (tag hubquant)"
        if is_release and not self.config.watches(repo_id):
            is_release, reason = False, f"{repo_id} is outside the watched authors/models"
        if not is_release:
            await self.db(self.queue.bump, "webhook_ignored_total")
            return JSONResponse({"accepted": False, "reason": reason, "repo": repo_id, "jobs": []}, status_code=202)
        try:
            self.config.specs_for(repo_id, sha or "0" * 40)  # a bad repo id or sha: 400 before anything is recorded
        except UsageError as e:
            await self.db(self.queue.bump, "webhook_malformed_total")
            return _error(400, f"malformed payload: {e.message}", hint=e.hint)
        if sha is None:
            try:
                sha = await run_in_threadpool(self.resolve_sha, repo_id)
            except HubquantError as e:  # nothing recorded: the Hub's retry of this delivery gets another chance
                return _error(502, f"cannot read {repo_id} on the Hub: {e.message}", hint=e.hint)
        try:
            specs = self.config.specs_for(repo_id, sha)
        except UsageError as e:
            return _error(400, f"malformed payload: {e.message}", hint=e.hint)
        pairs = [(sp.to_dict(), sp.key()) for sp in specs]
        duplicate, jobs = await self.db(self.queue.accept_delivery, delivery, pairs)
        if duplicate:
            await self.db(self.queue.bump, "webhook_duplicate_total")
            return JSONResponse({"accepted": True, "duplicate": True, "repo": repo_id, "jobs": jobs})
        await self.db(self.queue.bump, "webhook_accepted_total")
        out = [{"id": job.id, "status": job.status, "created": created, "label": sp.label()}
               for (job, created), sp in zip(jobs, specs, strict=True)]
        return JSONResponse({"accepted": True, "duplicate": False, "repo": repo_id, "sha": sha, "reason": reason,
                             "jobs": out}, status_code=202)

    async def submit(self, request: Request):
        if not self.config.api_token:
            return _error(403, "job submission is disabled", hint=f"set {TOKEN_ENV} and restart the service")
        denied = _bearer(request, self.config.api_token)
        if denied is not None:
            return denied
        try:
            body = json.loads(await request.body())
            if not isinstance(body, dict):
                raise UsageError("the body is not a JSON object", hint='send {"repo_id": "owner/name", ...}')
            retry_failed = body.pop("retry_failed", False)
            if not isinstance(retry_failed, bool):
                raise UsageError("retry_failed must be true or false", hint='e.g. "retry_failed": true')
            # the service's settings are the defaults; the caller's options go on top of the service's
            c = self.config
            fields = {"method": c.methods[0], "scheme": c.schemes[0], "namespace": c.namespace, "private": c.private,
                      "max_ppl_increase": c.max_ppl_increase, **body,
                      "options": {**(c.options or {}), **check_options(body.get("options", {}))}}
            spec = JobSpec.from_dict(fields)  # validates everything before any Hub call
            from hubquant.methods import get_method

            get_method(spec.method)
            if not spec.revision:
                spec = JobSpec.from_dict({**spec.to_dict(), "revision": await run_in_threadpool(
                    self.resolve_sha, spec.repo_id)})
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            return _error(400, f"malformed JSON: {str(e)[:200]}")
        except HubquantError as e:
            return _error(404 if isinstance(e, NotFoundError) else 400, e.message, hint=e.hint)
        except TypeError as e:
            return _error(400, str(e)[:200], hint="required field: repo_id")
        job, created = await self.db(self.queue.enqueue, spec.to_dict(), key=spec.key(), source="api",
                                retry_failed=retry_failed)
        return JSONResponse({"created": created, "job": job.to_dict()}, status_code=201 if created else 200)

    async def list_jobs(self, request: Request):
        denied = _bearer(request, self.config.api_token, self.config.read_token)
        if denied is not None:
            return denied
        q = request.query_params
        try:
            limit = int(q.get("limit", "100"))
            jobs, nxt = await self.db(self.queue.page, q.get("status") or None, limit=limit, cursor=q.get("cursor"))
        except (ValueError, UsageError) as e:
            return _error(400, str(e), hint=f"status is one of {', '.join(STATUSES)}; limit 1 to {MAX_PAGE}; "
                                            "cursor from 'next'")
        counts = await self.db(self.queue.counts)
        return JSONResponse({"counts": counts, "jobs": [j.to_dict() for j in jobs], "next": nxt})

    async def get_job(self, request: Request):
        denied = _bearer(request, self.config.api_token, self.config.read_token)
        if denied is not None:
            return denied
        try:
            job = await self.db(self.queue.get, request.path_params["job_id"])
        except NotFoundError as e:
            return _error(404, e.message, hint=e.hint)
        return JSONResponse(job.to_dict(with_logs=True))

    async def metrics(self, request: Request):
        denied = _bearer(request, self.config.api_token, self.config.read_token)
        if denied is not None:
            return denied
        text = await self.db(prometheus_text, self.queue, self.config)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def healthz(self, request: Request):
        return JSONResponse({"ok": True})


def create_app(queue: JobQueue, config: ServiceConfig, *, resolve_sha=_resolve_sha,
               on_shutdown: tuple = ()):
    """The service's ASGI app over `queue` (with body limits and a body-idle deadline); `on_shutdown`
    callables run when the server stops gracefully (uvicorn re-raises SIGTERM/SIGINT after its shutdown, so
    cleanup after `uvicorn.run` would never run)."""
    r = _Routes(queue, config, resolve_sha)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        for fn in on_shutdown:
            await run_in_threadpool(fn)

    app = Starlette(lifespan=lifespan, routes=[
        Route("/webhook", r.webhook, methods=["POST"]),
        Route("/jobs", r.submit, methods=["POST"]),
        Route("/jobs", r.list_jobs, methods=["GET"]),
        Route("/jobs/{job_id}", r.get_job, methods=["GET"]),
        Route("/metrics", r.metrics, methods=["GET"]),
        Route("/healthz", r.healthz, methods=["GET"]),
    ])
    return BodyGuard(app, limit=_body_limit)


def prometheus_text(queue: JobQueue, config: ServiceConfig) -> str:
    """The Prometheus exposition text for the queue's state and counters."""
    counts = queue.counts()
    c = queue.counters()
    lines = [
        "# HELP hubquant_queue_depth Jobs waiting to run (queued).",
        "# TYPE hubquant_queue_depth gauge",
        f"hubquant_queue_depth {counts['queued']}",
        "# HELP hubquant_jobs Jobs in the queue database by status.",
        "# TYPE hubquant_jobs gauge",
        *[f'hubquant_jobs{{status="{s}"}} {counts[s]}' for s in STATUSES],
        "# HELP hubquant_jobs_completed_total Jobs that finished successfully.",
        "# TYPE hubquant_jobs_completed_total counter",
        f"hubquant_jobs_completed_total {c.get('done_total', 0):g}",
        "# HELP hubquant_jobs_failed_total Jobs that ended in the failed list.",
        "# TYPE hubquant_jobs_failed_total counter",
        f"hubquant_jobs_failed_total {c.get('failed_total', 0):g}",
        "# HELP hubquant_job_retries_total Attempts scheduled again after a failure or a lost worker.",
        "# TYPE hubquant_job_retries_total counter",
        f"hubquant_job_retries_total {c.get('retries_total', 0):g}",
        "# HELP hubquant_job_leases_expired_total Jobs whose worker stopped renewing its lease.",
        "# TYPE hubquant_job_leases_expired_total counter",
        f"hubquant_job_leases_expired_total {c.get('lease_expired_total', 0):g}",
        "# HELP hubquant_job_duration_seconds Wall time of successful attempts.",
        "# TYPE hubquant_job_duration_seconds summary",
        f"hubquant_job_duration_seconds_sum {c.get('duration_seconds_sum', 0):.3f}",
        f"hubquant_job_duration_seconds_count {c.get('duration_seconds_count', 0):g}",
        "# HELP hubquant_webhook_deliveries_total Webhook deliveries by outcome.",
        "# TYPE hubquant_webhook_deliveries_total counter",
        *[f'hubquant_webhook_deliveries_total{{result="{r}"}} {c.get(f"webhook_{r}_total", 0):g}'
          for r in ("accepted", "duplicate", "ignored", "malformed", "unauthorized", "forbidden")],
        "# HELP hubquant_workers Workers configured to run jobs.",
        "# TYPE hubquant_workers gauge",
        f"hubquant_workers {config.workers}",
    ]
    return "\n".join(lines) + "\n"
