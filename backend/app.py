"""The HTTP app: the ML backend protocol that Label Studio 1.23.2 speaks, on Flask 3.

Layer L3. The app only checks requests, calls an `MLBackend` and shapes the answers; the
model, jobs and Label Studio settings live behind that protocol (``model.py``).

Routes (every answer is JSON):

- ``GET /health`` -> ``{"status": "UP", "model_class", "model_version"}``, never behind auth
  (Label Studio polls it with a 1 s timeout).
- ``POST /setup`` ``{project, schema, extra_params, ...}`` -> ``{"model_version"}``.
- ``POST /predict`` ``{tasks: [...], params: {context}}`` -> ``{"results": [...]}``, exactly
  one entry per task, in order.
- ``POST /webhook`` ``{action, ...}`` -> the backend's small status dict; the backend must answer
  fast (Label Studio waits 1 s) and leave real work to a job.
- ``GET /metrics`` -> the backend's metrics.

Bad requests get 400 ``{"error": ...}``; a failure inside the backend gets 500 ``{"error": ...}``
with the exception's type and message, never a traceback (that goes to the server log). With
``basic_auth`` every route but ``/health`` needs those credentials (401 with
``WWW-Authenticate: Basic`` otherwise). Note that the webhook Label Studio registers on its own
when a backend is connected sends NO credentials; register the webhook with an
``Authorization`` header instead when auth is on. Request bodies and headers are never logged:
they carry Label Studio tokens and task-data passwords.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Mapping
from typing import Any, NoReturn, Protocol

import flask
from werkzeug.exceptions import HTTPException

logger = logging.getLogger(__name__)

#: Largest request body accepted (tasks may carry their pictures as data: URLs).
DEFAULT_MAX_BODY_BYTES = 256 * 2**20
AUTH_REALM = "wafermap-labeling"


class MLBackend(Protocol):
    """What the app calls; ``model.py`` implements it."""

    def model_version(self) -> str:
        """The version `/setup` reports and every prediction carries (must be cheap)."""
        ...

    def setup(self, project: str, schema: str, extra: Mapping[str, Any]) -> str:
        """Take note of the project and its labeling config; return the model version."""
        ...

    def predict(
        self, tasks: list[dict[str, Any]], context: Mapping[str, Any] | None
    ) -> list[dict[str, Any]]:
        """One Label Studio prediction entry per task, in order."""
        ...

    def webhook(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """React to a Label Studio event FAST (enqueue, never train here); a small status dict."""
        ...

    def metrics(self) -> dict[str, Any]:
        """JSON-serialisable facts about the model and the labeling so far."""
        ...


def _fail(status: int, message: str) -> NoReturn:
    flask.abort(status, description=message)


def _json_object() -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    body = flask.request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        _fail(400, "the request body must be a JSON object")
    return body


def _extra_params(value: Any) -> dict[str, Any]:
    """``extra_params`` of /setup: Label Studio stores it as free JSON, null or text."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            _fail(400, "'extra_params' is text that is not JSON")
    if not isinstance(value, dict):
        _fail(400, "'extra_params' must be a JSON object")
    return value


def _authorized(expected: tuple[str, str]) -> bool:
    auth = flask.request.authorization
    if auth is None or auth.type != "basic":
        return False
    user_ok = hmac.compare_digest((auth.username or "").encode(), expected[0].encode())
    password_ok = hmac.compare_digest((auth.password or "").encode(), expected[1].encode())
    return user_ok & password_ok


def create_app(
    backend: MLBackend,
    *,
    basic_auth: tuple[str, str] | None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> flask.Flask:
    """The Flask app serving ``backend``; ``basic_auth`` is (user, password) or None for none."""
    if basic_auth is not None and (
        len(basic_auth) != 2 or not all(isinstance(s, str) and s for s in basic_auth)
    ):
        raise ValueError("basic_auth must be a (user, password) pair of non-empty strings")
    app = flask.Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes

    @app.before_request
    def check_credentials() -> flask.Response | None:
        if basic_auth is None or flask.request.endpoint == "health":
            return None
        if _authorized(basic_auth):
            return None
        response = flask.jsonify(error="authentication required: wrong or missing credentials")
        response.status_code = 401
        response.headers["WWW-Authenticate"] = f'Basic realm="{AUTH_REALM}"'
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[flask.Response, int]:
        return flask.jsonify(error=exc.description or exc.name), exc.code or 500

    @app.errorhandler(Exception)
    def backend_error(exc: Exception) -> tuple[flask.Response, int]:
        logger.exception("%s %s failed", flask.request.method, flask.request.path)
        where = flask.request.path.strip("/") or "request"
        return flask.jsonify(error=f"{where} failed: {type(exc).__name__}: {exc}"), 500

    @app.get("/health")
    def health() -> flask.Response:
        return flask.jsonify(
            status="UP",
            model_class=type(backend).__name__,
            model_version=backend.model_version(),
        )

    @app.post("/setup")
    def setup() -> flask.Response:
        body = _json_object()
        schema = body.get("schema")
        if not isinstance(schema, str) or not schema.strip():
            _fail(400, "'schema' (the labeling config) must be a non-empty string")
        project = body.get("project", "")
        if not isinstance(project, str | int) or isinstance(project, bool):
            _fail(400, "'project' must be a string or an integer")
        version = backend.setup(str(project), schema, _extra_params(body.get("extra_params")))
        return flask.jsonify(model_version=version)

    @app.post("/predict")
    def predict() -> flask.Response:
        body = _json_object()
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            _fail(400, "'tasks' must be a list of task objects")
        if not all(isinstance(task, dict) for task in tasks):
            _fail(400, "every entry of 'tasks' must be a JSON object")
        params = body.get("params")
        if params is not None and not isinstance(params, dict):
            _fail(400, "'params' must be a JSON object")
        context = (params or {}).get("context", body.get("context"))
        if context is not None and not isinstance(context, dict):
            _fail(400, "'context' must be a JSON object")
        results = backend.predict(tasks, context)
        if not isinstance(results, list) or len(results) != len(tasks):
            count = len(results) if isinstance(results, list) else type(results).__name__
            raise RuntimeError(f"the backend returned {count} results for {len(tasks)} tasks")
        return flask.jsonify(results=results)

    @app.post("/webhook")
    def webhook() -> flask.Response:
        body = _json_object()
        action = body.get("action")
        if not isinstance(action, str) or not action:
            _fail(400, "a webhook payload needs an 'action' string (e.g. ANNOTATION_CREATED)")
        return flask.jsonify(backend.webhook(body))

    @app.get("/metrics")
    def metrics() -> flask.Response:
        return flask.jsonify(backend.metrics())

    return app
