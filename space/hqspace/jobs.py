"""Conversions as background jobs: one worker thread, a log per job, results the UI polls.

The job outlives the browser tab that started it: the page only reads `Job.lines` and `Job.state`.
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from hubquant.errors import AuthError, HubquantError, NotFoundError, UnsupportedError
from hubquant.stages import STAGES  # the pipeline's stages, in order (the progress bar follows their events)


def error_kind(e: HubquantError) -> str:
    """The heading a person reads first: Gated, Unauthorized, Unsupported, Not found or Error."""
    if isinstance(e, AuthError):
        return "Gated" if "gated" in e.message else "Unauthorized"
    if isinstance(e, UnsupportedError):
        return "Unsupported"
    if isinstance(e, NotFoundError):
        return "Not found"
    return "Error"


@dataclass(frozen=True, kw_only=True)
class ConvertRequest:
    """What the Convert tab asks for: one base model, one or more methods, one weight scheme."""

    repo_id: str
    methods: tuple[str, ...]
    bits: int | None = None
    group_size: int | None = None
    token: str | None = None
    user: str | None = None
    evaluate: bool = True
    eval_windows: int = 8


@dataclass
class Job:
    id: int
    request: ConvertRequest
    state: str = "queued"  # queued | running | done | failed
    lines: list[str] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)
    error: str | None = None
    error_kind: str | None = None
    hint: str | None = None
    started: float | None = None
    finished: float | None = None
    methods_done: int = 0
    stage: str = ""
    stage_index: int = -1  # of STAGES, within the method being converted
    stage_fraction: float = 0.0

    def log(self, msg: str) -> None:
        self.lines.extend(str(msg).splitlines() or [""])

    def event(self, e) -> None:
        """A hubquant.stages.ProgressEvent of the method being converted."""
        if e.stage in STAGES:
            self.stage_index, self.stage, self.stage_fraction = STAGES.index(e.stage), e.stage, e.fraction

    @property
    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.time()) - self.started

    @property
    def progress(self) -> float:
        """Fraction done: finished methods plus the stage the current one has reached."""
        n = max(1, len(self.request.methods))
        current = 0.0 if self.state != "running" else (self.stage_index + self.stage_fraction) / len(STAGES)
        return min(1.0, (self.methods_done + current) / n)


def preflight(api, repo_id: str, token: str | None) -> str:
    """Check login and model access before a job is queued; returns the user's name.

    Raises:
        AuthError: no token, a token the Hub rejects, or a gated/private model without access.
        NotFoundError: the model does not exist.
    """
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if not token:
        raise AuthError("you are not logged in", hint="log in with the Hugging Face button (or paste a write token)")
    try:
        user = api.whoami(token=token)["name"]
    except HfHubHTTPError as e:
        raise AuthError("the Hub rejected your token (unauthorized)",
                        hint="log in again, or paste a valid token with write access") from e
    try:
        info = api.model_info(repo_id, token=token)
    except GatedRepoError as e:
        raise AuthError(f"{repo_id} is gated: your account has no access to it",
                        hint=f"request access on {api.endpoint}/{repo_id}, then try again") from e
    except RepositoryNotFoundError as e:
        raise NotFoundError(f"no model named {repo_id} (or it is private to someone else)",
                            hint="check the model id") from e
    if getattr(info, "gated", False) not in (False, None) and not _can_read(api, repo_id, token):
        raise AuthError(f"{repo_id} is gated: your account has no access to it",
                        hint=f"request access on {api.endpoint}/{repo_id}, then try again")
    return user


def _can_read(api, repo_id: str, token: str) -> bool:
    # a HEAD on a file: unlike hf_hub_download it never answers from the local cache
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json", endpoint=api.endpoint), token=token)
        return True
    except (GatedRepoError, HfHubHTTPError):
        return False


def scheme_overrides(method: str, bits: int | None, group_size: int | None) -> dict:
    """The bits/group_size to pass for `method`, or {} where the method has a scheme of its own.

    FP8 and bitsandbytes methods have one fixed scheme; W8A8 methods quantize weights to 8 bits only.
    """
    from hubquant.methods import get_method

    if not get_method(method).takes_scheme_overrides(bits):
        return {}
    out = {"bits": bits}
    if group_size is not None:
        out["group_size"] = group_size
    return out


def default_convert(request: ConvertRequest, method: str, log: Callable[[str], None], on_event=None) -> dict:
    """Run hubquant.convert for one method and push to the user's namespace (progress events to `on_event`)."""
    from hubquant.convert import ConvertOptions, convert

    over = scheme_overrides(method, request.bits, request.group_size)
    if request.bits is not None and not over:
        log(f"note: {method} has a scheme of its own; the chosen scheme applies to weight-only methods")
    # the visitor's own token, passed per call (never through the process environment)
    opts = ConvertOptions(repo_id=request.repo_id, method=method, push=True, progress=False,
                          skip_eval=not request.evaluate, eval_windows=request.eval_windows, token=request.token,
                          **over)
    events = {"on_event": on_event} if on_event is not None else {}
    res = convert(opts, log=log, **events)  # convert() removes its temp folder once the Hub has the files
    return {"method": method, "target_repo": res.target_repo, "commit_url": res.commit_url,
            "skipped": bool(res.skipped), "metrics": dict(res.metrics or {})}


class JobRunner:
    """A queue of conversion jobs worked through by one daemon thread (conversions are CPU-bound)."""

    def __init__(self, convert_fn: Callable[[ConvertRequest, str, Callable[[str], None]], dict] = default_convert):
        self._convert = convert_fn
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._queue: queue.Queue[Job] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="hubquant-convert", daemon=True)
        self._thread.start()

    def submit(self, request: ConvertRequest) -> Job:
        job = Job(id=next(self._ids), request=request)
        job.log(f"queued: {request.repo_id} with {', '.join(request.methods)}")
        self._jobs[job.id] = job
        self._queue.put(job)
        return job

    def get(self, job_id: int) -> Job | None:
        return self._jobs.get(job_id)

    def _call(self, job: Job, method: str) -> dict:
        import inspect

        if "on_event" in inspect.signature(self._convert).parameters:
            return self._convert(job.request, method, job.log, on_event=job.event)
        return self._convert(job.request, method, job.log)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            job.state, job.started = "running", time.time()
            try:
                for method in job.request.methods:
                    job.log(f"== {method}: converting {job.request.repo_id} ==")
                    job.stage_index, job.stage, job.stage_fraction = -1, "starting", 0.0
                    job.results.append(self._call(job, method))
                    job.methods_done += 1
                job.state = "done"
            except HubquantError as e:
                job.error, job.hint, job.state = e.message, e.hint, "failed"
                job.error_kind = error_kind(e)
                job.log(f"error: {e.message}" + (f"\n  fix: {e.hint}" if e.hint else ""))
            except Exception as e:  # an unexpected failure still ends the job with a readable message
                job.error, job.error_kind, job.state = f"{type(e).__name__}: {e}", "Error", "failed"
                job.log("".join(traceback.format_exception_only(type(e), e)).strip())
            finally:
                job.finished = time.time()
                job.log(f"{job.state} in {job.elapsed:.0f} s")
