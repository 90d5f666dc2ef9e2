"""The defences behind ``read_lswmd`` (issue 15, row 5): the distribution file known by SHA-256, the
checked unpickler, and the child process that reads every other pickle.

Hostile pickles are unpickled only in a child Python (one for all of them, ``checked_results``);
the pytest process unpickles only frames pandas itself wrote.
"""

from __future__ import annotations

import copyreg
import hashlib
import io
import json
import pickle
import re
import signal
import struct
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pandas._libs.internals import _unpickle_block
from pandas.core.indexes.base import _new_Index  # type: ignore[attr-defined]
from pandas.core.internals.managers import BlockManager

from backend.label_config import DEFAULT_LABEL_CONFIG, parse_label_config
from backend.settings import DEFAULT_DATA, REPO_ROOT
from backend.sources import load_wafers, lswmd
from backend.sources.cache import LoadReport
from backend.sources.checked_pickle import CheckedPandasUnpickler, unpickle_checked
from backend.sources.lswmd import (
    DISTRIBUTION_FILES,
    DistributionFile,
    distribution_file,
    open_wafer_file,
    read_lswmd,
)
from backend.sources.pickle_sandbox import ERROR_FILE, REPORTED_STATUS, UnsafeFileError, _run_child
from backend.wafers import WaferMaps

CLASSES = parse_label_config(DEFAULT_LABEL_CONFIG.read_text()).failure_types


# --- pickles made by hand ----------------------------------------------------------------------


