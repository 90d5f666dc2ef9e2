"""The accept step and label sources against a real Label Studio 1.23.2 (session fixture `ls`).

- An engineer's edit of an auto label keeps `completed_by` and sets `updated_by`; the task, as
  retraining lists it, counts as the engineer's.
- The accept step gives every unlabelled auto-routed wafer exactly one auto label, and none to a
  wafer a person labelled, while engineers label and Label Studio stores predictions of the same
  and of an older model version around and during it.
- Label Studio unreachable during an accept (its answer lost after it acted, then refused
  outright), then back: a re-run leaves no duplicates.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest

from backend.harness.stack import LabelStudioServer, create_user, free_port
from backend.label_config import DEFAULT_LABEL_CONFIG, LabelConfig
from backend.labelstudio import FilterOperator, LabelStudioClient, LabelStudioError, TaskFilter
from backend.loop_state import (
    LabelSource,
    annotation_source,
    label_of,
    label_sources,
    labelled_by_person,
)
from backend.preannotation import accept_confident, unaccepted_wafers

VERSION = "set1-v2"
OLD_VERSION = "set0-v1"
#: Scores of the wafers routed auto and to engineers, and the cut between them.
AUTO_SCORE, ENGINEER_SCORE, CUT = 0.99, 0.5, 0.9

pytestmark = pytest.mark.e2e


def choice(labels: LabelConfig, failure_type: str) -> list[dict[str, Any]]:
    return [
        {
            "from_name": labels.from_name,
            "to_name": labels.to_name,
            "type": "choices",
            "value": {"choices": [failure_type]},
        }
    ]


@dataclass(frozen=True)
class WaferSet:
    project: int
    auto: list[int]  # routed auto
    engineer: list[int]  # routed to engineers


def make_set(
    ls: LabelStudioClient, labels: LabelConfig, n_auto: int, n_engineer: int = 2
) -> WaferSet:
    """A project whose set 1 is pre-annotated as the backend does it: one prediction of VERSION
    per wafer, scored at or above CUT when routed auto and below it when routed to engineers,
    the project pointed at VERSION."""
    pid = ls.create_project(
        f"accept {uuid.uuid4().hex[:10]}", DEFAULT_LABEL_CONFIG.read_text(), "accept test"
    )
    scores = [AUTO_SCORE] * n_auto + [ENGINEER_SCORE] * n_engineer
    ids = ls.import_tasks(
        pid,
        [
            {"image": "data:image/png;base64,AAAA", "set": 1, "wafer_index": i}
            for i in range(len(scores))
        ],
    )
    ls.create_predictions(
        pid,
        [
            {"task": t, "result": choice(labels, "Center"), "score": s, "model_version": VERSION}
            for t, s in zip(ids, scores, strict=True)
        ],
    )
    ls.set_model_version(pid, VERSION)
    return WaferSet(pid, ids[:n_auto], ids[n_auto:])


@pytest.fixture(scope="module")
def engineer(label_studio: LabelStudioServer) -> Iterator[LabelStudioClient]:
    """A second user: an engineer with an own token."""
    email = f"engineer-{uuid.uuid4().hex[:8]}@example.com"
    credentials = create_user(label_studio, email, secrets.token_urlsafe(12))
    with LabelStudioClient.connect(label_studio.url, credentials.token) as client:
        yield client


def listed_as_retraining_does(ls: LabelStudioClient, project: int) -> list[dict[str, Any]]:
    labelled = TaskFilter("total_annotations", FilterOperator.GREATER, "Number", 0)
    return ls.tasks(project, [labelled])


def auto_labels(task: dict[str, Any], auto_user: int) -> list[int]:
    return [int(a["id"]) for a, s in label_sources(task, auto_user) if s is LabelSource.AUTO]


def person_labels(task: dict[str, Any], auto_user: int) -> list[int]:
    return [int(a["id"]) for a, s in label_sources(task, auto_user) if s is not LabelSource.AUTO]


# ---- an engineer corrects an auto label --------------------------------------------------------


def test_an_engineers_edit_of_an_auto_label_is_the_engineers_label(
    ls: LabelStudioClient, engineer: LabelStudioClient, label_config: LabelConfig
) -> None:
    auto_user = ls.current_user_id()
    wafers = make_set(ls, label_config, n_auto=3, n_engineer=0)
    accept_confident(ls, wafers.project, 1, VERSION, auto_user, CUT)
    corrected, confirmed, untouched = wafers.auto

    [annotation] = ls.task(corrected)["annotations"]
    engineer.update_annotation(annotation["id"], choice(label_config, "Scratch"))
    [kept] = ls.task(confirmed)["annotations"]
    engineer.update_annotation(kept["id"], choice(label_config, "Center"))

    tasks = {t["id"]: t for t in listed_as_retraining_does(ls, wafers.project)}
    assert sorted(tasks) == sorted(wafers.auto)
    [edited] = tasks[corrected]["annotations"]
    # What Label Studio 1.23.2 does on an edit: completed_by stays, updated_by changes.
    assert edited["completed_by"] == auto_user
    assert edited["updated_by"] == engineer.current_user_id() != auto_user
    assert edited["parent_prediction"] == tasks[corrected]["predictions"][0]["id"]
    assert tasks[corrected]["predictions"][0]["result"][0]["value"] == {"choices": ["Center"]}

    assert [s for _, s in label_sources(tasks[corrected], auto_user)] == [LabelSource.ENGINEER]
    assert label_of(tasks[corrected], label_config, auto_user) == "Scratch"
    assert labelled_by_person(tasks[corrected], auto_user)
    # Re-submitted unchanged by the engineer: a person checked it, so it grades the routing too.
    assert labelled_by_person(tasks[confirmed], auto_user)
    assert not labelled_by_person(tasks[untouched], auto_user)
    [plain] = tasks[untouched]["annotations"]
    assert annotation_source(plain, auto_user, tasks[untouched]["predictions"]) is (
        LabelSource.AUTO
    )


# ---- exactly once ------------------------------------------------------------------------------


class RacingClient(LabelStudioClient):
    """The backend's client, with an engineer and Label Studio acting in the windows of the
    accept step: after its listing (before the surplus predictions are deleted) and right
    before the accept action is sent."""

    def __init__(self, url: str, api_key: str) -> None:
        super().__init__(url, api_key)
        self.after_listing: list[Any] = []
        self.before_action: list[Any] = []

    def tasks(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        found = super().tasks(*args, **kwargs)
        while self.after_listing:
            self.after_listing.pop(0)()
        return found

    def accept_predictions_where(
        self, project: int, filters: Sequence[TaskFilter], model_version: str
    ) -> None:
        while self.before_action:
            self.before_action.pop(0)()
        super().accept_predictions_where(project, filters, model_version)


def check_exactly_once(
    ls: LabelStudioClient, wafers: WaferSet, auto_user: int, labelled_by_engineer: set[int]
) -> None:
    tasks = {t["id"]: t for t in ls.tasks_of_set(wafers.project, 1)}
    for task_id in wafers.auto:
        task = tasks[task_id]
        autos, persons = auto_labels(task, auto_user), person_labels(task, auto_user)
        assert len(autos) <= 1, f"task {task_id} has auto labels {autos}"
        if task_id in labelled_by_engineer:
            assert autos == [], f"task {task_id} labelled by an engineer got auto label {autos}"
            assert persons
        else:
            assert len(autos) == 1 and persons == [], f"task {task_id}: {autos} {persons}"
    for task_id in wafers.engineer:
        assert auto_labels(tasks[task_id], auto_user) == []


def test_accept_is_exactly_once_while_engineers_and_label_studio_race_it(
    label_studio: LabelStudioServer,
    ls: LabelStudioClient,
    engineer: LabelStudioClient,
    label_config: LabelConfig,
) -> None:
    auto_user = ls.current_user_id()
    wafers = make_set(ls, label_config, n_auto=12)
    a = wafers.auto

    def engineer_labels(task_id: int) -> None:
        engineer.accept_prediction(task_id, wafers.project, choice(label_config, "Loc"), None)

    def label_studio_predicts(task_id: int, version: str) -> None:
        # What Label Studio stores from the backend's /predict when someone opens the task.
        item = {
            "task": task_id,
            "result": choice(label_config, "Donut"),
            "score": 0.5,
            "model_version": version,
        }
        ls.create_predictions(wafers.project, [item])

    # Stored before the accept step: an old model's prediction, a duplicate of the same version.
    label_studio_predicts(a[0], OLD_VERSION)
    label_studio_predicts(a[1], VERSION)
    # Before the step too: an engineer labelled an auto-routed wafer.
    engineer_labels(a[2])
    with RacingClient(label_studio.url, label_studio.api_key) as racing:
        # After the listing: an engineer labels, Label Studio stores predictions.
        racing.after_listing += [
            lambda: engineer_labels(a[3]),
            lambda: label_studio_predicts(a[4], VERSION),
            lambda: label_studio_predicts(a[5], OLD_VERSION),
        ]
        # After the surplus predictions went, right before the action: the same again.
        racing.before_action += [
            lambda: engineer_labels(a[6]),
            lambda: label_studio_predicts(a[7], VERSION),
            lambda: label_studio_predicts(a[8], OLD_VERSION),
            lambda: engineer_labels(a[9]),
            lambda: label_studio_predicts(a[9], VERSION),
        ]
        outcome = accept_confident(racing, wafers.project, 1, VERSION, auto_user, CUT)
        assert not racing.after_listing and not racing.before_action
    # Deleted before the action: the stale and the duplicate prediction on a[0], a[1].
    assert outcome.predictions_deleted == 2
    # Skipped by the action's own "no annotation" filter: a[3], a[6], a[9]. a[4] and a[7]
    # gained a lower-scored duplicate of the served version after the listing: their score
    # (the mean of both) fell below the cut, so the action left them for the next run. No
    # wafer got two auto labels, so none was deleted.
    assert outcome.annotations_deleted == 0
    # They do not count as unaccepted either (their score is under the cut) until the surplus
    # prediction is gone: they stay in the engineer queue, never labelled twice.
    assert unaccepted_wafers(ls, wafers.project, 1, CUT) == 0
    assert not ls.task(a[4])["annotations"] and not ls.task(a[7])["annotations"]
    # The next run deletes their surplus predictions and accepts them, once each.
    again = accept_confident(ls, wafers.project, 1, VERSION, auto_user, CUT)
    assert (again.predictions_deleted, again.accepted, again.annotations_deleted) == (2, 2, 0)
    check_exactly_once(ls, wafers, auto_user, {a[2], a[3], a[6], a[9]})
    # Running it yet again changes nothing.
    third = accept_confident(ls, wafers.project, 1, VERSION, auto_user, CUT)
    assert (third.predictions_deleted, third.accepted, third.annotations_deleted) == (0, 0, 0)
    check_exactly_once(ls, wafers, auto_user, {a[2], a[3], a[6], a[9]})
    # The stale and duplicate predictions on a[0] and a[1] are gone: one of VERSION each.
    for task_id in a[:2]:
        [kept] = ls.task(task_id)["predictions"]
        assert kept["model_version"] == VERSION


def test_accept_is_exactly_once_with_engineers_labelling_concurrently(
    ls: LabelStudioClient, engineer: LabelStudioClient, label_config: LabelConfig
) -> None:
    auto_user = ls.current_user_id()
    wafers = make_set(ls, label_config, n_auto=40)
    targets = wafers.auto[::3]
    labelled: set[int] = set()
    failures: list[LabelStudioError] = []

    def race() -> None:
        try:
            for task_id in targets:
                if ls.task(task_id)["annotations"]:
                    continue  # accepted already: the engineer corrects by editing instead
                engineer.accept_prediction(
                    task_id, wafers.project, choice(label_config, "Loc"), None
                )
                labelled.add(task_id)
                ls.create_predictions(
                    wafers.project,
                    [
                        {
                            "task": task_id + 1,
                            "result": choice(label_config, "Donut"),
                            "model_version": VERSION,
                        }
                    ],
                )
        except LabelStudioError as exc:  # reported in the main thread
            failures.append(exc)

    racer = threading.Thread(target=race)
    racer.start()
    accept_confident(ls, wafers.project, 1, VERSION, auto_user, CUT)
    racer.join()
    assert not failures
    # A prediction stored after the step is the next run's business: run it as the loop would.
    accept_confident(ls, wafers.project, 1, VERSION, auto_user, CUT)
    # An engineer's label stored after an auto label is a correction and stays beside it.
    tasks = {t["id"]: t for t in ls.tasks_of_set(wafers.project, 1)}
    for task_id in wafers.auto:
        autos, persons = (
            auto_labels(tasks[task_id], auto_user),
            person_labels(tasks[task_id], auto_user),
        )
        assert len(autos) <= 1, f"task {task_id}: auto labels {autos}"
        if task_id in labelled and autos:
            assert autos[0] < min(persons), f"task {task_id}: auto label after the engineer's"
        if task_id not in labelled:
            assert len(autos) == 1, f"task {task_id}: auto labels {autos}"


# ---- Label Studio unreachable during an accept --------------------------------------------------


class Proxy:
    """A loopback TCP proxy in front of Label Studio that can pass, refuse, or pass requests
    on but lose Label Studio's answers (Label Studio acts, the caller hears nothing)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.mode = "pass"
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed.set()
        self._listener.close()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.mode == "refuse":
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, answers: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if self.mode == "refuse" or (answers and self.mode == "lose_answers"):
                    break
                target.sendall(chunk)
        except OSError:
            pass
        for end in (source, target):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()


