"""optimum-cli registration: installed as optimum/commands/register/quantkit.py (see setup.py).

optimum-cli imports every module in the ``optimum.commands.register`` namespace at start-up and
reads ``REGISTER_COMMANDS``; this one stays light (argparse only) and hands the arguments to
quantkit's own CLI, so `optimum-cli quantkit apply ...` and `quantkit apply ...` are one code path.
"""

from quantkit.integrations.optimum_cli import QuantkitCommand

REGISTER_COMMANDS = [QuantkitCommand]