def global_(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def text(value: str) -> bytes:
    data = value.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def raw(data: bytes) -> bytes:
    return pickle.SHORT_BINBYTES + bytes([len(data)]) + data


def small(n: int) -> bytes:
    return pickle.BININT1 + bytes([n])


def put(i: int) -> bytes:
    return pickle.BINPUT + bytes([i])


def get(i: int) -> bytes:
    return pickle.BINGET + bytes([i])


def dtype_state(flags: int) -> bytes:
    """A plain dtype's state: (3, '|', None, None, None, -1, -1, flags)."""
    minus_one = pickle.BININT + struct.pack("<i", -1)
    return (
        pickle.MARK
        + small(3)
        + text("|")
        + pickle.NONE * 3
        + minus_one * 2
        + small(flags)
        + pickle.TUPLE
    )


def u1() -> bytes:
    """A well-made uint8 dtype, left on the stack."""
    return dtype_call("u1") + dtype_state(0) + pickle.BUILD


def dtype_call(code: str) -> bytes:
    """``numpy.dtype(code, False, True)``, as numpy pickles a dtype."""
    return (
        global_("numpy", "dtype")
        + text(code)
        + pickle.NEWFALSE
        + pickle.NEWTRUE
        + pickle.TUPLE3
        + pickle.REDUCE
    )


def new_array() -> bytes:
    """``_reconstruct(ndarray, (0,), b"b")``, as numpy pickles an array."""
    return (
        global_("numpy._core.multiarray", "_reconstruct")
        + global_("numpy", "ndarray")
        + small(0)
        + pickle.TUPLE1
        + raw(b"b")
        + pickle.TUPLE3
        + pickle.REDUCE
    )


def array_state(dtype_at: int, data: bytes) -> bytes:
    """(1, (len(data),), memo[dtype_at], False, data)."""
    return (
        pickle.MARK
        + small(1)
        + small(len(data))
        + pickle.TUPLE1
        + get(dtype_at)
        + pickle.NEWFALSE
        + raw(data)
        + pickle.TUPLE
    )


def hand_made(*parts: bytes) -> bytes:
    return pickle.PROTO + b"\x02" + b"".join(parts) + pickle.STOP


class Reduces:
    """A pickle payload: unpickling calls ``function(*args)`` and, with a ``state``, BUILDs it."""

    def __init__(self, function: object, args: tuple[object, ...], state: object = None) -> None:
        self.function, self.args, self.state = function, args, state

    def __reduce__(self) -> tuple[Any, ...]:
        if self.state is None:
            return self.function, self.args
        return self.function, self.args, self.state


class NewObject(Reduces):
    """Pickles as NEWOBJ ``cls.__new__(cls, *args)`` (+ BUILD ``state``), as Python 2 pickled
    objects; pickle insists the object's class is ``cls``, so it says so."""

    def __init__(self, cls: type, args: tuple[object, ...], state: object = None) -> None:
        super().__init__(copyreg.__newobj__, (cls, *args), state)  # type: ignore[attr-defined]
        self.cls = cls

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        return self.cls


def object_block_values() -> np.ndarray:
    values = np.empty((2, 1), dtype=object)
    values[:, 0] = ["lot1", "none"]
    return values


COLUMNS = pd.Index(["lotName", "failureType"], dtype=object)


def legacy_manager_state(mgr_locs: object) -> dict[str, object]:
    """The 0.14.1 BlockManager state LSWMD.pkl holds, with one block at ``mgr_locs``."""
    return {
        "0.14.1": {
            "axes": [COLUMNS, pd.RangeIndex(1)],
            "blocks": [{"values": object_block_values(), "mgr_locs": mgr_locs}],
        }
    }


def legacy_manager(mgr_locs: object) -> Reduces:
    """``BlockManager`` made as Python 2 pickled it: NEWOBJ, then BUILD with the 0.14.1 state."""
    state: tuple[object, ...] = (
        [COLUMNS, pd.RangeIndex(1)],
        [],
        [],
        legacy_manager_state(mgr_locs),
    )
    return NewObject(BlockManager, (), state)


def block_at(placement: object) -> Reduces:
    return Reduces(_unpickle_block, (object_block_values(), placement, 2))


HOSTILE: dict[str, bytes] = {
    "a dtype used before its state": hand_made(
        dtype_call("u1"),
        put(0),
        pickle.POP,
        global_("numpy._core.multiarray", "scalar"),
        get(0),
        raw(b"\x01"),
        pickle.TUPLE2,
        pickle.REDUCE,
    ),
    "a dtype given state twice (memo)": hand_made(
        u1(), put(0), pickle.POP, get(0), dtype_state(63), pickle.BUILD
    ),
    "a dtype given state twice (DUP)": hand_made(
        dtype_call("u1"),
        pickle.DUP,
        dtype_state(0),
        pickle.BUILD,
        pickle.POP,
        dtype_state(0),
        pickle.BUILD,
    ),
    "an array given state twice": hand_made(
        u1(),
        put(0),
        pickle.POP,
        new_array(),
        array_state(0, b"\x01\x02"),
        pickle.BUILD,
        put(1),
        pickle.POP,
        get(1),
        array_state(0, b"\x03\x04"),
        pickle.BUILD,
    ),
    "an array of a dtype not built here": hand_made(
        global_("builtins", "slice"),
        small(1),
        pickle.TUPLE1,
        pickle.REDUCE,
        put(0),
        pickle.POP,
        new_array(),
        array_state(0, b"\x01"),
        pickle.BUILD,
    ),
    "numpy.ndarray called": hand_made(
        global_("numpy", "ndarray"), small(4), pickle.TUPLE1, pickle.TUPLE1, pickle.REDUCE
    ),
    "an uninitialised array": hand_made(
        global_("numpy._core.multiarray", "_reconstruct"),
        global_("numpy", "ndarray"),
        small(64),
        pickle.TUPLE1,
        raw(b"b"),
        pickle.TUPLE3,
        pickle.REDUCE,
    ),
    "a dtype from a list of fields": hand_made(
        global_("numpy", "dtype"),
        pickle.EMPTY_LIST,
        pickle.TUPLE1,
        pickle.REDUCE,
    ),
    "an object array from a buffer": hand_made(
        dtype_call("O8"),
        dtype_state(63),
        pickle.BUILD,
        put(0),
        pickle.POP,
        global_("numpy._core.numeric", "_frombuffer"),
        pickle.MARK,
        raw(b"\x10" + b"\x00" * 7),
        get(0),
        small(1),
        pickle.TUPLE1,
        text("C"),
        pickle.TUPLE,
        pickle.REDUCE,
    ),
    "a frame filled like a dict": hand_made(
        global_("pandas", "DataFrame"),
        pickle.EMPTY_TUPLE,
        pickle.REDUCE,
        pickle.MARK,
        text("waferMap"),
        small(1),
        pickle.SETITEMS,
    ),
    "state given to an index": pickle.dumps(
        Reduces(_new_Index, (pd.Index, {"data": COLUMNS}), {"_data": np.arange(3)}), protocol=2
    ),
    "a legacy manager block outside its columns": pickle.dumps(
        legacy_manager(np.array([0, 1 << 40])), protocol=2
    ),
    "a legacy manager slice past its columns": pickle.dumps(
        legacy_manager(slice(0, 1 << 40, 1)), protocol=2
    ),
    "a legacy manager column covered twice": pickle.dumps(
        legacy_manager(np.array([0, 0])), protocol=2
    ),
    "a manager made by a call": pickle.dumps(
        Reduces(BlockManager, ((block_at(np.array([0, 1 << 40])),), [COLUMNS, pd.RangeIndex(1)])),
        protocol=2,
    ),
    "a manager made by NEWOBJ with blocks": pickle.dumps(
        NewObject(BlockManager, ((block_at(np.array([1, 1 << 40])),), [COLUMNS, pd.RangeIndex(1)])),
        protocol=2,
    ),
}

REFUSED = {
    "a dtype used before its state": "refusing a scalar of dtype <",
    "a dtype given state twice (memo)": "refusing to give state to an existing UInt8DType",
    "a dtype given state twice (DUP)": "refusing a second BUILD of one dtype or array",
    "an array given state twice": "refusing to give state to an existing ndarray",
    "an array of a dtype not built here": "refusing an array of dtype slice(None, 1, None)",
    "numpy.ndarray called": "refusing a direct numpy.ndarray(...) call",
    "an uninitialised array": "refusing _reconstruct(",
    "a dtype from a list of fields": "refusing to build dtype ([],)",
    "an object array from a buffer": "refusing an object array from a raw buffer",
    "a frame filled like a dict": "refusing to fill a DataFrame as a dict",
    "state given to an index": "refusing to give state to an existing Index",
    "a legacy manager block outside its columns": (
        "refusing a frame whose block is placed at columns 0..1099511627776, outside its 2"
    ),
    "a legacy manager slice past its columns": (
        "refusing a frame whose block is placed at slice(0, 1099511627776, 1), outside 2 columns"
    ),
    "a legacy manager column covered twice": (
        "refusing a frame whose blocks do not cover its 2 columns once each"
    ),
    "a manager made by a call": (
        "refusing a frame whose block is placed at slice(0, 2199023255552, 1099511627776)"
    ),
    "a manager made by NEWOBJ with blocks": (
        "refusing a frame whose block is placed at slice(1, 2199023255551, 1099511627775)"
    ),
}

CHECKED_READS = """
import json, pickle, sys
from pathlib import Path
from backend.sources.checked_pickle import unpickle_checked
for path in json.loads(sys.argv[1]):
    with open(path, "rb") as stream:
        try:
            made = unpickle_checked(stream)
        except pickle.UnpicklingError as err:
            print(json.dumps([Path(path).stem, f"refused: {err}"]), flush=True)
        except Exception as err:
            print(json.dumps([Path(path).stem, f"error: {type(err).__name__}: {err}"]), flush=True)
        else:
            print(json.dumps([Path(path).stem, f"made: {type(made).__name__}"]), flush=True)
"""


@pytest.fixture(scope="module")
def checked_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each ``HOSTILE`` pickle unpickled by ``unpickle_checked`` in ONE child Python."""
    folder = tmp_path_factory.mktemp("hostile")
    paths = []
    for i, data in enumerate(HOSTILE.values()):
        paths.append(folder / f"{i}.pkl")
        paths[-1].write_bytes(data)
    child = subprocess.run(
        [sys.executable, "-c", CHECKED_READS, json.dumps([str(p) for p in paths])],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    results = dict(json.loads(line) for line in child.stdout.splitlines())
    names = list(HOSTILE)
    assert child.returncode == 0, (
        f"the checked reader died (rc {child.returncode}) after {len(results)} pickles, "
        f"on {names[len(results)]!r}: {child.stderr[-2000:]}"
    )
    return {names[int(i)]: result for i, result in results.items()}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_the_checked_unpickler_refuses(checked_results: dict[str, str], case: str) -> None:
    assert checked_results[case].startswith(f"refused: {REFUSED[case]}"), checked_results[case]


def test_hostile_pickles_use_only_admitted_names() -> None:
    """Every refusal above comes from the checks, not from the allow-list."""
    from pickletools import genops

    for case, data in HOSTILE.items():
        for op, arg, _ in genops(data):
            if op.name == "GLOBAL":
                module, name = str(arg).split(" ")
                lswmd.resolve_admitted(module, name)  # raises for a name not admitted
        assert data.startswith(b"\x80\x02"), case


# --- frames pandas itself writes read the same ---------------------------------------------


def frame_like_lswmd(failure_types: tuple[object, object] = ("none", b"Loc")) -> pd.DataFrame:
    """An LSWMD-shaped frame with every cell type the real file has, plus numpy scalars."""
    frame = pd.DataFrame(
        {
            "waferMap": pd.Series([np.ones((3, 4), np.uint8), np.full((2, 2), 2, np.uint8)]),
            "dieSize": [12.0, 4.0],
            "lotName": pd.Series(["lot1", "lot2"], dtype=object),
            "waferIndex": [1.0, 2.0],
            "trianTestLabel": pd.Series([np.array([["Training"]]), np.zeros((0, 0))]),
            "failureType": pd.Series([np.array([[label]]) for label in failure_types]),
            "extra": pd.Series([np.float64(1.5), np.int64(3)], dtype=object),
        }
    )
    frame.columns = pd.Index(frame.columns, dtype=object)
    return frame


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_a_frame_written_by_pandas_reads_the_same_checked(protocol: int) -> None:
    frame = frame_like_lswmd()
    again = unpickle_checked(io.BytesIO(pickle.dumps(frame, protocol=protocol)))
    assert isinstance(again, pd.DataFrame)
    pd.testing.assert_frame_equal(again, frame)
    assert again["waferMap"][0].dtype == np.uint8
    assert again["failureType"][1].tolist() == [[b"Loc"]]


@pytest.mark.parametrize(
    ("array", "refused"),
    [
        (np.zeros(2, dtype=[("a", "u1"), ("b", "O")]), "to build a dtype with fields"),
        (np.zeros(2, dtype="u1,f8"), "to build a dtype with fields"),
        (np.zeros(2, dtype=[("a", "u1", (3,))]), "to build a dtype with fields or a subarray"),
        (np.zeros(2, dtype="V4"), "to build dtype('V4') (only bool, integer"),
        (np.zeros(2, dtype="M8[ns]"), "to build a dtype with metadata"),
        (np.zeros(2, dtype="m8"), "to build a dtype with metadata"),
    ],
)
def test_structured_void_and_time_arrays_are_refused(array: np.ndarray, refused: str) -> None:
    """numpy itself wrote these (consistent state), so reading them here cannot crash."""
    with pytest.raises(pickle.UnpicklingError, match=f"refusing {re.escape(refused)}"):
        unpickle_checked(io.BytesIO(pickle.dumps(array, protocol=2)))


def test_plain_arrays_of_every_admitted_kind_round_trip() -> None:
    arrays = [
        np.array([True, False]),
        np.arange(3, dtype=np.int16),
        np.arange(3, dtype=">u4"),
        np.linspace(0, 1, 3),
        np.array([1 + 2j]),
        np.array([b"ab", b"c"]),
        np.array(["Edge-Ring", "none"]),
        np.array([np.ones(2), "x", None], dtype=object),
        np.zeros((2, 3), dtype=np.uint8, order="F"),
    ]
    for protocol in (2, 5):
        data = pickle.dumps(arrays, protocol=protocol)
        again = unpickle_checked(io.BytesIO(data))
        assert isinstance(again, list)
        for plain, checked in zip(pickle.loads(data), again, strict=True):
            assert plain.dtype == checked.dtype and plain.shape == checked.shape
            assert plain.flags.f_contiguous == checked.flags.f_contiguous
            assert pickle.dumps(plain) == pickle.dumps(checked)


def test_checked_find_class_keeps_the_allow_list() -> None:
    unpickler = CheckedPandasUnpickler(io.BytesIO(b""))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load os\.system from a wafer"):
        unpickler.find_class("os", "system")
    assert unpickler.find_class("pandas.indexes.numeric", "Int64Index") is pd.Index


# --- the distribution file, known by size and SHA-256 -------------------------------------


def test_the_distribution_digests_are_the_ones_its_readme_publishes() -> None:
    readme = (DEFAULT_DATA.parent / "README.md").read_text()
    published = re.findall(r"sha256 of (?:the \.pkl|this zip)\s+`([0-9a-f]{64})`", readme)
    assert sorted(published) == sorted(known.sha256 for known in DISTRIBUTION_FILES)
    assert DISTRIBUTION_FILES[1].size == 2_095_505_977  # "2,095,505,977 bytes unpacked"


def test_the_real_zip_is_recognised_by_its_digest() -> None:
    if not DEFAULT_DATA.is_file():
        pytest.skip(f"no WM-811K at {DEFAULT_DATA}")
    with open_wafer_file(DEFAULT_DATA) as file:
        assert distribution_file(file) == DISTRIBUTION_FILES[0]
        assert file.tell() == 0


def small_lswmd_zip(folder: Path, name: str = "LSWMD.zip") -> Path:
    frame = frame_like_lswmd(failure_types=("none", "Loc"))
    path = folder / name
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("LSWMD.pkl", pickle.dumps(frame, protocol=2))
    return path


@pytest.fixture
def known(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A small LSWMD.zip, listed as the distribution file for the test's length."""
    path = small_lswmd_zip(tmp_path)
    entry = DistributionFile(
        "LSWMD.zip", path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()
    )
    monkeypatch.setattr(lswmd, "DISTRIBUTION_FILES", (entry,))
    yield path


def test_a_file_of_another_size_is_not_even_hashed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_hashing(*args: object) -> None:
        raise AssertionError("hashed a file of another size")

    monkeypatch.setattr(hashlib, "file_digest", no_hashing)
    path = small_lswmd_zip(tmp_path)
    with open_wafer_file(path) as file:
        assert distribution_file(file) is None


def test_same_size_another_digest_is_not_trusted(
    known: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = lswmd.DISTRIBUTION_FILES[0]
    forged = DistributionFile(entry.name, entry.size, "0" * 64)
    monkeypatch.setattr(lswmd, "DISTRIBUTION_FILES", (forged,))
    with open_wafer_file(known) as file:
        assert distribution_file(file) is None


def test_the_distribution_file_is_read_in_this_process(
    known: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_child(*args: object, **kwargs: object) -> None:
        raise AssertionError("the distribution file went to a child process")

    monkeypatch.setattr(lswmd, "read_in_child", no_child)
    wafers, report = load_wafers(known, CLASSES, cache_dir=None, progress=False)
    assert wafers.label_names().tolist() == ["none", "Loc"]
    assert (report.total_rows, report.labelled) == (2, 2)


def test_a_known_zip_is_opened_as_a_zip_whatever_its_name(
    known: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    renamed = known.rename(known.with_name("wm811k.pkl"))
    monkeypatch.setattr(lswmd, "read_in_child", None)
    wafers, _ = read_lswmd(renamed, CLASSES, progress=False)
    assert len(wafers) == 2


def test_any_other_file_reads_the_same_in_a_child(known: Path, tmp_path: Path) -> None:
    """The same bytes read in-process (listed) and in the child (a copy, not listed) agree."""
    here, here_report = read_lswmd(known, CLASSES, progress=False)
    copy = tmp_path / "copy" / "LSWMD.zip"
    copy.parent.mkdir()
    copy.write_bytes(known.read_bytes() + b"\0")  # a zip may carry trailing bytes
    there, there_report = read_lswmd(copy, CLASSES, progress=False, keep_unlabelled=False)
    assert_same(here, there)
    assert there_report.source == str(copy)
    for field in ("total_rows", "labelled", "unlabelled", "empty_maps", "unknown_labels"):
        assert getattr(here_report, field) == getattr(there_report, field), field
    assert there_report.from_cache is False and there_report.cache_file is None


def assert_same(a: WaferMaps, b: WaferMaps) -> None:
    for name in ("flat", "offsets", "shapes", "labels", "lots", "wafer_index", "source_row"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


# --- the child process ---------------------------------------------------------------------


def test_a_reader_killed_by_a_signal_is_reported_as_unsafe(tmp_path: Path) -> None:
    crash = [sys.executable, "-c", "import ctypes; ctypes.string_at(0)"]
    with pytest.raises(UnsafeFileError) as err:
        _run_child(crash, tmp_path, Path("wafers.pkl"))
    assert str(err.value).startswith(
        "wafers.pkl: this file could not be read safely: the process reading it was killed by "
        f"{signal.SIGSEGV.name}."
    )
    assert isinstance(err.value, ValueError), "load_wafers documents ValueError"


@pytest.mark.parametrize(
    ("code", "what"),
    [
        ("import sys; sys.exit(7)", "exited with status 7"),
        ("pass", "exited without a readable result"),
        (f"open({ERROR_FILE!r}, 'w').write('{{'); raise SystemExit({REPORTED_STATUS})", "status 3"),
        ("import os; os._exit(1)", "exited with status 1"),
    ],
)
def test_a_reader_that_leaves_no_answer_is_reported_as_unsafe(
    tmp_path: Path, code: str, what: str
) -> None:
    with pytest.raises(UnsafeFileError, match=f"could not be read safely: the process .*{what}"):
        _run_child([sys.executable, "-c", code], tmp_path, Path("wafers.pkl"))


def test_a_reported_error_is_raised_again_as_it_was(tmp_path: Path) -> None:
    code = (
        f"import json; json.dump({{'kind': 'refused', 'message': 'no'}}, open({ERROR_FILE!r}, 'w'))"
        f"; raise SystemExit({REPORTED_STATUS})"
    )
    with pytest.raises(pickle.UnpicklingError, match=r"^no$"):
        _run_child([sys.executable, "-c", code], tmp_path, Path("wafers.pkl"))


def test_the_child_gets_no_secrets_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "secret-token")
    code = "import json, os; json.dump(dict(os.environ), open('environ.json', 'w'))"
    with pytest.raises(UnsafeFileError):
        _run_child([sys.executable, "-c", code], tmp_path, Path("wafers.pkl"))
    environment = json.loads((tmp_path / "environ.json").read_text())
    assert "LABEL_STUDIO_API_KEY" not in environment
    assert environment["PYTHONPATH"] == str(REPO_ROOT)


def test_a_broken_file_in_the_child_is_a_value_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "LSWMD.pkl"
    path.write_bytes(pickle.dumps([1, 2], protocol=2))
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: holds a list"):
        load_wafers(path, CLASSES, cache_dir=None, progress=False)
    path.write_bytes(b"\x80\x02K")  # cut short
    with pytest.raises(ValueError, match="could not be read as a WM-811K frame: IndexError"):
        load_wafers(path, CLASSES, cache_dir=None, progress=False)


@pytest.mark.slow
def test_real_file_reads_the_same_through_the_checked_child(
    real_wafers: tuple[WaferMaps, LoadReport],
) -> None:
    """The real LSWMD.pkl as any unknown file is read: pure-Python, checked (~1.5 min)."""
    from backend.sources.pickle_sandbox import read_in_child

    wafers, _ = real_wafers
    again, again_report = read_in_child(
        DEFAULT_DATA, CLASSES, keep_unlabelled=False, progress=False
    )
    assert_same(wafers, again)
    assert (again_report.total_rows, again_report.labelled) == (811_457, 172_950)