def test_label_studio_unreachable_during_an_accept_then_back_leaves_no_duplicates(
    label_studio: LabelStudioServer, ls: LabelStudioClient, label_config: LabelConfig
) -> None:
    auto_user = ls.current_user_id()
    wafers = make_set(ls, label_config, n_auto=10)
    port = urlsplit(label_studio.url).port
    assert port is not None
    proxy = Proxy(port)
    try:
        with LabelStudioClient(proxy.url, label_studio.api_key, timeout=20.0) as backend:
            # Label Studio accepts half the set, but its answer never reaches the backend.
            proxy.mode = "lose_answers"
            with pytest.raises(LabelStudioError, match=r"accepting predictions of 5 tasks"):
                backend.accept_predictions(wafers.project, wafers.auto[:5], VERSION)
            assert all(ls.task(t)["annotations"] for t in wafers.auto[:5])
            # Then Label Studio is unreachable: the step fails naming the server and the call.
            proxy.mode = "refuse"
            with pytest.raises(LabelStudioError) as failure:
                accept_confident(backend, wafers.project, 1, VERSION, auto_user, CUT)
            assert proxy.url in str(failure.value) and "listing tasks" in str(failure.value)
            assert unaccepted_wafers(ls, wafers.project, 1, CUT) == 5
            # Back: the re-run accepts the rest, and nothing twice.
            proxy.mode = "pass"
            outcome = accept_confident(backend, wafers.project, 1, VERSION, auto_user, CUT)
    finally:
        proxy.close()
    assert outcome.accepted == 5 and outcome.annotations_deleted == 0
    assert unaccepted_wafers(ls, wafers.project, 1, CUT) == 0
    check_exactly_once(ls, wafers, auto_user, set())


