"""One writer per run directory: ``train`` and ``analyze`` hold ``RUN/.lock`` while they work.

Two processes on one run directory would both train the same epochs or compute the whole grid and
append to one cell store. The second one instead says who holds the lock and stops (a
:class:`CriticalityError`, exit status 2), or, with ``wait=True`` (``--wait``), waits for it.

The lock is an advisory ``flock`` on ``RUN/.lock``; the file holds the holder's PID, host and command,
only to name it in the message. The kernel releases a ``flock`` when its process dies however it dies
(SIGKILL included), so a lock left by a dead process is stale by construction and simply taken over. On a
network file system ``flock`` is as reliable as the file system's locking (NFSv4: yes; some FUSE file
systems: no lock at all — then nothing is refused, as before). Under ``torchrun`` rank 0 takes the lock
and tells every rank the outcome, so all ranks stop together and only rank 0 says so. While waiting it
logs one INFO message (logger ``criticality.infra.lock``; the CLI shows it on stderr).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from criticality.errors import CriticalityError
from criticality.infra import distributed

log = logging.getLogger(__name__)
NAME = ".lock"
POLL_S = 0.5  # how often a waiting process tries again


def _holder(path: Path) -> str:
    """Who holds the lock, as written in the lock file (best effort: it may be mid-write)."""
    try:
        info = json.loads(path.read_text())
        return f"PID {info['pid']} on {info['host']} ({info['command']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _open(run_dir: Path) -> int:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        return os.open(run_dir / NAME, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise CriticalityError(f"{run_dir} is not writable ({e.strerror}); copy the run directory somewhere "
                                   "writable and run there") from e
        raise


def acquire(run_dir: str | os.PathLike, what: str, *, wait: bool = False) -> int:
    """Take the lock of ``run_dir`` for ``what`` (e.g. "criticality analyze"); returns the open descriptor."""
    run_dir = Path(run_dir)
    fd = _open(run_dir)
    said = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = _holder(run_dir / NAME)
            if not wait:
                os.close(fd)
                raise CriticalityError(f"{run_dir} is in use by {holder}; wait for it to finish, or rerun with "
                                       "--wait to wait for it") from None
            if not said:
                log.info("waiting for %s to release %s …", holder, run_dir)
                said = True
            time.sleep(POLL_S)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": what,
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return fd


def release(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        os.close(fd)


@contextlib.contextmanager
def held(run_dir: str | os.PathLike, what: str, *, wait: bool = False) -> Iterator[None]:
    """Hold the run directory's lock for the block. Under torchrun only rank 0 locks; every rank gets the
    outcome (so a refused lock stops all of them with the same error)."""
    fd, problem = None, None
    if distributed.is_main():
        try:
            fd = acquire(run_dir, what, wait=wait)
        except CriticalityError as e:
            problem = str(e)
    problem = distributed.broadcast(problem)
    if problem is not None:
        raise CriticalityError(problem)
    try:
        yield
    finally:
        if fd is not None:
            release(fd)
