"""The pipeline: plan, then resolve -> download -> load -> calibrate -> baseline -> quantize -> write -> evaluate
-> card -> push (see hubquant.stages).

`convert(ConvertOptions(...))` is the one entry point the CLI, the Python API, the Space, the watcher and the
webhook service share.
"""
from __future__ import annotations

import contextlib
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import hubquant
from hubquant import stages
from hubquant.errors import HubquantError
from hubquant.options import ConvertOptions
from hubquant.plan import (  # noqa: F401  (the names callers import from here)
    Plan,
    default_target,
    needs_calibration,
    plan,
    resolve_format,
    resolve_scheme,
    settings_hash,
    settings_of,
)
from hubquant.stages import (  # noqa: F401
    COPY_FILES,
    Log,
    OnEvent,
    ProgressEvent,
    check_group_size,
    load_model,
)

__all__ = ["ConvertOptions", "ConvertResult", "ProgressEvent", "command_line", "convert", "plan"]


@dataclass
class ConvertResult:
    out_dir: Path
    target_repo: str | None
    commit_url: str | None
    skipped: bool
    metrics: dict
    settings_hash: str
    base_sha: str
    timings: dict = field(default_factory=dict)
    message: str = ""
    events: list[dict] = field(default_factory=list)  # every stage's start and end (ProgressEvent.to_dict)


def command_line(opts: ConvertOptions) -> str:
    """The CLI call that reproduces these options (for the card)."""
    from hubquant.options import command_line as _command_line

    return _command_line(opts, calibrated=needs_calibration(opts, resolve_scheme(opts)))


def convert(opts: ConvertOptions, log: Log = print, on_event: OnEvent | None = None) -> ConvertResult:
    """Run the whole pipeline. Pushes nothing on failure and leaves no temp folder behind.

    Args:
        opts: what to convert and how.
        log: receives one line per step.
        on_event: receives ProgressEvents (stage, fraction, message) as the stages advance.

    Raises:
        HubquantError: see hubquant.errors (each names its fix and carries the CLI's exit code).
    """
    t_start = time.time()
    events: list[dict] = []

    def emit(e: ProgressEvent) -> None:
        if e.fraction in (0.0, 1.0):
            events.append(e.to_dict())
        if on_event is not None:
            on_event(e)

    with hub_unreachable():
        p = plan(opts)
        log(f"hubquant {hubquant.__version__}: {opts.repo_id} -> {p.scheme.name} {opts.method} ({p.format}); "
            f"{_env_summary(opts)}")
        run = stages.resolve(p, log=log, on_event=emit)
        run.timings["resolve"] += run._t0 - t_start  # the plan's requests are part of resolving
        if not run.skipped:
            _pipeline(run)
    run.timings["total"] = time.time() - t_start
    if not run.skipped:
        log("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in run.timings.items()))
    return ConvertResult(out_dir=run.out_dir or Path(opts.output_dir or "."), target_repo=p.target,
                         commit_url=run.commit_url, skipped=run.skipped,
                         metrics=run.metrics if not run.skipped or p.provenance is None
                         else p.provenance.get("metrics", {}),
                         settings_hash=p.settings_hash, base_sha=p.base.sha, timings=run.timings,
                         message=run.message, events=events)


def _pipeline(run: stages.Run) -> None:
    ok = False
    try:
        stages.download(run)
        stages.load(run)
        stages.calibrate(run)
        stages.baseline(run)
        stages.leak_check(run, "base")
        stages.quantize(run)
        stages.write(run)
        stages.evaluate_variant(run)
        stages.leak_check(run, "variant")
        stages.card(run)
        stages.check_gate(run)
        stages.push(run)
        ok = True
    finally:
        # a temp folder goes once the Hub has the files, or when the run failed
        if run.tmp_root is not None and (not ok or run.opts.push):
            shutil.rmtree(run.tmp_root, ignore_errors=True)


def _env_summary(opts: ConvertOptions) -> str:
    from hubquant.hub import client

    return client.env_summary(opts.token)


@contextlib.contextmanager
def hub_unreachable():
    """A network failure that escaped the Hub client's own translation is still one line and exit 4."""
    try:
        yield
    except HubquantError:
        raise
    except Exception as e:
        from hubquant.hub import client

        cause = client._transport_error(e)
        if cause is None:
            raise
        raise client.unreachable(cause) from e

def quantize(repo_id: str, /, *, log: Log = print, on_event: OnEvent | None = None, **options) -> ConvertResult:
    """Convert `repo_id` (a Hub repo id or a local folder); keyword arguments are ConvertOptions' fields, named
    as the CLI's flags (`method="gptq"`, `group_size=64`, `ignore=["mlp.down_proj"]`, `push=True`, ...).

    Raises:
        UsageError: an unknown keyword. HubquantError: see `convert`.
    """
    import dataclasses

    from hubquant.errors import UsageError

    known = {f.name for f in dataclasses.fields(ConvertOptions)} - {"repo_id", "version"}
    unknown = set(options) - known
    if unknown:
        raise UsageError(f"hubquant.convert() takes no option(s) {', '.join(sorted(unknown))}",
                         hint=f"use: {', '.join(sorted(known))}")
    if isinstance(options.get("ignore"), str):
        options["ignore"] = (options["ignore"],)
    return convert(ConvertOptions(repo_id=str(repo_id), **options), log=log, on_event=on_event)


def _api_signature():
    import dataclasses
    import inspect

    params = [inspect.Parameter("repo_id", inspect.Parameter.POSITIONAL_ONLY, annotation=str)]
    for f in dataclasses.fields(ConvertOptions):
        if f.name in ("repo_id", "version"):
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=f.type))
    params += [inspect.Parameter("log", inspect.Parameter.KEYWORD_ONLY, default=print),
               inspect.Parameter("on_event", inspect.Parameter.KEYWORD_ONLY, default=None)]
    return inspect.Signature(params, return_annotation="ConvertResult")


quantize.__signature__ = _api_signature()


class _CallableModule(sys.modules[__name__].__class__):
    """`hubquant.convert` is this module; calling it runs `quantize` (the Python API)."""

    def __call__(self, repo_id: str, /, **kwargs) -> ConvertResult:
        return quantize(repo_id, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
