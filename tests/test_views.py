"""The Data Manager tabs the set-up makes: what each shows, hides, filters and sorts by."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from backend.labelstudio import LABEL_STUDIO_TASK_COLUMNS, LabelStudioClient, TaskFilter
from backend.projects import (
    AUTO_VIEW,
    ENGINEER_VIEW,
    UNCERTAIN_FIRST,
    UNREADABLE_VIEW,
    WAFER_DATA_COLUMNS,
    engineer_columns,
    make_views,
    tab_columns,
)


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


def test_engineer_queue_shows_score_guess_picture_set_and_lot_most_uncertain_first() -> None:
    client = RecordingClient()
    ids = make_views(cast(LabelStudioClient, client), 7, auto_user=42)
    assert ids == {ENGINEER_VIEW: 1, AUTO_VIEW: 2, UNREADABLE_VIEW: 3}
    queue = client.tabs[ENGINEER_VIEW]
    assert visible(queue["hidden"]) == {
        "predictions_score",
        "predictions_results",
        "data.image",
        "data.set",
        "data.lot",
    }
    # Lowest prediction score (least sure by the routing measure) first.
    assert queue["ordering"] == [UNCERTAIN_FIRST] == ["tasks:predictions_score"]
    # Unlabelled wafers that hold a prediction of the project's model version.
    assert queue["filters"] == [
        {
            "filter": "filter:tasks:total_annotations",
            "operator": "equal",
            "type": "Number",
            "value": 0,
        },
        {
            "filter": "filter:tasks:predictions_score",
            "operator": "greater_or_equal",
            "type": "Number",
            "value": 0.0,
        },
    ]


def test_other_tabs_hide_label_studio_bookkeeping_too() -> None:
    client = RecordingClient()
    make_views(cast(LabelStudioClient, client), 7, auto_user=42)
    auto = client.tabs[AUTO_VIEW]
    assert visible(auto["hidden"]) == {*engineer_columns(), "annotators"}
    # The backend's own labels: annotated by its account.
    assert auto["filters"] == [
        {"filter": "filter:tasks:annotators", "operator": "contains", "type": "List", "value": 42}
    ]
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
