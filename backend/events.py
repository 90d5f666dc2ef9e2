"""Label Studio webhooks -> queued work. Layer L2.

Label Studio posts every webhook synchronously and waits about a second, so this decides
only what to queue and never reads Label Studio or trains: every event that can change the
loop's state asks for one `backend.jobs.advance_job` (debounced in Redis), and that job looks
at the project and does the right thing (retrain once per finished set, or open the next set).

Events the backend's own annotations cause (its account is `completed_by`) are recognised and
ignored, so accepting 500 wafers does not queue 500 jobs. The bulk events (many annotations or
tasks at once) come without payload (`backend.labelstudio.BULK_WEBHOOK_ACTIONS`): each asks for
one full advance, which finds nothing to do after the backend's own accept step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from backend.loop_keys import opened_key, request_advance
from backend.project_ids import ProjectIdError, parse_project_id

#: Actions that can finish a set or bring a new one.
ANNOTATION_ACTIONS = frozenset({"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED"})
HANDLED_ACTIONS = ANNOTATION_ACTIONS | {"START_TRAINING", "TASKS_CREATED"}


class EventError(ValueError):
    """A webhook payload this backend cannot use (answered with HTTP 400)."""


class QueueUnavailableError(RuntimeError):
    """Redis did not take the job (answered with HTTP 503; nothing was queued)."""


def project_of(payload: Mapping[str, Any]) -> int:
    """The project id of a webhook payload (`project` is an object with `id`, or an id), parsed
    as strictly as every route parses it (`backend.project_ids.parse_project_id`)."""
    project = payload.get("project")
    value = project.get("id") if isinstance(project, Mapping) else project
    if value is None or isinstance(value, bool) or not isinstance(value, int | str):
        raise EventError(f"the {payload.get('action')} payload has no project id")
    try:
        return parse_project_id(value)
    except ProjectIdError as exc:
        raise EventError(f"the {payload.get('action')} payload's project id: {exc}") from None


def event_annotations(payload: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The annotation objects of an annotation event (one, or a list for the bulk event)."""
    found = payload.get("annotation", payload.get("annotations"))
    if isinstance(found, Mapping):
        return [found]
    if isinstance(found, list):
        return [a for a in found if isinstance(a, Mapping)]
    return []


def _user(annotation: Mapping[str, Any]) -> Any:
    user = annotation.get("completed_by")
    return user.get("id") if isinstance(user, Mapping) else user


def handle_event(
    payload: Mapping[str, Any], redis: Redis, auto_user: Callable[[], int | None]
) -> dict[str, Any]:
    """Queue what the event asks for and say what happened, in a small JSON-able dict.

    `auto_user` gives the backend account's user id (None when unknown; then the event is
    treated as a person's). Raises EventError for a payload without a usable project and
    QueueUnavailableError when Redis refuses.
    """
    action = payload.get("action")
    if not isinstance(action, str) or not action:
        raise EventError("a webhook payload needs an 'action' string")
    if action not in HANDLED_ACTIONS:
        return {"status": "ignored", "action": action}
    project = project_of(payload)
    annotations = event_annotations(payload)
    if action in ANNOTATION_ACTIONS:
        own = auto_user()
        if annotations and own is not None and all(_user(a) == own for a in annotations):
            return {"status": "ignored", "action": action, "reason": "the backend's own labels"}
    try:
        if action == "TASKS_CREATED":
            # New wafers may belong to a set already pre-annotated. The advance job asks Label
            # Studio which wafers lack a prediction anyway (the mark is a hint for its report):
            # drop the mark so a delivered TASKS_CREATED is not reported as a lost one.
            redis.delete(opened_key(project))
        # A person's label can only finish the open set: a light advance checks just that. A
        # bulk event without payload may be anything (labelled history imported): a full one.
        queued = request_advance(
            redis, project, light=action in ANNOTATION_ACTIONS and bool(annotations)
        )
    except RedisError as exc:
        raise QueueUnavailableError(
            f"{action} for project {project} was not queued: Redis is not reachable "
            f"({type(exc).__name__}: {exc}); start Redis, then press Start Training in "
            "Label Studio to catch up"
        ) from exc
    return {
        "status": "queued" if queued else "already queued",
        "action": action,
        "project": project,
    }
