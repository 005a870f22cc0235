"""The `hubquant` command. Subcommands live beside the code they drive; this file wires them up and
maps hubquant's error types to exit codes (see hubquant.errors)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

import hubquant  # noqa: F401  (sets the Hub environment before huggingface_hub is imported)
from hubquant.errors import AuthError, HubquantError

# module -> it defines `add_parsers(subparsers)`; each parser sets `func(args) -> int`.
SUBCOMMAND_MODULES = (
    "hubquant.convert_cli",   # convert
    "hubquant.localhub.cli",  # hub serve | add-token | seed
    "hubquant.runtime.cli",   # generate
    "hubquant.space_cli",     # space
    "hubquant.service.cli",   # watch, serve
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hubquant",
        description="Quantized variants of Hugging Face Hub models: download, calibrate, quantize, card, push.",
    )
    parser.add_argument("--version", action="version", version=f"hubquant {hubquant.__version__}")
    add_all_subcommands(parser.add_subparsers(dest="command", metavar="COMMAND"))
    return parser


def add_all_subcommands(sub) -> None:
    """Add every hubquant subcommand to `sub` (also used by `optimum-cli hubquant`)."""
    for name in SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that part of hubquant is not built yet
                continue
            raise
        mod.add_parsers(sub)


def run(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return call(args.func, args)


def call(handler, args) -> int:
    """Run a subcommand handler; hubquant errors become one clear message and their exit code."""
    try:
        return int(handler(args) or 0)
    except HubquantError as e:
        if os.environ.get("HUBQUANT_DEBUG") == "1":
            raise
        print(f"error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"  fix: {e.hint}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("HUBQUANT_DEBUG") == "1":
            raise
        if _is_oidc_error(e):
            # huggingface_hub's trusted-publishing exchange (HF_OIDC_RESOURCE) runs wherever a token is first needed
            print(f"error: the Hub's trusted-publishing login failed: {str(e).splitlines()[0]}", file=sys.stderr)
            print("  fix: run in a GitHub Actions job with `permissions: id-token: write` whose workflow the Hub "
                  "trusts, or set HF_TOKEN and unset HF_OIDC_RESOURCE", file=sys.stderr)
            return AuthError.exit_code
        # a bug or an error hubquant does not know yet: still one line and a fix
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"error: unexpected {type(e).__name__}: {first}", file=sys.stderr)
        print("  fix: run again with HUBQUANT_DEBUG=1 to see the traceback, and report it", file=sys.stderr)
        return 1


def _is_oidc_error(e: BaseException) -> bool:
    try:
        from huggingface_hub.errors import OIDCError
    except ImportError:  # huggingface_hub without trusted publishing
        return False
    return isinstance(e, OIDCError)


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
