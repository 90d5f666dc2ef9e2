"""Simulated engineers, and waiting for the loop to settle. Layer L2.

For demos and tests: an "engineer" labels every wafer of a set that nobody labelled, with its
true WM-811K failure type, through the SDK under their own Label Studio account, as a person
would in the labeling UI. Their labels fire ANNOTATION_CREATED webhooks like a person's.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from redis import Redis
from rq import Queue
from rq.registry import StartedJobRegistry

from backend.label_config import LabelConfig
from backend.labelstudio import LabelStudioClient
from backend.loop_keys import QUEUES, READ_AHEAD_PREFIX, advance_key, job_alive
from backend.loop_state import label_of
from backend.wafer_sets import choice_result


def loop_busy(redis: Redis, *, background: bool = True) -> bool:
    """True while a loop job is queued or running (any project). A job that rq still lists as
    started but whose worker was killed does not count (`backend.loop_keys.job_alive`).
    Without `background`, the reads ahead of the labels (`backend.jobs.read_ahead_job`, which
    engineers never wait for) do not count either."""

    def counts(job_id: str) -> bool:
        return background or not job_id.startswith(READ_AHEAD_PREFIX)

    for name in QUEUES:
        queue = Queue(name, connection=redis)
        if any(counts(job_id) for job_id in queue.job_ids):
            return True
        started = StartedJobRegistry(queue=queue).get_job_ids()
        if any(counts(job_id) and job_alive(redis, job_id) for job_id in started):
            return True
    return False


def wait_until_idle(
    redis: Redis,
    project: int,
    timeout: float,
    *,
    settle: float = 1.5,
    poll: float = 0.5,
    background: bool = True,
) -> float:
    """Wait until no loop job is queued or running and none was asked for during `settle`
    seconds (webhooks arrive a moment after the annotations that cause them). Returns the
    seconds until the loop went quiet (the settling time not counted); TimeoutError after
    `timeout`. Without `background`, a read ahead of the labels still running counts as quiet:
    the next set is ready for engineers once it is opened."""
    start = time.monotonic()
    quiet_since: float | None = None
    while True:
        now = time.monotonic()
        busy = loop_busy(redis, background=background) or bool(redis.exists(advance_key(project)))
        if busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= settle:
            return quiet_since - start
        if now - start > timeout:
            raise TimeoutError(f"the labeling loop was still busy after {timeout:.0f} s")
        time.sleep(poll)


def label_uncertain(
    client: LabelStudioClient,
    project: int,
    set_number: int,
    truth: Mapping[int, str],
    labels: LabelConfig,
    engineers: int = 1,
) -> int:
    """Label every unlabelled wafer of the set with its true failure type; returns how many.

    `engineers` label at once (threads sharing the account), as a team works one queue: the
    set's unlabelled wafers are listed first, then shared out."""
    if engineers < 1:
        raise ValueError(f"engineers must be at least 1, got {engineers}")
    waiting = list(client.tasks_of_set(project, set_number, only_unlabelled=True))

    def label(task: Mapping[str, Any]) -> None:
        wafer = int((task.get("data") or {})["wafer_id"])
        client.accept_prediction(task["id"], project, choice_result(labels, truth[wafer]), None)

    with ThreadPoolExecutor(engineers, thread_name_prefix="engineer") as team:
        for _ in team.map(label, waiting):  # re-raises the first failed label
            pass
    return len(waiting)


@dataclass(frozen=True)
class SetCheck:
    """How one set was labelled, checked against the true failure types."""

    set_number: int
    wafers: int
    engineer: int
    auto: int
    auto_errors: int
    waiting: int
    model_version: str
    #: Wafers whose prediction names a failure type (audit wafers' predictions are blind), and
    #: how many of those name the true one: the model's accuracy on the set.
    predicted: int = 0
    predicted_right: int = 0
    #: The wafer ids of the wrong auto labels (to set beside WM-811K's suspect labels).
    wrong_auto_wafers: tuple[int, ...] = ()

    @property
    def model_accuracy(self) -> float | None:
        return self.predicted_right / self.predicted if self.predicted else None

    @property
    def engineer_ratio(self) -> float:
        return self.engineer / self.wafers if self.wafers else 0.0

    @property
    def accuracy(self) -> float:
        """Share of the set's wafers labelled correctly (engineer labels count as right)."""
        return 1.0 - self.auto_errors / self.wafers if self.wafers else 1.0


def set_outcome(
    client: LabelStudioClient,
    project: int,
    set_number: int,
    truth: Mapping[int, str],
    labels: LabelConfig,
    auto_user: int,
) -> SetCheck:
    """Count engineer and auto labels of a set, the auto labels that are wrong, and how often
    the set's predictions name the true failure type."""
    engineer = auto = waiting = predicted = right = 0
    wrong: list[int] = []
    versions: set[str] = set()
    for task in client.tasks_of_set(project, set_number):
        data: dict[str, Any] = task.get("data") or {}
        versions.update(
            str(p["model_version"]) for p in task.get("predictions") or [] if p.get("model_version")
        )
        guesses = [
            str(c)
            for p in task.get("predictions") or []
            for item in p.get("result") or []
            for c in (item.get("value") or {}).get("choices") or []
        ][:1]
        if guesses:
            predicted += 1
            right += guesses[0] == truth.get(int(data.get("wafer_id", -1)))
        annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        if not annotations:
            waiting += 1
            continue
        by_person = [a for a in annotations if a.get("completed_by") != auto_user]
        if by_person:
            engineer += 1
            continue
        auto += 1
        wafer = int(data.get("wafer_id", -1))
        if label_of(task, labels, auto_user) != truth.get(wafer):
            wrong.append(wafer)
    return SetCheck(
        set_number=set_number,
        wafers=engineer + auto + waiting,
        engineer=engineer,
        auto=auto,
        auto_errors=len(wrong),
        waiting=waiting,
        model_version=", ".join(sorted(versions)),
        predicted=predicted,
        predicted_right=right,
        wrong_auto_wafers=tuple(sorted(wrong)),
    )
