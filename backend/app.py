"""The HTTP app: the ML backend protocol that Label Studio 1.23.2 speaks, on Flask 3.

Layer L3. The app only checks requests, calls an `MLBackend` and shapes the answers; the
model, jobs and Label Studio settings live behind that protocol (``model.py``).

Routes (every answer is JSON):

- ``GET /health`` -> ``{"status": "UP", "model_class"}``, plus the backend's health facts for a
  caller with credentials; never behind auth and never waiting behind predictions (Label Studio
  polls it with a 1 s timeout and sends the backend's credentials).
- ``POST /setup`` ``{project: "<id>.<created>", schema, extra_params, ...}`` -> ``{"model_version"}``.
- ``POST /predict`` ``{tasks: [...], project, params: {context}}`` -> ``{"results": [...]}``,
  exactly one entry per task, in order.
- ``GET /versions`` (Label Studio sends ``{"project": "<id>.<created>"}`` as a JSON body of the
  GET; ``?project=`` works too) -> ``{"versions": [...]}``.
- ``POST /webhook`` ``{action, ...}`` -> the backend's small status dict; the backend must answer
  fast (Label Studio waits 1 s) and leave real work to a job.
- ``GET /metrics`` -> the Prometheus text format (`backend.monitoring`): requests and latency per
  route, wafers predicted, picture errors, and whatever else is registered on ``registry``
  (the loop's state, `_wsgi.py`); ``GET /metrics.json`` -> the backend's JSON facts.

Requests are bounded (`RequestLimits`), first by what their head says, before a byte of the
body is read: credentials (401), then the route's body limit (413): ``max_body_bytes`` for
``/predict`` and ``/webhook`` (Label Studio sends every selected task in ONE ``/predict``, and
batches up to 5,000 tasks with their data into one TASKS_CREATED or ANNOTATIONS_CREATED
webhook), ``max_small_body_bytes`` (1 MiB) for every other route. A chunked body that passes
its limit is a 413 too, never cut and processed. Then memory: every body in flight and what
parsing it will take (`parse_cost`: its bytes plus a bound for each JSON value, counted from
its separators and brackets without parsing) come out of one `MemoryBudget`
(``memory_bytes``): a body that alone needs more is a 413, one that finds the budget taken by
others a 503 with ``Retry-After``. Then ``/predict``'s own gates: more than ``max_tasks`` tasks
is a 400; at most ``predict_requests`` ``/predict`` calls are inside the app at once (more get
503 at once, without waiting) and at most ``predict_slots`` of those compute at once. Every body
that is not a JSON object (invalid JSON, nesting too deep for the parser, NaN or infinite
numbers, a list) is a 400.

The head checks live in `RequestRules`, which `create_app` keeps in ``app.extensions`` so that
the server (``backend.http_worker``) applies them before it reads a body; the app applies them
again, so they hold under any WSGI server.

Bad requests get 400 ``{"error": ...}``; a failure inside the backend gets 500 ``{"error": ...}``
with the exception's type and message, never a traceback (that goes to the server log). With
``basic_auth`` every route but ``/health`` needs those credentials (401 with
``WWW-Authenticate: Basic`` otherwise); ``/webhook`` also takes its own token
(``Authorization: Bearer <webhook_token>``, `backend.webhook_auth`), which opens nothing else:
Label Studio shows webhook headers to every project member, so they must not hold the Basic
pair. ``/health`` without credentials answers only ``{"status", "model_class"}``; with them (or
when the backend has none) it adds the backend's facts. Without ``basic_auth`` the app logs a
warning that it is open, and with ``require_auth`` it refuses to be created. Request bodies and
headers are never logged: they carry Label Studio tokens and task-data passwords.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

import flask
from prometheus_client import CollectorRegistry
from werkzeug.datastructures import Authorization
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge, ServiceUnavailable

from backend.monitoring import CONTENT_TYPE, RequestMetrics, exposition
from backend.webhook_auth import carries_webhook_token

logger = logging.getLogger(__name__)

AUTH_REALM = "wafermap-labeling"
#: Seconds a busy backend tells the caller to wait before asking again (503 Retry-After).
RETRY_AFTER_SECONDS = 5
#: How long an admitted /predict waits for a compute slot; Label Studio gives up after 100 s.
SLOT_WAIT_SECONDS = 90.0
#: Routes whose bodies may be as large as ``max_body_bytes``; every other route takes
#: ``max_small_body_bytes``.
LARGE_BODY_ROUTES = frozenset({"/predict", "/webhook"})
#: Routes that need no credentials.
OPEN_ROUTES = frozenset({"/health"})
#: Where `create_app` keeps its `RequestRules` (``app.extensions``).
RULES_EXTENSION = "wafermap.request_rules"
#: Bytes of memory `parse_cost` counts for each JSON value, whatever it is (a dict, a list, a
#: number, a key): measured with tracemalloc on CPython 3.11, values cost 34-78 bytes each
#: (the 78 for dicts of distinct keys; tests/test_http_rules.py checks the bound).
BYTES_PER_JSON_VALUE = 80
#: ``\u`` escapes of characters that make a string 4 (a surrogate) or 2 bytes a character.
_ASTRAL_ESCAPE = re.compile(rb"\\u[dD][89abAB]")
_WIDE_ESCAPE = re.compile(rb"\\u(?!00)")


@dataclass(frozen=True)
class RequestLimits:
    """How much one request, and all requests together, may take.

    ``max_body_bytes`` (default 64 MiB) bounds ``/predict`` and ``/webhook``: Label Studio sends
    ONE ``/predict`` with every selected task, each task with its data (a wafer picture as a
    data URL makes a task about 4-5 KB of JSON), so 64 MiB holds about 15,000 such tasks, or
    ``max_tasks`` with local-file pictures; its webhooks carry up to 5,000 tasks with their
    data (WEBHOOK_BATCH_SIZE). ``max_small_body_bytes`` (1 MiB) bounds every other route.
    ``max_tasks`` (default 20,000): a whole set as `import-sets` cuts them. ``memory_bytes``
    (default 1 GiB): the `MemoryBudget` of all bodies in flight and their parsing together.
    """

    max_body_bytes: int = 64 * 2**20
    max_tasks: int = 20_000
    predict_requests: int = 20
    predict_slots: int = 2
    max_small_body_bytes: int = 2**20
    memory_bytes: int = 2**30

    def __post_init__(self) -> None:
        smallest = min(
            self.max_body_bytes,
            self.max_tasks,
            self.predict_requests,
            self.max_small_body_bytes,
            self.memory_bytes,
        )
        if smallest < 1:
            raise ValueError("request limits must be positive")
        if not 1 <= self.predict_slots <= self.predict_requests:
            raise ValueError("predict_slots must be within 1..predict_requests")

    def body_limit(self, path: str) -> int:
        """The largest body the route at `path` takes, in bytes."""
        if path in LARGE_BODY_ROUTES:
            return self.max_body_bytes
        return min(self.max_small_body_bytes, self.max_body_bytes)

    def too_large(self, path: str) -> str:
        """What a 413 for a body over `path`'s limit says."""
        if path in LARGE_BODY_ROUTES:
            return (
                f"the request body is larger than {_mib(self.max_body_bytes)} "
                "(WAFER_MAX_REQUEST_MB): send fewer tasks at once"
            )
        return (
            f"the request body is larger than {_mib(self.body_limit(path))}, the most {path} takes"
        )


