"""Read a wafer-map pickle in a child process, so that a file which crashes the reader, or runs code
through memory it corrupted, takes down only that child (layer L1).

``read_in_child`` starts ``python -m backend.sources.lswmd_child`` on the file, in an empty
temporary folder, with a few plain environment variables (none of this process's settings or
tokens) and no core dump. The child unpickles with ``checked_pickle.CheckedPandasUnpickler`` and
hands back only plain arrays: the wafers and the load report in the conversion cache's ``.npz``
(``cache.write_cache``), which this process reads with ``allow_pickle=False`` and ``WaferMaps``'s
own validation. A refusal or a broken file comes back as the exception the reader raised
(``pickle.UnpicklingError`` / ``ValueError``); a child killed by a signal, or one that exits
without a result, as ``UnsafeFileError``.

A process boundary, not a jail: code that runs in the child runs as this user. What stops the known
ways to corrupt memory is ``checked_pickle``; the boundary keeps an unknown one out of the process
that serves requests. Starting the child costs about a second (Python, numpy and pandas imports).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from backend.files import atomic_text_writer
from backend.settings import REPO_ROOT
from backend.sources.cache import LoadReport, read_cache
from backend.wafers import WaferMaps

CHILD_MODULE = "backend.sources.lswmd_child"
RESULT_FILE = "wafers.npz"
ERROR_FILE = "error.json"
#: The child's exit status when it wrote ``ERROR_FILE`` (1 is Python's own, for an uncaught error).
REPORTED_STATUS = 3
_REFUSED = "refused"  # the reader refused the pickle: pickle.UnpicklingError
_BROKEN = "broken"  # not a WM-811K frame, or unreadable: ValueError
#: Passed on to the child when set: what Python and its libraries need to start, nothing else.
_CHILD_ENVIRONMENT = ("PATH", "LD_LIBRARY_PATH", "LANG", "LC_ALL", "TMPDIR")
_MESSAGE_LIMIT = 2000


class UnsafeFileError(ValueError):
    """A wafer-map file that could not be read safely: the process reading it crashed or died."""


def read_in_child(
    path: Path, classes: Sequence[str], *, keep_unlabelled: bool, progress: bool
) -> tuple[WaferMaps, LoadReport]:
    """``read_lswmd``'s result for ``path``, worked out in a child process (see the module)."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="wafer-read-") as folder:
        command = [
            sys.executable,
            "-P",  # nothing from the child's working folder is imported
            "-s",
            "-X",
            "faulthandler",  # a crash prints where on stderr
            "-m",
            CHILD_MODULE,
            str(path.absolute()),
            str(path),
            folder,
            json.dumps(list(classes)),
        ]
        if keep_unlabelled:
            command.append("--keep-unlabelled")
        if progress:
            command.append("--progress")
        wafers, report = _run_child(command, Path(folder), path)
    return wafers, replace(report, seconds=time.perf_counter() - start)


def _run_child(command: Sequence[str], folder: Path, name: Path) -> tuple[WaferMaps, LoadReport]:
    """Run ``command`` in ``folder`` and read what it left there: ``RESULT_FILE`` on success,
    ``ERROR_FILE`` (exit status ``REPORTED_STATUS``) for an error it reported."""
    start = time.perf_counter()
    environment = {k: v for k, v in os.environ.items() if k in _CHILD_ENVIRONMENT}
    environment["PYTHONPATH"] = str(REPO_ROOT)
    status = subprocess.run(
        command, cwd=folder, env=environment, stdin=subprocess.DEVNULL, check=False
    ).returncode
    if status == 0:
        result = read_cache(folder / RESULT_FILE, start)
        if result is not None:
            wafers, report = result
            return wafers, replace(report, from_cache=False, cache_file=None)
        raise _unsafe(name, "exited without a readable result")
    if status == REPORTED_STATUS:
        reported = _reported_error(folder / ERROR_FILE)
        if reported is not None:
            raise reported
    if status == -signal.SIGKILL:
        raise _unsafe(name, "was killed by SIGKILL (out of memory, or stopped by hand)")
    if status < 0:
        raise _unsafe(name, f"was killed by {_signal_name(-status)}")
    raise _unsafe(name, f"exited with status {status}")


def write_child_error(folder: Path, error: BaseException, name: Path) -> None:
    """In the child: leave ``error`` for the parent to raise again (``_reported_error``)."""
    kind, message = _BROKEN, str(error)
    if isinstance(error, pickle.UnpicklingError):
        kind, message = _REFUSED, f"{name}: this file could not be read safely: {error}"
    elif not isinstance(error, ValueError):
        message = f"{name}: could not be read as a WM-811K frame: {type(error).__name__}: {error}"
    with atomic_text_writer(folder / ERROR_FILE) as out:
        json.dump({"kind": kind, "message": message[:_MESSAGE_LIMIT]}, out)


def _reported_error(path: Path) -> Exception | None:
    """The exception the child left in ``path``, or None when there is no well-formed one."""
    try:
        reported = json.loads(path.read_text(encoding="utf-8"))
        kind, message = reported["kind"], str(reported["message"])[:_MESSAGE_LIMIT]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if kind == _REFUSED:
        return pickle.UnpicklingError(message)
    if kind == _BROKEN:
        return ValueError(message)
    return None


def _unsafe(name: Path, what: str) -> UnsafeFileError:
    return UnsafeFileError(
        f"{name}: this file could not be read safely: the process reading it {what}. It is not "
        "the WM-811K LSWMD.zip / LSWMD.pkl as distributed, so it was unpickled in a separate "
        "process, and it broke that process: the file is corrupt, or made to corrupt memory. Read "
        "the LSWMD.zip as distributed, or bring the wafers as an .npz of arrays "
        "(backend.sources.arrays)."
    )


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
