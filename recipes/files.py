"""Crash-safe files: atomic replacement, fsynced appends, and the fault-injection hook the
crash tests kill the recipe with (``$LOWRANK_RECIPE_FAULT``)."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

#: test hook: ``"<point>:<n>"`` kills this process with SIGKILL the n-th time it reaches
#: ``fault_point(<point>)`` (points: atomic-open, atomic-write, atomic-replace, atomic-dirsync,
#: append-write, checkpoint-state, checkpoint-prune); unset in normal runs
FAULT_ENV = "LOWRANK_RECIPE_FAULT"
_fault_hits: dict[str, int] = {}


def _fault_armed(point: str) -> bool:
    return bool(point) and os.environ.get(FAULT_ENV, "").partition(":")[0] == point


def fault_point(point: str) -> None:
    """SIGKILL this process here if ``$LOWRANK_RECIPE_FAULT`` names ``point`` (tests only)."""
    if not _fault_armed(point):
        return
    _fault_hits[point] = _fault_hits.get(point, 0) + 1
    if _fault_hits[point] == int(os.environ[FAULT_ENV].partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _write_fd(fd: int, payload: bytes, point: str) -> None:
    """Write all of ``payload`` (in two halves around ``point`` when a test armed it)."""
    if _fault_armed(point):
        _write_fd(fd, payload[:len(payload) // 2], "")
        fault_point(point)
        payload = payload[len(payload) // 2:]
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` durable (no-op where directories cannot be
    opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` so that a kill at any moment leaves the old file or the new
    one, never a partial one.

    The data goes to a temporary file in the same directory (``.<name>.<pid>.tmp``), which is
    flushed and fsynced, renamed over ``path`` with ``os.replace``, and the directory is fsynced.

    Parameters
    ----------
    path : str or os.PathLike
        The file to write.
    data : str or bytes
        Its whole new content (``str`` is encoded as UTF-8).
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        fault_point("atomic-open")
        _write_fd(fd, payload, "atomic-write")
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    fault_point("atomic-replace")
    os.replace(tmp, path)
    fault_point("atomic-dirsync")
    fsync_dir(path.parent)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append ``line`` and a newline to ``path`` with one write, then fsync.

    A kill can only leave a partial *last* line (no newline, or not JSON), which
    ``Metrics.truncate`` drops at resume.
    """
    path = Path(path)
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        _write_fd(fd, (line + "\n").encode("utf-8"), "append-write")
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)


def remove_stale_temporaries(directory: Path) -> None:
    """Temporary files of :func:`atomic_write` left by a killed process."""
    for tmp in directory.glob(".*.tmp"):
        if re.fullmatch(r"\.(metrics\.jsonl|summary\.json|rank\d+\.json)\.\d+\.tmp", tmp.name):
            tmp.unlink(missing_ok=True)
