"""`python -m quantkit ...` (and `torchrun ... -m quantkit apply ...`): the CLI."""

from quantkit.cli import main

if __name__ == "__main__":
    main(prog_name="quantkit")
