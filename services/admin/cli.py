"""``neopulse`` — the operator's command line.

Each group of commands lives in its own module and registers itself on ``app``.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="neopulse",
    help="Operate a NeoPulse stack: status, orders, positions, kill switch, flatten, trades, logs, stop.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _register() -> None:
    # Importing a command module registers its commands on ``app``.
    import importlib

    for mod in ("cmd_ops", "cmd_risk", "cmd_exec", "cmd_strategy", "cmd_feed", "cmd_bench", "cmd_stack",
                "cmd_chain", "cmd_history"):  # fmt: skip
        try:
            importlib.import_module(f"services.admin.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"services.admin.{mod}":
                raise


def main() -> None:
    _register()
    app()


if __name__ == "__main__":
    # `python -m services.admin.cli`: this file runs as __main__, while the command modules
    # register on the importable `services.admin.cli.app`; run that one.
    from services.admin.cli import main as _main

    _main()
