"""`optimum-cli hubquant`: the wheel installs this file as optimum/commands/register/register_hubquant.py.

optimum-cli imports every module of the `optimum.commands.register` namespace and registers the command classes
in its `REGISTER_COMMANDS`; keep it light, the commands import hubquant when they run.
"""
from hubquant.optimum_cli import HubquantCommand

REGISTER_COMMANDS = [HubquantCommand]
