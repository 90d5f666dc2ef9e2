"""The ML backend behind the HTTP app: serve predictions, hand webhooks to the queue. Layer L3.

`WaferLabelingService` implements `backend.app.MLBackend` for `model.py`. It predicts in the
request (batched, a few milliseconds per wafer) but never trains there: webhooks go to
`backend.events`, which queues jobs for the rq worker.

Each Label Studio project has its own models (`ModelStore.for_project`: MODEL_DIR/projects/<id>/);
the project comes with every /setup, /predict and /versions call as "<id>.<created timestamp>",
parsed by `backend.project_ids.parse_project_id` (the webhooks' parser too). A project's served
model is whatever its CURRENT names; a retraining in the worker switches it and the next
request reads it.

Only /setup and /predict of a project with a model directory open its store, which keeps its
served model in memory (the `MAX_OPEN_STORES` used last). /health, /metrics and /versions read
CURRENT and the model cards, never the weights, and never open a store: with more projects
than open stores, each /health used to load every project's weights again.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from functools import partial
from typing import Any

import httpx
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from werkzeug.exceptions import BadRequest, ServiceUnavailable

from backend.classifier import pick_device
from backend.events import EventError, QueueUnavailableError, handle_event
from backend.files import NotARegularFileError, read_regular_file
from backend.images import picture_reader
from backend.label_config import LabelConfig, parse_label_config
from backend.labelstudio import LabelStudioClient, LabelStudioError
from backend.loop_keys import QUEUES
from backend.loop_state import route_measure, serving_rule, set_number_of, trained_through
from backend.model_card import ModelCard
from backend.model_store import VERSION_PATTERN, ModelStore
from backend.predictions import WaferPrediction, predict_tasks, tasks_to_label_studio
from backend.project_ids import ProjectIdError, parse_project_id
from backend.settings import Settings
from backend.wafer_store import WaferStore

log = logging.getLogger(__name__)

#: `model_version` before any model is trained (Label Studio needs a non-empty string).
NO_MODEL = "no-model-yet"
#: Stores (each with its loaded model) kept in memory; the least recently used one goes first.
MAX_OPEN_STORES = 16
#: Failed tasks quoted in the one log line a /predict writes about its failures.
QUOTED_ERRORS = 3
#: How long /health waits for a fresh look at the model stores before it answers with the last
#: one (Label Studio gives /health 1 s).
HEALTH_WAIT_S = 0.7
#: Bytes of CURRENT read at most (a version name is at most 100 characters).
_CURRENT_MAX_BYTES = 256


def project_number(value: str | int | None) -> int:
    """The project id in what Label Studio sends; BadRequest saying what is wrong otherwise."""
    try:
        return parse_project_id(value)
    except ProjectIdError as exc:
        raise BadRequest(str(exc)) from None


def failure_summary(predictions: list[WaferPrediction]) -> str | None:
    """One line for all failed tasks of a batch ("N of M tasks failed: ..."), None if none."""
    failed = [p.error for p in predictions if p.error is not None]
    if not failed:
        return None
    quoted = "; ".join(e[:200] for e in failed[:QUOTED_ERRORS])
    more = f" (and {len(failed) - QUOTED_ERRORS} more)" if len(failed) > QUOTED_ERRORS else ""
    return f"{len(failed)} of {len(predictions)} tasks failed: {quoted}{more}"


class WaferLabelingService:
    """Predictions and webhook handling for one backend process (thread-safe)."""

    def __init__(self, settings: Settings, redis: Redis | None = None) -> None:
        self.settings = settings
        self.device = pick_device(settings.device)
        self.labels = parse_label_config(settings.label_config_path.read_text())
        self.redis = redis if redis is not None else Redis.from_url(settings.redis_url)
        self._stores: OrderedDict[int, ModelStore] = OrderedDict()
        self._stores_lock = threading.Lock()
        self._http = httpx.Client(timeout=30.0)
        self._auto_user: int | None = None
        self._health_lock = threading.Lock()
        self._health_check: threading.Thread | None = None
        self._health_facts: dict[str, Any] = {"projects": {}, "problems": []}

    def store(self, project: int) -> ModelStore:
        """The model store of one project (kept open: it caches the served model)."""
        with self._stores_lock:
            store = self._stores.get(project)
            if store is None:
                store = ModelStore.for_project(self.settings.model_dir, project, self.device)
                self._stores[project] = store
                while len(self._stores) > MAX_OPEN_STORES:
                    self._stores.popitem(last=False)
            self._stores.move_to_end(project)
            return store

    def _look_only(self, project: int) -> ModelStore:
        """A store to read CURRENT, versions and cards from, never cached (nor its model)."""
        return ModelStore.for_project(self.settings.model_dir, project, self.device)

    def _has_models(self, project: int) -> bool:
        """Whether the project has a model directory (unknown ids open no store)."""
        return self._look_only(project).root.is_dir()

    # ---- MLBackend ------------------------------------------------------------------------

    def model_version(self, project: str | int | None) -> str:
        """The version a project's predictions carry (what /setup reports)."""
        number = project_number(project)
        if not self._has_models(number):
            return NO_MODEL
        return self.store(number).current_version() or NO_MODEL

    def health(self) -> dict[str, Any]:
        """Each project's served version and every store problem (a CURRENT that cannot be
        served, old single-project models), from CURRENT and the cards. Reads no network, and
        answers within HEALTH_WAIT_S: the look at the stores runs in a thread of its own, and
        when it takes longer (a slow disk) the previous look is reported."""
        with self._health_lock:
            check = self._health_check
            if check is None or not check.is_alive():
                check = threading.Thread(target=self._look_at_stores, daemon=True)
                check.start()
                self._health_check = check
        check.join(HEALTH_WAIT_S)
        return dict(self._health_facts)

    def _look_at_stores(self) -> None:
        projects: dict[str, str] = {}
        problems: list[str] = []
        try:
            for project in ModelStore.projects(self.settings.model_dir):
                served, found = served_by_card(self._look_only(project))
                projects[str(project)] = served or NO_MODEL
                problems.extend(f"project {project}: {p}" for p in found)
        except (OSError, ValueError, RuntimeError) as exc:
            log.error("cannot look at the model stores: %s: %s", type(exc).__name__, exc)
            problems.append(f"the model stores cannot be read ({type(exc).__name__})")
        self._health_facts = {"projects": projects, "problems": sorted(set(problems))}

    def setup(self, project: str, schema: str, extra: Mapping[str, Any]) -> str:
        """Check the project's labeling config against this backend's; return the version."""
        try:
            config = parse_label_config(schema)
        except ValueError as exc:
            raise BadRequest(f"the project's labeling config does not fit: {exc}") from exc
        self._check_config(config)
        return self.model_version(project)

    def predict(
        self,
        tasks: list[dict[str, Any]],
        context: Mapping[str, Any] | None,
        project: str | None = None,
    ) -> list[dict[str, Any]]:
        """One entry per task; tasks whose picture cannot be read get an error entry, and the
        batch writes ONE log line about them however many they are.

        A task of a set beyond the open one (its `data.set` is past the served model's
        trained-through set + 1) gets an entry without a result, which Label Studio does not
        store: an engineer who opens such a task early would otherwise leave an old model's
        prediction on it, beside the one its set gets when it is opened."""
        number = project_number(project)
        has_models = self._has_models(number)
        classifier = self.store(number).load_current() if has_models else None
        if classifier is None:
            message = f"no model is trained yet for project {number}: import its initial set first"
            return [{"model_version": NO_MODEL, "error": message} for _ in tasks]
        version = classifier.card.version
        learnt = trained_through(classifier.card)
        later = [
            learnt is not None and (n := set_number_of(t)) is not None and n > learnt + 1
            for t in tasks
        ]
        current = [t for t, skip in zip(tasks, later, strict=True) if not skip]
        fetch = picture_reader(self.settings, classifier.card.image_size, self._http)
        rule = partial(serving_rule, self.settings, classifier.card)
        # Tasks imported with the wafer store need no picture: their die maps are there.
        stored = WaferStore.for_project(self.settings.model_dir, number).task_codes(
            current, classifier.card.image_size, classifier.card.failure_types
        )
        measure = route_measure(self.settings, classifier.card)
        predictions = predict_tasks(current, classifier, self.labels, rule, fetch, stored, measure)
        summary = failure_summary(predictions)
        if summary is not None:
            log.warning("predict for project %d: %s", number, summary)
        answered = iter(tasks_to_label_studio(predictions, self.labels, version))
        return [
            {
                "model_version": version,
                "error": f"set {set_number_of(t)} is pre-annotated when it is opened "
                f"({version} learnt through set {learnt})",
            }
            if skip
            else next(answered)
            for t, skip in zip(tasks, later, strict=True)
        ]

    def versions(self, project: str | None) -> list[str]:
        """The project's stored versions, oldest first; always holding what /setup reports."""
        number = project_number(project)
        if not self._has_models(number):
            return [NO_MODEL]
        store = self._look_only(number)
        found = store.versions()
        served = served_by_card(store)[0] or NO_MODEL
        return found if served in found else [*found, served]

    def webhook(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        try:
            return handle_event(payload, self.redis, self.auto_user)
        except EventError as exc:
            raise BadRequest(str(exc)) from exc
        except QueueUnavailableError as exc:
            log.error("%s", exc)
            raise ServiceUnavailable(str(exc)) from exc

    def metrics(self) -> dict[str, Any]:
        """Per project: the served version and every stored version with its card (a version
        whose card cannot be read is listed with an error, never a failure)."""
        projects: dict[str, Any] = {}
        for project in ModelStore.projects(self.settings.model_dir):
            store = self._look_only(project)
            served, problems = served_by_card(store)
            projects[str(project)] = {
                "model_version": served or NO_MODEL,
                "versions": [_version_facts(store, name) for name in store.versions()],
                "problems": problems,
            }
        queues: dict[str, Any] = {}
        try:
            for name in QUEUES:
                queues[name] = Queue(name, connection=self.redis).count
        except RedisError as exc:
            queues = {"error": f"Redis is not reachable: {type(exc).__name__}"}
        return {"projects": projects, "queues": queues}

    def served_card(self, project: int) -> ModelCard | None:
        """The card of the version `project` serves, read from CURRENT and the cards only (for
        `/metrics`); None when it serves none or the card cannot be read."""
        store = self._look_only(project)
        name, _ = served_by_card(store)
        if name is None:
            return None
        try:
            return store.card(name)
        except (OSError, ValueError) as exc:
            log.warning("project %d: the card of %s cannot be read: %s", project, name, exc)
            return None

    # ---- helpers ---------------------------------------------------------------------------

    def auto_user(self) -> int | None:
        """The Label Studio user id of LABEL_STUDIO_API_KEY (asked once), None if unknown."""
        if self._auto_user is None and self.settings.label_studio_api_key:
            try:
                with LabelStudioClient(
                    self.settings.label_studio_url, self.settings.label_studio_api_key, timeout=5.0
                ) as client:
                    self._auto_user = client.current_user_id()
            except LabelStudioError as exc:
                log.warning("cannot tell the backend's own annotations apart yet: %s", exc)
        return self._auto_user

    def _check_config(self, config: LabelConfig) -> None:
        missing = [t for t in self.labels.failure_types if t not in config.failure_types]
        if missing:
            raise BadRequest(
                f"the project's <Choices name={config.from_name!r}> lacks failure types this "
                f"backend predicts: {', '.join(missing)} (use label_config.xml)"
            )


def _version_facts(store: ModelStore, name: str) -> dict[str, Any]:
    """A version's card facts, or ``{"version", "error"}`` when its card is unreadable."""
    try:
        card = store.card(name)
        return {
            "version": name,
            "created": card.created,
            "backbone": card.backbone,
            "image_size": card.image_size,
            "trained_through_set": trained_through(card),
            "metrics": dict(card.metrics),
        }
    except (ValueError, TypeError, OverflowError) as exc:
        return {"version": name, "error": f"the model card is unreadable: {exc}"}


def served_by_card(store: ModelStore) -> tuple[str | None, list[str]]:
    """The version `store` serves and what is wrong with it, read from CURRENT and the cards
    only (a card that is missing or damaged is read from its weights instead).

    CURRENT's version is served when its weights file is there and its card names it; else the
    newest version with a readable card, as the store itself would choose (it can differ only
    when a weights file is damaged under a good card, which the first /predict then finds).
    """
    legacy = [store.legacy_note] if store.legacy_note is not None else []
    name, problem = _current_name(store)
    if name is None and problem is None:
        return None, legacy  # no model published yet
    if name is not None:
        trouble = _why_not_servable(store, name)
        if trouble is None:
            return name, legacy
        problem = f"model version {name} named in CURRENT {trouble}"
    for version in reversed(store.versions()):
        if version != name and _why_not_servable(store, version) is None:
            return version, [f"{problem}; serving {version} instead", *legacy]
    return None, [f"{problem}; no other version is readable, so no model is served", *legacy]


def _current_name(store: ModelStore) -> tuple[str | None, str | None]:
    """(CURRENT's version name, None), (None, what is wrong with CURRENT), or (None, None)
    before the first model."""
    current = store.root / "CURRENT"
    try:
        if current.is_symlink() and not current.resolve().is_relative_to(store.root.resolve()):
            return None, "CURRENT leads outside the model directory"
        raw = read_regular_file(current, _CURRENT_MAX_BYTES)  # a FIFO would block for good
    except FileNotFoundError:
        return None, None
    except NotARegularFileError as exc:
        return None, str(exc)
    except OSError as exc:
        return None, f"CURRENT is unreadable ({type(exc).__name__})"
    try:
        name = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        name = ""
    if len(raw) > _CURRENT_MAX_BYTES or not VERSION_PATTERN.match(name):
        return None, "CURRENT does not name a model version"
    return name, None


def _why_not_servable(store: ModelStore, version: str) -> str | None:
    """Why `version` cannot be served, judged by its files and card; None when it can."""
    try:
        if not store.path_of(version).is_file():
            return "does not exist"
        card = store.card(version)
    except ValueError:
        return "is unreadable (damaged card and weights)"
    if card.version != version:
        return f"holds another version ({card.version})"
    return None
