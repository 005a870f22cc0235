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
    AuthError,
    ConflictError,
    HubquantError,
    NotFoundError,
    QualityGateError,
    UnsupportedError,
    UsageError,
)

JOB_SPEC_VERSION = 1

# Errors that another attempt cannot fix: the job goes straight to the failed list.
PERMANENT_ERRORS = (UsageError, AuthError, NotFoundError, UnsupportedError, QualityGateError)

_SCHEME_RE = re.compile(r"^W(?P<w>\d+)A(?P<a>\d+)(?P<asym>-ASYM)?(?:-G(?P<g>\d+))?$")


def parse_scheme(name: str) -> dict[str, Any]:
    """Turn a scheme name into convert options.

    Accepted: ``default`` (the method's own scheme), ``W4A16-G32``, ``W4A16-ASYM-G128``, ``W8A16``
    (per channel), ``W8A8``, ``FP8``.

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
        raise UsageError(f"unknown scheme '{name}'",
                         hint="use default, W4A16-G<size>, W4A16-ASYM-G<size>, W8A16, W8A8 or FP8")
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
        if "/" not in self.repo_id:
            raise UsageError(f"'{self.repo_id}' is not a repo id", hint="use the form owner/name")
        parse_scheme(self.scheme)  # validates

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobSpec:
        """Build from JSON (unknown keys are a UsageError, so typos do not pass silently)."""
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
        UsageError: an option that ConvertOptions does not take, or a scheme the method refuses.
    """
    from hubquant.convert import ConvertOptions

    fields = set(ConvertOptions.__dataclass_fields__)
    kw: dict[str, Any] = {"repo_id": spec.repo_id, "method": spec.method, "push": True, "progress": False,
                          "revision": spec.revision, "private": spec.private,
                          "max_ppl_increase": spec.max_ppl_increase}
    kw.update(parse_scheme(spec.scheme))
    kw.update(spec.options)
    unknown = set(kw) - fields
    if unknown:
        raise UsageError(f"convert does not take option(s) {', '.join(sorted(unknown))}",
                         hint=f"valid options: {', '.join(sorted(fields))}")
    opts = ConvertOptions(**kw)
    if spec.namespace and not opts.target_repo:
        opts = replace(opts, target_repo=target_for(opts, spec.namespace))
    return opts


def target_for(opts, namespace: str) -> str:
    """The variant repo convert would write for `opts` in `namespace` (convert's own naming)."""
    from hubquant.convert import default_target, resolve_format, resolve_scheme

    scheme = resolve_scheme(opts)
    return default_target(opts.repo_id, namespace, scheme, opts.method, resolve_format(opts, scheme))


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
    """Decide up front whether `spec` needs a conversion: the target's hubquant.json is compared with
    the base sha and the settings hash convert would record.

    Raises:
        NotFoundError, AuthError: the base cannot be read. UsageError: bad method/scheme.
    """
    from hubquant.convert import (
        resolve_format,
        resolve_scheme,
        settings_hash,
        settings_of,
    )
    from hubquant.hub import client

    opts = convert_options(spec)
    scheme = resolve_scheme(opts)
    fmt = resolve_format(opts, scheme)
    shash = settings_hash(opts.repo_id, settings_of(opts, scheme, fmt))
    with client.hub_errors(opts.repo_id, revision=opts.revision):
        sha = client.api().model_info(opts.repo_id, revision=opts.revision).sha
    target = opts.target_repo or target_for(opts, client.whoami_name())
    prov = client.read_provenance(target)
    if prov is None:
        action, reason = "convert", "no variant yet"
    elif prov.get("base_model") != opts.repo_id:
        action, reason = "conflict", f"{target} holds a variant of {prov.get('base_model')}"
    elif prov.get("base_sha") == sha and prov.get("settings_hash") == shash:
        action, reason = "skip", f"up to date (base {sha[:10]}, settings {shash})"
    elif prov.get("base_sha") != sha:
        action, reason = "convert", f"new base commit {sha[:10]} (variant has {str(prov.get('base_sha'))[:10]})"
    else:
        action, reason = "convert", f"settings changed ({prov.get('settings_hash')} -> {shash})"
    pinned = replace(spec, revision=sha)
    return Plan(spec=pinned, action=action, target_repo=target, base_sha=sha, settings_hash=shash, reason=reason)


def run_job(spec: JobSpec | dict, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run one conversion through hubquant.convert and return a JSON-able result.

    Raises:
        HubquantError: whatever the pipeline raised (see `is_retryable`).
    """
    from hubquant.convert import convert

    if isinstance(spec, dict):
        spec = JobSpec.from_dict(spec)
    t0 = time.time()
    log(f"converting {spec.label()}")
    res = convert(convert_options(spec), log=log)
    out = {
        "target_repo": res.target_repo,
        "commit_url": getattr(res, "commit_url", None),
        "skipped": bool(getattr(res, "skipped", False)),
        "metrics": _jsonable(getattr(res, "metrics", None) or {}),
        "seconds": round(time.time() - t0, 2),
    }
    log(("up to date, no commit: " if out["skipped"] else "pushed: ")
        + (out["commit_url"] or out["target_repo"] or "?"))
    return out


def is_retryable(exc: BaseException) -> bool:
    """False for errors another attempt cannot fix (bad options, auth, missing repo, unsupported, gate)."""
    if isinstance(exc, ConflictError):
        return True
    return not isinstance(exc, PERMANENT_ERRORS)


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