# ---- at scale ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_accept_at_scale_is_exactly_once_and_prints_its_speed(
    label_studio: LabelStudioServer, label_config: LabelConfig
) -> None:
    """3,000 wafers (picture data URLs of real size, ~3.3 KB), 2,700 routed auto, 60 with a
    stale or duplicate prediction. Prints wafers/s of the whole accept step (listing,
    surplus deletion, action, repair); asserts only what it did. A long client timeout: a
    page of 500 listed tasks takes seconds, over 30 s on a busy 2-core machine."""
    with LabelStudioClient(label_studio.url, label_studio.api_key, timeout=300.0) as ls:
        accept_at_scale(ls, label_config)


def accept_at_scale(ls: LabelStudioClient, label_config: LabelConfig) -> None:
    auto_user = ls.current_user_id()
    n_auto, n_engineer = 2700, 300
    pid = ls.create_project(
        f"accept scale {uuid.uuid4().hex[:8]}", DEFAULT_LABEL_CONFIG.read_text(), "scale"
    )
    picture = "data:image/png;base64," + "A" * 3300
    scores = [AUTO_SCORE] * n_auto + [ENGINEER_SCORE] * n_engineer
    ids = ls.import_tasks(pid, [{"image": picture, "set": 1} for _ in scores])
    items = [
        {"task": t, "result": choice(label_config, "Center"), "score": s, "model_version": v}
        for t, s, v in [(t, s, VERSION) for t, s in zip(ids, scores, strict=True)]
        + [(t, AUTO_SCORE, OLD_VERSION) for t in ids[:30]]
        + [(t, AUTO_SCORE, VERSION) for t in ids[30:60]]
    ]
    ls.create_predictions(pid, items)
    ls.set_model_version(pid, VERSION)
    wafers = WaferSet(pid, ids[:n_auto], ids[n_auto:])
    started = time.perf_counter()
    outcome = accept_confident(ls, pid, 1, VERSION, auto_user, CUT)
    seconds = time.perf_counter() - started
    listing_started = time.perf_counter()
    ls.tasks_of_set(pid, 1, only_unlabelled=True)
    listing = time.perf_counter() - listing_started
    # For comparison: the listing the step no longer makes (here of the 300 left unlabelled).
    print(f"\nlisting the set's {len(ids) - n_auto} unlabelled wafers: {listing:.1f} s")
    print(
        f"\naccept step: {len(ids)} wafers ({outcome.accepted} accepted, "
        f"{outcome.predictions_deleted} surplus predictions deleted) in {seconds:.1f} s = "
        f"{len(ids) / seconds:.0f} wafers/s"
    )
    assert outcome.accepted == n_auto and outcome.predictions_deleted == 60
    check_exactly_once(ls, wafers, auto_user, set())
