"""`optimum-cli quantkit ...`: an optimum CLI command that forwards to quantkit's typer app."""

from __future__ import annotations

import argparse

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

COMMANDS = "apply, eval, sensitivity, verify, validate, recipes, formats, passes, inspect"


class QuantkitCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="quantkit", help=f"post-training quantization with quantkit ({COMMANDS})")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        # quantkit parses its own options (typer); argparse only collects them
        parser.add_argument("quantkit_args", nargs=argparse.REMAINDER,
                            help=f"a quantkit command and its options: {COMMANDS}")

    def run(self) -> None:
        from quantkit.cli import app

        app(args=list(self.args.quantkit_args), prog_name="optimum-cli quantkit")
