"""The `plora` command line. Each command lives in its own module under cli/ and is registered here."""

from __future__ import annotations

import sys

import typer

try:  # recent typer carries its own copy of click; older ones use click itself
    from typer._click import exceptions as click_exceptions
except ImportError:
    from click import exceptions as click_exceptions

# Each command module registers itself on `app` when imported.
import cli.convert  # noqa: F401
import cli.demomodel  # noqa: F401
import cli.generate  # noqa: F401
import cli.inspect  # noqa: F401
import cli.runs  # noqa: F401
import cli.tinymodel  # noqa: F401
import cli.tokenize  # noqa: F401
import cli.train  # noqa: F401
from cli.app import app
from pipeline.errors import PloraError

# click < 8.2 prints the help itself on a bare `plora`; later ones raise this
NO_ARGS_IS_HELP = getattr(click_exceptions, "NoArgsIsHelpError", ())


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
    except OSError as err:  # the system refused (disk full, permissions, ...): say what and where
        where = f"{err.filename}: " if err.filename else ""
        print(f"plora: error: {where}{err.strerror or err}", file=sys.stderr)
        sys.exit(1)
    except NO_ARGS_IS_HELP as err:  # bare `plora`: the help is the answer
        err.show()
        sys.exit(err.exit_code)
    except click_exceptions.ClickException as err:  # usage errors: one line too, with where to find help
        message = " ".join(err.format_message().split())
        ctx = getattr(err, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        print(f"plora: error: {message}{hint}", file=sys.stderr)
        sys.exit(err.exit_code)

