"""The Data Manager tabs the set-up makes: what each shows, hides, filters and sorts by."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import pytest

from backend.label_config import DEFAULT_LABEL_CONFIG, LabelConfig
from backend.labelstudio import LABEL_STUDIO_TASK_COLUMNS, LabelStudioClient, TaskFilter
from backend.projects import (
    AUTO_VIEW,
    ENGINEER_VIEW,
    SUSPECT_VIEW,
    UNCERTAIN_FIRST,
    UNREADABLE_VIEW,
    WAFER_DATA_COLUMNS,
    engineer_columns,
    make_views,
    tab_columns,
)
from backend.wafer_sets import choice_result


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
    assert ids == {ENGINEER_VIEW: 1, AUTO_VIEW: 2, UNREADABLE_VIEW: 3, SUSPECT_VIEW: 4}
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
    # The backend's own labels: annotated by its account, in new sets (the labelled history of
    # set 0 is imported with the same token, but those are no auto labels)
    assert auto["filters"] == [
        {"filter": "filter:tasks:annotators", "operator": "contains", "type": "List", "value": 42},
        {"filter": "filter:tasks:data.set", "operator": "greater", "type": "Number", "value": 0},
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
    # Person labels a retrained model confidently contradicts, surest first, with its guess.
    suspect = client.tabs[SUSPECT_VIEW]
    assert suspect["filters"] == [
        {
            "filter": "filter:tasks:data.suspect_label",
            "operator": "empty",
            "type": "String",
            "value": False,
        }
    ]
    assert suspect["ordering"] == ["-tasks:data.suspect_probability"]
    assert "annotations_results" in visible(suspect["hidden"])
    assert {"data.suspect_label", "data.suspect_probability"} <= visible(suspect["hidden"])


def test_tab_columns_hides_everything_not_shown() -> None:
    hidden = tab_columns(("data.image", "id"))
    assert "data.image" not in hidden and "id" not in hidden
    assert "inner_id" in hidden and "data.route" in hidden
    assert len(hidden) == len(set(hidden))


# ---- the tabs on a real Label Studio -------------------------------------------------------------


@pytest.mark.e2e
def test_auto_labels_tab_lists_accepted_predictions_not_the_imported_history(
    ls: LabelStudioClient, label_config: LabelConfig
) -> None:
    """The labelled history of set 0 is imported with the backend's token, so it is annotated
    by the backend's account too; only a new set's labels are auto labels."""
    project = ls.create_project("auto labels tab", DEFAULT_LABEL_CONFIG.read_text())
    labelled = {"result": choice_result(label_config, "Center")}
    ids = ls.import_tasks(
        project,
        [
            {"data": {"image": "/data/upload/h.png", "set": 0}, "annotations": [labelled]},
            {"data": {"image": "/data/upload/a.png", "set": 1}, "annotations": [labelled]},
            {"data": {"image": "/data/upload/w.png", "set": 1}},
        ],
    )
    views = make_views(ls, project, ls.current_user_id())
    assert [t["id"] for t in ls.view_page(project, views[AUTO_VIEW])] == [ids[1]]
