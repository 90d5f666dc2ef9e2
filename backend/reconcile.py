"""Find and repair what a killed worker, a lost webhook or a lost Redis left behind. Layer L2.

Run at the start of every advance job (`backend.jobs.advance`) and by hand as
``python -m backend reconcile --project ...``. Redis holds only hints; the truth is in Label
Studio (which wafers are labelled, which carry a prediction of the served version) and in the
project's model store (what the served model learnt). Repairs here:

- a retrain key whose job is dead (failed, gone, or its process killed): released, so the
  finished set is retrained by the next decision;
- the project lock of a dead holder (or an hours-long lock of an older version): broken;
- rq jobs left "started" by a killed worker: moved to rq's failed registry once rq's own
  heartbeat for them has run out (rq's cleanup);
- Label Studio's `total_annotations` counter where it disagrees with the task's annotations
  (`repair_label_counts`): a label Label Studio counted as 0 (a prediction import recounted
  the task while the label was being saved) would keep its set open for good; the loop's
  "unlabelled" queries read that counter, so it is repaired before the decision.

The decision that follows (`backend.loop_state.decide`, fed from Label Studio) then queues the
retraining of a finished set that no model learnt, and pre-annotates open-set wafers that lack
a prediction of the served version, whatever the Redis "opened" mark says.

None of this waits for an event: the workers sweep every known project every
`WAFER_RECONCILE_INTERVAL_S` seconds (`sweep`, run by `backend.jobs.sweep_job`), so a lost
webhook costs one interval.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from redis import Redis
from rq import Queue
from rq.registry import StartedJobRegistry

from backend.label_config import LabelConfig
from backend.labelstudio import (
    LabelStudioClient,
    counted_labelled,
    unlabelled_filter,
    with_annotation_rows,
)
from backend.loop_keys import (
    QUEUES,
    forget_project,
    known_projects,
    release_if_stale,
    request_advance,
    retrain_key,
    stale_lock,
)
from backend.loop_state import kept_annotations, set_number_of

log = logging.getLogger(__name__)

#: Rounds of `repair_label_counts`: a recount without Label Studio's batched-import flag
#: recounts the whole project, which can itself race a label being saved.
RECOUNT_ROUNDS = 3


def _set_of(key: str) -> str:
    return key.rsplit(":", 1)[-1]


def repair_keys(redis: Redis, project: int) -> list[str]:
    """Release the project's dead retrain keys and stale lock, and let rq fail the jobs a killed
    worker left started; returns one line per repair (empty when all was well)."""
    repaired: list[str] = []
    for name in QUEUES:
        registry = StartedJobRegistry(queue=Queue(name, connection=redis))
        before = set(registry.get_job_ids(cleanup=False))
        registry.cleanup()
        for job_id in sorted(before - set(registry.get_job_ids(cleanup=False))):
            repaired.append(f"job {job_id} died with its worker: rq marked it failed")
    for raw in redis.scan_iter(match=retrain_key(project, 0).rsplit(":", 1)[0] + ":*"):
        key = raw.decode() if isinstance(raw, bytes) else str(raw)
        dead = release_if_stale(redis, key)
        if dead is not None:
            repaired.append(
                f"set {_set_of(key)}: released the retrain key of dead job {dead} "
                "(the set is retrained again if no model learnt it)"
            )
    holder = stale_lock(redis, project)
    if holder is not None:
        repaired.append(f"broke the project lock of a holder that is gone ({holder})")
    for line in repaired:
        log.warning("project %d: %s", project, line)
    return repaired


def miscounted_tasks(client: LabelStudioClient, project: int) -> list[Mapping[str, Any]]:
    """The project's tasks whose `total_annotations` counter disagrees with their annotations:
    counted 0 although they hold an annotation that was not cancelled, or counted labelled
    although they hold none.

    Two filtered listings, normally empty: tasks counted 0 that have annotation rows (skipped
    tasks are among them, and are told apart here by reading their annotations), and tasks
    counted labelled that have no annotation row at all.
    """
    low = client.tasks(project, [unlabelled_filter(), with_annotation_rows(True)])
    high = client.tasks(project, [counted_labelled(), with_annotation_rows(False)])
    wrong = [t for t in low if kept_annotations(t)] + [t for t in high if not kept_annotations(t)]
    # The annotations join can list a task once per annotation: once each here.
    return list({int(t["id"]): t for t in wrong}.values())


def recount_result(labels: LabelConfig) -> list[dict[str, Any]]:
    """A result that suits the labeling config, for the short-lived recount predictions."""
    return [
        {
            "from_name": labels.from_name,
            "to_name": labels.to_name,
            "type": "choices",
            "value": {"choices": [labels.failure_types[0]]},
        }
    ]


def _describe(tasks: Sequence[Mapping[str, Any]]) -> str:
    by_set: dict[str, list[int]] = {}
    for task in tasks:
        number = set_number_of(task)
        by_set.setdefault("?" if number is None else str(number), []).append(int(task["id"]))
    return "; ".join(
        f"set {n}: {len(ids)} (tasks {', '.join(map(str, ids[:10]))}"
        f"{', ...' if len(ids) > 10 else ''})"
        for n, ids in sorted(by_set.items())
    )


def repair_label_counts(
    client: LabelStudioClient,
    project: int,
    labels: LabelConfig,
    check: Callable[[str], None] | None = None,
) -> list[str]:
    """Find the tasks whose annotation counter disagrees with their annotations
    (`miscounted_tasks`) and have Label Studio recount them
    (`LabelStudioClient.recount_annotations`); returns one line per repair round.

    Without it, a label Label Studio counted as 0 keeps its set "unlabelled" for the loop
    (and in the engineer queue) for good: no retraining starts, and `status` shows the wafer
    waiting. `check` (the job's lock check) runs before each write.
    """
    repaired: list[str] = []
    for _ in range(RECOUNT_ROUNDS):
        wrong = miscounted_tasks(client, project)
        if not wrong:
            break
        if check is not None:
            check("recounting annotations")
        low = sum(1 for t in wrong if kept_annotations(t))
        client.recount_annotations(project, [int(t["id"]) for t in wrong], recount_result(labels))
        repaired.append(
            f"{len(wrong)} wafers whose annotation count disagreed with their annotations "
            f"({low} labelled but counted unlabelled, {len(wrong) - low} counted labelled "
            f"without a label; {_describe(wrong)}): Label Studio recounted them"
        )
    else:
        left = miscounted_tasks(client, project)
        if left:
            repaired.append(
                f"{len(left)} wafers still miscounted after {RECOUNT_ROUNDS} recounts "
                f"({_describe(left)}): the next reconcile tries again"
            )
    for line in repaired:
        log.warning("project %d: %s", project, line)
    return repaired


def sweep(redis: Redis, model_dir: Path, exists: Callable[[int], bool]) -> dict[str, list[int]]:
    """Ask for one advance (`backend.loop_keys.request_advance`, debounced) of every known
    project (`backend.loop_keys.known_projects`: Redis's list and MODEL_DIR's stores): each
    advance repairs and decides from Label Studio, so whatever a lost webhook left undone is
    done. Projects `exists` denies (deleted in Label Studio) are skipped and dropped from
    Redis's list. Returns the project ids asked, already pending, and gone."""
    outcome: dict[str, list[int]] = {"advanced": [], "pending": [], "gone": []}
    for project in known_projects(redis, model_dir):
        if not exists(project):
            forget_project(redis, project)
            outcome["gone"].append(project)
            continue
        outcome["advanced" if request_advance(redis, project) else "pending"].append(project)
    if outcome["gone"]:
        log.info("sweep: Label Studio no longer has projects %s", outcome["gone"])
    log.info("sweep: %s", outcome)
    return outcome
