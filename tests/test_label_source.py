"""Who labelled a wafer, and which auto labels and predictions the accept step removes: pure
functions over task dicts shaped as Label Studio 1.23.2 lists them (`/api/tasks`, fields=all;
the shapes were read off the real server in tests/test_accept.py)."""

from __future__ import annotations

from typing import Any

from backend.label_config import LabelConfig
from backend.loop_state import (
    LabelSource,
    annotation_source,
    edited_by_person,
    label_of,
    labelled_by_person,
    set_states,
)
from backend.preannotation import misplaced_auto_labels, surplus_predictions

AUTO_USER = 1
ENGINEER = 7


def result(failure_type: str, item_id: str = "a1b2c3", origin: str | None = None) -> list[Any]:
    item: dict[str, Any] = {
        "id": item_id,
        "from_name": "failure_type",
        "to_name": "image",
        "type": "choices",
        "value": {"choices": [failure_type]},
    }
    if origin:
        item["origin"] = origin
    return [item]


def prediction(pid: int, failure_type: str, version: str = "set1-v2") -> dict[str, Any]:
    return {
        "id": pid,
        "result": result(failure_type),
        "score": 0.97,
        "model_version": version,
        "task": 10,
        "project": 3,
        "created_at": "2026-12-01T22:50:01.123456Z",
    }


def annotation(
    aid: int,
    failure_type: str,
    completed_by: int = AUTO_USER,
    parent: int | None = 100,
    updated_by: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "id": aid,
        "result": result(failure_type, **extra),
        "was_cancelled": False,
        "ground_truth": False,
        "completed_by": completed_by,
        "updated_by": updated_by,
        "parent_prediction": parent,
        "parent_annotation": None,
        "task": 10,
        "project": 3,
        "last_action": None,
    }


def task(annotations: list[dict[str, Any]], predictions: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": 10,
        "data": {"set": 1, "route": "auto", "model_version": "set1-v2"},
        "annotations": annotations,
        "predictions": predictions,
        "total_annotations": len(annotations),
        "total_predictions": len(predictions),
    }


# ---- an engineer corrects an auto label --------------------------------------------------------


def test_an_untouched_auto_label_is_auto() -> None:
    t = task([annotation(5, "Center")], [prediction(100, "Center")])
    assert annotation_source(t["annotations"][0], AUTO_USER, t["predictions"]) is LabelSource.AUTO
    assert not labelled_by_person(t, AUTO_USER)


def test_an_auto_label_an_engineer_updated_is_the_engineers() -> None:
    edited = annotation(5, "Scratch", updated_by=ENGINEER, origin="prediction-changed")
    t = task([edited], [prediction(100, "Center")])
    assert annotation_source(edited, AUTO_USER) is LabelSource.ENGINEER  # updated_by alone
    assert labelled_by_person(t, AUTO_USER)
    # Label Studio's single-task endpoint sends users as objects.
    as_object = {**edited, "updated_by": {"id": ENGINEER, "email": "e@fab"}}
    assert edited_by_person(as_object, AUTO_USER)


def test_an_auto_label_whose_result_differs_from_its_prediction_is_a_persons() -> None:
    # updated_by not telling (None, or the backend's own user): the result decides.
    for updated_by in (None, AUTO_USER):
        changed = annotation(5, "Scratch", updated_by=updated_by)
        t = task([changed], [prediction(99, "Scratch", "set0-v1"), prediction(100, "Center")])
        assert annotation_source(changed, AUTO_USER, t["predictions"]) is LabelSource.ENGINEER
        assert labelled_by_person(t, AUTO_USER)
        # Without the prediction at hand there is nothing to compare with.
        assert annotation_source(changed, AUTO_USER) is LabelSource.AUTO


def test_item_ids_and_origin_do_not_make_an_edit() -> None:
    same = annotation(5, "Center", item_id="zz9", origin="prediction")
    assert not edited_by_person(same, AUTO_USER, [prediction(100, "Center")])


def test_known_and_engineer_labels_keep_their_sources() -> None:
    assert annotation_source(annotation(5, "Loc", parent=None), AUTO_USER) is LabelSource.KNOWN
    engineer = annotation(6, "Loc", completed_by=ENGINEER, parent=None, updated_by=ENGINEER)
    assert annotation_source(engineer, AUTO_USER) is LabelSource.ENGINEER


def test_training_and_counts_take_the_engineers_correction(label_config: LabelConfig) -> None:
    edited = annotation(5, "Scratch", updated_by=ENGINEER)
    t = task([edited], [prediction(100, "Center")])
    assert label_of(t, label_config, AUTO_USER) == "Scratch"
    [state] = set_states([t], AUTO_USER, "set1-v2").values()
    assert (state.auto, state.engineer) == (0, 1)
    untouched = task([annotation(5, "Center")], [prediction(100, "Center")])
    [state] = set_states([untouched], AUTO_USER, "set1-v2").values()
    assert (state.auto, state.engineer) == (1, 0)


def test_a_corrected_auto_label_beats_an_older_untouched_one(label_config: LabelConfig) -> None:
    # Two auto labels (a race) of which an engineer corrected the first: the correction wins.
    corrected = annotation(5, "Scratch", updated_by=ENGINEER)
    t = task([corrected, annotation(6, "Center")], [prediction(100, "Center")])
    assert label_of(t, label_config, AUTO_USER) == "Scratch"


# ---- stale or duplicate predictions, misplaced auto labels -------------------------------------


def test_a_task_keeps_one_prediction_of_the_served_version() -> None:
    predictions = [
        prediction(90, "Donut", "set0-v1"),  # stored when an engineer opened the task early
        prediction(100, "Center"),
        prediction(101, "Center"),  # Label Studio's /predict answer beside the backend's own
    ]
    assert surplus_predictions(task([], predictions), "set1-v2") == [90, 101]
    assert surplus_predictions(task([], [prediction(100, "Center")]), "set1-v2") == []
    # Without one of the served version nothing is removed (nothing to keep instead).
    assert surplus_predictions(task([], predictions[:1]), "set1-v2") == []


def test_misplaced_auto_labels() -> None:
    preds = [prediction(100, "Center"), prediction(101, "Center")]
    one = annotation(5, "Center")
    twin = annotation(6, "Center", parent=101)
    assert misplaced_auto_labels(task([one], preds), AUTO_USER) == []
    assert misplaced_auto_labels(task([one, twin], preds), AUTO_USER) == [6]
    person = annotation(4, "Loc", completed_by=ENGINEER, parent=None)
    # An auto label made after a person's label landed on a labelled task: it goes.
    assert misplaced_auto_labels(task([person, one, twin], preds), AUTO_USER) == [5, 6]
    # A person's label after the auto label is a correction: the auto label stays as history.
    later = annotation(9, "Loc", completed_by=ENGINEER, parent=None)
    assert misplaced_auto_labels(task([one, later], preds), AUTO_USER) == []
    # An auto label an engineer edited is the engineer's: never removed.
    edited = annotation(5, "Scratch", updated_by=ENGINEER)
    assert misplaced_auto_labels(task([edited, twin], preds), AUTO_USER) == [6]
    cancelled = {**annotation(3, "Loc", completed_by=ENGINEER, parent=None), "was_cancelled": True}
    assert misplaced_auto_labels(task([cancelled, one], preds), AUTO_USER) == []
