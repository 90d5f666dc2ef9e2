"""The ML backend's model class, in the shape Label Studio's own ML backends use.

`setup`, `predict(tasks, context)` and `fit(event, data)` delegate to
`backend.service.WaferLabelingService`; `fit` never trains in the request, it queues the work
for the rq worker. Each Label Studio project has its own models. Configuration comes from the
environment (see README.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from backend.service import WaferLabelingService
from backend.settings import Settings


class WaferMapModel:
    """ResNet wafer-map failure-type classifier with uncertainty-based auto-accept."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.service = WaferLabelingService(settings or Settings.from_env(os.environ))

    def model_version(self, project: str | int) -> str:
        return self.service.model_version(project)

    def health(self) -> dict[str, Any]:
        return self.service.health()

    def setup(self, project: str, schema: str, extra: Mapping[str, Any]) -> str:
        return self.service.setup(project, schema, extra)

    def predict(
        self,
        tasks: list[dict[str, Any]],
        context: Mapping[str, Any] | None = None,
        project: str | None = None,
    ) -> list[dict[str, Any]]:
        return self.service.predict(tasks, context, project)

    def versions(self, project: str | None) -> list[str]:
        return self.service.versions(project)

    def fit(self, event: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """Label Studio's ML-backend name for an event: queued for the worker, never trained in
        the request (the event name is the payload's `action` when it has none)."""
        return self.webhook(data if data.get("action") == event else {**data, "action": event})

    def webhook(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        return self.service.webhook(payload)

    def metrics(self) -> dict[str, Any]:
        return self.service.metrics()
