"""Wafer pictures as files served by Label Studio's local-files storage (`import --pictures`),
against a real Label Studio 1.23.2: the task holds a short path, Label Studio serves the file,
and the backend reads it back to exactly the model's input."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from backend.encoding import resize_nearest
from backend.harness.stack import LabelStudioServer
from backend.image_client import shared_image_client
from backend.images import model_input
from backend.label_config import DEFAULT_LABEL_CONFIG, LabelConfig
from backend.labelstudio import LabelStudioClient
from backend.sources.cache import LoadReport
from backend.wafer_sets import PictureFiles, import_wafers
from backend.wafer_store import WaferStore
from backend.wafers import WaferMaps

pytestmark = pytest.mark.e2e


def test_picture_files_must_lie_under_the_document_root(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="LOCAL_FILES_DOCUMENT_ROOT"):
        PictureFiles(tmp_path / "elsewhere", tmp_path / "root")
    files = PictureFiles(tmp_path / "root" / "pics", tmp_path / "root")
    value = files.value("LSWMD", 17, b"\x89PNG...")
    assert value == "/data/local-files/?d=pics/LSWMD/17.png"
    assert (tmp_path / "root" / "pics" / "LSWMD" / "17.png").read_bytes() == b"\x89PNG..."


def test_imported_picture_files_are_served_and_read_back_exactly(
    label_studio: LabelStudioServer,
    ls: LabelStudioClient,
    real_wafers: tuple[WaferMaps, LoadReport],
    label_config: LabelConfig,
    tmp_path: Path,
) -> None:
    wafers = real_wafers[0].subset(np.arange(0, 60, 12))
    project = ls.create_project(
        f"pictures {uuid.uuid4().hex[:8]}", DEFAULT_LABEL_CONFIG.read_text()
    )
    pictures = PictureFiles(label_studio.files_root / f"wafers-{project}", label_studio.files_root)
    pictures.folder.mkdir(parents=True)
    storage = ls.connect_local_files(project, pictures.folder)
    assert ls.connect_local_files(project, pictures.folder) == storage  # idempotent
    outcome = import_wafers(
        ls,
        project,
        wafers,
        label_config,
        [np.arange(len(wafers))],
        source="LSWMD",
        initial=True,
        store=WaferStore(tmp_path / "store"),
        pictures=pictures,
        progress=False,
    )
    assert outcome.imported == {0: len(wafers)}
    tasks = ls.tasks_of_set(project, 0)
    client = shared_image_client(label_studio.url, ())
    for task in tasks:
        value = task["data"][label_config.image_value]
        assert value.startswith("/data/local-files/?d=") and len(value) < 100
        codes = model_input(
            value, client, label_studio_url=label_studio.url, api_key=label_studio.api_key, size=32
        )
        i = int(np.flatnonzero(wafers.source_row == task["data"]["wafer_id"])[0])
        np.testing.assert_array_equal(codes, resize_nearest(wafers.die_map(i), 32))
