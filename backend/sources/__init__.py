"""Wafer-map data sources (layer L1): ``load_wafers`` reads any supported file, once, into
``WaferMaps`` and a ``LoadReport``, and with a cache folder later loads take about a second.

Supported: ``.zip`` / ``.pkl`` (the WM-811K ``LSWMD`` pickle, see ``lswmd``) and ``.npz`` (a fab's
arrays, see ``arrays``).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from backend.settings import DEFAULT_DATA
from backend.sources.arrays import load_npz
from backend.sources.cache import LoadReport, cache_file_for, read_cache, write_cache
from backend.sources.lswmd import read_lswmd
from backend.wafers import WaferMaps

SUPPORTED_SUFFIXES = (".zip", ".pkl", ".npz")


def load_wafers(
    path: Path,
    classes: Sequence[str],
    cache_dir: Path | None,
    progress: bool = True,
    *,
    keep_unlabelled: bool = False,
) -> tuple[WaferMaps, LoadReport]:
    """Read the labelled wafers of ``path`` whose failure type is in ``classes``, in file order.

    ``.zip`` / ``.pkl`` are read as WM-811K (``LSWMD``), ``.npz`` as a fab's arrays. Rows without a
    failure type are skipped (kept with label -1 when ``keep_unlabelled``); rows with a failure type
    not in ``classes`` or an empty or invalid die map are dropped; the report counts each kind.

    With ``cache_dir``, the first call converts once into a cache file there and later calls for the
    same file (same path, size and mtime), classes and ``keep_unlabelled`` read that instead, with
    ``report.from_cache`` True and the same counts. ``progress`` prints progress to stderr.

    A ``.zip`` / ``.pkl`` is unpickled in this process only when it is the WM-811K file as
    distributed (size and SHA-256, ``lswmd.DISTRIBUTION_FILES``); any other pickle is read, checked,
    in a child process (``pickle_sandbox``), so a crafted file cannot crash this one.

    Raises ``FileNotFoundError`` for a missing file, ``ValueError`` for an unsupported suffix or a
    file that is broken as a whole (``UnsafeFileError`` when the child reading it crashed), and
    ``pickle.UnpicklingError`` for a pickle that names or builds what a WM-811K frame does not.
    """
    start = time.perf_counter()
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ValueError(
            f"{path}: unsupported wafer-map file {suffix or '(no suffix)'!r}; supported are "
            f"{', '.join(SUPPORTED_SUFFIXES)} (.zip/.pkl: WM-811K LSWMD, .npz: arrays)"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"wafer-map file not found: {path}. WM-811K is expected at {DEFAULT_DATA} "
            "(LSWMD.zip as distributed, or the LSWMD.pkl inside it)"
        )
    cache_file = (
        None if cache_dir is None else cache_file_for(path, classes, cache_dir, keep_unlabelled)
    )
    if cache_file is not None:
        cached = read_cache(cache_file, start)
        if cached is not None:
            if progress:
                print(f"loaded {len(cached[0]):,} wafers from cache {cache_file}", file=sys.stderr)
            return cached
    if suffix == ".npz":
        wafers, report = load_npz(path, classes, keep_unlabelled=keep_unlabelled, progress=progress)
    else:
        wafers, report = read_lswmd(
            path, classes, keep_unlabelled=keep_unlabelled, progress=progress
        )
    if cache_file is not None:
        if progress:
            print(f"writing cache {cache_file} ...", file=sys.stderr)
        write_cache(cache_file, wafers, report)
    seconds = time.perf_counter() - start
    return wafers, dataclasses.replace(
        report, seconds=seconds, cache_file=None if cache_file is None else str(cache_file)
    )
