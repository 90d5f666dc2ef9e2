"""The Label Studio client: the only module that imports `label_studio_sdk`.

Layer L1. A small typed face over `label_studio_sdk.LabelStudio` (SDK 2.1.2, server 1.23.2) that
speaks in project and task ids and plain dicts, and turns every SDK or transport failure into a
`LabelStudioError` whose message names the call, the HTTP status and Label Studio's own reason.
Response headers (they carry session cookies) and the API key never reach a message or a log.

What Label Studio does in reply to these calls, as measured against 1.23.2:
- `import_tasks` fires one TASKS_CREATED webhook per chunk.
- `accept_prediction` fires ANNOTATION_CREATED (the backend hears its own annotations).
- `set_model_version` fires PROJECT_UPDATED.
- `update_task_data`, `create_predictions` and `create_view` fire no webhook.
- START_TRAINING is not a webhook action (registering it is a 400); Label Studio sends
  `{"action": "START_TRAINING", "project": {...}}` straight to `<ml backend url>/webhook`.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.actions.types.prepare_params_request_request_selected_items_included import (
    PrepareParamsRequestRequestSelectedItemsIncluded,
)
from label_studio_sdk.core.api_error import ApiError
from label_studio_sdk.core.parse_error import ParsingError

log = logging.getLogger(__name__)

#: Events the ML backend's `/webhook` listens to with their payload: one annotation each, whose
#: author decides what is queued (`backend.events`).
WEBHOOK_ACTIONS: tuple[str, ...] = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
#: Events of many tasks at once, which the backend hears WITHOUT payload on a second webhook
#: whose URL names the project (`backend.projects.bulk_webhook_url`). Label Studio serialises a
#: payload's every annotation and task before it posts: 73% of its accept action on a set of
#: 17,295 wafers (measured with py-spy, Label Studio 1.23.2 on PostgreSQL, 2 cores), and the
#: tasks of every import chunk; the backend needs only the project of these events.
BULK_WEBHOOK_ACTIONS: tuple[str, ...] = ("ANNOTATIONS_CREATED", "TASKS_CREATED")
#: Tasks (and predictions) sent per import request.
IMPORT_CHUNK = 500
#: Tasks fetched per page when listing.
PAGE_SIZE = 500
#: Seconds an export of every labelled task may take (about 10 minutes for 190,000 here).
EXPORT_TIMEOUT = 3600
#: Seconds Label Studio's accept action on a whole set may take. It answers only when every
#: annotation is made: 25 s for 15,219 wafers on a quiet 2-core machine, and over the client's
#: 30 s default on a busy one (seen in the full-scale demo: the step failed and was redone).
ACCEPT_TIMEOUT = 900
#: Task ids fetched per page by `task_ids` (ids only: small pages would only add round trips).
ID_PAGE_SIZE = 5000
#: Task ids a chosen-task export asks for per request: they travel in the URL (`ids[]=123456&`,
#: ~17 bytes each), kept under the 8 KiB request line a proxy in front of Label Studio allows.
EXPORT_IDS_CHUNK = 400
#: Label Studio 1.23.2's feature flag that turns on its batched `import/predictions` path (an
#: environment variable of the Label Studio server). Off, every prediction import also
#: recounts the annotations of EVERY task of the project without a lock (see
#: `unlabelled_filter`), and validates each prediction on its own (about 5x slower).
BATCHED_PREDICTION_IMPORT_FLAG = (
    "fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short"
)
#: The model version of the short-lived predictions `recount_annotations` stores and deletes.
RECOUNT_VERSION = "wafermap-recount"
#: Label Studio's own Data Manager columns of a task (besides `data.*`, the task data), in
#: its order. A tab that names hidden columns shows every other one, these included.
LABEL_STUDIO_TASK_COLUMNS: tuple[str, ...] = (
    "id",
    "inner_id",
    "completed_at",
    "total_annotations",
    "cancelled_annotations",
    "total_predictions",
    "annotators",
    "annotations_results",
    "annotations_ids",
    "predictions_score",
    "predictions_model_versions",
    "predictions_results",
    "file_upload",
    "storage_filename",
    "created_at",
    "updated_at",
    "updated_by",
    "avg_lead_time",
    "draft_exists",
)


class LabelStudioError(RuntimeError):
    """A Label Studio call failed; `status_code` is the HTTP status when there was one."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class FilterOperator(StrEnum):
    """Data Manager filter operators (the ones this project uses)."""

    EQUAL = "equal"
    NOT_EQUAL = "not_equal"
    LESS = "less"
    GREATER = "greater"
    LESS_OR_EQUAL = "less_or_equal"
    GREATER_OR_EQUAL = "greater_or_equal"
    IN = "in"
    NOT_IN = "not_in"
    CONTAINS = "contains"
    NOT_CONTAINS = "not_contains"
    EMPTY = "empty"


@dataclass(frozen=True)
class TaskFilter:
    """One Data Manager filter on a task column.

    `column` is a task column without the `tasks:` prefix: `data.set`, `data.route`,
    `total_annotations`, `predictions_score`, ... `value_type` is the Data Manager type
    (`Number`, `String`, `Boolean`, `Datetime`); `value` is a number or string, or
    `{"min": a, "max": b}` for IN / NOT_IN.
    """

    column: str
    operator: FilterOperator
    value_type: str
    value: Any

    def to_data_manager(self) -> dict[str, Any]:
        """The `{"filter": "filter:tasks:...", "operator", "type", "value"}` item LS expects."""
        return {
            "filter": f"filter:tasks:{_bare_column(self.column)}",
            "operator": str(self.operator),
            "type": self.value_type,
            "value": self.value,
        }


