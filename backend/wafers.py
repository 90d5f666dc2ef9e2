"""Many wafers with ragged die maps, held as a few flat numpy arrays (layer L0: pure, no I/O).

A die map is a 2-D ``uint8`` array: 0 = off the wafer, 1 = good die, 2 = failing die. Maps differ in
shape from product to product, so they are stored end to end in one flat array with offsets, which
keeps 173k wafers in about 230 MB and lets a set be saved and loaded as a handful of arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

DIE_OFF_WAFER = 0
DIE_GOOD = 1
DIE_FAIL = 2
MAX_DIE_VALUE = DIE_FAIL


def _readonly(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """A read-only view of ``array``; the caller's own array keeps its flags."""
    view = array.view()
    view.flags.writeable = False
    return view


def _check_array(
    name: str, array: object, kind: str, dtype: np.dtype[Any] | None, ndim: int
) -> None:
    if not isinstance(array, np.ndarray):
        raise ValueError(f"WaferMaps.{name} must be a numpy array, got {type(array).__name__}")
    if dtype is not None and array.dtype != dtype:
        raise ValueError(f"WaferMaps.{name} must have dtype {dtype}, got {array.dtype}")
    if dtype is None and array.dtype.kind != kind:
        raise ValueError(
            f"WaferMaps.{name} must be a unicode string array, got dtype {array.dtype}"
        )
    if array.ndim != ndim:
        raise ValueError(f"WaferMaps.{name} must be {ndim}-D, got shape {array.shape}")


