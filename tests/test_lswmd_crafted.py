"""Crafted LSWMD pickles that use only admitted names yet corrupt memory (issue 15, row 5).

Each file is read by a CHILD Python (``python -c``), never by the pytest process: before the fix
the child died of SIGSEGV (rc -11) in ``read_lswmd``; now ``load_wafers`` refuses each one with a
clear ``pickle.UnpicklingError`` and the child exits normally. A control test keeps showing that the
payloads are real: read with the plain allow-listed unpickler, the same file still crashes a child.
"""

from __future__ import annotations

import pickle
import pickletools
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from backend.settings import REPO_ROOT
from backend.sources.lswmd import ADMITTED_GLOBALS

#: numpy's array reconstructor, as ``ndarray.__reduce__`` names it (numpy._core or numpy.core).
RECONSTRUCT = np.zeros(1).__reduce__()[0]
#: The pointer the crafted die-map bytes hold: an address nothing is mapped at.
POINTER = 0x10
CRASH_CODES = (-signal.SIGSEGV, -signal.SIGBUS)


class Reduces:
    """A pickle payload: unpickling calls ``function(*args)`` and, with a ``state``, BUILDs it."""

    def __init__(self, function: object, args: tuple[object, ...], state: object = None) -> None:
        self.function, self.args, self.state = function, args, state

    def __reduce__(self) -> tuple[Any, ...]:
        if self.state is None:
            return self.function, self.args
        return self.function, self.args, self.state


def object_field_dtype() -> Reduces:
    """``numpy.dtype('V8')`` whose state declares an object field, with flags 0 (no refcounting,
    no list pickling), so numpy copies the array's raw bytes into it as a PyObject pointer."""
    return Reduces(
        np.dtype, ("V8", False, True), (3, "|", None, ("f",), {"f": (np.dtype("O"), 0)}, 8, 1, 0)
    )


def object_dtype_without_flags() -> Reduces:
    """``numpy.dtype('O')`` with its flags zeroed: raw bytes become object pointers."""
    return Reduces(np.dtype, ("O8", False, True), (3, "|", None, None, None, -1, -1, 0))


def array_of_pointers(dtype: Reduces) -> Reduces:
    """``_reconstruct`` + ndarray state: a one-element array of ``dtype`` filled from raw bytes."""
    raw = struct.pack("<Q", POINTER)
    return Reduces(RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, (1,), dtype, False, raw))


def frame_holding(failure_type_cell: object) -> pd.DataFrame:
    """A one-wafer WM-811K frame whose ``failureType`` cell is ``failure_type_cell``."""
    frame = pd.DataFrame(
        {
            "waferMap": pd.Series([np.ones((3, 3), np.uint8)], dtype=object),
            "lotName": pd.Series(["lot1"], dtype=object),
            "waferIndex": [1.0],
            "failureType": pd.Series([failure_type_cell], dtype=object),
        }
    )
    frame.columns = pd.Index(frame.columns, dtype=object)
    return frame


def frame_with_block_outside_the_columns() -> Reduces:
    """A frame whose one block claims column 2**40: pandas' Cython index (no bounds check) writes
    there on the first column lookup."""
    from pandas._libs.internals import _unpickle_block
    from pandas.core.internals.managers import BlockManager

    values = np.empty((4, 1), dtype=object)
    values[:, 0] = [np.ones((3, 3), np.uint8), "lot1", 1.0, np.array([["none"]])]
    block = Reduces(_unpickle_block, (values, np.array([0, 1, 2, 1 << 40]), 2))
    columns = pd.Index(["waferMap", "lotName", "waferIndex", "failureType"], dtype=object)
    manager = Reduces(BlockManager, ((block,), [columns, pd.RangeIndex(1)]))
    return Reduces(pd.DataFrame, (), {"_mgr": manager, "_typ": "dataframe"})


CRAFTED = {
    "object field from raw bytes": lambda: frame_holding(array_of_pointers(object_field_dtype())),
    "object dtype without its flags": lambda: frame_holding(
        array_of_pointers(object_dtype_without_flags())
    ),
    "block placed outside the columns": frame_with_block_outside_the_columns,
}
REFUSALS = {
    "object field from raw bytes": "refusing to build a dtype with fields or a subarray",
    "object dtype without its flags": (
        "refusing to build dtype('O') with itemsize, alignment and flags (8, 8, 0) "
        "(numpy's own: (8, 8, 63))"
    ),
    "block placed outside the columns": (
        "refusing a frame whose block is placed at columns 0..1099511627776, outside its 4 columns"
    ),
}


def names_in(data: bytes) -> set[tuple[str, str]]:
    """The (module, name) pairs a protocol-2 pickle imports, Python 2 spellings mapped."""
    found = set()
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            module, name = str(arg).split(" ")
            found.add(({"__builtin__": "builtins"}.get(module, module), name))
    return found


def crafted_zip(tmp_path: Path, kind: str) -> Path:
    """``LSWMD.zip`` holding the crafted ``LSWMD.pkl``, as the real file is distributed."""
    data = pickle.dumps(CRAFTED[kind](), protocol=2)
    assert names_in(data) <= ADMITTED_GLOBALS, "the payload must pass the allow-list"
    path = tmp_path / "LSWMD.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("LSWMD.pkl", data)
    return path


def run_child(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


LOAD_WAFERS = """
import pickle, sys
from pathlib import Path
from backend.sources import load_wafers
try:
    wafers, _ = load_wafers(Path(sys.argv[1]), ("none",), cache_dir=None, progress=False)
except (pickle.UnpicklingError, ValueError) as err:
    print(f"{type(err).__name__}: {err}")
    sys.exit(3)
print(f"read {len(wafers)} wafers")
"""


@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_a_crafted_pickle_is_refused_with_a_clear_error(tmp_path: Path, kind: str) -> None:
    """Before the fix: rc -11 (SIGSEGV) in read_lswmd. After: a clean refusal, exit 3."""
    path = crafted_zip(tmp_path, kind)
    child = run_child(LOAD_WAFERS, str(path))
    assert child.returncode not in CRASH_CODES, f"the reader crashed: rc {child.returncode}"
    assert child.returncode == 3, child.stdout + child.stderr
    assert child.stdout.startswith(
        f"UnpicklingError: {path}: this file could not be read safely: {REFUSALS[kind]}"
    ), child.stdout


PLAIN_READ = """
import sys
from pathlib import Path
from backend.sources.lswmd import _cell_text, open_pickle, open_wafer_file, unpickle_distribution
path = Path(sys.argv[1])
with open_wafer_file(path) as file, open_pickle(file, path, zipped=True) as stream:
    frame = unpickle_distribution(stream)
print("unpickled", flush=True)
print([_cell_text(cell) for cell in frame["failureType"].to_numpy()])
"""


@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_the_payload_is_real_it_crashes_the_plain_reader(tmp_path: Path, kind: str) -> None:
    """The allow-list alone admits every name the payload uses, and the read segfaults."""
    path = crafted_zip(tmp_path, kind)
    child = run_child(PLAIN_READ, str(path))
    assert child.stdout.startswith("unpickled"), child.stdout + child.stderr
    assert child.returncode in CRASH_CODES, child.stdout + child.stderr
