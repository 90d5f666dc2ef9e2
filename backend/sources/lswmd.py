"""The public WM-811K file ``LSWMD.pkl``, read as a plain ``.pkl`` or streamed out of ``LSWMD.zip``
(layer L1; with ``checked_pickle``, the only modules that import pandas).

The file is a pandas DataFrame pickled under Python 2 with pandas ~0.19: 811,457 rows with columns
``waferMap`` (2-D uint8 die map), ``dieSize``, ``lotName``, ``waferIndex`` (float 1-25),
``trianTestLabel`` (sic) and ``failureType`` (a nested array such as ``[['none']]``, or an empty
array for the 638,507 unlabelled wafers). Unpickling takes ~12 s and ~2.7 GB; the frame is freed as
soon as the labelled die maps are copied out.

Unpickling calls the functions a pickle names, so the unpickler admits exactly the names that
``LSWMD.pkl`` holds (found by recording a load of the real file) and the names today's numpy and
pandas write for the same kind of frame; any other name (``os.system``, ``builtins.eval``,
``numpy.testing.*``, ``numpy.load``, ``pandas.read_pickle``, ...) raises
``pickle.UnpicklingError`` before anything is called.

The allow-list alone does not make a pickle safe: admitted names fed crafted state (a
``numpy.dtype`` declaring an object field, an array filled from raw bytes, a pandas block placed
outside its frame) corrupt memory. So only the file as distributed, recognised by its size and
SHA-256 (``DISTRIBUTION_FILES``), is unpickled in this process, by the fast C unpickler. Any other
pickle is read in a child process (``pickle_sandbox``) by the stricter, slower unpickler of
``checked_pickle``; a crash there is reported as ``UnsafeFileError`` and this process goes on.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import io
import os
import pickle
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import numpy.typing as npt
import pandas as pd
from tqdm import tqdm

from backend.sources.cache import LoadReport, label_codes, sort_report, wanted_rows
from backend.sources.pickle_sandbox import read_in_child
from backend.wafers import MAX_DIE_VALUE, WaferMaps

COLUMNS = ("waferMap", "lotName", "waferIndex", "failureType")
READ_BUFFER_BYTES = 4 << 20  # a small-read stream out of zipfile is ~3x slower to unpickle
_LEGACY_PACKAGE = "pandas.indexes"
_MOVED_PACKAGE = "pandas.core.indexes"
_LEGACY_INDEX_CLASSES = frozenset({"Int64Index", "Float64Index", "UInt64Index"})
# What LSWMD.pkl (Python 2, pandas 0.19, numpy 1.x, protocol 2) names, pandas.indexes.* already
# renamed to pandas.core.indexes.*. Recorded by loading the real file: 10 names, nothing else.
LSWMD_GLOBALS = frozenset(
    {
        ("builtins", "slice"),
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("pandas.core.frame", "DataFrame"),
        ("pandas.core.internals", "BlockManager"),
        ("pandas.core.indexes.base", "Index"),
        ("pandas.core.indexes.base", "_new_Index"),
        ("pandas.core.indexes.range", "RangeIndex"),
    }
)
# The same kind of frame (object columns of numpy arrays and str, float columns, object column
# labels) written again by today's Python 3, numpy 2 (and numpy 1's spelling of the same function)
# and pandas 3, pickle protocols 2-5, recorded the same way. Each only builds arrays, dtypes,
# indexes or frames. pandas 3's own string columns (pyarrow buffers) are not admitted.
CURRENT_PANDAS_GLOBALS = frozenset(
    {
        ("builtins", "bytearray"),  # protocol 2-4 array buffers
        ("builtins", "bytes"),
        ("_codecs", "encode"),  # protocol 2 bytes from Python 3
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),  # protocol 5 array buffers
        ("numpy.core.numeric", "_frombuffer"),
        ("pandas", "DataFrame"),
        ("pandas", "Index"),
        ("pandas", "RangeIndex"),
        ("pandas._libs.internals", "_unpickle_block"),
        ("pandas.core.internals.managers", "BlockManager"),
    }
)
ADMITTED_GLOBALS = LSWMD_GLOBALS | CURRENT_PANDAS_GLOBALS
_PYTHON2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


@dataclass(frozen=True)
class DistributionFile:
    """One file of the WM-811K distribution, as published: its name, size in bytes and SHA-256."""

    name: str
    size: int
    sha256: str

    @property
    def zipped(self) -> bool:
        return self.name.lower().endswith(".zip")


# Measured here (2026-12-04) with hashlib over /work/shared/data/wm811k/LSWMD.zip, and over the
# LSWMD.pkl streamed out of it; both match the digests the README beside that file publishes.
# A file is trusted only when size and digest both match: any other copy, re-zip or re-pickle of
# the same data is read in the child process like any unknown file.
DISTRIBUTION_FILES = (
    DistributionFile(
        "LSWMD.zip", 117_211_581, "71b3bfbdf34684247b4f6fda5fc0e4667c96346daed85393ea29d2354e401434"
    ),
    DistributionFile(
        "LSWMD.pkl",
        2_095_505_977,
        "1d04fccb3dd3176b276878b926b20fead7e077c5751e4d353ea9741a5e7b5c65",
    ),
)

#: Reads one object from a binary stream (``LegacyPandasUnpickler`` or the checked unpickler).
Unpickle = Callable[[IO[bytes]], object]


def resolve_admitted(module: str, name: str) -> tuple[str, str]:
    """The (module, name) to import for a global a WM-811K pickle names.

    ``pandas.indexes.*`` moved to ``pandas.core.indexes.*``; ``Int64Index`` / ``Float64Index`` /
    ``UInt64Index`` were folded into ``pandas.Index``; Python 2's ``__builtin__`` is ``builtins``.
    Any name outside ``ADMITTED_GLOBALS`` raises ``pickle.UnpicklingError`` naming it.
    """
    if module == _LEGACY_PACKAGE or module.startswith(_LEGACY_PACKAGE + "."):
        module = _MOVED_PACKAGE + module[len(_LEGACY_PACKAGE) :]
    if module.startswith(_MOVED_PACKAGE) and name in _LEGACY_INDEX_CLASSES:
        return "pandas", "Index"
    module = _PYTHON2_MODULES.get(module, module)
    if (module, name) not in ADMITTED_GLOBALS:
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} from a wafer-map file: only the names a "
            "WM-811K LSWMD.pkl frame needs are allowed (this is another kind of pickle, or "
            "one made to run code)"
        )
    return module, name


class LegacyPandasUnpickler(pickle.Unpickler):
    """Unpickler for pandas-0.19 pickles on today's pandas; open it with ``encoding="latin1"``.

    Admits only the names of ``resolve_admitted``, before anything is imported or called. Fast (the
    C unpickler) but only as safe as the file's state: use it on ``DISTRIBUTION_FILES`` only.
    """

    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(*resolve_admitted(module, name))


def unpickle_distribution(stream: IO[bytes]) -> object:
    """``LegacyPandasUnpickler`` on ``stream``: for the distribution file, whose bytes are known."""
    return LegacyPandasUnpickler(stream, encoding="latin1").load()


def read_lswmd(
    path: Path, classes: Sequence[str], *, keep_unlabelled: bool = False, progress: bool = True
) -> tuple[WaferMaps, LoadReport]:
    """Wafers of ``LSWMD.pkl`` / ``LSWMD.zip`` whose failure type is in ``classes``, in file order.

    Rows without a failure type are skipped unless ``keep_unlabelled`` (then label -1). Rows with
    a failure type not in ``classes``, or an empty or invalid die map, are dropped and counted in the
    report. ``source_row`` is the row number in the pickle.

    The distribution file (``DISTRIBUTION_FILES``, checked by size, then SHA-256: ~0.1 s for the
    zip, ~1.5 s for the .pkl) is unpickled here; any other file in a child process
    (``read_in_child``: slower, and a crash there cannot take this process down). Raises
    ``ValueError`` if the file is not a WM-811K frame (no DataFrame, or a missing column),
    ``pickle.UnpicklingError`` for a pickle that names or builds what a WM-811K frame does not, and
    ``UnsafeFileError`` (a ``ValueError``) when the child reading it crashed.
    """
    start = time.perf_counter()
    with open_wafer_file(path) as file:
        known = distribution_file(file)
        if known is not None:
            wafers, report = unpickle_wafers(
                file,
                path,
                zipped=known.zipped,
                unpickle=unpickle_distribution,
                classes=classes,
                keep_unlabelled=keep_unlabelled,
                progress=progress,
            )
            return wafers, replace(report, seconds=time.perf_counter() - start)
    if progress:
        print(
            f"{path.name} is not the WM-811K file as distributed (size or SHA-256 differ): "
            "reading it in a separate process, checked (5-8x slower)",
            file=sys.stderr,
        )
    return read_in_child(path, classes, keep_unlabelled=keep_unlabelled, progress=progress)


def distribution_file(file: io.BufferedReader) -> DistributionFile | None:
    """The ``DISTRIBUTION_FILES`` entry ``file`` is, or None; ``file`` is left at its start.

    The size is compared first, so any other file costs one ``fstat``. The caller reads the same
    open file afterwards: a path swapped after the check does not change what is read (rewriting
    the file in place, which needs write access to it, still could).
    """
    size = os.fstat(file.fileno()).st_size
    candidates = [known for known in DISTRIBUTION_FILES if known.size == size]
    if not candidates:
        return None
    file.seek(0)
    digest = hashlib.file_digest(file, "sha256").hexdigest()
    file.seek(0)
    return next((known for known in candidates if known.sha256 == digest), None)


def unpickle_wafers(
    file: IO[bytes],
    name: Path,
    *,
    zipped: bool,
    unpickle: Unpickle,
    classes: Sequence[str],
    keep_unlabelled: bool,
    progress: bool,
) -> tuple[WaferMaps, LoadReport]:
    """``read_lswmd``'s work on an open ``file`` (a zip holding the pickle when ``zipped``), read by
    ``unpickle``; ``name`` is the path shown in messages and the report. Runs wherever it is called:
    ``read_lswmd`` calls it for the distribution file, the child process for any other.
    """
    start = time.perf_counter()
    frame = _unpickle_frame(file, name, zipped=zipped, unpickle=unpickle, progress=progress)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{name}: not a WM-811K frame, columns {missing} are missing")
    texts = np.array([_cell_text(v) for v in frame["failureType"].to_numpy()], dtype=np.str_)
    codes = label_codes(texts, tuple(classes))
    wanted = wanted_rows(codes, keep_unlabelled)
    rows = np.flatnonzero(wanted)
    die_maps = frame["waferMap"].to_numpy()[rows]
    lots = np.array(
        [v if isinstance(v, str) else "" for v in frame["lotName"].to_numpy()[rows]], dtype=np.str_
    )
    slots = pd.to_numeric(frame["waferIndex"], errors="coerce").to_numpy(dtype=np.float64)[rows]
    del frame
    gc.collect()  # the other ~640k die maps and the frame itself: ~2.4 GB back before copying
    _return_freed_memory()
    kept_rows, flat, offsets, shapes = _copy_die_maps(die_maps, progress)
    del die_maps
    _return_freed_memory()
    kept = np.zeros(codes.shape[0], dtype=np.bool_)
    kept[rows[kept_rows]] = True
    wafers = WaferMaps(
        flat=flat,
        offsets=offsets,
        shapes=shapes,
        labels=codes[rows[kept_rows]],
        classes=tuple(classes),
        lots=lots[kept_rows],
        wafer_index=_slot_numbers(slots[kept_rows]),
        source_row=rows[kept_rows].astype(np.int64),
    )
    report = sort_report(str(name), texts, codes, wanted, kept, time.perf_counter() - start)
    return wafers, report


def _unpickle_frame(
    file: IO[bytes], name: Path, *, zipped: bool, unpickle: Unpickle, progress: bool
) -> pd.DataFrame:
    """The raw WM-811K DataFrame pickled in ``file``, or in the one ``.pkl`` of the zip ``file``."""
    if progress:
        print(
            f"unpickling {name.name} (all of WM-811K: 15-40 s, or ~1.5 min checked; ~2.7 GB) ...",
            file=sys.stderr,
        )
    with open_pickle(file, name, zipped=zipped) as stream:
        frame = unpickle(stream)
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"{name}: holds a {type(frame).__name__}, not a pandas DataFrame")
    return frame


@contextmanager
def open_pickle(file: IO[bytes], name: Path, *, zipped: bool) -> Iterator[IO[bytes]]:
    """A binary stream of the pickle in ``file`` (open it with ``open_wafer_file``), decompressed
    on the fly when ``zipped``; ``name`` is the path shown in messages."""
    if not zipped:
        yield file
        return
    with zipfile.ZipFile(file) as archive:
        member = _pickle_member(name, archive)
        with archive.open(member) as raw:
            # ZipExtFile reads like a raw stream; pickle's many small reads need a big buffer
            yield io.BufferedReader(cast(io.RawIOBase, raw), buffer_size=READ_BUFFER_BYTES)


def open_wafer_file(path: Path) -> io.BufferedReader:
    """``path`` opened for reading with a buffer big enough for pickle's many small reads."""
    return io.BufferedReader(io.FileIO(path, "r"), buffer_size=READ_BUFFER_BYTES)


