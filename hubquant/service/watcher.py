"""`hubquant watch`: find new or updated models on the Hub and convert each one.

Discovery goes through list_models (by author, newest first by createdAt or lastModified) plus any
models named explicitly. Candidates are filtered (causal-LM architecture transformers knows, no remote
code, not already quantized, size limit, license allowlist, gated ones skipped unless the token can
read them, hubquant's own variants never) and every (model, method, scheme) is planned cheaply: the
target's hubquant.json is read and compared with the base sha and the settings hash convert would
record, so the watcher needs no local state and `--dry-run` can say exactly what it would do.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hubquant.errors import HubquantError, UsageError
from hubquant.service.jobs import JobSpec, describe_error, plan, run_job

Log = Callable[[str], None]
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMBT]?)\s*$", re.IGNORECASE)
_MULT = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


def parse_count(text: str) -> int:
    """'135M' -> 135_000_000, '8B' -> 8_000_000_000, '1000' -> 1000.

    Raises:
        UsageError: not a number with an optional K/M/B/T suffix.
    """
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"'{text}' is not a parameter count", hint="use e.g. 500M, 8B or 70B")
    return int(float(m[1]) * _MULT[m[2].upper()])


def parse_since(text: str | None) -> datetime | None:
    """An ISO date or datetime (UTC when no zone is given)."""
    if not text:
        return None
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--since {text} is not an ISO date",
                         hint="use e.g. 2026-11-01 or 2026-11-01T12:00:00Z") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


@dataclass(frozen=True, kw_only=True)
class WatchOptions:
    """What to watch, what to skip, what to make.

    Attributes:
        authors: users/orgs whose models are listed (newest first).
        models: repo ids checked explicitly.
        search: a substring the repo id must contain (list_models' search).
        since: only models created (sort=createdAt) or modified (sort=lastModified) at/after this time.
        sort: "createdAt" or "lastModified".
        limit: models listed per author.
        methods, schemes: every candidate gets one job per (method, scheme).
        namespace, private, max_ppl_increase, options: passed to every job (see JobSpec).
        max_params: skip larger models (None: no limit).
        licenses: allowed license ids (empty: any).
        include_gated: try gated models (skipped anyway when the token cannot read them).
        dry_run: plan only, convert nothing.
    """

    authors: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    search: str | None = None
    since: datetime | None = None
    sort: str = "createdAt"
    limit: int = 20
    methods: tuple[str, ...] = ("rtn",)
    schemes: tuple[str, ...] = ("default",)
    namespace: str | None = None
    private: bool = False
    max_ppl_increase: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    max_params: int | None = None
    licenses: tuple[str, ...] = ()
    include_gated: bool = True
    dry_run: bool = False
    version: int = 1

    def __post_init__(self):
        if not self.authors and not self.models:
            raise UsageError("nothing to watch", hint="pass --author ORG and/or --model OWNER/NAME")
        if self.sort not in ("createdAt", "lastModified"):
            raise UsageError(f"--sort {self.sort}", hint="use createdAt or lastModified")
        from hubquant.methods import get_method

        for m in self.methods:
            get_method(m)


@dataclass(frozen=True, kw_only=True)
class WatchRow:
    """One line of the watcher's report."""

    repo_id: str
    action: str  # filtered | skip | conflict | convert (dry run) | done | up-to-date | failed
    reason: str
    method: str | None = None
    scheme: str | None = None
    target_repo: str | None = None
    base_sha: str | None = None
    commit_url: str | None = None
    exit_code: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def discover(opts: WatchOptions, log: Log = print) -> list[Any]:
    """ModelInfo objects of the candidate repos (deduplicated, newest first per author)."""
    from hubquant.hub.client import api, hub_errors

    hf = api()
    seen: dict[str, Any] = {}
    for author in opts.authors:
        with hub_errors(author):
            found = list(hf.list_models(author=author, search=opts.search, sort=opts.sort, limit=opts.limit,
                                        full=True, cardData=True))
        log(f"{author}: {len(found)} model(s) listed (sort {opts.sort})")
        for m in found:
            seen.setdefault(m.id, m)
    for repo_id in opts.models:
        with hub_errors(repo_id):
            seen.setdefault(repo_id, hf.model_info(repo_id))
    return list(seen.values())


def _when(info, sort: str) -> datetime | None:
    return getattr(info, "created_at" if sort == "createdAt" else "last_modified", None)


def _license(info) -> str | None:
    card = getattr(info, "card_data", None)
    lic = None
    if card is not None:
        lic = card.get("license") if hasattr(card, "get") else getattr(card, "license", None)
    if not lic:
        lic = next((t.split(":", 1)[1] for t in (info.tags or []) if t.startswith("license:")), None)
    return lic


def _config(hf, info) -> dict:
    """config.json of the repo (the listing's excerpt when it has architectures, else the file)."""
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(info.id, "config.json", revision=info.sha, endpoint=hf.endpoint)
    return json.loads(Path(path).read_text())


def _param_count(hf, info, config: dict) -> int | None:
    st = getattr(info, "safetensors", None)
    if st is not None and getattr(st, "total", None):
        return int(st.total)
    full = hf.model_info(info.id, revision=info.sha, files_metadata=True)
    size = sum((s.size or 0) for s in (full.siblings or []) if s.rfilename.endswith(".safetensors"))
    if not size:
        return None
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    per = 4 if "32" in dtype else 1 if "8" in dtype else 2
    return size // per


def screen(info, opts: WatchOptions) -> str | None:
    """Why `info` is not a candidate (None: it is). Reads config.json and file sizes when needed."""
    from huggingface_hub import errors as hf_errors
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from hubquant.hub.client import PROVENANCE_FILE, api

    hf = api()
    tags = set(info.tags or [])
    if "hubquant" in tags or any(s.rfilename == PROVENANCE_FILE for s in (info.siblings or [])):
        return "a hubquant variant"
    if opts.since is not None:
        when = _when(info, opts.sort)
        if when is not None and when < opts.since:
            return f"{'created' if opts.sort == 'createdAt' else 'modified'} {when:%Y-%m-%d} before --since"
    if opts.licenses:
        lic = _license(info)
        if lic not in opts.licenses:
            return f"license {lic or 'unknown'} not in {', '.join(opts.licenses)}"
    if getattr(info, "gated", False) and not opts.include_gated:
        return "gated (pass --include-gated to try it)"
    try:
        config = _config(hf, info)
    except (hf_errors.GatedRepoError, hf_errors.RepositoryNotFoundError):
        return "gated or private, and the token has no access"
    except hf_errors.EntryNotFoundError:
        return "no config.json"
    except hf_errors.HfHubHTTPError as e:
        if getattr(e.response, "status_code", None) in (401, 403):
            return "gated or private, and the token has no access"
        raise
    from hubquant.moe_gptoss import is_mxfp4_source  # gpt-oss's own MXFP4 releases dequantize on load

    if config.get("quantization_config") and not is_mxfp4_source(config):
        return f"already quantized ({config['quantization_config'].get('quant_method', '?')})"
    if config.get("auto_map"):
        return "needs remote code (auto_map)"
    arch = (config.get("architectures") or ["?"])[0]
    causal = {c for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for c in ((v,) if isinstance(v, str) else v)}
    if config.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or arch not in causal:
        return f"not a causal LM transformers knows ({arch}, model_type {config.get('model_type')})"
    if opts.max_params is not None:
        n = _param_count(hf, info, config)
        if n is not None and n > opts.max_params:
            return f"{n / 1e9:.2f}B parameters > limit {opts.max_params / 1e9:.2f}B"
    if not any(s.rfilename.endswith(".safetensors") for s in (info.siblings or [])) and info.siblings:
        return "no safetensors weights"
    return None


def specs_for(info, opts: WatchOptions) -> list[JobSpec]:
    return [JobSpec(repo_id=info.id, revision=getattr(info, "sha", None), method=m, scheme=s,
                    namespace=opts.namespace, private=opts.private, max_ppl_increase=opts.max_ppl_increase,
                    options=dict(opts.options))
            for m in opts.methods for s in opts.schemes]


def watch(opts: WatchOptions, log: Log = print, runner: Callable[..., dict] = run_job) -> list[WatchRow]:
    """Discover, screen, plan and (unless dry_run) convert. One WatchRow per model x method x scheme
    (one per filtered model). Conversion failures are reported in their row, never raised."""
    rows: list[WatchRow] = []
    for info in discover(opts, log):
        why = screen(info, opts)
        if why:
            log(f"skip {info.id}: {why}")
            rows.append(WatchRow(repo_id=info.id, action="filtered", reason=why))
            continue
        for spec in specs_for(info, opts):
            try:
                p = plan(spec)
            except HubquantError as e:
                rows.append(WatchRow(repo_id=info.id, method=spec.method, scheme=spec.scheme, action="failed",
                                     reason=describe_error(e), exit_code=e.exit_code))
                log(f"{spec.label()}: cannot plan: {describe_error(e)}")
                continue
            base = dict(repo_id=info.id, method=spec.method, scheme=spec.scheme, target_repo=p.target_repo,
                        base_sha=p.base_sha)
            if p.action != "convert" or opts.dry_run:
                action = {"skip": "up-to-date"}.get(p.action, p.action)
                log(f"{spec.label()} -> {p.target_repo}: {action} ({p.reason})")
                rows.append(WatchRow(**base, action=action, reason=p.reason,
                                     exit_code=7 if p.action == "conflict" else 0))
                continue
            log(f"{spec.label()} -> {p.target_repo}: converting ({p.reason})")
            try:
                res = runner(p.spec.to_dict(), log=log)
            except HubquantError as e:
                rows.append(WatchRow(**base, action="failed", reason=describe_error(e), exit_code=e.exit_code))
                log(f"{spec.label()}: failed: {describe_error(e)}")
                continue
            except Exception as e:  # one model's crash must not stop the others
                rows.append(WatchRow(**base, action="failed", reason=describe_error(e), exit_code=1))
                log(f"{spec.label()}: failed: {describe_error(e)}")
                continue
            rows.append(WatchRow(**base, action="up-to-date" if res["skipped"] else "done", reason=p.reason,
                                 commit_url=res.get("commit_url")))
    return rows


def exit_code(rows: list[WatchRow]) -> int:
    """0 when nothing failed, else the exit code of the first failure (see hubquant.errors)."""
    return next((r.exit_code for r in rows if r.exit_code), 0)


_ICON = {"done": "✅", "up-to-date": "⏭️", "convert": "📝", "filtered": "➖", "failed": "❌", "conflict": "⚠️"}


def summary_markdown(rows: list[WatchRow], opts: WatchOptions, endpoint: str) -> str:
    """A Markdown report (the GitHub Action appends it to $GITHUB_STEP_SUMMARY)."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.action] = counts.get(r.action, 0) + 1
    head = "hubquant watch" + (" (dry run)" if opts.dry_run else "")
    lines = [f"### {head}", "",
             f"Watched: {', '.join([*opts.authors, *opts.models])}; methods {', '.join(opts.methods)}; "
             f"schemes {', '.join(opts.schemes)}; Hub {endpoint}", "",
             "Totals: " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "no models found"), "",
             "| model | method | scheme | result | variant | reason |", "|---|---|---|---|---|---|"]
    for r in rows:
        variant = r.target_repo or ""
        if r.commit_url:
            variant = f"[{variant}]({r.commit_url})"
        reason = r.reason.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r.repo_id} | {r.method or ''} | {r.scheme or ''} | {_ICON.get(r.action, '')} {r.action} "
                     f"| {variant} | {reason} |")
    return "\n".join(lines) + "\n"
