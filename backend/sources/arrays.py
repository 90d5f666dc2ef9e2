"""Wafer maps a fab brings as a plain ``.npz`` (layer L1: numpy files, never pickles).

Two layouts are read:

* ``maps``: (n, h, w) integer die maps of one shape;
* ``maps_flat`` (all maps end to end, row-major) + ``shapes`` (n, 2) height, width, and optionally
  ``offsets`` (n + 1,) where map i is ``maps_flat[offsets[i]:offsets[i + 1]]``.

Beside them ``labels`` (n,) failure-type names as a string array, '' = unlabelled; optional ``lots``
(n,) strings, ``wafer_index`` (n,) integers (0 = unknown) and ``source_row`` (n,) integers.
``save_npz`` writes the ragged layout, which this module reads back unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from backend.files import atomic_writer
from backend.sources.cache import LoadReport, label_codes, sort_report, wanted_rows
from backend.wafers import MAX_DIE_VALUE, WaferMaps

_DieMapAt = Callable[[int], npt.NDArray[Any]]


def save_npz(wafers: WaferMaps, path: Path) -> None:
    """Write ``wafers`` to ``path`` in the ragged layout (compressed; die maps shrink ~20x).

    Labels are written as names, so the file reads back with any class list that holds them. The
    write is atomic (`backend.files.atomic_writer`).
    """
    with atomic_writer(path) as f:
        np.savez_compressed(
            f,
            maps_flat=wafers.flat,
            shapes=wafers.shapes,
            offsets=wafers.offsets,
            labels=wafers.label_names(),
            lots=wafers.lots,
            wafer_index=wafers.wafer_index,
            source_row=wafers.source_row,
        )


def load_npz(
    path: Path, classes: Sequence[str], *, keep_unlabelled: bool = False, progress: bool = False
) -> tuple[WaferMaps, LoadReport]:
    """Read a fab's ``.npz`` (layouts in the module docstring) into wafers with a load report.

    Rows without a label are skipped unless ``keep_unlabelled``; rows with a label not in
    ``classes`` or an empty or invalid die map are dropped and counted in the report. A file that
    is broken as a whole (a missing array, wrong lengths, offsets that do not match the shapes,
    arrays stored as Python objects) raises ``ValueError`` naming the array.
    """
    start = time.perf_counter()
    with np.load(path, allow_pickle=False) as npz:
        arrays = _ArraysFile(path, npz)
        texts = arrays.text("labels", required=True)
        n = texts.shape[0]
        if "maps" in npz:
            sizes, die_maps = arrays.regular_maps(n)
        elif "maps_flat" in npz:
            sizes, die_maps = arrays.ragged_maps(n)
        else:
            raise ValueError(
                f"{path}: holds neither 'maps' (n, h, w) nor 'maps_flat' + 'shapes'; "
                f"arrays found: {sorted(npz.files)}"
            )
        lots = arrays.text("lots", required=False, n=n)
        wafer_index = arrays.integers(
            "wafer_index", n, np.int16, default=np.zeros(n, dtype=np.int16)
        )
        source_row = arrays.integers("source_row", n, np.int64, default=np.arange(n))

    codes = label_codes(texts, tuple(classes))
    wanted = wanted_rows(codes, keep_unlabelled)
    kept = np.zeros(n, dtype=np.bool_)
    rows = np.flatnonzero(wanted)
    for i in tqdm(rows.tolist(), desc="checking die maps", disable=not progress, unit="wafer"):
        kept[i] = sizes[i] > 0 and _usable(die_maps(i))
    keep = np.flatnonzero(kept)
    shapes = arrays.shapes[keep]
    offsets = np.zeros(keep.size + 1, dtype=np.int64)
    np.cumsum(sizes[keep], out=offsets[1:])
    flat = np.empty(int(offsets[-1]), dtype=np.uint8)
    for j, i in enumerate(keep.tolist()):
        flat[offsets[j] : offsets[j + 1]] = die_maps(i).reshape(-1)
    wafers = WaferMaps(
        flat=flat,
        offsets=offsets,
        shapes=shapes,
        labels=codes[keep],
        classes=tuple(classes),
        lots=lots[keep],
        wafer_index=wafer_index[keep],
        source_row=source_row[keep],
    )
    report = sort_report(str(path), texts, codes, wanted, kept, time.perf_counter() - start)
    return wafers, report


def _usable(die_map: npt.NDArray[Any]) -> bool:
    """True when a non-empty die map holds only 0..2 and has at least one die on the wafer."""
    if die_map.dtype.kind not in "biu":
        return False
    low, high = int(die_map.min()), int(die_map.max())
    return low >= 0 and 0 < high <= MAX_DIE_VALUE


class _ArraysFile:
    """The arrays of one open ``.npz`` with the checks and messages a fab's file needs."""

    def __init__(self, path: Path, npz: Any) -> None:
        self.path = path
        self.npz = npz
        self.shapes: npt.NDArray[np.int32] = np.zeros((0, 2), dtype=np.int32)

    def get(self, key: str) -> npt.NDArray[Any]:
        try:
            return np.asarray(self.npz[key])
        except ValueError as err:
            raise ValueError(
                f"{self.path}: array {key!r} cannot be read without pickle ({err}); save it as a "
                "plain string or number array"
            ) from err

    def text(self, key: str, *, required: bool, n: int | None = None) -> npt.NDArray[np.str_]:
        if key not in self.npz:
            if required:
                raise ValueError(f"{self.path}: array {key!r} is missing")
            return np.full(n or 0, "", dtype=np.str_)
        values = self.get(key)
        if values.dtype.kind not in "US" or values.ndim != 1:
            raise ValueError(
                f"{self.path}: {key!r} must be a 1-D string array, got {values.dtype} {values.shape}"
            )
        if n is not None and values.shape[0] != n:
            raise ValueError(f"{self.path}: {key!r} has {values.shape[0]} entries, labels {n}")
        return values.astype(np.str_)

    def integers(
        self, key: str, n: int, dtype: type[np.integer[Any]], default: npt.NDArray[Any]
    ) -> npt.NDArray[Any]:
        values = self.get(key) if key in self.npz else default
        info = np.iinfo(dtype)
        if values.shape != (n,) or (values.dtype.kind not in "iu" and values.size):
            raise ValueError(
                f"{self.path}: {key!r} must be {n} integers, got {values.dtype} {values.shape}"
            )
        if values.size and (values.min() < 0 or values.max() > info.max):
            raise ValueError(f"{self.path}: {key!r} must lie in 0..{info.max}")
        return values.astype(dtype)

    def regular_maps(self, n: int) -> tuple[npt.NDArray[np.int64], _DieMapAt]:
        maps = self.get("maps")
        if maps.ndim != 3 or maps.shape[0] != n or maps.dtype.kind not in "biu":
            raise ValueError(
                f"{self.path}: 'maps' must be (n={n}, h, w) integers, got {maps.dtype} {maps.shape}"
            )
        h, w = int(maps.shape[1]), int(maps.shape[2])
        self.shapes = np.tile(np.array([h, w], dtype=np.int32), (n, 1))
        sizes = np.full(n, h * w, dtype=np.int64)
        return sizes, maps.__getitem__

    def ragged_maps(self, n: int) -> tuple[npt.NDArray[np.int64], _DieMapAt]:
        flat = self.get("maps_flat")
        shapes = self.get("shapes")
        if flat.ndim != 1 or flat.dtype.kind not in "biu":
            raise ValueError(
                f"{self.path}: 'maps_flat' must be 1-D integers, got {flat.dtype} {flat.shape}"
            )
        if shapes.shape != (n, 2) or shapes.dtype.kind not in "iu":
            raise ValueError(
                f"{self.path}: 'shapes' must be ({n}, 2) integers, got {shapes.dtype} {shapes.shape}"
            )
        if n and (shapes.min() < 0 or shapes.max() > np.iinfo(np.int32).max):
            raise ValueError(f"{self.path}: 'shapes' must not be negative")
        self.shapes = shapes.astype(np.int32)
        sizes = shapes[:, 0].astype(np.int64) * shapes[:, 1]
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        if "offsets" in self.npz and not np.array_equal(self.get("offsets"), offsets):
            raise ValueError(
                f"{self.path}: 'offsets' must be (n + 1,) running totals of height x width "
                "starting at 0"
            )
        if offsets[-1] != flat.shape[0]:
            raise ValueError(
                f"{self.path}: 'shapes' need {offsets[-1]} dies but 'maps_flat' holds {flat.shape[0]}"
            )
        starts = offsets.tolist()
        table = self.shapes.tolist()

        def die_map(i: int) -> npt.NDArray[Any]:
            return flat[starts[i] : starts[i + 1]].reshape(table[i])

        return sizes, die_map