def set_filter(set_number: int) -> TaskFilter:
    """The tasks of one wafer set (`data.set == set_number`)."""
    return TaskFilter("data.set", FilterOperator.EQUAL, "Number", set_number)


def updated_since_filter(when: datetime) -> TaskFilter:
    """Tasks Label Studio changed after `when` (`updated_at`): an annotation saved, updated or
    deleted through the API, a prediction stored, and Label Studio 1.23.2's bulk accept of
    predictions (its action sets `updated_at` on every task it labels: checked in
    tests/test_label_reads.py)."""
    utc = when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # the Data Manager's format
    return TaskFilter("updated_at", FilterOperator.GREATER, "Datetime", utc)


@dataclass(frozen=True)
class TaskStamp:
    """A task's id, when Label Studio last changed it, and its annotations as Label Studio's
    counters have them (denormalised: see `unlabelled_filter`)."""

    task: int
    updated_at: datetime | None
    annotations: int


def utc_time(value: object) -> datetime | None:
    """A time as Label Studio gives it (a datetime, or ISO text as in its JSON export) in UTC;
    None when absent or unreadable. Naive times are Label Studio's UTC."""
    when: datetime
    if isinstance(value, datetime):
        when = value
    elif isinstance(value, str):
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            return None
    else:
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def unlabelled_filter() -> TaskFilter:
    """Tasks without an annotation, by Label Studio's `total_annotations` counter.

    The counter is denormalised and can be wrong: Label Studio 1.23.2 recounts it for the tasks
    of a prediction import (for EVERY task of the project without the batched-import feature
    flag, `BATCHED_PREDICTION_IMPORT_FLAG`) by reading the counts, then writing them back without a
    lock, so a label saved in between is counted as 0. `backend.reconcile.repair_label_counts`
    finds such tasks from their annotations (`with_annotation_rows`) and has Label Studio
    recount them (`LabelStudioClient.recount_annotations`)."""
    return TaskFilter("total_annotations", FilterOperator.EQUAL, "Number", 0)


def counted_labelled() -> TaskFilter:
    """Tasks whose `total_annotations` counter says they have an annotation."""
    return TaskFilter("total_annotations", FilterOperator.GREATER, "Number", 0)


def with_annotation_rows(present: bool = True) -> TaskFilter:
    """Tasks that have (`present`) or lack any annotation, read from the annotations
    themselves, not from a counter (Label Studio joins the annotations table: "annotators
    empty"). Cancelled (skipped) annotations count as rows here; an annotation whose author
    was deleted does not."""
    return TaskFilter("annotators", FilterOperator.EMPTY, "Boolean", not present)


def predicted_by(version: str) -> TaskFilter:
    """Tasks holding a prediction of model `version`."""
    return TaskFilter("predictions_model_versions", FilterOperator.CONTAINS, "List", [version])


def not_predicted_by(version: str) -> TaskFilter:
    """Tasks without a prediction of model `version`."""
    return TaskFilter("predictions_model_versions", FilterOperator.NOT_CONTAINS, "List", [version])


def score_at_least(cut: float) -> TaskFilter:
    """Tasks whose prediction score (of the project's model version) is at least `cut`."""
    return TaskFilter("predictions_score", FilterOperator.GREATER_OR_EQUAL, "Number", float(cut))


def _bare_column(column: str) -> str:
    for prefix in ("filter:tasks:", "tasks:"):
        column = column.removeprefix(prefix)
    return column


def _ordering_column(column: str) -> str:
    """`-data.entropy` or `-tasks:data.entropy` -> `-tasks:data.entropy`."""
    descending = column.startswith("-")
    bare = _bare_column(column.removeprefix("-"))
    return f"{'-' if descending else ''}tasks:{bare}"


def _filters_query(filters: Sequence[TaskFilter], conjunction: str = "and") -> dict[str, Any]:
    return {"conjunction": conjunction, "items": [f.to_data_manager() for f in filters]}


