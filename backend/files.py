"""Files written whole or not at all, and read only when they are files: the one way this project
writes a file that something reads back (model versions and cards, CURRENT, stored die maps and set routings, the data cache,
picture files, the study's phases). Layer L0 (standard library only; the file system is the
only outside world it touches, and nothing here decides anything).

A write goes to a temporary file in the target's folder, is flushed and fsynced, renamed over the
target, and the folder is fsynced so the rename survives a power cut. A reader sees the old file
or the new one, never half of one; a writer that fails or is killed leaves the old file and at
most a hidden ``.<name>.*.tmp`` beside it.
"""

from __future__ import annotations

import io
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, TextIO

#: The permission bits of a written file when none are asked for: readable by all (mkstemp
#: makes 0600; a cache shared between a user and CI must be readable), writable by the owner.
DEFAULT_MODE = 0o644


@contextmanager
def atomic_writer(path: Path, *, mode: int = DEFAULT_MODE) -> Iterator[BinaryIO]:
    """An open binary file that becomes `path` when the block ends without an exception (for
    writers that stream: `torch.save`, `numpy.savez`). The folder is created when missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        tmp.chmod(mode)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_text_writer(
    path: Path, *, mode: int = DEFAULT_MODE, newline: str | None = None
) -> Iterator[TextIO]:
    """`atomic_writer` for text, UTF-8 encoded (`newline` as for `open`; "" for `csv`)."""
    with atomic_writer(path, mode=mode) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline=newline)
        try:
            yield text
            text.flush()
        finally:
            text.detach()


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = DEFAULT_MODE) -> None:
    """Make `path` hold exactly `data` (see the module's docstring)."""
    with atomic_writer(path, mode=mode) as handle:
        handle.write(data)


def atomic_write_text(path: Path, text: str, *, mode: int = DEFAULT_MODE) -> None:
    """Make `path` hold exactly `text`, UTF-8 encoded."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new link in `directory` durable (a no-op where a folder cannot be
    opened or synced)."""
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


class NotARegularFileError(OSError):
    """A path that should hold a file holds a FIFO, a device, a socket or a directory."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_regular_file(path: Path, limit: int) -> bytes:
    """The first `limit` + 1 bytes of `path` (following links) when it is a regular file.

    Anything else raises `NotARegularFileError` (an OSError) without being read: opening a FIFO
    for reading blocks until a writer comes, and a device may never end. The type is checked
    before opening and again on the open descriptor (opened non-blocking), so a swap between
    the two cannot block either. FileNotFoundError when there is nothing at `path`.
    """
    before = path.stat()
    if not stat.S_ISREG(before.st_mode):
        raise NotARegularFileError(f"{path.name} is {_kind(before.st_mode)}, not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFileError(f"{path.name} is {_kind(mode)}, not a regular file")
        chunks: list[bytes] = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
