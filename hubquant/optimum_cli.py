"""`optimum-cli hubquant ...`: hubquant's commands in optimum's command registry.

optimum-cli loads every module in the `optimum.commands.register` namespace and registers the classes in its
`REGISTER_COMMANDS`. hubquant's wheel ships that module (hubquant/optimum_register.py, installed as
optimum/commands/register/register_hubquant.py by setup.py's build step); the commands run the same code as
`hubquant ...`.
"""
from __future__ import annotations

import argparse
import sys

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


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
