"""The ``kronlm`` command: one entry point, one module per subcommand.

Each subcommand module defines a ``click`` command named ``command``. Errors a user can fix (a
missing file, an unknown preset, factor shapes that do not divide) are printed as one line
``kronlm: error: ...`` with exit status 2 (bad arguments) or 1 (failed run), never a traceback;
``KRONLM_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

SUBCOMMANDS = ("compress", "eval", "presets", "shapes", "distill", "truncate", "glue", "squad", "bench", "export", "merge")
_MODULES = {"eval": "evaluate"}


class _LazyGroup(click.Group):
    """Imports a subcommand's module only when it runs, so ``kronlm --help`` stays fast."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in SUBCOMMANDS:
            return None
        module = importlib.import_module(f"kronlm.cli.{_MODULES.get(name, name)}")
        return module.command


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kronlm")
def cli() -> None:
    """Compress transformer language models with Kronecker products, recover and measure them."""


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit status (0 ok, 1 failed run, 2 bad arguments)."""
    try:
        cli.main(args=argv, prog_name="kronlm", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("kronlm: aborted", err=True)
        return 130
    except click.ClickException as exc:  # usage errors: unknown option, missing argument
        click.echo(f"kronlm: error: {exc.format_message()}", err=True)
        return exc.exit_code
    except (ValueError, FileNotFoundError, NotADirectoryError, KeyError, OSError, RuntimeError, ImportError) as exc:
        if os.environ.get("KRONLM_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        click.echo(f"kronlm: error: {message}", err=True)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
