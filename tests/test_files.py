"""backend.files: a file is written whole or not at all."""

from __future__ import annotations

import csv
import stat
from pathlib import Path

import numpy as np
import pytest

from backend.files import (
    atomic_text_writer,
    atomic_write_bytes,
    atomic_write_text,
    atomic_writer,
    fsync_dir,
)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_write_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "new" / "folder" / "CURRENT"
    atomic_write_text(path, "v001-set0\n")
    atomic_write_text(path, "v002-set1\n")
    assert path.read_text() == "v002-set1\n"
    assert leftovers(path.parent) == []
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_writer_that_fails_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "routing.json"
    atomic_write_bytes(path, b'{"cut": 0.98}')
    with pytest.raises(RuntimeError, match="killed"), atomic_writer(path) as handle:
        handle.write(b'{"cut": nu')
        raise RuntimeError("killed halfway")
    assert path.read_bytes() == b'{"cut": 0.98}'
    assert leftovers(tmp_path) == []


def test_secrets_get_owner_only_permissions(tmp_path: Path) -> None:
    path = tmp_path / "logins.json"
    atomic_write_text(path, "{}", mode=0o600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_streaming_writers_numpy_and_csv(tmp_path: Path) -> None:
    arrays = tmp_path / "phase.npz"
    with atomic_writer(arrays) as handle:
        np.savez(handle, probs=np.eye(3))
    with np.load(arrays) as data:
        np.testing.assert_array_equal(data["probs"], np.eye(3))
    table = tmp_path / "truth.csv"
    with atomic_text_writer(table, newline="") as handle:
        csv.writer(handle).writerows([["wafer_id", "failure_type"], [7, "Edge-Ring, partial"]])
    assert list(csv.reader(table.open(newline=""))) == [
        ["wafer_id", "failure_type"],
        ["7", "Edge-Ring, partial"],
    ]
    assert leftovers(tmp_path) == []


def test_syncing_a_missing_folder_is_harmless(tmp_path: Path) -> None:
    fsync_dir(tmp_path / "absent")
    fsync_dir(tmp_path)