def _pickle_member(path: Path, archive: zipfile.ZipFile) -> str:
    """The ``.pkl`` inside the zip: ``LSWMD.pkl`` if present, else the only ``.pkl``."""
    names = [
        n
        for n in archive.namelist()
        if n.lower().endswith(".pkl") and not n.startswith("__MACOSX/")
    ]
    preferred = [n for n in names if Path(n).name == "LSWMD.pkl"]
    if len(preferred) == 1:
        return preferred[0]
    if len(names) == 1:
        return names[0]
    raise ValueError(f"{path}: expected one .pkl inside (LSWMD.pkl), found {names or 'none'}")


def _slot_numbers(slots: npt.NDArray[np.float64]) -> npt.NDArray[np.int16]:
    """``waferIndex`` floats (1.0-25.0) as int16; missing or nonsense values become 0 (unknown)."""
    valid = np.isfinite(slots) & (slots >= 0) & (slots <= np.iinfo(np.int16).max)
    return np.where(valid, np.round(slots), 0).astype(np.int16)


def _cell_text(cell: object) -> str:
    """The text of a ``failureType`` cell: ``[['Center']]`` -> 'Center', empty/NaN/None -> ''."""
    if isinstance(cell, np.ndarray):
        if cell.size == 0:
            return ""
        cell = cell.reshape(-1)[0]
    if cell is None or (isinstance(cell, float) and cell != cell):
        return ""
    return str(cell)


