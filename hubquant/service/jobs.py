"""What one conversion job is, its idempotency key, and how it runs (through hubquant.convert).

A job is plain JSON (`JobSpec.to_dict`) so it can sit in the SQLite queue, travel to a Ray worker,
or be printed by `hubquant watch --dry-run`. The key is a hash of everything that decides the output
(base repo, base sha, method, scheme, target namespace, options): the same release asked for twice
gives one key, so one job and one variant.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from hubquant.errors import (
    ConflictError,
    CorruptFileError,
    HubquantError,
    HubUnreachableError,
    UsageError,
)
from hubquant.options import service_options

JOB_SPEC_VERSION = 1

# Errors another attempt can fix: the Hub was unreachable or slow, the branch moved under a push, a download
# came out damaged, the job ran past its wall-clock limit. Everything else (bad options, auth, missing repos,
# unsupported models, the quality gate, bugs) goes straight to the failed list.
TRANSIENT_ERRORS = (HubUnreachableError, ConflictError, CorruptFileError, TimeoutError, ConnectionError)

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
REPO_ID_RE = re.compile(rf"\A{_NAME}/{_NAME}\Z")
NAMESPACE_RE = re.compile(rf"\A{_NAME}\Z")
REVISION_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._/-]{0,199}\Z")
_DATASET_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"
DATASET_RE = re.compile(rf"\A{_DATASET_PART}(/{_DATASET_PART})?(:[A-Za-z0-9._-]{{0,100}}){{0,3}}\Z")
_FILE_SUFFIXES = (".txt", ".md", ".text", ".json", ".jsonl", ".parquet", ".csv")


def _dataset(v: Any) -> str:
    """A built-in corpus or a Hub dataset id (`ID[:CONFIG[:SPLIT[:COLUMN]]]`), never a path on the service's disk."""
    if not isinstance(v, str) or not DATASET_RE.match(v) or ".." in v or v.split(":")[0].lower().endswith(
            _FILE_SUFFIXES):
        raise ValueError("a built-in corpus (fortunes, lee-news) or a Hub dataset id, not a file path")
    return v


def _int_in(lo: int, hi: int):
    def check(v: Any) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise ValueError(f"an integer from {lo} to {hi}")
        return v
    return check


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("true or false")
    return v


def _short_str(v: Any) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", v):
        raise ValueError("a short name (letters, digits, . _ -)")
    return v


def _ignore(v: Any) -> list[str]:
    if not isinstance(v, list | tuple) or len(v) > 64 or not all(isinstance(x, str) and 0 < len(x) <= 200 for x in v):
        raise ValueError("a list of at most 64 module-name patterns")
    return list(v)


def _method_options(v: Any) -> dict:
    ok = isinstance(v, dict) and len(v) <= 32 and all(
        isinstance(k, str) and len(k) <= 64 and (v[k] is None or isinstance(v[k], bool | int | float | str))
        for k in v)
    if not ok:
        raise ValueError("an object of at most 32 scalar settings")
    return dict(v)


# The value check of each convert option a job may set (POST /jobs "options", the service's --option and config
# file). Which options those are is declared once, on ConvertOptions' fields (hubquant.options, `service=True`);
# everything else is refused: the caller never sets token, trust_remote_code, allow_pickle, output_dir, device or
# push; the job's own fields (repo, revision, method, scheme, namespace, private, quality gate) are set through
# JobSpec. A declared option without a check here fails at import.
_CHECKS: dict[str, Callable[[Any], Any]] = {
    "format": _short_str, "activations": _short_str, "calib_dataset": _dataset, "eval_dataset": _dataset,
    "num_samples": _int_in(1, 4096), "seq_len": _int_in(16, 32768), "seed": _int_in(0, 2**31 - 1),
    "chat_template": _bool, "eval_windows": _int_in(1, 1024), "eval_seq_len": _int_in(16, 32768),
    "skip_eval": _bool, "leak_check": _bool, "ignore": _ignore, "default_ignore": _bool,
    "method_options": _method_options, "gguf_type": _short_str, "gguf_split_size": _short_str,
}
JOB_OPTIONS: dict[str, Callable[[Any], Any]] = {name: _CHECKS[name] for name in sorted(service_options())}


def check_options(options: Any) -> dict[str, Any]:
    """Validate job options against JOB_OPTIONS.

    Raises:
        UsageError: not an object, an option outside the allow-list, or a bad value (the message says which).
    """
    if not isinstance(options, dict):
        raise UsageError("options must be a JSON object", hint=f"allowed options: {', '.join(sorted(JOB_OPTIONS))}")
    out = {}
    for k, v in options.items():
        if k not in JOB_OPTIONS:
            raise UsageError(f"option {str(k)[:64]!r} is not accepted by the service",
                             hint=f"allowed options: {', '.join(sorted(JOB_OPTIONS))}")
        try:
            out[k] = JOB_OPTIONS[k](v)
        except ValueError as e:
            raise UsageError(f"option {k!r}: expected {e}", hint=f"fix the value of {k}") from None
    return out

