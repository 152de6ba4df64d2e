"""One writer per run dir: an flock on RUN_DIR/.lock, held for the life of the run.

The kernel drops an flock when its process dies, however it dies (SIGKILL, OOM, power loss of a
network client aside), so a killed run never leaves a lock that needs cleaning up by hand: the
next `--resume` simply takes it. The file's text (pid and host) only serves the error message.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import sys
from pathlib import Path

from cifar_transfer.system.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not protected against a second writer
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
# O_NOFOLLOW: a .lock planted as a symlink would have its target truncated and overwritten (or
# created) with our pid. O_NONBLOCK: a planted FIFO must not hang the open.
_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


class RunLock:
    """A held lock on a run dir; release() frees it and removes the file."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        """Give the run dir back. The file goes while still locked: acquire() checks for that."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


def _holder(fd: int) -> str:
    """'pid N on host H' as the holder wrote it, or a neutral phrase."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = os.pread(fd, 200, 0).decode().strip()
        if text:
            return text
    return "another process"


def _not_a_lock_file(path: Path, what: str) -> UserError:
    return UserError(
        f"{path} is {what}, not a lock file a run could have written: delete it (see what it "
        f"points at first), or choose another --out"
    )


def _open_lock_file(path: Path, run_dir: Path) -> int:
    """The lock file opened for writing; a symlink or anything but a regular file is refused."""
    try:
        fd = os.open(path, _OPEN_FLAGS, 0o644)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK) or path.is_symlink():  # EMLINK: BSD's ELOOP
            raise _not_a_lock_file(path, "a symbolic link") from None
        if e.errno == errno.EISDIR:
            raise _not_a_lock_file(path, "a folder (not a regular file)") from None
        raise UserError(
            f"cannot write in run dir {run_dir} ({e.strerror}): make it writable, or choose "
            f"another --out"
        ) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _not_a_lock_file(path, "not a regular file (a FIFO, socket or device)")
    return fd


def acquire(run_dir: Path) -> RunLock:
    """Lock `run_dir` for this process or raise a UserError naming the process that holds it."""
    path = Path(run_dir) / LOCK_NAME
    if fcntl is None:
        return RunLock(path, None)
    while True:
        fd = _open_lock_file(path, run_dir)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise UserError(
                f"run dir {run_dir} is in use by {holder} (a cifar-transfer train is writing it): "
                f"let it finish or stop it, then continue it with --resume {run_dir}; "
                f"or choose another --out"
            ) from None
        except OSError as e:  # a filesystem without flock (some network mounts): say so, go on
            print(f"note: cannot lock {path} ({e.strerror}): make sure no other run writes to "
                  f"{run_dir}", file=sys.stderr)
            return RunLock(path, fd)
        # The holder may have deleted the file between our open() and flock(): then we hold a lock
        # on a file nobody else will see, so start over on the current one.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
    return RunLock(path, fd)
