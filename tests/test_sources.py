"""Wafer-map sources: .npz arrays, the LSWMD pickle, the load report and the conversion cache."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from backend.label_config import DEFAULT_LABEL_CONFIG, parse_label_config
from backend.settings import DEFAULT_DATA
from backend.sources import load_wafers
from backend.sources.arrays import load_npz, save_npz
from backend.sources.cache import LoadReport
from backend.sources.lswmd import (
    LSWMD_GLOBALS,
    LegacyPandasUnpickler,
    open_pickle,
    open_wafer_file,
)
from backend.wafers import WaferMaps

CLASSES = parse_label_config(DEFAULT_LABEL_CONFIG.read_text()).failure_types
README_COUNTS = {
    "Center": 4294,
    "Donut": 555,
    "Edge-Loc": 5189,
    "Edge-Ring": 9680,
    "Loc": 3593,
    "Near-full": 149,
    "Random": 866,
    "Scratch": 1193,
    "none": 147431,
}


def die_map(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.integers(0, 3, size=(h, w), dtype=np.uint8)
    m[0, 0] = 1  # at least one die on the wafer
    return m


def assert_same_wafers(a: WaferMaps, b: WaferMaps) -> None:
    assert a.classes == b.classes
    for name in ("flat", "offsets", "shapes", "labels", "lots", "wafer_index", "source_row"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        assert getattr(a, name).dtype == getattr(b, name).dtype, name


def assert_balanced(report: LoadReport) -> None:
    """Every source row lands in exactly one bucket."""
    dropped = report.empty_maps + sum(report.unknown_labels.values())
    assert report.total_rows == report.labelled + report.unlabelled + dropped


@pytest.fixture
def labelled_set() -> WaferMaps:
    maps = [die_map(3 + i % 3, 4 + i % 2, i) for i in range(7)]
    return WaferMaps.from_maps(
        maps,
        labels=["Center", "none", "Scratch", "none", "Edge-Ring", "Loc", "none"],
        classes=CLASSES,
        lots=["lot1"] * 4 + ["lot2"] * 3,
        wafer_index=[1, 2, 3, 4, 1, 2, 3],
        source_row=[3, 4, 5, 6, 9, 10, 11],
    )


# --- .npz arrays -----------------------------------------------------------------------------


def test_npz_round_trip_ragged(tmp_path: Path, labelled_set: WaferMaps) -> None:
    path = tmp_path / "fab.npz"
    save_npz(labelled_set, path)
    wafers, report = load_wafers(path, CLASSES, cache_dir=None, progress=False)
    assert_same_wafers(wafers, labelled_set)
    assert report.total_rows == report.labelled == 7
    assert (report.unlabelled, report.empty_maps, report.unknown_labels) == (0, 0, {})
    assert report.from_cache is False and report.cache_file is None
    assert not list(tmp_path.glob("*.tmp")), "atomic write left a temp file"


def test_npz_ragged_without_offsets(tmp_path: Path, labelled_set: WaferMaps) -> None:
    path = tmp_path / "fab.npz"
    np.savez(
        path,
        maps_flat=labelled_set.flat,
        shapes=labelled_set.shapes.astype(np.int64),
        labels=labelled_set.label_names(),
    )
    wafers, _ = load_wafers(path, CLASSES, cache_dir=None, progress=False)
    np.testing.assert_array_equal(wafers.flat, labelled_set.flat)
    assert wafers.source_row.tolist() == list(range(7))
    assert wafers.lots.tolist() == [""] * 7
    assert wafers.wafer_index.tolist() == [0] * 7


def test_npz_regular_maps(tmp_path: Path) -> None:
    maps = np.stack([die_map(5, 6, i) for i in range(4)]).astype(np.int32)
    path = tmp_path / "fab.npz"
    np.savez(
        path,
        maps=maps,
        labels=np.array(["Donut", "", "none", "Random"]),
        lots=np.array(["L9", "L9", "L9", "L9"]),
        wafer_index=np.array([7, 8, 9, 10]),
    )
    wafers, report = load_wafers(path, CLASSES, cache_dir=None, progress=False)
    assert len(wafers) == 3 and report.unlabelled == 1
    assert wafers.label_names().tolist() == ["Donut", "none", "Random"]
    assert wafers.source_row.tolist() == [0, 2, 3]
    assert wafers.wafer_index.tolist() == [7, 9, 10]
    for j, i in enumerate([0, 2, 3]):
        np.testing.assert_array_equal(wafers.die_map(j), maps[i])
    kept_all, report_all = load_npz(path, CLASSES, keep_unlabelled=True)
    assert len(kept_all) == 4 and kept_all.labels.tolist()[1] == -1
    assert report_all.unlabelled == 1 and report_all.labelled == 3


def test_bad_rows_are_counted_not_fatal(tmp_path: Path) -> None:
    maps = [
        die_map(3, 3, 0),  # kept
        np.zeros((3, 3), dtype=np.uint8),  # no die on the wafer -> empty map
        die_map(2, 2, 1),  # unlabelled
        np.full((2, 3), 3, dtype=np.uint8),  # die value 3 -> invalid map
        die_map(2, 2, 2),  # unknown label
        np.zeros((0, 4), dtype=np.uint8),  # zero-size map
        die_map(4, 2, 3),  # unknown label again
        die_map(3, 2, 4),  # kept
        np.zeros((0, 0), dtype=np.uint8),  # unlabelled and empty: counted once, as unlabelled
    ]
    labels = ["Center", "none", "", "Loc", "Ring", "Donut", "Ring", "Scratch", ""]
    path = tmp_path / "fab.npz"
    np.savez(
        path,
        maps_flat=np.concatenate([m.ravel() for m in maps]),
        shapes=np.array([m.shape for m in maps]),
        labels=np.array(labels),
    )
    wafers, report = load_wafers(path, CLASSES, cache_dir=None, progress=False)
    assert wafers.source_row.tolist() == [0, 7]
    assert wafers.label_names().tolist() == ["Center", "Scratch"]
    assert report.total_rows == 9
    assert report.labelled == 2
    assert report.unlabelled == 2
    assert report.empty_maps == 3
    assert report.unknown_labels == {"Ring": 2}
    assert_balanced(report)
    summary = report.summary()
    assert "9 rows" in summary and "'Ring' x2" in summary and "3 empty or invalid" in summary

    kept_all, report_all = load_npz(path, CLASSES, keep_unlabelled=True)
    assert kept_all.source_row.tolist() == [0, 2, 7]
    assert (report_all.unlabelled, report_all.empty_maps) == (1, 4)
    assert_balanced(report_all)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"maps": np.ones((2, 2, 2), np.uint8)}, "'labels' is missing"),
        ({"labels": np.array(["none"])}, "holds neither 'maps'"),
        (
            {"maps": np.ones((2, 2, 2), np.uint8), "labels": np.array(["none"])},
            r"'maps' must be \(n=1, h, w\)",
        ),
        ({"maps": np.ones((1, 2, 2)), "labels": np.array(["none"])}, "integers"),
        (
            {
                "maps_flat": np.ones(5, np.uint8),
                "shapes": np.array([[2, 2]]),
                "labels": np.array(["none"]),
            },
            "need 4 dies but 'maps_flat' holds 5",
        ),
        (
            {
                "maps_flat": np.ones(4, np.uint8),
                "shapes": np.array([[2, 2]]),
                "offsets": np.array([0, 3]),
                "labels": np.array(["none"]),
            },
            "'offsets' must be",
        ),
        (
            {
                "maps_flat": np.ones(4, np.uint8),
                "shapes": np.array([[2, 2]]),
                "labels": np.array(["none"]),
                "lots": np.array(["a", "b"]),
            },
            "'lots' has 2 entries",
        ),
        (
            {
                "maps_flat": np.ones(4, np.uint8),
                "shapes": np.array([[2, 2]]),
                "labels": np.array(["none"]),
                "wafer_index": np.array([-3]),
            },
            "'wafer_index' must lie in",
        ),
        (
            {"maps": np.ones((1, 2, 2), np.uint8), "labels": np.array(["none"], dtype=object)},
            "'labels' cannot be read without pickle",
        ),
    ],
)
def test_broken_npz_files_name_the_array(
    tmp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    path = tmp_path / "broken.npz"
    np.savez(path, allow_pickle=True, **arrays)
    with pytest.raises(ValueError, match=message):
        load_wafers(path, CLASSES, cache_dir=None, progress=False)


# --- errors before reading ---------------------------------------------------------------------


def test_unsupported_suffix_lists_the_supported_ones(tmp_path: Path) -> None:
    path = tmp_path / "wafers.csv"
    path.write_text("x\n")
    with pytest.raises(ValueError, match=r"'\.csv'.*\.zip, \.pkl, \.npz"):
        load_wafers(path, CLASSES, cache_dir=None)


def test_missing_file_names_the_path_and_where_wm811k_lives(tmp_path: Path) -> None:
    path = tmp_path / "LSWMD.zip"
    with pytest.raises(FileNotFoundError, match="WM-811K is expected at") as err:
        load_wafers(path, CLASSES, cache_dir=None)
    assert str(path) in str(err.value) and str(DEFAULT_DATA) in str(err.value)


def test_default_data_sits_beside_the_checkout() -> None:
    checkout = Path(__file__).resolve().parents[1]
    expected = checkout.parent / "shared" / "data" / "wm811k" / "LSWMD.zip"
    assert expected == DEFAULT_DATA


# --- the conversion cache ----------------------------------------------------------------------


def test_cache_hit_returns_the_same_wafers_and_counts(tmp_path: Path) -> None:
    maps = [die_map(3, 4, i) for i in range(5)]
    source = WaferMaps.from_maps(maps, ["none", "Loc", "", "none", "Center"], CLASSES)
    path = tmp_path / "fab.npz"
    save_npz(source, path)
    cache_dir = tmp_path / "cache"
    first, first_report = load_wafers(path, CLASSES, cache_dir, progress=False)
    assert first_report.from_cache is False
    files = list(cache_dir.glob("*.npz"))
    assert len(files) == 1 and first_report.cache_file == str(files[0])
    assert not list(cache_dir.glob("*.tmp"))
    second, second_report = load_wafers(path, CLASSES, cache_dir, progress=False)
    assert second_report.from_cache is True
    assert_same_wafers(first, second)
    for name in ("source", "total_rows", "labelled", "unlabelled", "empty_maps", "unknown_labels"):
        assert getattr(first_report, name) == getattr(second_report, name), name
    assert "from cache" in second_report.summary()


def test_cache_is_keyed_by_classes_and_file_state(tmp_path: Path, labelled_set: WaferMaps) -> None:
    path = tmp_path / "fab.npz"
    save_npz(labelled_set, path)
    cache_dir = tmp_path / "cache"
    load_wafers(path, CLASSES, cache_dir, progress=False)
    fewer = ("Center", "none")
    wafers, report = load_wafers(path, fewer, cache_dir, progress=False)
    assert report.from_cache is False and len(list(cache_dir.glob("*.npz"))) == 2
    assert report.unknown_labels == {"Edge-Ring": 1, "Loc": 1, "Scratch": 1}
    assert wafers.classes == fewer

    save_npz(labelled_set.subset([0, 1]), path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    changed, changed_report = load_wafers(path, CLASSES, cache_dir, progress=False)
    assert changed_report.from_cache is False and len(changed) == 2


def test_unreadable_cache_is_rebuilt(
    tmp_path: Path, labelled_set: WaferMaps, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "fab.npz"
    save_npz(labelled_set, path)
    cache_dir = tmp_path / "cache"
    _, report = load_wafers(path, CLASSES, cache_dir, progress=False)
    assert report.cache_file is not None
    Path(report.cache_file).write_bytes(b"not a zip")
    wafers, again = load_wafers(path, CLASSES, cache_dir, progress=False)
    assert again.from_cache is False and len(wafers) == 7
    assert "ignoring unreadable cache file" in capsys.readouterr().err
    assert load_wafers(path, CLASSES, cache_dir, progress=False)[1].from_cache is True


# --- the LSWMD pickle (synthetic, in the real file's layout) ----------------------------------


def lswmd_frame() -> pd.DataFrame:
    """A small frame shaped like LSWMD.pkl: nested-array labels, empty arrays when unlabelled,
    lot names in an object column (as in the file, not pandas' newer string type)."""
    empty = np.zeros((0, 0))
    rows = [
        (die_map(4, 5, 0), "lot1", 1.0, [["Training"]], [["Center"]]),
        (die_map(3, 3, 1), "lot1", 2.0, empty, empty),
        (die_map(6, 4, 2), "lot1", 3.0, [["Test"]], [["none"]]),
        (np.zeros((3, 3), np.uint8), "lot2", 1.0, [["Test"]], [["none"]]),
        (die_map(5, 5, 3), "lot2", 2.0, [["Test"]], [["Ring"]]),
        (die_map(2, 7, 4), "lot2", 25.0, [["Training"]], [["Scratch"]]),
        (die_map(3, 3, 5), "lot3", 1.0, empty, empty),
    ]
    frame = pd.DataFrame(
        {
            "waferMap": [r[0] for r in rows],
            "dieSize": [float((r[0] > 0).sum()) for r in rows],
            "lotName": pd.Series([r[1] for r in rows], dtype=object),
            "waferIndex": [r[2] for r in rows],
            "trianTestLabel": [np.array(r[3]) for r in rows],
            "failureType": [np.array(r[4]) for r in rows],
        }
    )
    frame.columns = pd.Index(frame.columns, dtype=object)
    return frame


@pytest.fixture(params=[".pkl", ".zip"])
def lswmd_file(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    pkl = tmp_path / "LSWMD.pkl"
    lswmd_frame().to_pickle(pkl, protocol=2)
    if request.param == ".pkl":
        return pkl
    archive = tmp_path / "LSWMD.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.write(pkl, "LSWMD.pkl")
    pkl.unlink()
    return archive


def test_lswmd_keeps_labelled_rows_in_file_order(lswmd_file: Path) -> None:
    wafers, report = load_wafers(lswmd_file, CLASSES, cache_dir=None, progress=False)
    frame = lswmd_frame()
    assert wafers.source_row.tolist() == [0, 2, 5]
    assert wafers.label_names().tolist() == ["Center", "none", "Scratch"]
    assert wafers.lots.tolist() == ["lot1", "lot1", "lot2"]
    assert wafers.wafer_index.tolist() == [1, 3, 25]
    for j, row in enumerate([0, 2, 5]):
        np.testing.assert_array_equal(wafers.die_map(j), frame["waferMap"][row])
    assert (report.total_rows, report.labelled, report.unlabelled) == (7, 3, 2)
    assert (report.empty_maps, report.unknown_labels) == (1, {"Ring": 1})
    assert report.source == str(lswmd_file)
    assert_balanced(report)


def test_lswmd_zip_needs_one_pickle_inside(tmp_path: Path) -> None:
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("README.txt", "no pickle here")
    with pytest.raises(ValueError, match=r"expected one \.pkl inside"):
        load_wafers(archive, CLASSES, cache_dir=None, progress=False)


def test_legacy_unpickler_maps_old_pandas_names() -> None:
    unpickler = LegacyPandasUnpickler(io.BytesIO(b""), encoding="latin1")
    assert unpickler.find_class("pandas.indexes.base", "Index") is pd.Index
    assert unpickler.find_class("pandas.indexes.numeric", "Int64Index") is pd.Index
    assert unpickler.find_class("pandas.indexes.numeric", "Float64Index") is pd.Index
    assert unpickler.find_class("pandas.indexes.range", "RangeIndex") is pd.RangeIndex
    assert unpickler.find_class("__builtin__", "slice") is slice
    assert unpickler.find_class("numpy.core.multiarray", "_reconstruct") is not None


class RunsCode:
    """A pickle payload: unpickling it calls `function(*args)`."""

    def __init__(self, function: object, *args: object) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.function, self.args


def touch_marker(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def payloads(marker: Path) -> dict[str, bytes]:
    """Pickles that create `marker` when loaded by a plain unpickler (each made by hand)."""
    import builtins

    import numpy.testing

    return {
        "numpy.testing.runstring": pickle.dumps(
            RunsCode(numpy.testing.runstring, touch_marker(marker), {}), protocol=2
        ),
        "os.system": pickle.dumps(RunsCode(os.system, f"touch {marker}"), protocol=2),
        "builtins.eval": pickle.dumps(RunsCode(builtins.eval, touch_marker(marker)), protocol=2),
        "builtins.exec": pickle.dumps(RunsCode(builtins.exec, touch_marker(marker)), protocol=5),
        # in a frame's place: a DataFrame column whose cell runs code
        "inside a frame": pickle.dumps(
            pd.DataFrame(
                {"waferMap": [RunsCode(os.system, f"touch {marker}")]},
                columns=pd.Index(["waferMap"], dtype=object),
            ),
            protocol=2,
        ),
    }


@pytest.mark.parametrize(
    ("name", "refused"),
    [
        ("numpy.testing.runstring", "numpy.testing._private.utils.runstring"),
        ("os.system", f"{os.name}.system"),
        ("builtins.eval", "builtins.eval"),
        ("builtins.exec", "builtins.exec"),
        ("inside a frame", f"{os.name}.system"),
    ],
)
def test_a_pickle_that_runs_code_is_refused_before_running_it(
    tmp_path: Path, name: str, refused: str
) -> None:
    marker = tmp_path / "ran"
    payload = payloads(marker)[name]
    pickle.loads(payload)  # the payload works: a plain unpickler runs it
    assert marker.exists()
    marker.unlink()
    path = tmp_path / "LSWMD.pkl"
    path.write_bytes(payload)
    with pytest.raises(pickle.UnpicklingError, match=f"refusing to load {refused} from a wafer"):
        load_wafers(path, CLASSES, cache_dir=None, progress=False)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("numpy.testing", "runstring"),
        ("numpy.testing._private.utils", "runstring"),
        ("numpy", "load"),
        ("numpy.lib.npyio", "load"),
        ("numpy", "fromfile"),
        ("pandas", "read_pickle"),
        ("pandas.io.pickle", "read_pickle"),
        ("pandas", "eval"),
        ("pyarrow.lib", "_restore_array"),
        ("os", "system"),
        ("posix", "system"),
        ("subprocess", "Popen"),
        ("builtins", "eval"),
        ("__builtin__", "getattr"),
        ("builtins", "__import__"),
        ("copyreg", "_reconstructor"),
        ("os", "Int64Index"),
    ],
)
def test_only_the_names_of_the_wm811k_frame_are_admitted(module: str, name: str) -> None:
    unpickler = LegacyPandasUnpickler(io.BytesIO(b""), encoding="latin1")
    shown = {"__builtin__": "builtins"}.get(module, module)
    with pytest.raises(pickle.UnpicklingError, match=f"refusing to load {shown}.{name} "):
        unpickler.find_class(module, name)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_frame_like_lswmd_written_by_todays_pandas_round_trips(
    tmp_path: Path, protocol: int
) -> None:
    frame = lswmd_frame()
    buffer = io.BytesIO()
    frame.to_pickle(buffer, protocol=protocol)
    again = LegacyPandasUnpickler(io.BytesIO(buffer.getvalue()), encoding="latin1").load()
    pd.testing.assert_frame_equal(again, frame)
    assert again["waferMap"][2].dtype == np.uint8
    assert again["failureType"][0].tolist() == [["Center"]]


def test_pickle_of_something_else_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "LSWMD.pkl"
    path.write_bytes(pickle.dumps({"not": "a frame"}, protocol=2))
    with pytest.raises(ValueError, match="not a pandas DataFrame"):
        load_wafers(path, CLASSES, cache_dir=None, progress=False)


# --- the real WM-811K file ---------------------------------------------------------------------


@pytest.mark.slow
def test_real_file_needs_exactly_the_admitted_lswmd_names() -> None:
    """Unpickle the real file (~1 min, ~2.7 GB), recording every name it asks for."""
    asked: set[tuple[str, str]] = set()

    class Recording(LegacyPandasUnpickler):
        def find_class(self, module: str, name: str) -> object:
            found = super().find_class(module, name)
            asked.add((module, name))
            return found

    with (
        open_wafer_file(DEFAULT_DATA) as file,
        open_pickle(file, DEFAULT_DATA, zipped=True) as stream,
    ):
        frame = Recording(stream, encoding="latin1").load()
    assert frame.shape == (811_457, 6)
    as_admitted = {
        ({"__builtin__": "builtins"}.get(m, m).replace("pandas.indexes", "pandas.core.indexes"), n)
        for m, n in asked
    }
    assert as_admitted == set(LSWMD_GLOBALS)


@pytest.mark.slow
def test_real_file_counts(real_wafers: tuple[WaferMaps, LoadReport]) -> None:
    wafers, report = real_wafers
    assert report.total_rows == 811_457
    assert report.labelled == 172_950 == len(wafers)
    assert report.unlabelled == 638_507
    assert report.empty_maps == 0 and report.unknown_labels == {}
    assert wafers.class_counts() == README_COUNTS


@pytest.mark.slow
def test_real_file_die_maps(real_wafers: tuple[WaferMaps, LoadReport]) -> None:
    wafers, _ = real_wafers
    assert int(wafers.flat.max()) <= 2
    assert wafers.flat.size == int(np.prod(wafers.shapes, axis=1).sum())
    assert (wafers.shapes >= 3).all() and (wafers.shapes <= 300).all()
    assert wafers.wafer_index.min() >= 1 and wafers.wafer_index.max() <= 25
    assert (np.diff(wafers.source_row) > 0).all(), "file order"
    assert (wafers.lots != "").all()
    assert wafers.source_row[0] == 0 and wafers.label_names()[0] == "none"


@pytest.mark.slow
def test_real_file_second_load_comes_from_cache(
    real_wafers: tuple[WaferMaps, LoadReport], real_cache_dir: Path
) -> None:
    wafers, report = real_wafers
    again, again_report = load_wafers(DEFAULT_DATA, CLASSES, real_cache_dir, progress=False)
    assert again_report.from_cache is True
    assert again_report.total_rows == report.total_rows
    assert again_report.labelled == report.labelled
    assert again_report.unlabelled == report.unlabelled
    assert again.class_counts() == README_COUNTS
    assert_same_wafers(again, wafers)
