"""Graceful stops: SIGINT or SIGTERM asks the training loop to stop after the current optimizer step.

The loop then saves a resumable checkpoint and raises :class:`~parallel.errors.Stopped`. A second
signal gets the default action, which ends the process at once (also inside a collective or a long
forward, where a Python handler would not run): checkpoints already published stay whole, since each is
written under a temporary name and renamed into place, and a half-written temporary is removed by the
next run.

Under torchrun one stop can arrive twice: Ctrl-C in a terminal reaches every process of the foreground
group, and torchrun, stopping too, sends each worker the signal it got. There the first two signals are
one request, and the third ends the process at once.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """The first stop signal received while training (None: none yet)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.caught: list[signal.Signals] = []  # the signals handled here (not those the process ignores)
        self.received = 0
        self.copies = 2 if "TORCHELASTIC_RUN_ID" in os.environ else 1  # signals that make one request

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = self.signum or signum
        self.received += 1
        if self.received >= self.copies:  # the next one ends the process at once
            for other in self.caught:
                signal.signal(other, signal.SIG_DFL)


@contextmanager
def graceful_stops() -> Iterator[StopRequest]:
    """While training, a stop signal is recorded rather than raised. Afterwards the handlers in place
    before come back, unless a stop was asked for: then the next signal still ends the process at once,
    also while the stop is reported. Signals the process ignores stay ignored; off the main thread
    (where Python cannot install handlers) nothing changes."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    request.caught = [signum for signum, handler in before.items() if handler is not signal.SIG_IGN]
    for signum in request.caught:
        signal.signal(signum, request.handle)
    try:
        yield request
    finally:
        for signum in request.caught if request.signum is None else ():
            handler = before[signum]
            if handler is not None:  # None: a handler not installed from Python, which cannot be put back
                signal.signal(signum, handler)
