"""The `plora` command line. Each command lives in its own module under cli/ and is registered here."""

from __future__ import annotations

import signal
import sys
from types import FrameType

import typer

try:  # recent typer carries its own copy of click; older ones use click itself
    from typer._click import exceptions as click_exceptions
except ImportError:
    from click import exceptions as click_exceptions  # type: ignore[no-redef]  # the same module

# Each command module registers itself on `app` when imported.
import cli.convert
import cli.demomodel
import cli.generate
import cli.inspect
import cli.runs
import cli.tinymodel
import cli.tokenize
import cli.train  # noqa: F401
from cli.app import app
from parallel.errors import PloraError, Stopped

# click < 8.2 prints the help itself on a bare `plora`; later ones raise this
NO_ARGS_IS_HELP = getattr(click_exceptions, "NoArgsIsHelpError", ())

# typer turns a KeyboardInterrupt inside a command into this *returned* status (standalone_mode=False)
INTERRUPTED = 128 + signal.SIGINT
STOP_SIGNALS: dict[int, str] = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}
_received: list[int] = []  # the signals that stopped the command, first one first


def _stop(signum: int, frame: FrameType | None) -> None:
    """SIGINT and SIGTERM both unwind as Ctrl-C does: finally blocks run, temporaries are removed, and
    nothing half-written is left under a final name. A second one kills at once, as SIGKILL would."""
    _received.append(signum)
    signal.signal(signum, signal.SIG_DFL)
    raise KeyboardInterrupt


def _catch_stop_signals() -> None:
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL):  # not if ignored
            signal.signal(signum, _stop)


def _exit_stopped() -> None:
    """One line and the shell's status for a process killed by that signal (130 Ctrl-C, 143 SIGTERM)."""
    signum = _received[0] if _received else signal.SIGINT
    print(f"plora: {STOP_SIGNALS[signum]}", file=sys.stderr)
    sys.exit(128 + signum)


def main() -> None:
    """Console entry point: known errors become one line on stderr and exit status 2; Ctrl-C and
    SIGTERM one line and 130 or 143 (training stops after its current step and saves, trainer.stop)."""
    _catch_stop_signals()
    try:
        status = app(standalone_mode=False)
    except PloraError as err:
        print(f"plora: error: {err}", file=sys.stderr)
        sys.exit(2)
    except Stopped as stop:  # the work was saved first: the line says how to go on
        print(f"plora: {STOP_SIGNALS[stop.signum]} {stop}", file=sys.stderr)
        sys.exit(128 + stop.signum)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        print("plora: aborted", file=sys.stderr)
        sys.exit(INTERRUPTED)
    except KeyboardInterrupt:
        _exit_stopped()
    except OSError as err:  # the system refused (disk full, permissions, ...): say what and where
        where = f"{err.filename}: " if err.filename else ""
        print(f"plora: error: {where}{err.strerror or err}", file=sys.stderr)
        sys.exit(2)
    except NO_ARGS_IS_HELP as err:  # bare `plora`: the help is the answer
        err.show()
        sys.exit(err.exit_code)
    except click_exceptions.ClickException as err:  # usage errors: one line too, with where to find help
        message = " ".join(err.format_message().split())
        ctx = getattr(err, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        print(f"plora: error: {message}{hint}", file=sys.stderr)
        sys.exit(err.exit_code)
    if status == INTERRUPTED or _received:
        _exit_stopped()
    sys.exit(status or 0)
