"""`optimum-cli hubquant ...`: hubquant's commands in optimum's command registry.

optimum-cli loads every module in the `optimum.commands.register` namespace and registers the classes in its
`REGISTER_COMMANDS`. `python -m hubquant.optimum_cli --install` writes that module (register_hubquant.py)
into the installed optimum (scripts/setup.sh does it); the commands then run the same code as `hubquant ...`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

REGISTER_MODULE = "register_hubquant.py"
REGISTER_SOURCE = '''"""Registers `optimum-cli hubquant` (written by `python -m hubquant.optimum_cli --install`)."""
from hubquant.optimum_cli import HubquantCommand

REGISTER_COMMANDS = [HubquantCommand]
'''


class _Exit:
    """What optimum-cli expects back from `args.func(args)`: an object with run()."""

    def __init__(self, handler, args):
        self.handler, self.args = handler, args

    def run(self):
        from hubquant.cli import call

        sys.exit(call(self.handler, self.args))


def _wrap_funcs(parser: argparse.ArgumentParser) -> None:
    handler = parser.get_default("func")
    if handler is not None:
        parser.set_defaults(func=lambda args, h=handler: _Exit(h, args))
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                _wrap_funcs(sub)


class HubquantCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="hubquant", help="quantize Hub models into ready-to-use variants (hubquant)")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser):
        from hubquant.cli import add_all_subcommands

        sub = parser.add_subparsers(dest="hubquant_command", metavar="COMMAND")
        add_all_subcommands(sub)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for p in set(action.choices.values()):
                    _wrap_funcs(p)

    def run(self):
        self.parser.print_help()


def register_dir() -> Path:
    import optimum

    return Path(list(optimum.__path__)[0]) / "commands" / "register"


def install_register() -> Path:
    """Write optimum/commands/register/register_hubquant.py (a PEP 420 namespace: no __init__.py)."""
    d = register_dir()
    d.mkdir(parents=True, exist_ok=True)
    target = d / REGISTER_MODULE
    target.write_text(REGISTER_SOURCE)
    return target


if __name__ == "__main__":
    if sys.argv[1:] == ["--install"]:
        print(f"registered optimum-cli hubquant: {install_register()}")
    else:
        print("usage: python -m hubquant.optimum_cli --install")
        sys.exit(2)
