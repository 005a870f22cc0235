"""`hubquant watch` (find new releases and convert them) and `hubquant serve` (the conversion service)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from hubquant.errors import UsageError


def _split(values: list[str] | None) -> tuple[str, ...]:
    """Flags that take lists accept both `--methods rtn gptq` and `--methods rtn,gptq` (and repeats)."""
    out: list[str] = []
    for v in values or []:
        out += [x.strip() for x in v.replace("\n", ",").split(",") if x.strip()]
    return tuple(dict.fromkeys(out))


def _options(pairs: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UsageError(f"--option {pair} is not KEY=VALUE", hint="e.g. --option num_samples=64")
        k, v = pair.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to make")
    g.add_argument("--methods", nargs="+", default=None, metavar="METHOD", help="methods (default: rtn)")
    g.add_argument("--schemes", nargs="+", default=None, metavar="SCHEME",
                   help="schemes: default (the method's), W4A16-G32, W4A16-ASYM-G128, W8A16, W8A8, FP8")
    g.add_argument("--namespace", help="user or org for the variants (default: the token's user)")
    g.add_argument("--private", action="store_true", default=None, help="create variant repos private")
    g.add_argument("--max-ppl-increase", type=float, default=None, metavar="PCT",
                   help="quality gate: no push when perplexity rises more than PCT percent")
    g.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="any other convert option, e.g. num_samples=64 or skip_eval=true (repeatable)")


def add_parsers(sub) -> None:
    w = sub.add_parser("watch", help="find new or updated models and convert them",
                       description="List models by author (newest first) and/or check named models; convert "
                                   "each supported one that has no up-to-date variant yet.")
    g = w.add_argument_group("what to watch")
    g.add_argument("--author", action="append", metavar="ORG", help="user/org to watch (repeatable, or a,b)")
    g.add_argument("--model", action="append", metavar="OWNER/NAME", help="model to check (repeatable, or a,b)")
    g.add_argument("--filter", dest="search", help="only repo ids containing this text")
    g.add_argument("--since", help="only models created (or, with --sort lastModified, changed) since this ISO time")
    g.add_argument("--sort", choices=("createdAt", "lastModified"), default="createdAt")
    g.add_argument("--limit", type=int, default=20, help="models listed per author (default 20)")
    g.add_argument("--max-params", help="skip models larger than this, e.g. 8B")
    g.add_argument("--license", action="append", metavar="ID", help="allowed licenses (default: any)")
    g.add_argument("--skip-gated", action="store_true", help="skip gated models even when the token has access")
    _common(w)
    o = w.add_argument_group("output")
    o.add_argument("--dry-run", action="store_true", help="say what would be converted; convert nothing")
    o.add_argument("--summary", metavar="PATH", help="append a Markdown report (e.g. $GITHUB_STEP_SUMMARY)")
    o.add_argument("--json", dest="json_out", metavar="PATH", help="write the results as JSON")
    w.set_defaults(func=_watch)

    s = sub.add_parser("serve", help="run the conversion service (webhooks, job API, queue, workers)",
                       description="Receive Hub webhooks (secret in $HUBQUANT_WEBHOOK_SECRET) and hand-submitted "
                                   "jobs (token in $HUBQUANT_SERVICE_TOKEN); convert new releases with N workers "
                                   "or on a Ray cluster; jobs live in a SQLite queue that survives restarts.")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8700)
    s.add_argument("--db", default=None, help="queue database (default: $HF_HOME/hubquant/service.db)")
    s.add_argument("--workers", type=int, default=None, help="local workers (default: one per GPU, else 1)")
    s.add_argument("--backend", choices=("local", "ray"), default="local")
    s.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local Ray)")
    s.add_argument("--ray-node-ip", default=None, help="this machine's address in the Ray cluster (e.g. 127.0.0.1)")
    s.add_argument("--config", metavar="FILE", help="settings file (JSON, TOML or YAML) with any of the flags' names")
    s.add_argument("--author", action="append", metavar="ORG", help="only webhooks of these owners (fnmatch)")
    s.add_argument("--model", action="append", metavar="PATTERN", help="only webhooks of these repos (fnmatch)")
    _common(s)
    r = s.add_argument_group("queue")
    r.add_argument("--max-attempts", type=int, default=None, help="attempts before a job is failed (default 3)")
    r.add_argument("--backoff", type=float, default=None, help="first retry delay in seconds, doubling (default 30)")
    r.add_argument("--lease", type=float, default=None, help="seconds a worker may go silent before its job moves on")
    r.add_argument("--job-timeout", type=float, default=None,
                   help="wall-clock limit of one attempt in seconds (default 21600); a hung attempt is failed and "
                        "retried like any transient error")
    s.set_defaults(func=_serve)


def _watch(args) -> int:
    from hubquant.hub.client import endpoint
    from hubquant.service.watcher import (
        WatchOptions,
        exit_code,
        parse_count,
        parse_since,
        summary_markdown,
        watch,
    )

    opts = WatchOptions(
        authors=_split(args.author), models=_split(args.model), search=args.search, since=parse_since(args.since),
        sort=args.sort, limit=args.limit, methods=_split(args.methods) or ("rtn",),
        schemes=_split(args.schemes) or ("default",), namespace=args.namespace, private=bool(args.private),
        max_ppl_increase=args.max_ppl_increase, options=_options(args.option),
        max_params=parse_count(args.max_params) if args.max_params else None, licenses=_split(args.license),
        include_gated=not args.skip_gated, dry_run=args.dry_run,
    )
    rows = watch(opts, log=lambda s: print(s, flush=True))
    if args.summary:
        with open(args.summary, "a", encoding="utf-8") as f:
            f.write(summary_markdown(rows, opts, endpoint()))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([r.to_dict() for r in rows], indent=2) + "\n")
    done = sum(r.action == "done" for r in rows)
    failed = sum(r.action == "failed" for r in rows)
    print(f"watch: {len(rows)} result(s), {done} converted, {failed} failed", flush=True)
    return exit_code(rows)


def load_config(path: str | None) -> dict[str, Any]:
    """Read a settings file; keys are the flags' names with underscores (methods, namespace, ...)."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path} does not exist", hint="pass the path of a JSON, TOML or YAML file")
    text = p.read_text()
    if p.suffix == ".json":
        data = json.loads(text)
    elif p.suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    elif p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        raise UsageError(f"--config {path}: unknown file type", hint="use .json, .toml or .yaml")
    if not isinstance(data, dict):
        raise UsageError(f"--config {path} is not a mapping", hint="write keys such as methods, namespace")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _serve(args) -> int:
    import threading

    import uvicorn

    from hubquant.service.app import ServiceConfig, create_app
    from hubquant.service.queue import JobQueue, RetryPolicy
    from hubquant.service.workers import WorkerOptions, WorkerPool, default_workers

    cfg = load_config(args.config)

    def pick(name: str, default=None):
        v = getattr(args, name, None)
        return v if v is not None else cfg.get(name, default)

    def listed(name: str, default: tuple) -> tuple:
        v = getattr(args, name, None)
        if v:
            return _split(v)
        v = cfg.get(name)
        if isinstance(v, str):
            return _split([v])
        return tuple(v) if v else default

    options = {**cfg.get("options", {}), **_options(args.option)}
    n_workers = pick("workers") or default_workers()
    config = ServiceConfig.from_env(
        methods=listed("methods", ("rtn",)), schemes=listed("schemes", ("default",)), namespace=pick("namespace"),
        private=bool(pick("private", False)), max_ppl_increase=pick("max_ppl_increase"),
        authors=listed("author", ()), models=listed("model", ()), options=options, workers=n_workers)
    from hubquant.methods import get_method
    from hubquant.service.jobs import check_options, parse_scheme

    check_options(config.options or {})
    for m in config.methods:
        get_method(m)
    for sch in config.schemes:
        parse_scheme(sch)
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    db = pick("db") or str(hf_home / "hubquant" / "service.db")
    retry = RetryPolicy(max_attempts=pick("max_attempts", 3), backoff_s=pick("backoff", 30.0))
    queue = JobQueue(db, retry=retry)
    lease = float(pick("lease", 120.0))
    job_timeout = float(pick("job_timeout", 6 * 3600.0))
    if not config.webhook_secret:
        print("warning: HUBQUANT_WEBHOOK_SECRET is not set: POST /webhook answers 503", file=sys.stderr)
    if not config.api_token:
        print("warning: HUBQUANT_SERVICE_TOKEN is not set: POST /jobs answers 403", file=sys.stderr)

    stop = threading.Event()
    cleanup = [stop.set]
    if pick("backend", "local") == "ray":
        from hubquant.service.ray_backend import RayBackend, RayOptions

        backend = RayBackend(queue, RayOptions(address=pick("ray_address"), node_ip_address=pick("ray_node_ip"),
                                                  lease_s=lease, job_timeout_s=job_timeout))
        threading.Thread(target=backend.run, args=(stop,), name="ray-dispatcher", daemon=True).start()
    else:
        pool = WorkerPool(db, n_workers, WorkerOptions(lease_s=lease, job_timeout_s=job_timeout)).start()
        cleanup.append(pool.stop)
        print(f"{pool.n} local worker(s)" + (f", one per GPU ({pool.gpus})" if pool.gpus else ""), file=sys.stderr)
    sys.stderr.write(f"hubquant service on http://{args.host}:{args.port} (queue {db})\n")  # one write (threads)
    sys.stderr.flush()
    try:
        from hubquant.localhub.serving import uvicorn_config

        uvicorn.Server(uvicorn_config(create_app(queue, config, on_shutdown=tuple(cleanup)), host=args.host,
                                      port=args.port)).run()
    finally:  # reached on errors; a signal ends the process after the app's shutdown hooks ran
        for fn in cleanup:
            fn()
    return 0
