"""`hubquant hub ...`: run and administer the local Hub.

    hubquant hub serve --root DIR [--host 127.0.0.1] [--port N]     (port 0: a free one; prints the URL)
    hubquant hub add-token --root DIR --user NAME [--orgs A,B] [--read-only]   (prints only the token)
    hubquant hub seed --root DIR                                      (publishes SmolLM2-135M-Instruct)
    hubquant hub gate --root DIR REPO [--mode auto|manual|off] [--grant USER] [--private|--public]
    hubquant hub trust --root DIR REPO --issuer URL --claim repository=OWNER/REPO [--claim workflow=FILE.yml]
"""
from __future__ import annotations

import argparse


def add_parsers(subparsers) -> None:
    hub = subparsers.add_parser("hub", help="run and administer the local Hub (a Hugging Face Hub-compatible server)")
    sub = hub.add_subparsers(dest="hub_command", metavar="HUB_COMMAND")
    hub.set_defaults(func=lambda args: (hub.print_help(), 2)[1])

    def root_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--root", required=True, help="folder that holds the Hub's data (created if missing)")

    p = sub.add_parser("serve", help="serve the Hub over HTTP (point HF_ENDPOINT at the printed URL)")
    root_arg(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8808, help="0 picks a free port (default 8808)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_serve)

    p = sub.add_parser("add-token", help="create an access token and print it (only its hash is stored)")
    root_arg(p)
    p.add_argument("--user", required=True, help="user name; the token may write to this namespace")
    p.add_argument("--orgs", default="", help="comma-separated organizations the user belongs to (write access)")
    p.add_argument("--read-only", action="store_true", help="a token that can read but not write")
    p.set_defaults(func=_add_token)

    p = sub.add_parser("seed", help="publish SmolLM2-135M-Instruct as HuggingFaceTB/SmolLM2-135M-Instruct")
    root_arg(p)
    p.set_defaults(func=_seed)

    p = sub.add_parser("gate", help="gate a repo, grant access, or make it private/public (tests and demos)")
    root_arg(p)
    p.add_argument("repo", help="NAMESPACE/NAME")
    p.add_argument("--repo-type", default="model", choices=["model", "dataset", "space"])
    p.add_argument("--mode", choices=["auto", "manual", "off"], help="gate mode (default: manual unless other flags)")
    p.add_argument("--grant", metavar="USER", action="append", default=[], help="let USER download (repeatable)")
    vis = p.add_mutually_exclusive_group()
    vis.add_argument("--private", action="store_true", help="make the repo private")
    vis.add_argument("--public", action="store_true", help="make the repo public")
    p.set_defaults(func=_gate)

    p = sub.add_parser("trust", help="add a trusted publisher: a CI workflow whose OIDC tokens may write to REPO")
    root_arg(p)
    p.add_argument("repo", help="NAMESPACE/NAME (it must exist)")
    p.add_argument("--repo-type", default="model", choices=["model", "dataset", "space"])
    p.add_argument("--issuer", required=True, help="the OIDC issuer, e.g. https://token.actions.githubusercontent.com")
    p.add_argument("--claim", action="append", default=[], metavar="NAME=VALUE",
                   help="a claim the id token must carry exactly (repository, workflow, ref, branch...); repeatable")
    p.set_defaults(func=_trust)


def _serve(args) -> int:
    import uvicorn

    from hubquant.localhub.app import create_app
    from hubquant.localhub.local import bind_socket, url_of
    from hubquant.localhub.serving import uvicorn_config

    try:
        sock = bind_socket(args.host, args.port)
    except OSError as e:
        from hubquant.errors import UsageError

        raise UsageError(
            f"cannot listen on {args.host}:{args.port}: {e.strerror}", hint="pick another --port (0 = any free port)"
        ) from e
    print(url_of(sock), flush=True)  # the first line of output is the URL (scripts and tests read it)
    app = create_app(args.root)
    uvicorn.Server(uvicorn_config(app, log_level=args.log_level, lifespan="off")).run(sockets=[sock])
    return 0


def _add_token(args) -> int:
    from hubquant.localhub.local import LocalHub

    orgs = [o.strip() for o in args.orgs.split(",") if o.strip()]
    print(LocalHub(args.root).add_token(args.user, orgs=orgs, write=not args.read_only))
    return 0


def _seed(args) -> int:
    from hubquant.assets import SMOLLM2_REPO
    from hubquant.localhub.local import LocalHub

    oid = LocalHub(args.root).seed_smollm2()
    print(f"{SMOLLM2_REPO} at {oid}")
    return 0


def _gate(args) -> int:
    from hubquant.localhub.local import LocalHub

    hub = LocalHub(args.root)
    mode = args.mode or (None if (args.grant or args.private or args.public) else "manual")
    if mode is not None:
        hub.set_gated(args.repo, False if mode == "off" else mode, repo_type=args.repo_type)
    for user in args.grant:
        hub.grant_access(args.repo, user, repo_type=args.repo_type)
    if args.private or args.public:
        hub.set_private(args.repo, args.private, repo_type=args.repo_type)
    repo = hub.store.get_repo(args.repo, args.repo_type)
    print(f"{repo.repo_id}: gated={repo.gated or False} private={repo.private}")
    return 0


def _trust(args) -> int:
    from hubquant.errors import UsageError
    from hubquant.localhub.local import LocalHub

    claims = dict(c.split("=", 1) for c in args.claim if "=" in c)
    if len(claims) != len(args.claim):
        raise UsageError("--claim takes NAME=VALUE", hint="e.g. --claim repository=acme/ci --claim workflow=x.yml")
    LocalHub(args.root).add_publisher(args.repo, issuer=args.issuer, claims=claims, repo_type=args.repo_type)
    print(f"{args.repo}: trusts {args.issuer} with {claims}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m hubquant.localhub.cli hub ...`: the same commands without importing the rest of hubquant's CLI
    (which loads torch); the test fixtures start the server this way in a fraction of a second."""
    import sys

    from hubquant.errors import HubquantError

    parser = argparse.ArgumentParser(prog="hubquant")
    add_parsers(parser.add_subparsers(dest="command", metavar="COMMAND"))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except HubquantError as e:
        print(f"error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"  fix: {e.hint}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
