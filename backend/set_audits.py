"""The audits of a project's sets, read from what persons labelled in Label Studio. Layer L2.

Each set's audit wafers (`backend.audit`, kept with the set's routing in the wafer store) are
compared with the labels persons gave them. `record_audits` runs in the retraining job, when a
set is finished, on the labelled tasks that job lists anyway: it writes each set's `SetAudit`
beside its routing (`status`, `/metrics` and the next set's routing read it there) and logs an
ERROR when an audit shows the promise broken. `live_audit` reads one set's audit wafers from
Label Studio for `status` while the set is still being labelled.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from backend.audit import SetAudit, audit_set
from backend.label_config import LabelConfig
from backend.labelstudio import LabelStudioClient
from backend.loop_state import (
    kept_annotations,
    label_of,
    labelled_by_person,
    set_number_of,
)
from backend.wafer_store import SetRouting, WaferStore

log = logging.getLogger(__name__)


def person_label(task: Mapping[str, Any], labels: LabelConfig, auto_user: int) -> str | None:
    """The label a person gave the task (None when only the backend labelled it, or nobody)."""
    if not kept_annotations(task) or not labelled_by_person(task, auto_user):
        return None
    return label_of(task, labels, auto_user)


def audit_from_tasks(
    routing: SetRouting,
    set_tasks: Sequence[Mapping[str, Any]],
    labels: LabelConfig,
    auto_user: int,
    target_accuracy: float,
) -> SetAudit:
    """The set's audit from its tasks (with their annotations): every wafer of the set counts
    in `wafers`, the ones whose label is the backend's own in `auto_labels`."""
    person = {int(t["id"]): person_label(t, labels, auto_user) for t in set_tasks}
    auto_labels = sum(
        1 for t in set_tasks if kept_annotations(t) and not labelled_by_person(t, auto_user)
    )
    return audit_set(
        routing.set_number,
        routing.model_version,
        routing.audit,
        person,
        wafers=len(set_tasks),
        auto_labels=auto_labels,
        target_accuracy=target_accuracy,
    )


def record_audits(
    wafers: WaferStore,
    tasks: Sequence[Mapping[str, Any]],
    labels: LabelConfig,
    auto_user: int,
    target_accuracy: float,
) -> list[SetAudit]:
    """The audit of every set with audit wafers, from the project's labelled `tasks`, written
    to the wafer store; an ERROR is logged the first time a finished audit breaks the promise."""
    by_set: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for task in tasks:
        number = set_number_of(task)
        if number is not None:
            by_set[number].append(task)
    found = []
    for routing in wafers.routings():
        if not routing.audit:
            continue
        audit = audit_from_tasks(
            routing, by_set.get(routing.set_number, []), labels, auto_user, target_accuracy
        )
        before = wafers.audit(routing.set_number)
        wafers.save_audit(audit)
        found.append(audit)
        newly_finished = audit.pending == 0 and (before is None or before.pending > 0)
        figures = audit.summary()
        if newly_finished and audit.breached:
            log.error(
                "PROMISE BROKEN in set %d: %d of %d audit wafers agree with the model "
                "(auto-label accuracy %.4f, %.0f%% interval %.4f-%.4f), so the set's labeling "
                "accuracy is at most %.4f against a target of %.4f; the next set is routed "
                "with half the error budget until an audit clears",
                audit.set_number,
                audit.agreed,
                audit.audited,
                figures["audited_accuracy"],
                audit.confidence * 100,
                figures["audited_accuracy_low"],
                figures["audited_accuracy_high"],
                figures["labeling_accuracy_high"],
                audit.target_accuracy,
            )
        elif newly_finished:
            log.info("audit of set %d: %s", audit.set_number, figures)
    return found


def sampled_wafers(wafers: WaferStore, task_ids: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """For each task id, whether it is in its set's random audit sample (audit wafers and the
    sample's engineer wafers): random person-labelled wafers of a routed set."""
    sample: set[int] = set()
    for routing in wafers.routings():
        sample |= routing.sample
    ids = np.asarray(task_ids, dtype=np.int64)
    return np.asarray([int(t) in sample for t in ids.tolist()], dtype=np.bool_)


def live_audit(
    client: LabelStudioClient,
    routing: SetRouting,
    labels: LabelConfig,
    auto_user: int,
    target_accuracy: float,
    auto_labels: int,
    wafers: int,
) -> SetAudit:
    """The set's audit so far, reading each audit wafer from Label Studio (one request each:
    for `status` on a set still being labelled)."""
    person = {t: person_label(client.task(t), labels, auto_user) for t in routing.audit}
    return audit_set(
        routing.set_number,
        routing.model_version,
        routing.audit,
        person,
        wafers=wafers,
        auto_labels=auto_labels,
        target_accuracy=target_accuracy,
    )