def _reason(body: Any) -> str:
    """Label Studio's own explanation from an error body, without anything else."""
    if isinstance(body, Mapping):
        parts = [str(body[key]) for key in ("detail", "validation_errors") if body.get(key)]
        if parts:
            return "; ".join(parts)
    text = str(body) if body is not None else ""
    return text[:500]


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class LabelStudioClient:
    """Label Studio as this project needs it: projects, tasks, predictions, views, webhooks.

    Works with a legacy token (`Authorization: Token ...`, needs
    LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true on new servers) or a personal access token (the SDK
    exchanges it for short-lived access tokens). Close it (or use `with`) to free the connection pool.
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        http_client: httpx.Client | None = None,
    ) -> None:
        """`http_client` replaces the transport (tests pass one with `httpx.MockTransport`)."""
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"Label Studio URL must start with http:// or https://, got {url!r}")
        if not api_key:
            raise ValueError("Label Studio API key is empty")
        self.url = url.rstrip("/")
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout, follow_redirects=True)
        self._sdk = LabelStudio(
            base_url=self.url, api_key=api_key, timeout=timeout, httpx_client=self._http
        )

    def __repr__(self) -> str:
        return f"LabelStudioClient(url={self.url!r})"

    def close(self) -> None:
        """Close the HTTP connection pool when this client made it."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def _call(self, what: str) -> Iterator[None]:
        """Turn SDK and transport failures of `what` into a LabelStudioError."""
        try:
            yield
        except (ApiError, ParsingError) as exc:
            # `from None`: the SDK's own message lists the response headers (session cookie).
            raise LabelStudioError(
                f"Label Studio at {self.url}: {what} failed with HTTP {exc.status_code}: "
                f"{_reason(exc.body)}",
                exc.status_code,
            ) from None
        except httpx.HTTPError as exc:
            raise LabelStudioError(
                f"Label Studio at {self.url}: {what} failed: {type(exc).__name__}: {exc}"
            ) from exc

    # ---- connection -------------------------------------------------------------------------

    @classmethod
    def connect(cls, url: str, api_key: str, *, timeout: float = 30.0) -> LabelStudioClient:
        """A client whose server answers `/health` and accepts `api_key`.

        The LabelStudioError says which of the two failed: the server (unreachable, or not
        Label Studio) or the key (rejected, e.g. a legacy token on an organization that has
        legacy tokens disabled).
        """
        client = cls(url, api_key, timeout=timeout)
        try:
            client.check()
        except LabelStudioError:
            client.close()
            raise
        return client

    def check(self) -> None:
        """Raise LabelStudioError unless the server is up and the API key works."""
        try:
            response = self._http.get(f"{self.url}/health")
        except httpx.HTTPError as exc:
            raise LabelStudioError(
                f"cannot reach Label Studio at {self.url}: {type(exc).__name__}: {exc}"
            ) from exc
        if response.status_code != 200:
            raise LabelStudioError(
                f"{self.url}/health answered HTTP {response.status_code}: "
                "is this the Label Studio URL?",
                response.status_code,
            )
        try:
            self._sdk.users.whoami()
        except (ApiError, ParsingError) as exc:
            if exc.status_code in (401, 403):
                raise LabelStudioError(
                    f"Label Studio at {self.url} is up but rejected the API key "
                    f"(HTTP {exc.status_code}: {_reason(exc.body)}); use the token from "
                    "Account & Settings, and for legacy tokens start Label Studio with "
                    "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true",
                    exc.status_code,
                ) from None
            raise LabelStudioError(
                f"Label Studio at {self.url}: checking the API key failed with HTTP "
                f"{exc.status_code}: {_reason(exc.body)}",
                exc.status_code,
            ) from None
        except httpx.HTTPError as exc:
            raise LabelStudioError(
                f"Label Studio at {self.url}: checking the API key failed: {exc}"
            ) from exc

    # ---- projects -----------------------------------------------------------------------------

    def create_project(self, title: str, label_config: str, description: str = "") -> int:
        """Create a project; Label Studio wants a title of 3 to 50 characters."""
        with self._call(f"creating project {title!r}"):
            project = self._sdk.projects.create(
                title=title, label_config=label_config, description=description
            )
        if project.id is None:
            raise LabelStudioError(f"Label Studio created project {title!r} without an id")
        log.info("created Label Studio project %d (%s)", project.id, title)
        return project.id

    def find_project(self, title: str) -> int | None:
        """The id of the project titled exactly `title`, None when there is none.

        Raises LabelStudioError when several projects carry that title.
        """
        with self._call(f"looking up project {title!r}"):
            projects: Iterable[Any] = self._sdk.projects.list(title=title)
            found = [p.id for p in projects if p.title == title]
        ids = sorted(i for i in found if i is not None)
        if len(ids) > 1:
            raise LabelStudioError(f"several Label Studio projects are titled {title!r}: {ids}")
        return ids[0] if ids else None

    def project_label_config(self, project: int) -> str:
        """The labeling config XML the project holds now."""
        with self._call(f"reading project {project}"):
            config = self._sdk.projects.get(project).label_config
        return config or ""

    def project_model_version(self, project: int) -> str:
        """`project.model_version`: the predictions Data Manager score filters count."""
        with self._call(f"reading project {project}"):
            version = self._sdk.projects.get(project).model_version
        return version or ""

    def set_model_version(self, project: int, version: str) -> None:
        """Point the project at `version` (fires PROJECT_UPDATED).

        Label Studio accepts only a version that some prediction of the project carries or that
        is the title of a connected ML backend (else a LabelStudioError, HTTP 400), and always
        accepts "". So store the new model's first predictions, then switch. Data Manager score
        filters and sorting count only predictions of this version, and "retrieve predictions"
        skips tasks that already have one of it.
        """
        with self._call(f"setting model version of project {project}"):
            self._sdk.projects.update(id=project, model_version=version)

    def project_exists(self, project: int) -> bool:
        """Whether Label Studio has the project (False on 404; other failures raise)."""
        try:
            with self._call(f"reading project {project}"):
                self._sdk.projects.get(project)
        except LabelStudioError as exc:
            if exc.status_code == 404:
                return False
            raise
        return True

    def prediction_import_batched(self, project: int) -> bool | None:
        """Whether Label Studio imports predictions through its batched path
        (`BATCHED_PREDICTION_IMPORT_FLAG` on): True, False, or None when its answer is not one of the
        two known ones.

        Asked by behaviour, with nothing stored: an import naming task 0, which no project
        has, is refused by both paths before they write, in words that differ (Label Studio
        1.23.2, `data_import/api.py`): the batched path says "task ID 0 not found in project",
        the legacy path "couldn't be retrieved from project" (or, with its validation flag,
        "Invalid task ID 0"). The flag itself is readable only on `/feature-flags/`, a page
        that does not take API tokens.
        """
        probe = [{"task": 0, "result": [], "score": 0.0, "model_version": RECOUNT_VERSION}]
        try:
            with self._call(f"probing the prediction import of project {project}"):
                self._sdk.projects.import_predictions(project, request=cast(Any, probe))
        except LabelStudioError as exc:
            text = str(exc)
            if exc.status_code == 400 and "task ID 0 not found in project" in text:
                return True
            # ("be retrieved" without the apostrophe of "couldn't", which Label Studio's error
            # body may escape.)
            if exc.status_code == 400 and (
                "be retrieved from project" in text or "Invalid task ID 0" in text
            ):
                return False
            log.warning("could not tell Label Studio's prediction import path: %s", exc)
        return None

    # ---- storages ---------------------------------------------------------------------------

    def connect_local_files(self, project: int, folder: Path) -> int:
        """Let Label Studio serve the picture files under `folder` to the project (a local-files
        import storage over it; Label Studio answers 404 for `/data/local-files/?d=...` until
        one covers the folder). Idempotent; returns the storage id. Label Studio must run with
        LOCAL_FILES_SERVING_ENABLED=true and LOCAL_FILES_DOCUMENT_ROOT above `folder`."""
        path = str(folder)
        with self._call(f"reading the local storages of project {project}"):
            found = self._sdk.import_storage.local.list(project=project)
        for storage in found:
            if storage.path == path and storage.id is not None:
                return int(storage.id)
        with self._call(f"adding local storage {path} to project {project}"):
            made = self._sdk.import_storage.local.create(
                project=project,
                path=path,
                use_blob_urls=True,
                title="wafer pictures",
            )
        if made.id is None:
            raise LabelStudioError(f"Label Studio made the local storage {path} without an id")
        return int(made.id)

    # ---- ML backend and webhooks ------------------------------------------------------------

    def connect_ml_backend(
        self, project: int, url: str, title: str, basic_auth: tuple[str, str] | None = None
    ) -> int:
        """Connect the ML backend at `url` to the project; returns the backend's id.

        Label Studio calls `GET <url>/health` and `POST <url>/setup` before it answers (a 400
        here when they fail), sets project.model_version to `title` when it was empty, and
        registers a webhook `<url>/webhook` for all actions WITHOUT the basic-auth header
        (`register_webhook` on that URL fixes its headers and actions). Loopback URLs need
        ML_BLOCK_LOCAL_IP=false and SSRF_PROTECTION_ENABLED=false on the Label Studio side.
        """
        auth: dict[str, Any] = {}
        if basic_auth is not None:
            user, password = basic_auth
            auth = {
                "auth_method": "BASIC_AUTH",
                "basic_auth_user": user,
                "basic_auth_pass": password,
            }
        with self._call(f"connecting ML backend {url} to project {project}"):
            backend = self._sdk.ml.create(
                project=project, url=url, title=title, is_interactive=False, **auth
            )
        if backend.id is None:
            raise LabelStudioError(f"Label Studio connected ML backend {url} without an id")
        return backend.id

    def ml_backends(self, project: int) -> list[dict[str, Any]]:
        """The ML backends connected to the project (id, url, title, state, ...)."""
        with self._call(f"listing ML backends of project {project}"):
            backends = self._sdk.ml.list(project=project)
        return [b.model_dump(mode="json") for b in backends]

    def register_webhook(
        self,
        project: int,
        url: str,
        headers: Mapping[str, str],
        actions: Sequence[str] = WEBHOOK_ACTIONS,
        *,
        send_payload: bool = True,
    ) -> int:
        """Send the project's `actions` to `url`, with `headers`, and with their payload when
        `send_payload` (else the body is `{"action": ...}` alone).

        Idempotent: a webhook of this project with the same URL (e.g. the one connecting an ML
        backend registered) is updated instead of duplicated. Label Studio posts synchronously
        with a short timeout, so the receiver must answer fast.
        """
        payload: dict[str, Any] = {
            "url": url,
            "headers": dict(headers),
            "send_payload": send_payload,
            "send_for_all_actions": False,
            "actions": list(actions),
            "is_active": True,
        }
        with self._call(f"registering webhook for project {project}"):
            existing = [w for w in self._sdk.webhooks.list(project=str(project)) if w.url == url]
            if existing and existing[0].id is not None:
                webhook = self._sdk.webhooks.update(id=existing[0].id, **payload)
            else:
                webhook = self._sdk.webhooks.create(project=project, **payload)
        if webhook.id is None:
            raise LabelStudioError(f"Label Studio registered webhook {url} without an id")
        return webhook.id

    def webhooks(self, project: int) -> list[dict[str, Any]]:
        """The project's webhooks as Label Studio stores them (url, headers, actions, ...)."""
        with self._call(f"listing webhooks of project {project}"):
            hooks = self._sdk.webhooks.list(project=str(project))
        return [w.model_dump(mode="json") for w in hooks if w.project == project]

    # ---- Data Manager views -------------------------------------------------------------------

    def create_view(
        self,
        project: int,
        title: str,
        filters: Sequence[TaskFilter] = (),
        ordering: Sequence[str] = (),
        *,
        conjunction: str = "and",
        hidden_columns: Sequence[str] = (),
        column_types: Mapping[str, str] | None = None,
    ) -> int:
        """A Data Manager tab named `title`; returns its id. Idempotent by title.

        `ordering` holds columns like `-data.entropy` (descending) or `data.wafer_index`;
        Label Studio sorts by the first one only. `hidden_columns` (e.g. `data.route`, `id`)
        are hidden in the table and in the labeling stream's task list; every other column is
        shown, Label Studio's own ones (LABEL_STUDIO_TASK_COLUMNS) included, in Label Studio's
        order (a tab cannot reorder columns). `column_types` shows task-data columns as another
        Data Manager type (e.g. `{"data.margin": "Number"}`: numeric filters; Label Studio
        calls every task-data field it does not know from the labeling config a string).
        Label Studio applies the filters and ordering on the server, so `tasks(view=...)` and
        the UI show the same tasks in the same order.
        """
        if conjunction not in ("and", "or"):
            raise ValueError(f"conjunction must be 'and' or 'or', got {conjunction!r}")
        hidden = [f"tasks:{_bare_column(c)}" for c in hidden_columns]
        data: dict[str, Any] = {
            "title": title,
            "filters": _filters_query(filters, conjunction),
            "ordering": [_ordering_column(c) for c in ordering],
            "hiddenColumns": {"explore": hidden, "labeling": hidden},
        }
        if column_types:
            data["columnsDisplayType"] = {
                f"tasks:{_bare_column(c)}": kind for c, kind in column_types.items()
            }
        with self._call(f"saving view {title!r} of project {project}"):
            same = [
                v for v in self._sdk.views.list(project=project) if _view_title(v.data) == title
            ]
            if same and same[0].id is not None:
                view = self._sdk.views.update(str(same[0].id), project=project, data=data)
            else:
                view = self._sdk.views.create(project=project, data=data)
        if view.id is None:
            raise LabelStudioError(f"Label Studio saved view {title!r} without an id")
        return view.id

    def view(self, view: int) -> dict[str, Any]:
        """A view's `data` as Label Studio returns it: title, filters, ordering, hiddenColumns."""
        with self._call(f"reading view {view}"):
            found = self._sdk.views.get(str(view))
        return dict(found.data or {})

    # ---- tasks -------------------------------------------------------------------------------

    def import_tasks(
        self, project: int, tasks: Sequence[Mapping[str, Any]], *, chunk_size: int = IMPORT_CHUNK
    ) -> list[int]:
        """Import task data dicts (`{"image": ..., "set": ...}`); returns the ids in order.

        Sends `chunk_size` tasks per request; each request fires one TASKS_CREATED webhook.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        ids: list[int] = []
        for chunk in _chunks(tasks, chunk_size):
            with self._call(f"importing {len(chunk)} tasks into project {project}"):
                response = self._sdk.projects.import_tasks(
                    project, request=cast(Any, [dict(t) for t in chunk]), return_task_ids=True
                )
            # `task_ids` is not in the SDK's response model but the server sends it.
            got = [int(i) for i in getattr(response, "task_ids", None) or []]
            if len(got) != len(chunk):
                raise LabelStudioError(
                    f"Label Studio imported {len(got)} of {len(chunk)} tasks into project {project}"
                )
            ids.extend(got)
        log.info("imported %d tasks into Label Studio project %d", len(ids), project)
        return ids

    def tasks(
        self,
        project: int,
        filters: Sequence[TaskFilter] = (),
        *,
        ordering: str = "tasks:id",
        view: int | None = None,
    ) -> list[dict[str, Any]]:
        """Full task dicts (id, data, annotations, predictions, total_annotations, ...).

        Each annotation's `completed_by` is the user id (Label Studio itself sends a user
        object from the single-task endpoint and an id from the list endpoint).

        Without `view`, the tasks matching all `filters`, sorted by `ordering` (task id by
        default). With `view`, that Data Manager tab's filters and ordering apply instead.
        """
        query = None
        if view is None:
            query = json.dumps(
                {"filters": _filters_query(filters), "ordering": [_ordering_column(ordering)]}
            )
        with self._call(f"listing tasks of project {project}"):
            pager: Iterable[Any] = self._sdk.tasks.list(
                project=project, query=query, view=view, fields="all", page_size=PAGE_SIZE
            )
            return [_task_dict(task) for task in pager]

    def view_page(self, project: int, view: int, page_size: int = 30) -> list[dict[str, Any]]:
        """The first page of a Data Manager tab, as the tab shows it to an engineer (its
        filters and ordering; `page_size` tasks)."""
        with self._call(f"reading the first page of view {view} of project {project}"):
            pager: Iterable[Any] = self._sdk.tasks.list(
                project=project, view=view, page=1, page_size=page_size
            )
            return [_task_dict(task) for task in itertools.islice(pager, page_size)]

    def first_task(self, project: int, filters: Sequence[TaskFilter]) -> dict[str, Any] | None:
        """The lowest-id task matching all `filters` (without its annotations), or None.

        One small request whatever the project's size: for "is there any ..." questions.
        """
        query = json.dumps({"filters": _filters_query(filters), "ordering": ["tasks:id"]})
        with self._call(f"looking up a task of project {project}"):
            pager: Iterable[Any] = self._sdk.tasks.list(
                project=project, query=query, fields="task_only", page_size=1
            )
            first = next(iter(pager), None)
        return None if first is None else _task_dict(first)

    def count_tasks(self, project: int, filters: Sequence[TaskFilter]) -> int:
        """How many tasks match all `filters`: one request for one task, whatever the count.

        Measured on Label Studio 1.23.2 on PostgreSQL (2 busy cores, 900 tasks): 0.59 s for a
        count on `data.source` and a `data.wafer_id` range.
        """
        query = json.dumps({"filters": _filters_query(filters), "ordering": ["tasks:id"]})
        with self._call(f"counting tasks of project {project}"):
            pager: Any = self._sdk.tasks.list(
                project=project, query=query, fields="task_only", page_size=1
            )
        return int(pager.response.total)

    def task_data(
        self, project: int, filters: Sequence[TaskFilter], keys: Sequence[str]
    ) -> list[tuple[int, dict[str, Any]]]:
        """(task id, the task data's `keys`) of every task matching all `filters`, by task id.

        Label Studio sends each task's whole data (the picture too), without annotations or
        predictions; only `keys` are kept here. Measured on Label Studio 1.23.2 on PostgreSQL
        (2 busy cores, 3.3 KB picture data URLs): 500 tasks in 13.9 s (36 tasks/s).
        """
        query = json.dumps({"filters": _filters_query(filters), "ordering": ["tasks:id"]})
        found: list[tuple[int, dict[str, Any]]] = []
        with self._call(f"listing task data of project {project}"):
            pager: Iterable[Any] = self._sdk.tasks.list(
                project=project, query=query, fields="task_only", page_size=PAGE_SIZE
            )
            for task in pager:
                data = task.data or {}
                found.append((int(task.id), {k: data[k] for k in keys if k in data}))
        return found

    def labelled_tasks(
        self, project: int, ids: Sequence[int] | None = None
    ) -> list[dict[str, Any]]:
        """Every task with at least one annotation (or, with `ids`, those of them that have
        one), from Label Studio's JSON export: id, data, annotations (with `completed_by` as
        the user id, `updated_by`, `parent_prediction`, `was_cancelled`, `result`).

        Without `ids` in one streamed request; with them in requests of `EXPORT_IDS_CHUNK`
        ids (the ids travel in the URL as `ids[]`, which is what the server reads: the SDK's
        own `ids` parameter is sent as `ids` and ignored). The export gives predictions as ids
        only, so the tasks come WITHOUT `predictions` (an engineer's edit of an auto label is
        still seen through `updated_by`). Measured on Label Studio 1.23.2 on PostgreSQL (2
        cores): 15,219 labelled tasks in 48.6 s (313 tasks/s; the Data Manager listing of the
        same took 118.6 s).
        """
        if ids is None:
            return self._export(project, None)
        wanted = sorted({int(i) for i in ids})
        found: list[dict[str, Any]] = []
        for chunk in _chunks(wanted, EXPORT_IDS_CHUNK):
            found.extend(self._export(project, chunk))
        return found

    def _export(self, project: int, ids: Sequence[int] | None) -> list[dict[str, Any]]:
        options: dict[str, Any] = {"timeout_in_seconds": EXPORT_TIMEOUT}
        if ids is not None:
            options["additional_query_parameters"] = {"ids[]": [str(i) for i in ids]}
        what = "labelled tasks" if ids is None else f"{len(ids)} chosen labelled tasks"
        with self._call(f"exporting the {what} of project {project}"):
            body = b"".join(
                self._sdk.projects.exports.download_sync(
                    project,
                    export_type="JSON",
                    download_all_tasks=False,
                    download_resources=False,
                    request_options=cast(Any, options),
                )
            )
        try:
            tasks = json.loads(body)
        except ValueError as exc:
            raise LabelStudioError(
                f"Label Studio at {self.url}: the export of project {project} is not JSON ({exc})"
            ) from None
        if not isinstance(tasks, list):
            raise LabelStudioError(
                f"Label Studio at {self.url}: the export of project {project} is not a task list"
            )
        found: list[dict[str, Any]] = []
        for task in tasks:
            if not isinstance(task, dict):
                continue
            task["predictions"] = []
            for annotation in task.get("annotations") or []:
                for key in ("completed_by", "updated_by"):
                    user = annotation.get(key)
                    if isinstance(user, Mapping):
                        annotation[key] = user.get("id")
            found.append(task)
        return found

    def annotation_count(self, project: int) -> int:
        """How many annotations the project holds, cancelled (skipped) ones included, by Label
        Studio's own counters (`total_annotations_number` + `skipped_annotations_number`; its
        `num_tasks_with_annotations` leaves out imported labels, which it marks ground truth)."""
        with self._call(f"counting the annotations of project {project}"):
            found = self._sdk.projects.get(project)
        kept, skipped = found.total_annotations_number, found.skipped_annotations_number
        if kept is None or skipped is None:
            raise LabelStudioError(
                f"Label Studio at {self.url}: project {project} gives no annotation counts"
            )
        return int(kept) + int(skipped)

    def task_ids(self, project: int, filters: Sequence[TaskFilter] = ()) -> list[int]:
        """The ids of the tasks matching all `filters`, ascending, without any task content.

        Asks Label Studio for the `id` field alone (`include=id`), so neither the pictures nor
        the annotations travel. Measured on Label Studio 1.23.2 on PostgreSQL (2 cores): the
        17,295 ids of one set in 11.7 s (1,480 tasks/s; with their pictures, 93 s).
        """
        with self._call(f"listing task ids of project {project}"):
            return sorted(int(task.id) for task in self._task_fields(project, filters, "id"))

    def task_updates(self, project: int, filters: Sequence[TaskFilter] = ()) -> list[TaskStamp]:
        """When Label Studio last changed each task matching all `filters` (`updated_at`) and how
        many annotations its counters hold, by task id, without any task content (as
        `task_ids`, with three more fields)."""
        fields = "id,updated_at,total_annotations,cancelled_annotations"
        with self._call(f"listing task changes of project {project}"):
            return [
                TaskStamp(
                    int(task.id),
                    utc_time(task.updated_at),
                    int(task.total_annotations or 0) + int(task.cancelled_annotations or 0),
                )
                for task in self._task_fields(project, filters, fields)
            ]

    def _task_fields(
        self, project: int, filters: Sequence[TaskFilter], include: str
    ) -> Iterable[Any]:
        """The Data Manager's tasks matching all `filters` by id, with the `include` fields only
        (pages of `ID_PAGE_SIZE`, fetched as iterated: iterate inside `_call`)."""
        query = json.dumps({"filters": _filters_query(filters), "ordering": ["tasks:id"]})
        pager: Iterable[Any] = self._sdk.tasks.list(
            project=project, query=query, include=include, page_size=ID_PAGE_SIZE
        )
        return pager

    def tasks_of_set(
        self, project: int, set_number: int, *, only_unlabelled: bool = False
    ) -> list[dict[str, Any]]:
        """The tasks whose `data.set` is `set_number`, by task id, with their predictions and
        annotations; only those without an annotation when `only_unlabelled`."""
        filters = [set_filter(set_number)]
        if only_unlabelled:
            filters.append(unlabelled_filter())
        return self.tasks(project, filters)

    def task(self, task: int) -> dict[str, Any]:
        """One task with its annotations and predictions (same shape as `tasks`)."""
        with self._call(f"reading task {task}"):
            return _task_dict(self._sdk.tasks.get(str(task)))

    def update_task_data(
        self, task: int, data: Mapping[str, Any], *, current: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Merge `data` into the task's data and return the merged data.

        Label Studio replaces `task.data` as a whole on PATCH, so this reads the task first
        unless `current` (the task's data as just listed) is given: two writers updating the
        same task at once can lose each other's fields. Fires no webhook.
        """
        with self._call(f"updating data of task {task}"):
            if current is None:
                current = self._sdk.tasks.get(str(task)).data or {}
            merged = {**current, **data}
            updated = self._sdk.tasks.update(id=str(task), data=merged)
        return dict(updated.data or merged)

    # ---- predictions and annotations --------------------------------------------------------

    def create_predictions(
        self,
        project: int,
        items: Sequence[Mapping[str, Any]],
        *,
        chunk_size: int = IMPORT_CHUNK,
    ) -> int:
        """Store predictions `{task, result, score, model_version}` in bulk; returns how many.

        One request per `chunk_size` items; a task id outside the project fails the request.
        Fires no webhook.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        created = 0
        for chunk in _chunks(items, chunk_size):
            with self._call(f"storing {len(chunk)} predictions in project {project}"):
                response = self._sdk.projects.import_predictions(
                    project, request=cast(Any, [dict(item) for item in chunk])
                )
            created += int(response.created or 0)
        return created

    def accept_prediction(
        self,
        task: int,
        project: int,
        result: Sequence[Mapping[str, Any]],
        prediction_id: int | None,
    ) -> int:
        """Turn a prediction into an annotation by the API key's user; returns the annotation id.

        `parent_prediction` records which prediction it came from. Fires ANNOTATION_CREATED,
        whose `annotation.completed_by` is this client's user.
        """
        extra: dict[str, Any] = {}
        if prediction_id is not None:
            extra["parent_prediction"] = prediction_id
        with self._call(f"annotating task {task}"):
            annotation = self._sdk.annotations.create(
                id=task, project=project, result=[dict(r) for r in result], **extra
            )
        if annotation.id is None:
            raise LabelStudioError(f"Label Studio annotated task {task} without an id")
        return annotation.id

    def accept_predictions(self, project: int, tasks: Sequence[int], model_version: str) -> None:
        """Turn each listed task's `model_version` prediction into an annotation, in one call.

        Label Studio's "Create Annotations From Predictions" Data Manager action: every
        annotation gets `parent_prediction` and this client's user as `completed_by`, and ONE
        ANNOTATIONS_CREATED webhook fires for all of them. Label Studio itself converts EVERY
        prediction of that version without a child annotation and does not look at the task's
        other annotations; so the action is sent with the Data Manager filter "no annotation"
        beside the task ids, which Label Studio applies inside the action's own query: a task an
        engineer labelled after the caller listed it is left alone. Remove surplus predictions
        first (`delete_predictions`): a task with two of that version gets two annotations.
        Measured: 15,219 tasks in 50.4 s (~300 wafers/s; Label Studio 1.23.2, PostgreSQL, 2 cores).
        """
        if not tasks:
            return
        filters = _filters_query([unlabelled_filter()])
        with self._call(f"accepting predictions of {len(tasks)} tasks in project {project}"):
            self._sdk.actions.create(
                id="predictions_to_annotations",
                project=project,
                selected_items=PrepareParamsRequestRequestSelectedItemsIncluded(
                    all_=False, included=[int(t) for t in tasks]
                ),
                request_options={
                    "additional_body_parameters": {
                        "model_version": model_version,
                        "filters": filters,
                    }
                },
            )

    def accept_predictions_where(
        self, project: int, filters: Sequence[TaskFilter], model_version: str
    ) -> None:
        """`accept_predictions` for every task matching all `filters` and having no annotation,
        as Label Studio evaluates them inside the action's own query: no listing beforehand,
        so the call costs one request whatever the set's size. Measured on Label Studio 1.23.2
        (PostgreSQL, 2 busy cores) inside `backend.preannotation.accept_confident`: 2,700 of
        3,000 wafers accepted in a 36 s step.
        """
        query = _filters_query([*filters, unlabelled_filter()])
        with self._call(f"accepting predictions of {model_version} in project {project}"):
            self._sdk.actions.create(
                id="predictions_to_annotations",
                project=project,
                request_options={
                    "additional_body_parameters": {
                        "model_version": model_version,
                        "filters": query,
                        "selectedItems": {"all": True, "excluded": []},
                    },
                    "timeout_in_seconds": ACCEPT_TIMEOUT,
                },
            )

    def delete_predictions(self, predictions: Sequence[int]) -> int:
        """Delete predictions by id (one DELETE each; Label Studio has no bulk call for chosen
        prediction ids); returns how many. One already gone counts as deleted. Fires no
        webhook. Meant for the few surplus predictions of a set, not for whole sets: 60 took
        part of a 36 s accept step (Label Studio 1.23.2, PostgreSQL, 2 busy cores).
        """
        for prediction in predictions:
            try:
                with self._call(f"deleting prediction {prediction}"):
                    self._sdk.predictions.delete(int(prediction))
            except LabelStudioError as exc:
                if exc.status_code != 404:
                    raise
        return len(predictions)

    def recount_annotations(
        self, project: int, tasks: Sequence[int], result: Sequence[Mapping[str, Any]]
    ) -> int:
        """Have Label Studio count the annotations of `tasks` again (its `total_annotations`,
        `cancelled_annotations` and `total_predictions` counters); returns how many tasks were
        asked for.

        Label Studio 1.23.2 has no call for that alone. A prediction import recounts the tasks
        it touches (the whole project without `BATCHED_PREDICTION_IMPORT_FLAG`), so this stores one
        prediction of `RECOUNT_VERSION` per task (`result` must suit the labeling config) and
        deletes every prediction of that version again. Re-saving an annotation would recount
        too, but would make this client's user its `updated_by`, and an engineer's edit of an
        auto label would then read as an unedited auto label. Annotations are not touched;
        no webhook fires. Predictions of `RECOUNT_VERSION` left by an earlier call that died
        midway are deleted as well.
        """
        if tasks:
            self.create_predictions(
                project,
                [
                    {
                        "task": int(t),
                        "result": [dict(r) for r in result],
                        "score": 0.0,
                        "model_version": RECOUNT_VERSION,
                    }
                    for t in tasks
                ],
            )
        self.delete_predictions(self.prediction_ids(project, RECOUNT_VERSION))
        return len(tasks)

    def prediction_ids(self, project: int, version: str) -> list[int]:
        """Ids of every prediction of model `version` in the project (one listing of the tasks
        that hold one; meant for few tasks)."""
        return sorted(
            int(p["id"])
            for t in self.tasks(project, [predicted_by(version)])
            for p in t.get("predictions") or []
            if p.get("model_version") == version and p.get("id") is not None
        )

    def update_annotation(self, annotation: int, result: Sequence[Mapping[str, Any]]) -> None:
        """Replace an annotation's result, as this client's user (an engineer's edit).

        Label Studio 1.23.2 keeps the annotation's `completed_by` and sets `updated_by` to this
        user (verified in tests/test_accept.py). Fires ANNOTATION_UPDATED.
        """
        with self._call(f"updating annotation {annotation}"):
            self._sdk.annotations.update(id=int(annotation), result=[dict(r) for r in result])

    def delete_annotations(self, annotations: Sequence[int]) -> int:
        """Delete annotations by id (one DELETE each: Label Studio 1.23.2 has no bulk call for
        chosen annotation ids; its "delete annotations" action takes whole tasks and their
        drafts); returns how many. One already gone counts as deleted. Meant for the rare auto
        label a race left beside another, not for whole sets.
        """
        for annotation in annotations:
            try:
                with self._call(f"deleting annotation {annotation}"):
                    self._sdk.annotations.delete(int(annotation))
            except LabelStudioError as exc:
                if exc.status_code != 404:
                    raise
        return len(annotations)

    def current_user_id(self) -> int:
        """The id of the user the API key belongs to (`completed_by` of its annotations)."""
        with self._call("reading the current user"):
            user = self._sdk.users.whoami()
        return user.id


def _task_dict(task: Any) -> dict[str, Any]:
    """A task model as a JSON-like dict, with `completed_by` reduced to the user id."""
    found: dict[str, Any] = task.model_dump(mode="json")
    for annotation in found.get("annotations") or []:
        user = annotation.get("completed_by")
        if isinstance(user, Mapping):
            annotation["completed_by"] = user.get("id")
    return found


def _view_title(data: Any) -> str | None:
    if isinstance(data, Mapping):
        title = data.get("title")
        return title if isinstance(title, str) else None
    return None