_SCHEME_RE = re.compile(r"^W(?P<w>\d+)A(?P<a>\d+)(?P<asym>-ASYM)?(?:-G(?P<g>\d+))?$")


def parse_scheme(name: str) -> dict[str, Any]:
    """Turn a scheme name into convert options.

    Accepted: ``default`` (the method's own scheme), ``W4A16-G32``, ``W4A16-ASYM-G128``, ``W8A16``
    (per channel), ``W8A8``, ``FP8``, and the other `hubquant.presets` names (``NVFP4A16``, ``MXFP4A16``, ...).

    Raises:
        UsageError: a name outside that grammar.
    """
    s = name.strip().upper()
    if s in ("", "DEFAULT"):
        return {}
    if s == "FP8":
        return {"bits": 8}
    m = _SCHEME_RE.match(s)
    if not m:
        from hubquant.presets import PRESETS

        if s in PRESETS:  # the llm-compressor names hubquant convert --scheme takes (NVFP4A16, FP8_DYNAMIC, ...)
            return {"scheme": s}
        raise UsageError(f"unknown scheme '{name}'",
                         hint="use default, W4A16-G<size>, W4A16-ASYM-G<size>, W8A16, W8A8, FP8 or a --scheme "
                              f"preset ({', '.join(PRESETS)})")
    out: dict[str, Any] = {"bits": int(m["w"])}
    out["group_size"] = int(m["g"]) if m["g"] else -1
    if m["asym"]:
        out["symmetric"] = False
    return out


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """One conversion: a base model at one sha, one method, one scheme, one target namespace.

    Attributes:
        repo_id: the base model.
        revision: the base commit sha (None: the branch head, resolved when the job runs).
        method: a key of hubquant.methods.METHODS.
        scheme: a scheme name (see parse_scheme); "default" keeps the method's own.
        namespace: where the variant goes (None: the token's user).
        private: create the variant repo private.
        max_ppl_increase: the quality gate in percent (None: no gate).
        options: any other ConvertOptions field, passed as is (e.g. {"n_samples": 8}).
    """

    repo_id: str
    revision: str | None = None
    method: str = "rtn"
    scheme: str = "default"
    namespace: str | None = None
    private: bool = False
    max_ppl_increase: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    version: int = JOB_SPEC_VERSION

    def __post_init__(self):
        if not isinstance(self.repo_id, str) or not REPO_ID_RE.match(self.repo_id) or self.repo_id.endswith(".git"):
            raise UsageError(f"{str(self.repo_id)[:200]!r} is not a repo id", hint="use the form owner/name")
        if self.revision is not None and (not isinstance(self.revision, str) or not REVISION_RE.match(self.revision)):
            raise UsageError("revision must be a commit sha, branch or tag name", hint="e.g. main or a 40-hex sha")
        if not isinstance(self.method, str) or not NAMESPACE_RE.match(self.method):
            raise UsageError("method must be a method name", hint="e.g. rtn, gptq, awq")
        if not isinstance(self.scheme, str) or len(self.scheme) > 64:
            raise UsageError("scheme must be a scheme name", hint="e.g. default, W4A16-G128, W8A8")
        if self.namespace is not None and (not isinstance(self.namespace, str) or not NAMESPACE_RE.match(
                self.namespace)):
            raise UsageError("namespace must be a user or org name", hint="letters, digits, . _ -")
        if not isinstance(self.private, bool):
            raise UsageError("private must be true or false", hint='e.g. "private": true')
        if self.max_ppl_increase is not None and (not isinstance(self.max_ppl_increase, int | float)
                                                  or isinstance(self.max_ppl_increase, bool)):
            raise UsageError("max_ppl_increase must be a number (percent)", hint='e.g. "max_ppl_increase": 5')
        object.__setattr__(self, "options", check_options(self.options))
        parse_scheme(self.scheme)  # validates

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobSpec:
        """Build from JSON (unknown keys are a UsageError, so typos do not pass silently).

        Raises:
            UsageError: not an object, unknown fields, no repo_id, or a field that fails JobSpec's checks.
        """
        if not isinstance(d, dict):
            raise UsageError("a job is a JSON object", hint='send {"repo_id": "owner/name", ...}')
        if "repo_id" not in d:
            raise UsageError("a job needs repo_id", hint='send {"repo_id": "owner/name", ...}')
        known = set(cls.__dataclass_fields__)
        extra = set(d) - known
        if extra:
            raise UsageError(f"unknown job field(s): {', '.join(sorted(extra))}",
                             hint=f"use only: {', '.join(sorted(known))}")
        return cls(**d)

    def key(self) -> str:
        """The idempotency key: equal for jobs that would produce the same variant from the same base."""
        d = self.to_dict()
        d.pop("version")
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def label(self) -> str:
        sha = (self.revision or "HEAD")[:8]
        return f"{self.repo_id}@{sha} {self.method} {self.scheme}"


