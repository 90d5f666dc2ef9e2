"""The HTTP app: the ML backend protocol that Label Studio 1.23.2 speaks, on Flask 3.

Layer L3. The app only checks requests, calls an `MLBackend` and shapes the answers; the
model, jobs and Label Studio settings live behind that protocol (``model.py``).

Routes (every answer is JSON):

- ``GET /health`` -> ``{"status": "UP", "model_class", ...the backend's health facts}``, never
  behind auth and never waiting behind predictions (Label Studio polls it with a 1 s timeout).
- ``POST /setup`` ``{project: "<id>.<created>", schema, extra_params, ...}`` -> ``{"model_version"}``.
- ``POST /predict`` ``{tasks: [...], project, params: {context}}`` -> ``{"results": [...]}``,
  exactly one entry per task, in order.
- ``GET /versions`` (Label Studio sends ``{"project": "<id>.<created>"}`` as a JSON body of the
  GET; ``?project=`` works too) -> ``{"versions": [...]}``.
- ``POST /webhook`` ``{action, ...}`` -> the backend's small status dict; the backend must answer
  fast (Label Studio waits 1 s) and leave real work to a job.
- ``GET /metrics`` -> the backend's metrics.

Requests are bounded (`RequestLimits`): a body larger than ``max_body_bytes`` is refused with
413 before it is read when its Content-Length says so (and while reading otherwise); a
``/predict`` with more than ``max_tasks`` tasks gets 400; at most ``predict_requests``
``/predict`` calls are inside the app at once (more get 503 with ``Retry-After`` at once, without
waiting) and at most ``predict_slots`` of those compute at once. Run the app with more server
threads than ``predict_requests`` (gunicorn.conf.py does): the spare threads serve ``/health``
and webhooks however many predictions are queued. Every body that is not a JSON object
(invalid JSON, nesting too deep for the parser, NaN or infinite numbers, a list) is a 400.

Bad requests get 400 ``{"error": ...}``; a failure inside the backend gets 500 ``{"error": ...}``
with the exception's type and message, never a traceback (that goes to the server log). With
``basic_auth`` every route but ``/health`` needs those credentials (401 with
``WWW-Authenticate: Basic`` otherwise). Without it the app logs a warning that it is open, and
with ``require_auth`` it refuses to be created. Note that the webhook Label Studio registers on
its own when a backend is connected sends NO credentials; register the webhook with an
``Authorization`` header instead when auth is on. Request bodies and headers are never logged:
they carry Label Studio tokens and task-data passwords.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import flask
from werkzeug.exceptions import HTTPException, ServiceUnavailable

logger = logging.getLogger(__name__)

AUTH_REALM = "wafermap-labeling"
#: Seconds a busy backend tells the caller to wait before asking again (503 Retry-After).
RETRY_AFTER_SECONDS = 5
#: How long an admitted /predict waits for a compute slot; Label Studio gives up after 100 s.
SLOT_WAIT_SECONDS = 90.0


@dataclass(frozen=True)
class RequestLimits:
    """How much one request, and all /predict requests together, may take.

    ``max_body_bytes`` (default 64 MiB): Label Studio sends ONE ``/predict`` with every selected
    task, each task with its data (a wafer picture as a data URL makes a task about 4-5 KB of
    JSON), so 64 MiB holds about 15,000 such tasks, or ``max_tasks`` with local-file pictures.
    ``max_tasks`` (default 20,000): a whole set as `import-sets` cuts them.
    """

    max_body_bytes: int = 64 * 2**20
    max_tasks: int = 20_000
    predict_requests: int = 20
    predict_slots: int = 2

    def __post_init__(self) -> None:
        if min(self.max_body_bytes, self.max_tasks, self.predict_requests) < 1:
            raise ValueError("request limits must be positive")
        if not 1 <= self.predict_slots <= self.predict_requests:
            raise ValueError("predict_slots must be within 1..predict_requests")


class MLBackend(Protocol):
    """What the app calls; ``model.py`` implements it.

    ``project`` is what Label Studio sends: ``"<id>.<created timestamp>"`` (or a bare id), or
    None when the request names none; the backend parses it and raises
    `werkzeug.exceptions.BadRequest` when it cannot.
    """

    def health(self) -> dict[str, Any]:
        """Facts for /health (served versions, problems); cheap, no network, never raises."""
        ...

    def setup(self, project: str, schema: str, extra: Mapping[str, Any]) -> str:
        """Take note of the project and its labeling config; return the model version."""
        ...

    def predict(
        self,
        tasks: list[dict[str, Any]],
        context: Mapping[str, Any] | None,
        project: str | None,
    ) -> list[dict[str, Any]]:
        """One Label Studio prediction entry per task, in order."""
        ...

    def versions(self, project: str | None) -> list[str]:
        """The project's model versions; the one /setup reports among them."""
        ...

    def webhook(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """React to a Label Studio event FAST (enqueue, never train here); a small status dict."""
        ...

    def metrics(self) -> dict[str, Any]:
        """JSON-serialisable facts about the models and the labeling so far."""
        ...


def _fail(status: int, message: str) -> NoReturn:
    flask.abort(status, description=message)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is too large")
    return value


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(data: bytes) -> Any:
    """Standard JSON only: every failure (bad syntax or encoding, nesting deeper than the
    parser's recursion limit, NaN/Infinity, numbers too large) is a ValueError."""
    try:
        return json.loads(data, parse_float=_finite_float, parse_constant=_no_constants)
    except RecursionError:
        raise ValueError("it is nested too deeply") from None


def _json_object(*, required: bool = True) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying what is wrong with it.

    Content-Type is not looked at (Label Studio sends JSON). With ``required=False`` an empty
    body is an empty object.
    """
    data = flask.request.get_data(cache=False)  # 413 past MAX_CONTENT_LENGTH
    if not data.strip() and not required:
        return {}
    try:
        body = parse_json(data)
    except ValueError as exc:
        _fail(400, f"the request body must be a JSON object; it is not JSON: {exc}"[:300])
    if not isinstance(body, dict):
        _fail(400, "the request body must be a JSON object")
    return body


def _project_value(value: Any) -> str | None:
    """Label Studio's ``project`` ("<id>.<created>" or an id) as text; a 400 for other types."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        _fail(400, "'project' must be a string or an integer")
    return str(value)


def _is_id(value: Any) -> bool:
    return isinstance(value, int | str) and not isinstance(value, bool)


def _extra_params(value: Any) -> dict[str, Any]:
    """``extra_params`` of /setup: Label Studio stores it as free JSON, null or text."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        try:
            value = parse_json(value.encode())
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


class PredictGate:
    """At most ``requests`` /predict calls inside the app, ``slots`` of them computing.

    A call over ``requests`` is refused at once (it must not hold a server thread waiting);
    an admitted one waits for a compute slot up to ``wait_seconds``.
    """

    def __init__(self, requests: int, slots: int, wait_seconds: float = SLOT_WAIT_SECONDS):
        self._admitted = threading.BoundedSemaphore(requests)
        self._slots = threading.BoundedSemaphore(slots)
        self._wait = wait_seconds
        self.requests = requests

    @contextmanager
    def admitted(self) -> Iterator[None]:
        if not self._admitted.acquire(blocking=False):
            raise ServiceUnavailable(
                f"the backend is busy: {self.requests} /predict requests are running or waiting "
                f"(WAFER_PREDICT_REQUESTS); ask again in {RETRY_AFTER_SECONDS} s"
            )
        try:
            yield
        finally:
            self._admitted.release()

    @contextmanager
    def computing(self) -> Iterator[None]:
        if not self._slots.acquire(timeout=self._wait):
            raise ServiceUnavailable(
                f"no compute slot became free within {self._wait:.0f} s; ask again later"
            )
        try:
            yield
        finally:
            self._slots.release()


def create_app(
    backend: MLBackend,
    *,
    basic_auth: tuple[str, str] | None,
    limits: RequestLimits | None = None,
    require_auth: bool = False,
) -> flask.Flask:
    """The Flask app serving ``backend``; ``basic_auth`` is (user, password) or None for none.

    ``require_auth`` (WAFER_REQUIRE_AUTH, set in the Docker image) makes a missing
    ``basic_auth`` a ValueError instead of a logged warning.
    """
    if basic_auth is not None and (
        len(basic_auth) != 2 or not all(isinstance(s, str) and s for s in basic_auth)
    ):
        raise ValueError("basic_auth must be a (user, password) pair of non-empty strings")
    if basic_auth is None:
        if require_auth:
            raise ValueError(
                "WAFER_REQUIRE_AUTH is true but no credentials are set: set BASIC_AUTH_USER and "
                "BASIC_AUTH_PASS (and give Label Studio the same pair when connecting the backend)"
            )
        logger.warning(
            "NO AUTHENTICATION: BASIC_AUTH_USER/BASIC_AUTH_PASS are not set, so every route "
            "(predictions, webhooks that queue training) is open to anyone who reaches this "
            "port; serve it on 127.0.0.1 only, or set the credentials"
        )
    limits = limits or RequestLimits()
    gate = PredictGate(limits.predict_requests, limits.predict_slots)
    app = flask.Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = limits.max_body_bytes

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
    def http_error(exc: HTTPException) -> flask.Response:
        if exc.code == 413:
            message = (
                f"the request body is larger than {limits.max_body_bytes // 2**20} MiB "
                "(WAFER_MAX_REQUEST_MB): send fewer tasks at once"
            )
        else:
            message = exc.description or exc.name
        response = flask.jsonify(error=message)
        response.status_code = exc.code or 500
        if exc.code == 503:
            response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response

    @app.errorhandler(Exception)
    def backend_error(exc: Exception) -> tuple[flask.Response, int]:
        logger.exception("%s %s failed", flask.request.method, flask.request.path)
        where = flask.request.path.strip("/") or "request"
        return flask.jsonify(error=f"{where} failed: {type(exc).__name__}: {exc}"), 500

    @app.get("/health")
    def health() -> flask.Response:
        return flask.jsonify(status="UP", model_class=type(backend).__name__, **backend.health())

    @app.post("/setup")
    def setup() -> flask.Response:
        body = _json_object()
        schema = body.get("schema")
        if not isinstance(schema, str) or not schema.strip():
            _fail(400, "'schema' (the labeling config) must be a non-empty string")
        project = _project_value(body.get("project", "")) or ""
        version = backend.setup(project, schema, _extra_params(body.get("extra_params")))
        return flask.jsonify(model_version=version)

    @app.post("/predict")
    def predict() -> flask.Response:
        with gate.admitted():
            body = _json_object()
            tasks = body.get("tasks")
            if not isinstance(tasks, list):
                _fail(400, "'tasks' must be a list of task objects")
            if len(tasks) > limits.max_tasks:
                _fail(
                    400,
                    f"too many tasks in one /predict: {len(tasks)}, the limit is "
                    f"{limits.max_tasks} (WAFER_MAX_TASKS): select fewer tasks",
                )
            if not all(isinstance(task, dict) for task in tasks):
                _fail(400, "every entry of 'tasks' must be a JSON object")
            params = body.get("params")
            if params is not None and not isinstance(params, dict):
                _fail(400, "'params' must be a JSON object")
            context = (params or {}).get("context", body.get("context"))
            if context is not None and not isinstance(context, dict):
                _fail(400, "'context' must be a JSON object")
            project = _project_value(body.get("project"))
            if project is None:
                # Older callers put the project only in the tasks.
                ids = {task.get("project") for task in tasks if _is_id(task.get("project"))}
                project = str(ids.pop()) if len(ids) == 1 else None
            with gate.computing():
                results = backend.predict(tasks, context, project)
            if not isinstance(results, list) or len(results) != len(tasks):
                count = len(results) if isinstance(results, list) else type(results).__name__
                raise RuntimeError(f"the backend returned {count} results for {len(tasks)} tasks")
            return flask.jsonify(results=results)

    @app.get("/versions")
    def versions() -> flask.Response:
        body = _json_object(required=False)
        project = _project_value(body.get("project", flask.request.args.get("project")))
        return flask.jsonify(versions=backend.versions(project))

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
