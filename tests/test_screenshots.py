"""The engineer's screens in a real browser: a headless Chromium logs in to a real Label Studio
1.23.2 and screenshots the engineer queue tab and the labeling screen at 1600x1000."""

from __future__ import annotations

import shutil
import struct
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backend.harness.browser import CHROMIUM_NAMES, INSTALL_HINT, Box
from backend.harness.screenshots import take_screenshots
from backend.harness.stack import LabelStudioServer
from backend.label_config import DEFAULT_LABEL_CONFIG, LabelConfig
from backend.labelstudio import LabelStudioClient
from backend.projects import make_views
from backend.routing import sureness
from backend.sources.cache import LoadReport
from backend.uncertainty import Measure
from backend.wafer_sets import choice_result, wafer_task
from backend.wafers import WaferMaps

MODEL_VERSION = "v001-set0"
#: Wafers of the test project: (failure type shown, the model's guess, its top probability).
#: The most uncertain one (smallest margin: listed first, opened first for labeling) is a round
#: Edge-Loc wafer; the tallest Scratch wafer of WM-811K is in the queue too.
WAFERS = (
    ("Center", "Center", 0.55),
    ("Edge-Ring", "Edge-Ring", 0.62),
    ("Scratch", "Loc", 0.58),
    ("Donut", "Donut", 0.70),
    ("Edge-Loc", "Edge-Loc", 0.48),
    ("Random", "Near-full", 0.52),
)
TALLEST = "Scratch"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails unless the file is a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", head[16:24])
    return int(width), int(height)


def probabilities(config: LabelConfig, guess: str, top: float) -> np.ndarray:
    """A probability vector with `top` on `guess` and the rest spread unevenly."""
    rest = np.linspace(2.0, 0.5, len(config.failure_types) - 1)
    probs = np.insert(rest / rest.sum() * (1.0 - top), config.index_of(guess), top)
    return probs


def wafer_tasks(wafers: WaferMaps, config: LabelConfig) -> list[dict[str, Any]]:
    """Engineer-routed wafers as the pre-annotation leaves them: the imported task data and one
    prediction whose score is the routing measure's sureness (here margin: p1 - p2)."""
    tasks = []
    for failure_type, guess, top in WAFERS:
        of_type = np.flatnonzero(wafers.label_names() == failure_type)
        if failure_type == TALLEST:
            tallness = wafers.shapes[of_type, 0] / wafers.shapes[of_type, 1]
            i = int(of_type[np.argmax(tallness)])
        else:
            i = int(of_type[0])
        task = wafer_task(wafers, i, 1, config, with_label=False)
        probs = probabilities(config, guess, top)[None, :]
        task["predictions"] = [
            {
                "model_version": MODEL_VERSION,
                "score": round(float(sureness(probs, Measure.MARGIN)[0]), 6),
                "result": choice_result(config, guess),
            }
        ]
        tasks.append(task)
    return tasks


@pytest.mark.slow
@pytest.mark.e2e
def test_engineer_sees_wafer_guess_and_choices_without_scrolling(
    label_studio: LabelStudioServer,
    ls: LabelStudioClient,
    real_wafers: tuple[WaferMaps, LoadReport],
    label_config: LabelConfig,
    tmp_path: Path,
) -> None:
    assert any(shutil.which(name) for name in CHROMIUM_NAMES), (
        f"no Chromium for the screenshots (scripts/install installs it where it may): {INSTALL_HINT}"
    )
    wafers, _ = real_wafers
    title = f"screens {uuid.uuid4().hex[:8]}"
    project = ls.create_project(title, DEFAULT_LABEL_CONFIG.read_text())
    tasks = wafer_tasks(wafers, label_config)
    ls.import_tasks(project, tasks)
    ls.set_model_version(project, MODEL_VERSION)
    make_views(ls, project, ls.current_user_id())

    shots = take_screenshots(
        label_studio.url,
        label_studio.admin.email,
        label_studio.admin.password,
        title,
        tmp_path / "shots",
    )

    assert png_size(shots.queue) == (1600, 1000)
    assert png_size(shots.labeling) == (1600, 1000)
    # The tab lists every wafer, with only the engineer's columns: the score and the guess
    # (Label Studio puts its own columns first), the picture, set and lot.
    assert shots.rows == len(WAFERS)
    shown = ["predictions_score", "predictions_results", "data.image", "data.set", "data.lot"]
    assert sorted(shots.columns) == sorted(f"tasks:{c}" for c in shown)
    assert shots.columns.index("tasks:data.image") < shots.columns.index("tasks:data.set")
    # The labeling screen: the most uncertain wafer (lowest score), its picture and all nine
    # failure types inside the 1600x1000 window, the model's guess pre-selected.
    assert shots.choices_in_sight, shots.choices
    assert shots.picture_in_sight, shots.picture
    assert isinstance(shots.picture, Box) and shots.picture.height >= 400
    first = min(tasks, key=lambda t: t["predictions"][0]["score"])
    guess = first["predictions"][0]["result"][0]["value"]["choices"][0]
    assert len(shots.selected) == 1 and shots.selected[0].startswith(guess), shots.selected
    assert f"wafer {first['data']['wafer_id']}" in shots.labeling_text
    assert "Ctrl+Enter confirms" in shots.labeling_text
    for failure_type in label_config.failure_types:
        assert failure_type in shots.labeling_text
