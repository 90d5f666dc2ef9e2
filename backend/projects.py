"""What ops do to a Label Studio project: wire it to the backend, and read where it stands.

Layer L2 (Label Studio client + model store + the loop's bookkeeping from backend.jobs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from backend.audit import SetAudit
from backend.label_config import LabelConfig, parse_label_config
from backend.labelstudio import (
    BULK_WEBHOOK_ACTIONS,
    LABEL_STUDIO_TASK_COLUMNS,
    WEBHOOK_ACTIONS,
    FilterOperator,
    LabelStudioClient,
    TaskFilter,
    predicted_by,
    score_at_least,
    set_filter,
    unlabelled_filter,
)
from backend.loop_state import SetState
from backend.model_store import ModelStore
from backend.set_audits import live_audit
from backend.settings import Settings
from backend.wafer_sets import INITIAL_SET
from backend.wafer_store import WaferStore
from backend.webhook_auth import webhook_headers, webhook_token

#: Data Manager tabs the set-up command creates (title -> purpose).
ENGINEER_VIEW = "Engineer queue: most uncertain first"
AUTO_VIEW = "Auto labels"
UNREADABLE_VIEW = "Unreadable pictures"
SUSPECT_VIEW = "Suspect labels"
BACKEND_TITLE = "wafermap-resnet"
#: What the engineer queue sorts by, most uncertain first: the prediction score (how sure the
#: model is by the routing measure, `backend.routing.sureness`), lowest first.
UNCERTAIN_FIRST = "tasks:predictions_score"
#: Task data the import (`set`, `source`, `wafer_id`, `lot`, `wafer_index`, `image`) and the
#: pre-annotation (the rest) write: each is a Data Manager column a tab shows or hides.
WAFER_DATA_COLUMNS = (
    "data.image",
    "data.predicted",
    "data.score",
    "data.least_confidence",
    "data.margin",
    "data.entropy",
    "data.route",
    "data.model_version",
    "data.prediction_error",
    "data.suspect_label",
    "data.suspect_probability",
    "data.suspect_model_version",
    "data.set",
    "data.lot",
    "data.wafer_id",
    "data.wafer_index",
    "data.source",
)


#: Task-data columns shown as numbers (numeric filters), not as Label Studio's default strings.
NUMBER_COLUMNS = {
    c: "Number"
    for c in (
        "data.score",
        "data.least_confidence",
        "data.margin",
        "data.entropy",
        "data.set",
        "data.wafer_id",
        "data.suspect_probability",
    )
}


def tab_columns(shown: Sequence[str]) -> tuple[str, ...]:
    """The columns a tab hides so that only `shown` remain: Label Studio's own task columns
    and the wafer data columns not in `shown`.

    Label Studio 1.23.2 orders columns itself (its own first, then the task data: fields the
    labeling config names, then the rest in the database's order); a tab can hide columns but
    not reorder them. A task-data field that is not in WAFER_DATA_COLUMNS stays visible.
    """
    return tuple(c for c in (*LABEL_STUDIO_TASK_COLUMNS, *WAFER_DATA_COLUMNS) if c not in shown)


def engineer_columns() -> tuple[str, ...]:
    """What an engineer sees first: the wafer, the model's guess, how sure it is, where from.

    Label Studio 1.23.2 puts its own columns (the guess and the score) before the task data."""
    return ("predictions_score", "predictions_results", "data.image", "data.set", "data.lot")


@dataclass(frozen=True)
class Wiring:
    """What `wire_project` made or found."""

    project: int
    created: bool
    ml_backend: int
    webhook: int
    views: Mapping[str, int]
    #: The webhook of the bulk events, without payload (`bulk_webhook_url`).
    bulk_webhook: int | None = None


def _route_is(route: str) -> TaskFilter:
    return TaskFilter("data.route", FilterOperator.EQUAL, "String", route)


def wire_project(
    client: LabelStudioClient,
    settings: Settings,
    title: str,
    backend_url: str,
    auto_user: int | None = None,
) -> Wiring:
    """Find or create the project, connect the backend, register its webhooks, make the views.

    Two webhooks: ``/webhook`` for one person's annotation at a time, with its payload, and
    ``/webhook?project=<id>`` for the bulk events without payload (`bulk_webhook_url`). Both
    carry ``Authorization: Bearer <token>`` (`backend.webhook_auth`), which opens the backend's
    ``/webhook`` only, and no header at all when the backend has no credentials.
    Idempotent: running it again changes nothing that is already right. The labeling config
    comes from LABEL_CONFIG (label_config.xml); an existing project must have the same
    failure types.
    """
    xml = settings.label_config_path.read_text()
    wanted = parse_label_config(xml)
    project = client.find_project(title)
    created = project is None
    if project is None:
        project = client.create_project(
            title, xml, description="Wafer-map failure patterns; uncertain wafers for engineers"
        )
    else:
        have = parse_label_config(client.project_label_config(project))
        if have.failure_types != wanted.failure_types:
            raise ValueError(
                f"project {title!r} labels {', '.join(have.failure_types)}, not the "
                f"{', '.join(wanted.failure_types)} of {settings.label_config_path}"
            )
    url = backend_url.rstrip("/")
    existing = [b for b in client.ml_backends(project) if str(b.get("url", "")).rstrip("/") == url]
    if existing:
        backend_id = int(existing[0]["id"])
    else:
        backend_id = client.connect_ml_backend(project, url, BACKEND_TITLE, settings.basic_auth)
    # The webhook carries its own token, never the Basic pair: Label Studio shows webhook
    # headers to every project member. Registering again replaces the headers stored before
    # (a Basic header of an older setup-project included).
    headers = webhook_headers(webhook_token(settings.basic_auth, settings.webhook_secret))
    webhook = client.register_webhook(project, f"{url}/webhook", headers, WEBHOOK_ACTIONS)
    bulk = client.register_webhook(
        project, bulk_webhook_url(url, project), headers, BULK_WEBHOOK_ACTIONS, send_payload=False
    )
    # The backend's account (whose labels are the auto labels): this client's user by default.
    backend_user = client.current_user_id() if auto_user is None else auto_user
    views = make_views(client, project, backend_user)
    return Wiring(project, created, backend_id, webhook, views, bulk)


def bulk_webhook_url(backend_url: str, project: int) -> str:
    """The webhook URL of the project's bulk events (`BULK_WEBHOOK_ACTIONS`): they come without
    payload, so the URL says whose they are."""
    return f"{backend_url.rstrip('/')}/webhook?project={project}"


def has_prediction() -> TaskFilter:
    """Tasks holding a prediction of the project's model version (scores are 0..1)."""
    return score_at_least(0.0)


def make_views(client: LabelStudioClient, project: int, auto_user: int) -> dict[str, int]:
    """Create or update the four Data Manager tabs (title -> view id).

    The engineer queue shows the unlabelled wafers the served model predicted (the open set's
    wafers it did not accept), most uncertain first (prediction score ascending), with the
    score, the model's guess, the picture as a thumbnail, set and lot, and nothing else. The
    auto labels tab lists the wafers of new sets (set > 0) labelled by the backend's account
    (`auto_user`): accepted predictions only, not the labelled history of set 0 that ops
    imported with the same token; the unreadable-pictures tab shows where each wafer came from
    and why it failed; the suspect-labels tab lists person-labelled wafers that a retrained
    model, which never trained on them, confidently calls something else
    (`backend.retraining.mark_suspect_labels`), surest first, for a person to re-check.
    """
    shown = engineer_columns()
    auto_shown = (*shown, "annotators")
    unreadable_shown = (
        "data.image",
        "data.set",
        "data.lot",
        "data.wafer_id",
        "data.prediction_error",
    )
    suspect_shown = (
        "data.image",
        "data.set",
        "data.wafer_id",
        "annotations_results",
        "data.suspect_label",
        "data.suspect_probability",
        "data.suspect_model_version",
    )
    suspect = TaskFilter("data.suspect_label", FilterOperator.EMPTY, "String", False)
    by_backend = TaskFilter("annotators", FilterOperator.CONTAINS, "List", int(auto_user))
    new_sets = TaskFilter("data.set", FilterOperator.GREATER, "Number", INITIAL_SET)
    return {
        ENGINEER_VIEW: client.create_view(
            project,
            ENGINEER_VIEW,
            [unlabelled_filter(), has_prediction()],
            [UNCERTAIN_FIRST],
            hidden_columns=tab_columns(shown),
            column_types=NUMBER_COLUMNS,
        ),
        AUTO_VIEW: client.create_view(
            project,
            AUTO_VIEW,
            [by_backend, new_sets],
            [UNCERTAIN_FIRST],
            hidden_columns=tab_columns(auto_shown),
            column_types=NUMBER_COLUMNS,
        ),
        UNREADABLE_VIEW: client.create_view(
            project,
            UNREADABLE_VIEW,
            [_route_is("error")],
            hidden_columns=tab_columns(unreadable_shown),
            column_types=NUMBER_COLUMNS,
        ),
        SUSPECT_VIEW: client.create_view(
            project,
            SUSPECT_VIEW,
            [suspect],
            ["-tasks:data.suspect_probability"],
            hidden_columns=tab_columns(suspect_shown),
            column_types=NUMBER_COLUMNS,
        ),
    }


def lookup_project_id(client: LabelStudioClient, title_or_id: str) -> int:
    """A project id from its title (or from a number)."""
    if title_or_id.isdigit():
        return int(title_or_id)
    found = client.find_project(title_or_id)
    if found is None:
        raise ValueError(f"there is no Label Studio project titled {title_or_id!r}")
    return found


def set_counts(
    client: LabelStudioClient, project: int, auto_user: int, version: str | None
) -> dict[int, SetState]:
    """Per set, from Label Studio's own counts (four count queries a set, whatever its size;
    no task is listed): wafers, waiting (no annotation), labelled by the backend's account
    (`auto_user`), predicted by `version`. Set 0's labels count as known; in later sets a label
    by anyone but the backend is an engineer's (an auto label an engineer edited counts as auto
    here, unlike in retraining, which reads each annotation)."""
    states: dict[int, SetState] = {}
    number = INITIAL_SET
    while True:
        in_set = set_filter(number)
        total = client.count_tasks(project, [in_set])
        if total == 0:
            return states
        waiting = client.count_tasks(project, [in_set, unlabelled_filter()])
        by_backend = TaskFilter("annotators", FilterOperator.CONTAINS, "List", int(auto_user))
        auto = 0 if number == INITIAL_SET else client.count_tasks(project, [in_set, by_backend])
        predicted = client.count_tasks(project, [in_set, predicted_by(version)]) if version else 0
        labelled = total - waiting
        states[number] = SetState(
            number=number,
            total=total,
            auto=auto,
            engineer=0 if number == INITIAL_SET else labelled - auto,
            known=labelled if number == INITIAL_SET else 0,
            waiting=waiting,
            predicted=predicted,
        )
        number += 1


def project_status(
    client: LabelStudioClient, store: ModelStore, project: int
) -> tuple[dict[int, SetState], list[dict[str, Any]]]:
    """Per set counts and the stored model versions with their validation figures."""
    version = store.current_version()
    states = set_counts(client, project, client.current_user_id(), version)
    versions: list[dict[str, Any]] = []
    for name in store.versions():
        try:
            card = store.card(name)
        except ValueError as exc:
            versions.append({"version": name, "error": str(exc)})
            continue
        versions.append(
            {
                "version": name,
                "served": name == version,
                "trained_through_set": card.trained_through_set,
                **{k: card.metrics[k] for k in sorted(card.metrics)},
            }
        )
    return states, versions


def status_table(states: Mapping[int, SetState], versions: list[dict[str, Any]]) -> str:
    """The status as Markdown tables."""
    lines = [
        "| set | wafers | auto | engineer | known | waiting | predicted by served model |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, s in states.items():
        name = "initial" if n == INITIAL_SET else str(n)
        lines.append(
            f"| {name} | {s.total} | {s.auto} | {s.engineer} | {s.known} | {s.waiting} "
            f"| {s.predicted} |"
        )
    lines += ["", "| version | served | through set | val wafers | val accuracy | threshold |"]
    lines.append("|---|---|---:|---:|---:|---:|")
    for v in versions:
        acc = v.get("validation_accuracy")
        lines.append(
            f"| {v['version']} | {'yes' if v.get('served') else ''} "
            f"| {v.get('trained_through_set', '')} | {int(v.get('validation_wafers', 0))} "
            f"| {'' if acc is None else f'{acc:.2%}'} | {v.get('route_threshold', '')} |"
        )
    return "\n".join(lines)


def project_audits(
    client: LabelStudioClient,
    wafers: WaferStore,
    states: Mapping[int, SetState],
    labels: LabelConfig,
    target_accuracy: float,
) -> list[SetAudit]:
    """Each audited set's audit: the one recorded when the set finished, else the audit so far
    (its audit wafers read from Label Studio one by one)."""
    auto_user = client.current_user_id()
    found = []
    for routing in wafers.routings():
        if not routing.audit:
            continue
        recorded = wafers.audit(routing.set_number)
        if recorded is not None and recorded.pending == 0:
            found.append(recorded)
            continue
        state = states.get(routing.set_number)
        found.append(
            live_audit(
                client,
                routing,
                labels,
                auto_user,
                target_accuracy,
                auto_labels=state.auto if state is not None else routing.auto,
                wafers=state.total if state is not None else 0,
            )
        )
    return found


def audit_table(audits: Sequence[SetAudit]) -> str:
    """The audits as a Markdown table (intervals: exact, two-sided)."""
    lines = [
        "| set | audit wafers | labelled | agree | auto-label accuracy (interval) "
        "| labeling accuracy (interval) | target | promise |",
        "|---:|---:|---:|---:|---|---|---:|---|",
    ]
    for a in audits:
        f = a.summary()
        if a.audited:
            auto = (
                f"{f['audited_accuracy']:.2%} ({f['audited_accuracy_low']:.2%}-"
                f"{f['audited_accuracy_high']:.2%})"
            )
            lab = (
                f"{f['labeling_accuracy']:.2%} ({f['labeling_accuracy_low']:.2%}-"
                f"{f['labeling_accuracy_high']:.2%})"
            )
        else:
            auto = lab = "not yet"
        verdict = "BROKEN" if a.breached else ("in progress" if a.pending else "kept")
        lines.append(
            f"| {a.set_number} | {a.audited + a.pending} | {a.audited} | {a.agreed} | {auto} "
            f"| {lab} | {a.target_accuracy:.2%} | {verdict} |"
        )
    return "\n".join(lines)