def convert_options(spec: JobSpec):
    """The hubquant.convert.ConvertOptions for a job (pushing, no progress bars).

    Raises:
        UsageError: an option the service does not take from callers (see hubquant.options: tokens, remote code,
        pickles and output folders never come from a job), or a scheme the method refuses.
    """
    from hubquant.options import ConvertOptions

    kw: dict[str, Any] = {"repo_id": spec.repo_id, "method": spec.method, "push": True, "progress": False,
                          "revision": spec.revision, "private": spec.private,
                          "max_ppl_increase": spec.max_ppl_increase}
    kw.update(parse_scheme(spec.scheme))
    kw.update(check_options(spec.options))
    opts = ConvertOptions(**kw)
    if spec.namespace and not opts.target_repo:
        opts = replace(opts, target_repo=target_for(opts, spec.namespace))
    return opts


def target_for(opts, namespace: str) -> str:
    """The variant repo convert would write for `opts` in `namespace` (convert's own naming)."""
    from hubquant.plan import check_options, default_target

    scheme, fmt = check_options(opts)
    return default_target(opts.repo_id, namespace, scheme, opts.method, fmt)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What a job would do, found cheaply (model_info + the target's hubquant.json, no download)."""

    spec: JobSpec
    action: str  # "convert" | "skip" (target up to date) | "conflict" (target holds another base)
    target_repo: str
    base_sha: str
    settings_hash: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "target_repo": self.target_repo, "base_sha": self.base_sha,
                "settings_hash": self.settings_hash, "reason": self.reason, "spec": self.spec.to_dict()}


def plan(spec: JobSpec) -> Plan:
    """Decide up front whether `spec` needs a conversion, with the pipeline's own plan (hubquant.plan).

    Raises:
        NotFoundError, AuthError: the base cannot be read. UsageError: bad method/scheme.
    """
    from hubquant.plan import plan as convert_plan

    p = convert_plan(convert_options(spec))
    pinned = replace(spec, revision=p.base.sha)
    return Plan(spec=pinned, action=p.action, target_repo=p.target, base_sha=p.base.sha,
                settings_hash=p.settings_hash, reason=p.reason)


def run_job(spec: JobSpec | dict, log: Callable[[str], None] = print, on_event=None) -> dict[str, Any]:
    """Run one conversion through hubquant.convert and return a JSON-able result; the stages' progress events
    (hubquant.stages.ProgressEvent) go to `on_event` and their starts and ends into the result ("stages").

    Raises:
        HubquantError: whatever the pipeline raised (see `is_retryable`).
    """
    from hubquant.convert import convert

    if isinstance(spec, dict):
        spec = JobSpec.from_dict(spec)
    t0 = time.time()
    log(f"converting {spec.label()}")
    res = convert(convert_options(spec), log=log, on_event=on_event)
    out = {
        "target_repo": res.target_repo,
        "commit_url": getattr(res, "commit_url", None),
        "skipped": bool(getattr(res, "skipped", False)),
        "metrics": _jsonable(getattr(res, "metrics", None) or {}),
        "seconds": round(time.time() - t0, 2),
        "stages": _jsonable(getattr(res, "events", None) or []),
    }
    log(("up to date, no commit: " if out["skipped"] else "pushed: ")
        + (out["commit_url"] or out["target_repo"] or "?"))
    return out


def is_retryable(exc: BaseException) -> bool:
    """True only for transient errors (TRANSIENT_ERRORS, or the Hub answering 429/5xx): another attempt may
    succeed."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return isinstance(exc, TRANSIENT_ERRORS) or status in (429, 500, 502, 503, 504)


def describe_error(exc: BaseException) -> str:
    """One line for the failed list: type, message and fix."""
    if isinstance(exc, HubquantError):
        return f"{type(exc).__name__}: {exc.message}" + (f" (fix: {exc.hint})" if exc.hint else "")
    return f"{type(exc).__name__}: {exc}"


def _jsonable(x: Any) -> Any:
    try:
        return json.loads(json.dumps(x, default=float))
    except (TypeError, ValueError):
        return str(x)