def _mib(size: int) -> str:
    return f"{size // 2**20} MiB" if size >= 2**20 else f"{size} bytes"


class MemoryBudget:
    """Bytes that request bodies and their parsing may hold together (thread-safe).

    The server takes a body's length while it reads the body, the app what parsing it will
    take; both give it back when the request ends. Nobody waits: a request that does not fit
    is refused (413 when it could never fit, 503 when others hold the budget).
    """

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError("a memory budget must be positive")
        self.total = total
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._used

    def take(self, size: int) -> bool:
        """Take `size` bytes if they are free; whether they were."""
        with self._lock:
            if size < 0 or self._used + size > self.total:
                return False
            self._used += size
            return True

    def give(self, size: int) -> None:
        """Give back what `take` took."""
        with self._lock:
            self._used = max(0, self._used - size)


def parse_cost(data: bytes) -> int:
    """An upper bound of the memory ``json.loads(data)`` takes, found without parsing.

    Every JSON value but the first follows a ``,`` or a ``:``, or opens a container, so the
    separators and brackets bound how many values (and dicts) the parser can make, whatever
    strings they stand in; each is counted at `BYTES_PER_JSON_VALUE`. The text comes on top,
    twice: the decoded document and the strings parsed out of it, each at one byte per
    character for ASCII, and up to four when ``\\u`` escapes or raw UTF-8 make wider
    characters. A ``{}`` costs the parser ~24 times its 3 bytes; Label Studio's tasks, mostly
    a picture's base64, about twice theirs.
    """
    values = 1 + sum(data.count(mark) for mark in (b",", b":", b"{", b"["))
    if not data.isascii():
        text, strings = 4, 4
    elif _ASTRAL_ESCAPE.search(data):
        text, strings = 1, 4
    elif _WIDE_ESCAPE.search(data):
        text, strings = 1, 2
    else:
        text, strings = 1, 1
    return (text + strings) * len(data) + BYTES_PER_JSON_VALUE * values


