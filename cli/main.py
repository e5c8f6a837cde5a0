"""The `plora` command line. Each command lives in its own module under cli/ and is registered here."""

from __future__ import annotations

import sys

import click
import typer

from cli.app import app
from pipeline.errors import PloraError

# Each command module registers itself on `app` when imported.

def main() -> None:
    """Console entry point: known errors become one line on stderr and exit status 2."""
    try:
        app(standalone_mode=False)
    except PloraError as err:
        print(f"plora: error: {err}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        print("plora: aborted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("plora: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # click's usage errors and the like
        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise

