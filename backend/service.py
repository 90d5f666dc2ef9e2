"""The ML backend behind the HTTP app: serve predictions, hand webhooks to the queue. Layer L3.

`WaferLabelingService` implements `backend.app.MLBackend` for `model.py`. It predicts in the
request (batched, a few milliseconds per wafer) but never trains there: webhooks go to
`backend.events`, which queues jobs for the rq worker. The served model is whatever
MODEL_DIR/CURRENT names; a retraining in the worker switches it and the next request reads it.
"""

from __future__ import annotations

import logging
import threading
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
from backend.images import model_input
from backend.jobs import QUEUES, serving_rule, trained_through
from backend.label_config import LabelConfig, parse_label_config
from backend.labelstudio import LabelStudioClient, LabelStudioError
from backend.model_store import ModelStore
from backend.predictions import predict_tasks, tasks_to_label_studio
from backend.settings import Settings

log = logging.getLogger(__name__)

#: `model_version` before any model is trained (Label Studio needs a non-empty string).
NO_MODEL = "no-model-yet"


class WaferLabelingService:
    """Predictions and webhook handling for one backend process (thread-safe)."""

    def __init__(self, settings: Settings, redis: Redis | None = None) -> None:
        self.settings = settings
        self.store = ModelStore(settings.model_dir, pick_device(settings.device))
        self.labels = parse_label_config(settings.label_config_path.read_text())
        self.redis = redis if redis is not None else Redis.from_url(settings.redis_url)
        self._lock = threading.Lock()
        self._http = httpx.Client(timeout=30.0)
        self._auto_user: int | None = None

    # ---- MLBackend ------------------------------------------------------------------------

    def model_version(self) -> str:
        return self.store.current_version() or NO_MODEL

    def setup(self, project: str, schema: str, extra: Mapping[str, Any]) -> str:
        """Check the project's labeling config against this backend's; return the version."""
        try:
            config = parse_label_config(schema)
        except ValueError as exc:
            raise BadRequest(f"the project's labeling config does not fit: {exc}") from exc
        self._check_config(config)
        return self.model_version()

    def predict(
        self, tasks: list[dict[str, Any]], context: Mapping[str, Any] | None
    ) -> list[dict[str, Any]]:
        with self._lock:
            classifier = self.store.load_current()
        version = self.model_version()
        if classifier is None:
            message = "no model is trained yet: import the initial labelled set first"
            return [{"model_version": version, "error": message} for _ in tasks]
        fetch = _Fetch(self._http, self.settings, classifier.card.image_size)
        rule = partial(serving_rule, self.settings, classifier.card)
        predictions = predict_tasks(tasks, classifier, self.labels, rule, fetch)
        for p in predictions:
            if not p.ok:
                log.warning("predict: %s", p.error)
        return tasks_to_label_studio(predictions, self.labels, classifier.card.version)

    def webhook(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        try:
            return handle_event(payload, self.redis, self.auto_user)
        except EventError as exc:
            raise BadRequest(str(exc)) from exc
        except QueueUnavailableError as exc:
            log.error("%s", exc)
            raise ServiceUnavailable(str(exc)) from exc

    def metrics(self) -> dict[str, Any]:
        versions: list[dict[str, Any]] = []
        for name in self.store.versions():
            try:
                card = self.store.card(name)
            except ValueError as exc:
                versions.append({"version": name, "error": str(exc)})
                continue
            versions.append(
                {
                    "version": name,
                    "created": card.created,
                    "backbone": card.backbone,
                    "image_size": card.image_size,
                    "trained_through_set": trained_through(card),
                    "metrics": dict(card.metrics),
                }
            )
        queues: dict[str, Any] = {}
        try:
            for name in QUEUES:
                queues[name] = Queue(name, connection=self.redis).count
        except RedisError as exc:
            queues = {"error": f"Redis is not reachable: {type(exc).__name__}"}
        return {"model_version": self.model_version(), "versions": versions, "queues": queues}

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


class _Fetch:
    """A task image value -> die codes of the model's input size (the Label Studio token is
    sent only to LABEL_STUDIO_URL)."""

    def __init__(self, http: httpx.Client, settings: Settings, size: int) -> None:
        self._http, self._settings, self._size = http, settings, size

    def __call__(self, value: str) -> Any:
        return model_input(
            value,
            self._http,
            label_studio_url=self._settings.label_studio_url,
            api_key=self._settings.label_studio_api_key or None,
            size=self._size,
        )
