"""Graceful preemption: SIGTERM, SIGINT and SIGUSR2 let the current training step finish, write a checkpoint and
exit with EXIT_PREEMPTED; `train.resume=auto` (the default) continues from there.

A handler that was installed before zoodip's (submitit's, under the submitit launcher) is called after the
checkpoint is written, so submitit can requeue the job (it does so on SIGUSR2, the signal it asks SLURM for).
A second signal while the first is being handled stops at once (KeyboardInterrupt); the previous checkpoint,
written atomically, survives.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: a temporary stop, run the same command again to continue

_received: list[int] = []  # the first signal caught inside handle_signals(), if any
_previous: dict[int, Any] = {}  # the handlers zoodip's replaced, by signal number


class Preempted(Exception):
    """Training stopped on a signal after a completed step, with its checkpoint written."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step
        super().__init__(f"stopped by {signal_name(signum)} after step {step}, checkpointed")


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def requested() -> int | None:
    """The signal that asked the run to stop, or None."""
    return _received[0] if _received else None


def _handle(signum: int, frame: Any) -> None:
    if _received:
        raise KeyboardInterrupt(f"second signal {signal_name(signum)} while stopping: stopped at once")
    _received.append(signum)
    log.warning("%s received: finishing the current step, writing a checkpoint, then exiting", signal_name(signum))


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Catch SIGNALS for the duration of the block (main thread only; elsewhere signals cannot be caught)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in SIGNALS}
    _received.clear()
    _previous.clear()
    _previous.update(saved)
    try:
        for s in SIGNALS:
            signal.signal(s, _handle)
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        _received.clear()


def previous_handler(signum: int) -> Callable[[int, Any], Any] | None:
    """The handler zoodip's replaced for `signum`, if it was a Python function other than the KeyboardInterrupt
    default (submitit's requeue on SIGUSR2, its log-only handler on SIGTERM)."""
    handler = _previous.get(signum)
    return handler if callable(handler) and handler is not signal.default_int_handler else None


def hand_on(signum: int) -> None:
    """After the checkpoint: call the handler that was there before zoodip's (under submitit this requeues the job
    and exits)."""
    handler = previous_handler(signum)
    if handler is not None:
        log.info("handing %s on to %s", signal_name(signum), getattr(handler, "__qualname__", handler))
        handler(signum, None)