@dataclass(frozen=True)
class Access:
    """Who may call which route: the Basic pair opens every route; the webhook token opens
    ``/webhook`` only; without a Basic pair every route is open (loopback only)."""

    basic_auth: tuple[str, str] | None = field(default=None, repr=False)
    webhook_token: str | None = field(default=None, repr=False)

    @property
    def is_open(self) -> bool:
        return self.basic_auth is None

    def has_basic(self, authorization: str | None) -> bool:
        """Whether the header holds the Basic pair (compared in constant time)."""
        if self.basic_auth is None or not authorization:
            return False
        auth = Authorization.from_header(authorization)
        if auth is None or auth.type != "basic":
            return False
        user, password = self.basic_auth
        user_ok = hmac.compare_digest((auth.username or "").encode(), user.encode())
        password_ok = hmac.compare_digest((auth.password or "").encode(), password.encode())
        return user_ok & password_ok

    def allows(self, path: str, authorization: str | None) -> bool:
        if self.is_open or path in OPEN_ROUTES or self.has_basic(authorization):
            return True
        return path == "/webhook" and carries_webhook_token(authorization, self.webhook_token)

    def sees_facts(self, authorization: str | None) -> bool:
        """Whether a caller may see the backend's facts on /health (project ids, versions)."""
        return self.is_open or self.has_basic(authorization)


@dataclass(frozen=True)
class RequestRules:
    """What may be decided about a request from its head, before its body is read: who may
    call the route, how large its body may be, and the memory budget bodies come out of."""

    limits: RequestLimits = field(default_factory=RequestLimits)
    access: Access = field(default_factory=Access)
    budget: MemoryBudget = field(default_factory=lambda: MemoryBudget(RequestLimits().memory_bytes))

    def body_limit(self, path: str) -> int:
        return self.limits.body_limit(path)

    def refusal(self, path: str, authorization: str | None) -> tuple[int, str] | None:
        """(status, message) when the request must be refused from its head alone."""
        if self.access.allows(path, authorization):
            return None
        return 401, "authentication required: wrong or missing credentials"


def request_rules(app: object) -> RequestRules | None:
    """The `RequestRules` of an app `create_app` made; None for any other WSGI app."""
    extensions = getattr(app, "extensions", None)
    found = extensions.get(RULES_EXTENSION) if isinstance(extensions, dict) else None
    return found if isinstance(found, RequestRules) else None


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


def _body_bytes() -> bytes:
    """The whole request body within the route's limit (``request.max_content_length``).

    Werkzeug answers a Content-Length over the limit with 413 before reading; a chunked body
    it cuts at the limit, so a body that still has bytes after the cut is a 413 here."""
    request = flask.request
    data = request.get_data(cache=False)
    limit = request.max_content_length
    cut = request.content_length is None and limit is not None and len(data) >= limit
    if cut and request.environ["wsgi.input"].read(1):
        raise RequestEntityTooLarge()
    return data


