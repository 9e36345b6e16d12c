"""Advisory locks on local files (``fcntl.flock``): one ``amed distill`` per output folder at a time.

The kernel drops a flock when its process dies, SIGKILL included, so a killed run never leaves a stale lock behind:
the next run takes it at once. A second run while the first is alive is refused with one line naming the holder.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["LockHeld", "hold_lock", "release_lock", "pid_alive"]

_HELD: dict[str, int] = {}  # path -> fd, held until release_lock or process exit


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a process of another user counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LockHeld(ValueError):
    """Another live process holds the lock."""


def hold_lock(path: str | os.PathLike, what: str) -> Path:
    """Take the exclusive lock ``path`` (created if needed) for this process, or raise :class:`LockHeld` naming the
    process that holds it. Idempotent within one process."""
    path = Path(path).absolute()
    key = str(path)
    if key in _HELD:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        finally:
            os.close(fd)
        raise LockHeld(f"{what} is in use by another amed distill (pid {holder}); wait for it to finish, or use "
                       "another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = fd
    return path


def release_lock(path: str | os.PathLike) -> None:
    fd = _HELD.pop(str(Path(path).absolute()), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
