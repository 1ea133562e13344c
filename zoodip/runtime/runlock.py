"""One run folder, one writer: an exclusive flock on <run dir>/.zoodip.lock for as long as a run works there.

The kernel releases the lock when its holder exits, however it exits (even kill -9), so a lock can never be left
behind: a lock file that still names a holder but is not locked is a stale one, taken over with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from zoodip.errors import ZoodipError

log = logging.getLogger(__name__)

LOCK_FILE = ".zoodip.lock"


def _holder_text() -> str:
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return f"pid {os.getpid()} on {socket.gethostname()} since {started}\n"


def _read_holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode("utf-8", "replace").strip()


def _write_holder(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, text.encode())
    os.fsync(fd)


def _try_lock(fd: int, path: Path) -> bool:
    """True when locked; False when the file system cannot lock at all (the run goes on, with a warning)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            holder = _read_holder(fd) or "another process"
            raise ZoodipError(
                f"{path.parent} is in use by another zoodip run ({holder}); wait for it to end or choose "
                f"another run folder (hydra.run.dir=...)"
            ) from None
        log.warning("cannot lock %s (%s): nothing stops a second run from writing to this folder", path, err)
        return False
    return True


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold `run_dir`'s lock for the block; a folder a live run holds is a ZoodipError naming that run."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise ZoodipError(f"cannot create the lock file {path} ({err.strerror}); is the run folder writable?") from None
    try:
        locked = _try_lock(fd, path)
        stale = _read_holder(fd)
        if locked and stale:
            log.warning("taking over the lock of %s: its holder (%s) is no longer running", path.parent, stale)
        _write_holder(fd, _holder_text())
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # an empty lock file: its last holder ended cleanly
    finally:
        os.close(fd)  # closing the descriptor releases the flock