@dataclass(frozen=True, eq=False)
class WaferMaps:
    """A set of wafers: their die maps, failure-type labels and where each came from.

    Map ``i`` is ``flat[offsets[i]:offsets[i + 1]]`` reshaped to ``shapes[i]`` (row-major). ``labels[i]``
    indexes ``classes`` (the failure-type names, e.g. ``Center`` ... ``none``), -1 = unlabelled.
    ``wafer_index`` is the slot in the lot (1-25 in a 25-wafer carrier), 0 if unknown; ``lots`` is ''
    if unknown; ``source_row`` is the row number in the file the wafer was read from.

    Construction validates every array (dtype, length, die values 0..2) and raises ``ValueError``.
    The stored arrays are read-only views, so a ``WaferMaps`` cannot change after it is built; the
    arrays passed in stay writeable for their owner. Equality is not defined (``eq=False``): compare
    the arrays.
    """

    flat: npt.NDArray[np.uint8]
    offsets: npt.NDArray[np.int64]
    shapes: npt.NDArray[np.int32]
    labels: npt.NDArray[np.int16]
    classes: tuple[str, ...]
    lots: npt.NDArray[np.str_]
    wafer_index: npt.NDArray[np.int16]
    source_row: npt.NDArray[np.int64]

    def __post_init__(self) -> None:
        _check_array("flat", self.flat, "u", np.dtype(np.uint8), 1)
        _check_array("offsets", self.offsets, "i", np.dtype(np.int64), 1)
        _check_array("shapes", self.shapes, "i", np.dtype(np.int32), 2)
        _check_array("labels", self.labels, "i", np.dtype(np.int16), 1)
        _check_array("lots", self.lots, "U", None, 1)
        _check_array("wafer_index", self.wafer_index, "i", np.dtype(np.int16), 1)
        _check_array("source_row", self.source_row, "i", np.dtype(np.int64), 1)
        self._check_classes()
        n = self.offsets.shape[0] - 1
        if n < 0:
            raise ValueError("WaferMaps.offsets must hold n + 1 entries, got an empty array")
        self._check_lengths(n)
        self._check_layout()
        self._check_values(n)
        for name in ("flat", "offsets", "shapes", "labels", "lots", "wafer_index", "source_row"):
            object.__setattr__(self, name, _readonly(getattr(self, name)))

    def _check_classes(self) -> None:
        if not isinstance(self.classes, tuple) or not all(isinstance(c, str) for c in self.classes):
            raise ValueError(f"WaferMaps.classes must be a tuple of str, got {self.classes!r}")
        if any(not c for c in self.classes):
            raise ValueError("WaferMaps.classes must not hold an empty name ('' means unlabelled)")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"WaferMaps.classes has duplicate names: {self.classes!r}")

    def _check_lengths(self, n: int) -> None:
        if self.shapes.shape != (n, 2):
            raise ValueError(f"WaferMaps.shapes must have shape ({n}, 2), got {self.shapes.shape}")
        for name in ("labels", "lots", "wafer_index", "source_row"):
            length = getattr(self, name).shape[0]
            if length != n:
                raise ValueError(
                    f"WaferMaps.{name} has {length} entries, expected {n} (one a wafer)"
                )

    def _check_layout(self) -> None:
        if self.offsets[0] != 0:
            raise ValueError(f"WaferMaps.offsets must start at 0, got {self.offsets[0]}")
        if self.offsets[-1] != self.flat.shape[0]:
            raise ValueError(
                f"WaferMaps.offsets ends at {self.offsets[-1]} but flat holds {self.flat.shape[0]} dies"
            )
        if (self.shapes < 1).any():
            bad = int(np.flatnonzero((self.shapes < 1).any(axis=1))[0])
            raise ValueError(
                f"WaferMaps.shapes[{bad}] = {self.shapes[bad].tolist()}: empty die map"
            )
        sizes = self.shapes[:, 0].astype(np.int64) * self.shapes[:, 1]
        mismatch = np.flatnonzero(np.diff(self.offsets) != sizes)
        if mismatch.size:
            i = int(mismatch[0])
            raise ValueError(
                f"WaferMaps map {i}: offsets give {self.offsets[i + 1] - self.offsets[i]} dies but "
                f"shape {self.shapes[i].tolist()} needs {sizes[i]}"
            )

    def _check_values(self, n: int) -> None:
        if self.flat.size and int(self.flat.max()) > MAX_DIE_VALUE:
            first = int(np.flatnonzero(self.flat > MAX_DIE_VALUE)[0])
            i = int(np.searchsorted(self.offsets, first, side="right")) - 1
            raise ValueError(
                f"WaferMaps map {i} holds die value {self.flat[first]}; allowed are 0 (off wafer), "
                "1 (good die), 2 (failing die)"
            )
        if n and (self.labels.min() < -1 or self.labels.max() >= len(self.classes)):
            raise ValueError(
                f"WaferMaps.labels must lie in -1..{len(self.classes) - 1} for {len(self.classes)} "
                f"classes, got {self.labels.min()}..{self.labels.max()}"
            )
        if n and self.wafer_index.min() < 0:
            raise ValueError("WaferMaps.wafer_index must be >= 0 (0 = unknown)")

    def __len__(self) -> int:
        return int(self.shapes.shape[0])

    def die_map(self, i: int) -> npt.NDArray[np.uint8]:
        """Die map of wafer ``i`` (negative counts from the end) as a read-only (h, w) view."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"wafer {i} out of range for {n} wafers")
        i %= n
        h, w = (int(v) for v in self.shapes[i])
        return self.flat[self.offsets[i] : self.offsets[i + 1]].reshape(h, w)

    def subset(self, indices: Sequence[int] | npt.NDArray[np.integer[Any] | np.bool_]) -> WaferMaps:
        """The wafers at ``indices``, in the order given (repeats allowed; a bool mask also works).

        Raises ``IndexError`` for an index out of range, ``ValueError`` for a mask of the wrong length.
        """
        n = len(self)
        idx = np.asarray(indices)
        if idx.dtype == np.bool_:
            if idx.shape != (n,):
                raise ValueError(f"a bool mask must have shape ({n},), got {idx.shape}")
            idx = np.flatnonzero(idx)
        elif idx.size == 0:
            idx = np.zeros(0, dtype=np.int64)
        elif idx.dtype.kind not in "iu" or idx.ndim != 1:
            raise ValueError(f"indices must be a 1-D integer array or sequence, got {idx.dtype}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"wafer index out of range for {n} wafers")
        idx %= max(n, 1)
        sizes = np.diff(self.offsets)[idx]
        offsets = np.zeros(idx.size + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        flat = np.empty(int(offsets[-1]), dtype=np.uint8)
        starts = self.offsets[idx]
        for j, (start, size) in enumerate(zip(starts.tolist(), sizes.tolist(), strict=True)):
            flat[offsets[j] : offsets[j] + size] = self.flat[start : start + size]
        return WaferMaps(
            flat=flat,
            offsets=offsets,
            shapes=self.shapes[idx],
            labels=self.labels[idx],
            classes=self.classes,
            lots=self.lots[idx],
            wafer_index=self.wafer_index[idx],
            source_row=self.source_row[idx],
        )

    def label_names(self) -> npt.NDArray[np.str_]:
        """Failure-type name of every wafer, '' for an unlabelled one."""
        names = np.array([*self.classes, ""], dtype=np.str_)
        return names[self.labels]

    def class_counts(self) -> dict[str, int]:
        """Wafers per failure type, every class listed (zero included), in ``classes`` order.

        Unlabelled wafers are not counted here: they number ``len(self) - sum(counts.values())``.
        """
        labelled = self.labels[self.labels >= 0]
        counts = np.bincount(labelled, minlength=len(self.classes))
        return {name: int(count) for name, count in zip(self.classes, counts, strict=True)}

    @classmethod
    def from_maps(
        cls,
        maps: Sequence[npt.NDArray[Any]],
        labels: Sequence[str] | Sequence[int] | npt.NDArray[Any],
        classes: Sequence[str],
        lots: Sequence[str] | npt.NDArray[Any] | None = None,
        wafer_index: Sequence[int] | npt.NDArray[Any] | None = None,
        source_row: Sequence[int] | npt.NDArray[Any] | None = None,
    ) -> WaferMaps:
        """Build a set from separate 2-D die maps (any integer dtype, values 0..2).

        ``labels`` are either failure-type names ('' = unlabelled; every other name must be in
        ``classes``) or integer codes into ``classes`` (-1 = unlabelled). Missing ``lots`` become '',
        missing ``wafer_index`` 0, missing ``source_row`` 0..n-1. Raises ``ValueError`` naming the
        first bad map or label.
        """
        classes_t = tuple(classes)
        n = len(maps)
        shapes = np.zeros((n, 2), dtype=np.int32)
        for i, m in enumerate(maps):
            shapes[i] = _map_shape(i, m)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(shapes[:, 0].astype(np.int64) * shapes[:, 1], out=offsets[1:])
        flat = np.empty(int(offsets[-1]), dtype=np.uint8)
        for i, m in enumerate(maps):
            flat[offsets[i] : offsets[i + 1]] = np.asarray(m).ravel()
        return cls(
            flat=flat,
            offsets=offsets,
            shapes=shapes,
            labels=_label_codes(labels, classes_t, n),
            classes=classes_t,
            lots=_column(lots, n, "lots", np.str_, ""),
            wafer_index=_column(wafer_index, n, "wafer_index", np.int16, 0),
            source_row=(
                np.arange(n, dtype=np.int64)
                if source_row is None
                else _column(source_row, n, "source_row", np.int64, 0)
            ),
        )


def _map_shape(i: int, die_map: npt.NDArray[Any]) -> tuple[int, int]:
    """Shape of one die map for ``from_maps``, after checking it is 2-D, non-empty and 0..2."""
    m = np.asarray(die_map)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"die map {i} must be a non-empty 2-D array, got shape {m.shape}")
    if m.dtype.kind not in "biu":
        raise ValueError(f"die map {i} must hold integers 0..2, got dtype {m.dtype}")
    if int(m.min()) < 0 or int(m.max()) > MAX_DIE_VALUE:
        raise ValueError(
            f"die map {i} holds values {int(m.min())}..{int(m.max())}; allowed are 0 (off wafer), "
            "1 (good die), 2 (failing die)"
        )
    return int(m.shape[0]), int(m.shape[1])


def _label_codes(
    labels: Sequence[str] | Sequence[int] | npt.NDArray[Any], classes: tuple[str, ...], n: int
) -> npt.NDArray[np.int16]:
    """Integer codes for ``labels`` given as names ('' = unlabelled) or as codes (-1)."""
    raw = np.asarray(labels)
    if raw.shape != (n,):
        raise ValueError(f"labels must hold one entry a wafer ({n}), got shape {raw.shape}")
    if n == 0:
        return np.zeros(0, dtype=np.int16)
    if raw.dtype.kind in "iu":
        if raw.min() < -1 or raw.max() >= len(classes):
            raise ValueError(f"label codes must lie in -1..{len(classes) - 1}")
        return raw.astype(np.int16)
    if raw.dtype.kind not in "UO":
        raise ValueError(f"labels must be failure-type names or integer codes, got {raw.dtype}")
    lookup = {name: code for code, name in enumerate(classes)}
    lookup[""] = -1
    codes = np.empty(n, dtype=np.int16)
    for i, name in enumerate(raw.tolist()):
        code = lookup.get(str(name))
        if code is None:
            raise ValueError(f"label {name!r} of wafer {i} is not one of the classes {classes}")
        codes[i] = code
    return codes


def _column(
    values: Sequence[Any] | npt.NDArray[Any] | None,
    n: int,
    name: str,
    dtype: type[np.generic],
    fill: str | int,
) -> npt.NDArray[Any]:
    """One per-wafer column as an array of ``dtype``, ``fill`` everywhere when ``values`` is None."""
    if values is None:
        return np.full(n, fill, dtype=dtype)
    raw = np.asarray(values)
    if raw.shape != (n,):
        raise ValueError(f"{name} must hold one entry a wafer ({n}), got shape {raw.shape}")
    out = raw.astype(dtype)
    if np.issubdtype(dtype, np.integer) and not np.array_equal(out, raw):
        raise ValueError(f"{name} must hold whole numbers that fit {np.dtype(dtype)}")
    return out