def _json_object(budget: MemoryBudget, *, required: bool = True) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying what is wrong with it.

    Parsing is admitted by the memory budget first (`parse_cost`; held until the request
    ends). Content-Type is not looked at (Label Studio sends JSON). With ``required=False``
    an empty body is an empty object.
    """
    data = _body_bytes()
    if not data.strip() and not required:
        return {}
    cost = len(data) + parse_cost(data)
    if cost > budget.total:
        _fail(
            413,
            f"the request body holds too many JSON values to parse: about {cost // 2**20} MiB "
            f"of memory, more than all requests may take together ({budget.total // 2**20} "
            "MiB, WAFER_REQUEST_MEMORY_MB): send fewer tasks at once",
        )
    if not budget.take(cost):
        raise ServiceUnavailable(
            "the backend is reading other large requests (WAFER_REQUEST_MEMORY_MB); ask again "
            f"in {RETRY_AFTER_SECONDS} s"
        )
    flask.g.setdefault("parse_reserved", []).append(cost)
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
    webhook_token: str | None = None,
    budget: MemoryBudget | None = None,
    registry: CollectorRegistry | None = None,
) -> flask.Flask:
    """The Flask app serving ``backend``; ``basic_auth`` is (user, password) or None for none.

    ``require_auth`` (WAFER_REQUIRE_AUTH, set in the Docker image) makes a missing
    ``basic_auth`` a ValueError instead of a logged warning. ``webhook_token``
    (`backend.webhook_auth.webhook_token`) opens ``/webhook`` when ``basic_auth`` is set.
    ``budget`` defaults to a `MemoryBudget` of ``limits.memory_bytes``. ``registry`` is
    where the request figures are counted and what ``/metrics`` exposes (a new one if None).
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
    if webhook_token is not None and not webhook_token:
        raise ValueError("webhook_token must be None or a non-empty string")
    limits = limits or RequestLimits()
    rules = RequestRules(
        limits=limits,
        access=Access(basic_auth=basic_auth, webhook_token=webhook_token),
        budget=budget or MemoryBudget(limits.memory_bytes),
    )
    gate = PredictGate(limits.predict_requests, limits.predict_slots)
    app = flask.Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = limits.max_body_bytes
    app.extensions[RULES_EXTENSION] = rules
    registry = registry if registry is not None else CollectorRegistry()
    traffic = RequestMetrics.on(registry)

    @app.before_request
    def start_clock() -> None:
        flask.g.started = time.perf_counter()

    @app.after_request
    def count_request(response: flask.Response) -> flask.Response:
        rule = flask.request.url_rule
        traffic.observe(
            rule.rule if rule is not None else "unknown",
            flask.request.method,
            response.status_code,
            time.perf_counter() - flask.g.get("started", time.perf_counter()),
        )
        return response

    @app.before_request
    def check_credentials() -> flask.Response | None:
        request = flask.request
        request.max_content_length = rules.body_limit(request.path)
        refused = rules.refusal(request.path, request.headers.get("Authorization"))
        if refused is None:
            return None
        status, message = refused
        response = flask.jsonify(error=message)
        response.status_code = status
        response.headers["WWW-Authenticate"] = f'Basic realm="{AUTH_REALM}"'
        return response

    @app.teardown_request
    def give_back_memory(_exc: BaseException | None) -> None:
        for cost in flask.g.pop("parse_reserved", []):
            rules.budget.give(cost)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> flask.Response:
        if exc.code == 413 and exc.description == RequestEntityTooLarge.description:
            # Werkzeug's own 413 (over the route's limit) says nothing of which limit.
            message = limits.too_large(flask.request.path)
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
        answer: dict[str, Any] = {"status": "UP", "model_class": type(backend).__name__}
        if rules.access.sees_facts(flask.request.headers.get("Authorization")):
            answer = {**answer, **backend.health()}
        return flask.jsonify(answer)

    @app.post("/setup")
    def setup() -> flask.Response:
        body = _json_object(rules.budget)
        schema = body.get("schema")
        if not isinstance(schema, str) or not schema.strip():
            _fail(400, "'schema' (the labeling config) must be a non-empty string")
        project = _project_value(body.get("project", "")) or ""
        version = backend.setup(project, schema, _extra_params(body.get("extra_params")))
        return flask.jsonify(model_version=version)

    @app.post("/predict")
    def predict() -> flask.Response:
        with gate.admitted():
            body = _json_object(rules.budget)
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
            traffic.predicted(len(results), sum(1 for r in results if "error" in r))
            return flask.jsonify(results=results)

    @app.get("/versions")
    def versions() -> flask.Response:
        body = _json_object(rules.budget, required=False)
        project = _project_value(body.get("project", flask.request.args.get("project")))
        return flask.jsonify(versions=backend.versions(project))

    @app.post("/webhook")
    def webhook() -> flask.Response:
        body = _json_object(rules.budget)
        action = body.get("action")
        if not isinstance(action, str) or not action:
            _fail(400, "a webhook payload needs an 'action' string (e.g. ANNOTATION_CREATED)")
        named = flask.request.args.get("project")
        if named is not None and "project" not in body:
            # The bulk events' webhook sends no payload: its URL names the project.
            body = {**body, "project": named}
        return flask.jsonify(backend.webhook(body))

    @app.get("/metrics")
    def metrics() -> flask.Response:
        return flask.Response(exposition(registry), content_type=CONTENT_TYPE)

    @app.get("/metrics.json")
    def metrics_json() -> flask.Response:
        return flask.jsonify(backend.metrics())

    return app
