"""The Data Manager tabs the set-up makes: what each shows, hides, filters and sorts by."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import pytest

from backend.labelstudio import LABEL_STUDIO_TASK_COLUMNS, LabelStudioClient, TaskFilter
from backend.ops import (
    AUTO_VIEW,
    ENGINEER_VIEW,
    MEASURE_COLUMN,
    UNCERTAIN_FIRST,
    UNREADABLE_VIEW,
    WAFER_DATA_COLUMNS,
    engineer_columns,
    make_views,
    tab_columns,
)
from backend.uncertainty import Measure


class RecordingClient:
    """Stands in for LabelStudioClient.create_view: records each tab."""

    def __init__(self) -> None:
        self.tabs: dict[str, dict[str, Any]] = {}

    def create_view(
        self,
        project: int,
        title: str,
        filters: Sequence[TaskFilter] = (),
        ordering: Sequence[str] = (),
        *,
        hidden_columns: Sequence[str] = (),
        column_types: Mapping[str, str] | None = None,
    ) -> int:
        self.tabs[title] = {
            "project": project,
            "filters": [f.to_data_manager() for f in filters],
            "ordering": list(ordering),
            "hidden": set(hidden_columns),
            "types": dict(column_types or {}),
        }
        return len(self.tabs)


def visible(hidden: set[str]) -> set[str]:
    return {*LABEL_STUDIO_TASK_COLUMNS, *WAFER_DATA_COLUMNS} - hidden


@pytest.mark.parametrize("measure", list(Measure))
def test_engineer_queue_shows_only_picture_guess_measure_score_set_and_lot(
    measure: Measure,
) -> None:
    client = RecordingClient()
    ids = make_views(cast(LabelStudioClient, client), 7, measure)
    assert ids == {ENGINEER_VIEW: 1, AUTO_VIEW: 2, UNREADABLE_VIEW: 3}
    queue = client.tabs[ENGINEER_VIEW]
    measure_column = MEASURE_COLUMN[measure]
    assert measure_column.removeprefix("data.").replace("_", "-") == measure.value
    assert visible(queue["hidden"]) == {
        "data.image",
        "data.predicted",
        measure_column,
        "data.score",
        "data.set",
        "data.lot",
    }
    assert queue["ordering"] == [UNCERTAIN_FIRST[measure]]
    assert queue["ordering"][0].lstrip("-") == measure_column
    assert [f["filter"] for f in queue["filters"]] == [
        "filter:tasks:total_annotations",
        "filter:tasks:data.route",
    ]
    assert queue["types"][measure_column] == "Number"
    assert queue["types"]["data.score"] == "Number"


def test_other_tabs_hide_label_studio_bookkeeping_too() -> None:
    client = RecordingClient()
    make_views(cast(LabelStudioClient, client), 7, Measure.MARGIN)
    auto = visible(client.tabs[AUTO_VIEW]["hidden"])
    assert auto == {*engineer_columns(Measure.MARGIN), "annotators"}
    unreadable = visible(client.tabs[UNREADABLE_VIEW]["hidden"])
    assert unreadable == {
        "data.image",
        "data.set",
        "data.lot",
        "data.wafer_id",
        "data.prediction_error",
    }
    assert client.tabs[UNREADABLE_VIEW]["ordering"] == []


def test_tab_columns_hides_everything_not_shown() -> None:
    hidden = tab_columns(("data.image", "id"))
    assert "data.image" not in hidden and "id" not in hidden
    assert "inner_id" in hidden and "data.route" in hidden
    assert len(hidden) == len(set(hidden))
