"""Running `plora` as a user does, and the one-line error bad input must give.

:func:`run_cli` runs the console entry point (``cli.main.main``: the same PloraError -> one line, exit 2
mapping) inside the test process, isolated, which saves a process start of seconds per call.
:func:`run_plora` starts the installed script as a real process: for what only a process shows (the
entry point itself, signals, torchrun, environment read at import, file descriptors).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import traceback
import types
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from typer.testing import CliRunner

import cli.main

WIDE = {"COLUMNS": "200"}  # rich output as wide as a roomy terminal (no wrapped lines)
# One torch thread per run, as the training processes had: the models are tiny and 2 cores are shared.
IN_PROCESS = {**WIDE, "OMP_NUM_THREADS": "1"}


def run_plora(
    plora_bin: Path,
    *args: object,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: int = 120,
) -> subprocess.CompletedProcess[str]:
    """`plora ARGS...` in a real subprocess."""
    return subprocess.run(
        [str(plora_bin), *map(str, args)],
        cwd=cwd,
        env={**os.environ, **WIDE, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_cli(
    *args: object, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`plora ARGS...` through ``cli.main.main`` in this process, as :func:`run_plora` would run it: own
    argv, stdin/stdout/stderr (CliRunner's), environment, working directory, signal handlers, warning
    filters and torch settings, all put back afterwards. An exception that escapes ``main`` is a
    traceback on stderr and status 1, as in a process."""
    argv = ["plora", *map(str, args)]
    outer_stderr = sys.stderr
    with (
        CliRunner().isolation(env={**IN_PROCESS, **(env or {})}) as (stdout, stderr, _),
        _own_process_state(argv, cwd, outer_stderr),
    ):
        try:
            cli.main.main()
            status = 0
        except SystemExit as done:
            status = done.code if isinstance(done.code, int) else 1
        except BaseException:  # noqa: BLE001 - a process would print it and die: so does the run
            traceback.print_exc()
            status = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        return subprocess.CompletedProcess(argv, status, _text(stdout), _text(stderr))


def _text(stream: object) -> str:
    return stream.getvalue().decode("utf-8", errors="backslashreplace")  # type: ignore[attr-defined]


@contextlib.contextmanager
def _own_process_state(argv: list[str], cwd: Path | None, outer_stderr: object) -> Iterator[None]:
    """What a fresh process would have of its own, kept from leaking into the next test and back."""
    saved_argv, saved_cwd, saved_env = sys.argv, os.getcwd(), dict(os.environ)
    saved_main = sys.modules["__main__"]
    saved_signals = {signum: signal.getsignal(signum) for signum in cli.main.STOP_SIGNALS}
    saved_torch = (torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled())
    cli.main._received.clear()
    if os.environ.get("OMP_NUM_THREADS"):  # what a new process would take for its thread pool
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    sys.argv = argv
    sys.modules["__main__"] = types.ModuleType("__main__")  # a script's: click names the program argv[0]
    if cwd is not None:
        os.chdir(cwd)
    try:
        with warnings.catch_warnings(), _logging_moved(outer_stderr, sys.stderr):
            _fresh_warnings()
            yield
    finally:
        sys.argv = saved_argv
        sys.modules["__main__"] = saved_main
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for signum, handler in saved_signals.items():
            signal.signal(signum, handler)
        cli.main._received.clear()
        torch.set_num_threads(saved_torch[0])
        torch.set_default_dtype(saved_torch[1])
        torch.set_grad_enabled(saved_torch[2])


def _fresh_warnings() -> None:
    """A new interpreter's warning filters, printing to (the captured) stderr instead of to pytest."""
    warnings.resetwarnings()
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
    warnings.showwarning = _show_warning
    warnings.onceregistry.clear()


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextlib.contextmanager
def _logging_moved(old: object, new: object) -> Iterator[None]:
    """Logging handlers made at import (transformers') hold the stderr of that time: point them at the
    run's stderr meanwhile, so that their lines land there as in a process."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    handlers = {
        h
        for logger in loggers
        for h in getattr(logger, "handlers", ())
        if type(h) is logging.StreamHandler and h.stream in (old, sys.__stderr__)
    }
    saved = {h: h.setStream(new) for h in handlers}  # type: ignore[arg-type]
    try:
        yield
    finally:
        for handler, previous in saved.items():
            handler.setStream(previous)


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """Assert that the run failed as bad input must (exit status 2, exactly one line ``plora: error: ...``
    on stderr, no traceback) and return that line."""
    assert done.returncode == 2, (done.stdout or "") + done.stderr
    assert done.stderr.startswith("plora: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.endswith("\n"), done.stderr
    return done.stderr.rstrip("\n")
