"""WaferMaps: the ragged die-map value type (layer L0)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backend.label_config import DEFAULT_LABEL_CONFIG, parse_label_config
from backend.wafers import WaferMaps

CLASSES = parse_label_config(DEFAULT_LABEL_CONFIG.read_text()).failure_types
ROOT = Path(__file__).resolve().parents[1]


def make_maps(n: int, seed: int = 0) -> list[np.ndarray]:
    """n die maps of varied shapes with values 0..2."""
    rng = np.random.default_rng(seed)
    maps = []
    for i in range(n):
        h, w = 3 + i % 4, 2 + (i * 3) % 5
        maps.append(rng.integers(0, 3, size=(h, w), dtype=np.uint8))
    return maps


@pytest.fixture
def wafers() -> WaferMaps:
    maps = make_maps(6)
    return WaferMaps.from_maps(
        maps,
        labels=["Center", "", "none", "Scratch", "none", "Donut"],
        classes=CLASSES,
        lots=["lot1", "lot1", "lot1", "lot2", "lot2", "lot3"],
        wafer_index=[1, 2, 3, 1, 2, 25],
        source_row=[10, 11, 12, 20, 21, 30],
    )


def test_from_maps_keeps_every_map_and_column(wafers: WaferMaps) -> None:
    maps = make_maps(6)
    assert len(wafers) == 6
    for i, m in enumerate(maps):
        np.testing.assert_array_equal(wafers.die_map(i), m)
        assert wafers.die_map(i).dtype == np.uint8
    assert wafers.offsets[0] == 0 and wafers.offsets[-1] == wafers.flat.size
    assert wafers.shapes.tolist() == [list(m.shape) for m in maps]
    assert wafers.label_names().tolist() == ["Center", "", "none", "Scratch", "none", "Donut"]
    assert wafers.labels.tolist() == [0, -1, 8, 7, 8, 1]
    assert wafers.lots.tolist() == ["lot1", "lot1", "lot1", "lot2", "lot2", "lot3"]
    assert wafers.wafer_index.tolist() == [1, 2, 3, 1, 2, 25]
    assert wafers.source_row.tolist() == [10, 11, 12, 20, 21, 30]
    assert wafers.classes == CLASSES


def test_from_maps_defaults_and_integer_codes() -> None:
    maps = make_maps(3)
    by_name = WaferMaps.from_maps(maps, ["Loc", "", "none"], CLASSES)
    by_code = WaferMaps.from_maps(maps, np.array([4, -1, 8]), CLASSES)
    np.testing.assert_array_equal(by_name.labels, by_code.labels)
    assert by_name.lots.tolist() == ["", "", ""]
    assert by_name.wafer_index.tolist() == [0, 0, 0]
    assert by_name.source_row.tolist() == [0, 1, 2]
    assert by_name.flat.dtype == np.uint8 and by_name.offsets.dtype == np.int64


def test_from_maps_accepts_other_integer_dtypes() -> None:
    m = np.array([[0, 1], [2, 1]], dtype=np.int64)
    wafers = WaferMaps.from_maps([m, m.astype(bool)], ["none", "none"], CLASSES)
    np.testing.assert_array_equal(wafers.die_map(0), m)
    np.testing.assert_array_equal(wafers.die_map(1), [[0, 1], [1, 1]])


def test_class_counts_lists_every_class_and_skips_unlabelled(wafers: WaferMaps) -> None:
    counts = wafers.class_counts()
    assert list(counts) == list(CLASSES)
    assert counts == {
        "Center": 1,
        "Donut": 1,
        "Edge-Loc": 0,
        "Edge-Ring": 0,
        "Loc": 0,
        "Near-full": 0,
        "Random": 0,
        "Scratch": 1,
        "none": 2,
    }
    assert len(wafers) - sum(counts.values()) == 1


def test_subset_keeps_the_given_order(wafers: WaferMaps) -> None:
    picked = wafers.subset([4, 0, 5, 0])
    assert len(picked) == 4
    assert picked.source_row.tolist() == [21, 10, 30, 10]
    assert picked.label_names().tolist() == ["none", "Center", "Donut", "Center"]
    assert picked.lots.tolist() == ["lot2", "lot1", "lot3", "lot1"]
    for j, i in enumerate([4, 0, 5, 0]):
        np.testing.assert_array_equal(picked.die_map(j), wafers.die_map(i))
    assert picked.classes == wafers.classes


def test_subset_with_mask_negative_and_empty(wafers: WaferMaps) -> None:
    mask = wafers.labels >= 0
    assert wafers.subset(mask).source_row.tolist() == [10, 12, 20, 21, 30]
    assert wafers.subset(np.array([-1])).source_row.tolist() == [30]
    empty = wafers.subset([])
    assert len(empty) == 0 and empty.flat.size == 0 and empty.offsets.tolist() == [0]
    assert empty.class_counts()["none"] == 0
    assert empty.label_names().shape == (0,)


def test_subset_rejects_bad_indices(wafers: WaferMaps) -> None:
    with pytest.raises(IndexError):
        wafers.subset([6])
    with pytest.raises(IndexError):
        wafers.subset([-7])
    with pytest.raises(ValueError, match="mask"):
        wafers.subset(np.array([True, False]))
    with pytest.raises(ValueError, match="integer"):
        wafers.subset(np.array([0.5]))


def test_die_map_is_read_only_and_caller_arrays_stay_writeable() -> None:
    maps = make_maps(2)
    flat = np.concatenate([m.ravel() for m in maps])
    offsets = np.array([0, maps[0].size, flat.size], dtype=np.int64)
    wafers = WaferMaps(
        flat=flat,
        offsets=offsets,
        shapes=np.array([m.shape for m in maps], dtype=np.int32),
        labels=np.array([0, 1], dtype=np.int16),
        classes=CLASSES,
        lots=np.array(["a", "b"]),
        wafer_index=np.array([1, 2], dtype=np.int16),
        source_row=np.array([0, 1], dtype=np.int64),
    )
    with pytest.raises(ValueError, match="read-only"):
        wafers.die_map(0)[0, 0] = 1
    assert flat.flags.writeable
    np.testing.assert_array_equal(wafers.die_map(-1), maps[1])
    with pytest.raises(IndexError):
        wafers.die_map(2)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("flat", np.zeros(0, dtype=np.int64), "flat must have dtype uint8"),
        ("offsets", np.array([0, 6], dtype=np.int64), r"shapes must have shape \(1, 2\)"),
        ("shapes", np.zeros((6, 3), dtype=np.int32), r"shapes must have shape \(6, 2\)"),
        ("labels", np.full(6, 9, dtype=np.int16), r"labels must lie in -1\.\.8"),
        ("labels", np.full(6, -2, dtype=np.int16), r"labels must lie in -1\.\.8"),
        ("labels", np.zeros(5, dtype=np.int16), "labels has 5 entries"),
        ("lots", np.zeros(6), "lots must be a unicode string array"),
        ("wafer_index", np.full(6, -1, dtype=np.int16), "wafer_index must be >= 0"),
        ("source_row", [0, 1, 2, 3, 4, 5], "source_row must be a numpy array"),
        ("classes", ("Center", "Center"), "duplicate"),
        ("classes", ("Center", ""), "empty name"),
        ("classes", ["Center"], "tuple of str"),
    ],
)
def test_validation_names_the_problem(
    wafers: WaferMaps, field: str, value: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        changes: dict[str, Any] = {field: value}
        replace(wafers, **changes)


def test_validation_of_die_values_and_layout(wafers: WaferMaps) -> None:
    flat = wafers.flat.copy()
    flat[wafers.offsets[3]] = 3
    with pytest.raises(ValueError, match="map 3 holds die value 3"):
        replace(wafers, flat=flat)
    with pytest.raises(ValueError, match="offsets ends at"):
        replace(wafers, flat=flat[:-1])
    shapes = wafers.shapes.copy()
    shapes[[0, 1]] = shapes[[1, 0]]
    if not np.array_equal(shapes, wafers.shapes):
        with pytest.raises(ValueError, match="map 0: offsets give"):
            replace(wafers, shapes=shapes)
    shapes = wafers.shapes.copy()
    shapes[2] = (0, 5)
    with pytest.raises(ValueError, match=r"shapes\[2\].*empty die map"):
        replace(wafers, shapes=shapes)
    offsets = wafers.offsets.copy()
    offsets[0] = 1
    with pytest.raises(ValueError, match="offsets must start at 0"):
        replace(wafers, offsets=offsets)


@pytest.mark.parametrize(
    ("die_map", "message"),
    [
        (np.zeros(4, dtype=np.uint8), "die map 1 must be a non-empty 2-D array"),
        (np.zeros((0, 3), dtype=np.uint8), "die map 1 must be a non-empty 2-D array"),
        (np.full((2, 2), 3, dtype=np.uint8), "die map 1 holds values 3..3"),
        (np.full((2, 2), -1, dtype=np.int8), "die map 1 holds values -1..-1"),
        (np.ones((2, 2), dtype=np.float32), "die map 1 must hold integers"),
    ],
)
def test_from_maps_rejects_bad_maps(die_map: np.ndarray, message: str) -> None:
    good = np.ones((2, 2), dtype=np.uint8)
    with pytest.raises(ValueError, match=message):
        WaferMaps.from_maps([good, die_map], ["none", "none"], CLASSES)


def test_from_maps_rejects_bad_labels_and_columns() -> None:
    maps = make_maps(2)
    with pytest.raises(ValueError, match="'Ring' of wafer 1 is not one of the classes"):
        WaferMaps.from_maps(maps, ["none", "Ring"], CLASSES)
    with pytest.raises(ValueError, match="one entry a wafer"):
        WaferMaps.from_maps(maps, ["none"], CLASSES)
    with pytest.raises(ValueError, match="label codes"):
        WaferMaps.from_maps(maps, [0, 9], CLASSES)
    with pytest.raises(ValueError, match="lots must hold one entry a wafer"):
        WaferMaps.from_maps(maps, ["none", "none"], CLASSES, lots=["a"])
    with pytest.raises(ValueError, match="wafer_index"):
        WaferMaps.from_maps(maps, ["none", "none"], CLASSES, wafer_index=[1, 40000])


def test_empty_set_is_valid() -> None:
    wafers = WaferMaps.from_maps([], [], CLASSES)
    assert len(wafers) == 0
    assert wafers.class_counts() == dict.fromkeys(CLASSES, 0)


def test_wafers_module_imports_only_numpy_and_the_standard_library() -> None:
    code = (
        "import sys, backend.wafers; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'pandas', 'tqdm', 'torch'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