def _copy_die_maps(
    die_maps: npt.NDArray[np.object_], progress: bool
) -> tuple[
    npt.NDArray[np.int64], npt.NDArray[np.uint8], npt.NDArray[np.int64], npt.NDArray[np.int32]
]:
    """Copy the usable die maps end to end; returns their positions in ``die_maps`` and the arrays.

    Usable: a non-empty 2-D integer array with values 0..2 and at least one die on the wafer.
    """
    n = die_maps.shape[0]
    sizes = np.fromiter(
        (m.size if isinstance(m, np.ndarray) else 0 for m in die_maps), dtype=np.int64, count=n
    )
    flat = np.empty(int(sizes.sum()), dtype=np.uint8)
    shapes = np.zeros((n, 2), dtype=np.int32)
    ok = np.zeros(n, dtype=np.bool_)
    end = 0
    for i, m in enumerate(
        tqdm(die_maps, desc="copying die maps", disable=not progress, unit="wafer")
    ):
        if not _usable(m):
            continue
        h, w = m.shape
        flat[end : end + m.size].reshape(h, w)[...] = m
        shapes[i] = (h, w)
        ok[i] = True
        end += m.size
    kept_rows = np.flatnonzero(ok)
    offsets = np.zeros(kept_rows.size + 1, dtype=np.int64)
    np.cumsum(sizes[kept_rows], out=offsets[1:])
    packed = flat if end == flat.size else flat[:end].copy()
    return kept_rows, packed, offsets, shapes[kept_rows]


def _usable(m: object) -> bool:
    if not isinstance(m, np.ndarray) or m.ndim != 2 or m.size == 0 or m.dtype.kind not in "biu":
        return False
    if m.dtype == np.uint8:
        return 0 < int(m.max()) <= MAX_DIE_VALUE
    return int(m.min()) >= 0 and 0 < int(m.max()) <= MAX_DIE_VALUE


def _return_freed_memory() -> None:
    """Ask glibc to give freed heap pages back to the OS; a no-op where that is not available.

    The frame is ~800k small objects: once freed, glibc keeps ~2 GB in the heap (RSS stays at
    2.4 GB) unless trimmed; trimmed, the process drops to the ~0.3 GB it still uses.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return
