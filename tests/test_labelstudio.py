"""backend.labelstudio: the tests marked e2e run against a real Label Studio 1.23.2 server
(started once per session); the others fake the transport with `httpx.MockTransport`.

Set LABEL_STUDIO_TEST_DATA_DIR to keep the server's database between runs: the first start runs
the migrations (about 45 s on 2 cores), later starts take about 7 s.
"""

from __future__ import annotations

import base64
import io
import json
import secrets
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from PIL import Image

from backend.harness.stack import (
    LabelStudioServer,
    create_user,
    free_port,
)
from backend.label_config import DEFAULT_LABEL_CONFIG, LabelConfig, parse_label_config
from backend.labelstudio import (
    BULK_WEBHOOK_ACTIONS,
    WEBHOOK_ACTIONS,
    FilterOperator,
    LabelStudioClient,
    LabelStudioError,
    TaskFilter,
)
from backend.projects import bulk_webhook_url

#: The top-level keys of the ANNOTATION_CREATED payload (send_payload=True), measured.
ANNOTATION_CREATED_KEYS = {"action", "annotation", "project", "task"}
#: Keys of its `annotation` object, measured on 1.23.2.
ANNOTATION_KEYS = {
    "id",
    "result",
    "was_cancelled",
    "ground_truth",
    "created_at",
    "updated_at",
    "draft_created_at",
    "lead_time",
    "prediction",
    "result_count",
    "unique_id",
    "import_id",
    "last_action",
    "bulk_created",
    "task",
    "project",
    "completed_by",
    "updated_by",
    "parent_prediction",
    "parent_annotation",
    "last_created_by",
}
TASKS_CREATED_KEYS = {"action", "project", "tasks"}


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def label_config_xml() -> str:
    return DEFAULT_LABEL_CONFIG.read_text()


def wafer_png(seed: int) -> str:
    """A tiny wafer-like picture as a data URI."""
    image = Image.new("RGB", (8, 8), (40, 40, 40))
    for i in range(8):
        image.putpixel((i, (i + seed) % 8), (200, 60, 60))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


#: The wafer set of each of the five tasks every test project gets.
TASK_SETS = (1, 1, 2, 2, 2)


def task_data(lot: str) -> list[dict[str, Any]]:
    return [
        {
            "image": wafer_png(i),
            "set": set_number,
            "wafer_id": f"{lot}-{i + 1:02d}",
            "lot": lot,
            "wafer_index": i + 1,
        }
        for i, set_number in enumerate(TASK_SETS)
    ]


@dataclass(frozen=True)
class Project:
    id: int
    title: str
    task_ids: list[int]
    data: list[dict[str, Any]]

    def ids_of_set(self, set_number: int) -> list[int]:
        return [t for t, d in zip(self.task_ids, self.data, strict=True) if d["set"] == set_number]


@pytest.fixture
def project(ls: LabelStudioClient, label_config_xml: str) -> Project:
    """A fresh project (titles are unique: the data dir may be reused) with five tasks."""
    title = f"wafers {uuid.uuid4().hex[:10]}"
    pid = ls.create_project(title, label_config_xml, description="test project")
    data = task_data(lot=f"LOT{pid}")
    return Project(pid, title, ls.import_tasks(pid, data), data)


def choice(config: LabelConfig, failure_type: str) -> list[dict[str, Any]]:
    return [
        {
            "from_name": config.from_name,
            "to_name": config.to_name,
            "type": "choices",
            "value": {"choices": [failure_type]},
        }
    ]


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class Receiver:
    """A loopback HTTP server that records what it is sent and answers like an ML backend."""

    url: str
    received: list[Received] = field(default_factory=list)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    def wait_for(self, path: str, action: str | None = None, timeout: float = 10.0) -> Received:
        def match() -> Received | None:
            for item in self.received:
                if item.path == path and (
                    action is None
                    or (isinstance(item.body, dict) and item.body.get("action") == action)
                ):
                    return item
            return None

        with self.arrived:
            if not self.arrived.wait_for(lambda: match() is not None, timeout=timeout):
                seen = [
                    (r.path, r.body.get("action") if isinstance(r.body, dict) else None)
                    for r in self.received
                ]
                pytest.fail(f"nothing for {path} {action or ''} within {timeout} s; got {seen}")
            found = match()
            assert found is not None
            return found


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    state = Receiver(url=f"http://127.0.0.1:{server.server_address[1]}")

    class Handler(BaseHTTPRequestHandler):
        def _record(self, body: Any) -> None:
            with state.arrived:
                state.received.append(Received(self.path, dict(self.headers), body))
                state.arrived.notify_all()
            answer = {"status": "UP", "model_class": "Fake"}
            if self.path == "/setup":
                answer = {"model_version": "fake-v0"}
            payload = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            self._record(None)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            self._record(json.loads(self.rfile.read(length) or b"null"))

        def log_message(self, format: str, *args: Any) -> None:
            return

    server.RequestHandlerClass = Handler
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# ---- without a server: the transport is faked -------------------------------------------------


@dataclass
class FakeLabelStudio:
    """Canned answers by (method, path); records every request it is sent."""

    answers: dict[tuple[str, str], httpx.Response | Callable[[httpx.Request], httpx.Response]]
    sent: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        answer = self.answers.get((request.method, request.url.path))
        if callable(answer):
            return answer(request)
        return answer if answer is not None else httpx.Response(404, json={"detail": "Not found."})

    def client(self) -> LabelStudioClient:
        http = httpx.Client(transport=httpx.MockTransport(self))
        return LabelStudioClient("http://ls.test", "secret-key-0123456789", http_client=http)

    def json_sent(self, method: str, path: str) -> Any:
        [request] = [r for r in self.sent if (r.method, r.url.path) == (method, path)]
        return json.loads(request.content)


def test_rejected_key_is_named_without_leaking_key_or_cookie() -> None:
    fake = FakeLabelStudio(
        {
            ("GET", "/health"): httpx.Response(200, json={"status": "UP"}),
            ("GET", "/api/current-user/whoami"): httpx.Response(
                401,
                json={"detail": "Invalid token."},
                headers={"set-cookie": "sessionid=abc123; Path=/"},
            ),
        }
    )
    with pytest.raises(LabelStudioError, match="rejected the API key") as rejected:
        fake.client().check()
    assert rejected.value.status_code == 401
    assert "Invalid token." in str(rejected.value)
    assert "secret-key" not in str(rejected.value) and "abc123" not in str(rejected.value)
    assert rejected.value.__cause__ is None and rejected.value.__suppress_context__


def test_a_server_that_is_not_label_studio_is_named() -> None:
    fake = FakeLabelStudio({})
    with pytest.raises(LabelStudioError, match=r"/health answered HTTP 404"):
        fake.client().check()


def test_update_task_data_sends_the_merged_data() -> None:
    fake = FakeLabelStudio(
        {
            ("GET", "/api/tasks/7/"): httpx.Response(
                200, json={"id": 7, "data": {"set": 1, "lot": "A"}}
            ),
            ("PATCH", "/api/tasks/7/"): httpx.Response(
                200, json={"id": 7, "data": {"set": 1, "lot": "A", "entropy": 0.2}}
            ),
        }
    )
    merged = fake.client().update_task_data(7, {"entropy": 0.2})
    assert fake.json_sent("PATCH", "/api/tasks/7/")["data"] == {
        "set": 1,
        "lot": "A",
        "entropy": 0.2,
    }
    assert merged == {"set": 1, "lot": "A", "entropy": 0.2}


def test_view_is_sent_with_data_manager_names() -> None:
    fake = FakeLabelStudio(
        {
            ("GET", "/api/dm/views/"): httpx.Response(200, json=[]),
            ("POST", "/api/dm/views/"): httpx.Response(
                201, json={"id": 3, "project": 1, "data": {}}
            ),
        }
    )
    view_id = fake.client().create_view(
        1,
        "Engineer queue",
        [TaskFilter("data.route", FilterOperator.EQUAL, "String", "engineer")],
        ["-data.entropy"],
        hidden_columns=["tasks:data.image"],
    )
    assert view_id == 3
    sent = fake.json_sent("POST", "/api/dm/views/")
    assert sent["project"] == 1
    assert sent["data"] == {
        "title": "Engineer queue",
        "filters": {
            "conjunction": "and",
            "items": [
                {
                    "filter": "filter:tasks:data.route",
                    "operator": "equal",
                    "type": "String",
                    "value": "engineer",
                }
            ],
        },
        "ordering": ["-tasks:data.entropy"],
        "hiddenColumns": {"explore": ["tasks:data.image"], "labeling": ["tasks:data.image"]},
    }


def test_tasks_of_set_asks_for_the_set_and_the_unlabelled() -> None:
    task = {
        "id": 4,
        "data": {"set": 2},
        "annotations": [{"id": 1, "completed_by": {"id": 9, "email": "e@x"}}],
    }

    def pages(request: httpx.Request) -> httpx.Response:
        # Like Label Studio: the page after the last one is a 404, which ends the listing.
        if request.url.params.get("page", "1") == "1":
            return httpx.Response(200, json={"total": 1, "tasks": [task]})
        return httpx.Response(404, json={"detail": "Invalid page."})

    fake = FakeLabelStudio({("GET", "/api/tasks/"): pages})
    [found] = fake.client().tasks_of_set(5, 2, only_unlabelled=True)
    assert found["annotations"][0]["completed_by"] == 9
    request = fake.sent[0]
    assert request.url.params["project"] == "5" and request.url.params["fields"] == "all"
    query = json.loads(request.url.params["query"])
    assert query["ordering"] == ["tasks:id"]
    assert query["filters"]["items"] == [
        {"filter": "filter:tasks:data.set", "operator": "equal", "type": "Number", "value": 2},
        {
            "filter": "filter:tasks:total_annotations",
            "operator": "equal",
            "type": "Number",
            "value": 0,
        },
    ]


def test_bad_arguments_are_refused_before_any_request() -> None:
    with pytest.raises(ValueError, match="http"):
        LabelStudioClient("ls.test:8080", "key")
    with pytest.raises(ValueError, match="empty"):
        LabelStudioClient("http://ls.test", "")
    fake = FakeLabelStudio({})
    with pytest.raises(ValueError, match="chunk_size"):
        fake.client().import_tasks(1, [{"set": 1}], chunk_size=0)
    with pytest.raises(ValueError, match="conjunction"):
        fake.client().create_view(1, "x", conjunction="xor")
    assert fake.sent == []


# ---- connection ------------------------------------------------------------------------------


@pytest.mark.e2e
def test_connect_says_whether_the_server_or_the_key_failed(label_studio: LabelStudioServer) -> None:
    with pytest.raises(LabelStudioError, match="rejected the API key") as rejected:
        LabelStudioClient.connect(label_studio.url, "0" * 40)
    assert rejected.value.status_code == 401
    assert "0" * 40 not in str(rejected.value)
    with pytest.raises(LabelStudioError, match="cannot reach Label Studio"):
        LabelStudioClient.connect(f"http://127.0.0.1:{free_port()}", label_studio.api_key)


@pytest.mark.e2e
def test_errors_carry_label_studios_reason(ls: LabelStudioClient, label_config_xml: str) -> None:
    with pytest.raises(LabelStudioError, match="at least 3 characters") as short:
        ls.create_project("ab", label_config_xml)
    assert short.value.status_code == 400
    assert "sessionid" not in str(short.value)


# ---- projects and tasks ----------------------------------------------------------------------


@pytest.mark.e2e
def test_project_is_found_by_title_and_keeps_the_label_config(
    ls: LabelStudioClient, project: Project, label_config: LabelConfig
) -> None:
    assert ls.find_project(project.title) == project.id
    assert ls.find_project(project.title + " (none)") is None
    assert parse_label_config(ls.project_label_config(project.id)) == label_config


@pytest.mark.e2e
def test_import_returns_task_ids_in_order(ls: LabelStudioClient, project: Project) -> None:
    assert len(project.task_ids) == len(TASK_SETS)
    for task_id, data in zip(project.task_ids, project.data, strict=True):
        assert ls.task(task_id)["data"] == data


@pytest.mark.e2e
def test_import_in_chunks(ls: LabelStudioClient, project: Project) -> None:
    more = task_data(lot="CHUNKED")
    ids = ls.import_tasks(project.id, more, chunk_size=2)
    assert len(ids) == len(more) and ids == sorted(ids)
    assert [ls.task(i)["data"]["wafer_id"] for i in ids] == [d["wafer_id"] for d in more]


@pytest.mark.e2e
def test_tasks_of_set_returns_exactly_that_set(ls: LabelStudioClient, project: Project) -> None:
    for set_number in (1, 2):
        tasks = ls.tasks_of_set(project.id, set_number)
        assert [t["id"] for t in tasks] == project.ids_of_set(set_number)
        assert all(t["data"]["set"] == set_number for t in tasks)
        assert all(t["data"]["image"].startswith("data:image/png;base64,") for t in tasks)
        assert all(t["total_annotations"] == 0 and t["predictions"] == [] for t in tasks)
    assert ls.tasks_of_set(project.id, 3) == []


@pytest.mark.e2e
def test_update_task_data_adds_fields_and_keeps_the_others(
    ls: LabelStudioClient, project: Project
) -> None:
    task_id, original = project.task_ids[0], project.data[0]
    merged = ls.update_task_data(task_id, {"entropy": 0.2, "route": "engineer"})
    assert merged == {**original, "entropy": 0.2, "route": "engineer"}
    assert ls.task(task_id)["data"] == merged
    assert ls.update_task_data(task_id, {"route": "auto"})["entropy"] == 0.2


# ---- predictions and annotations -------------------------------------------------------------


@pytest.mark.e2e
def test_predictions_are_stored_and_one_is_accepted(
    ls: LabelStudioClient, project: Project, label_config: LabelConfig
) -> None:
    set_two = project.ids_of_set(2)
    items = [
        {
            "task": task_id,
            "result": choice(label_config, "Donut"),
            "score": 0.5 + 0.1 * i,
            "model_version": "wafer-v1",
        }
        for i, task_id in enumerate(set_two)
    ]
    assert ls.create_predictions(project.id, items, chunk_size=2) == len(items)

    tasks = ls.tasks_of_set(project.id, 2)
    for item, task in zip(items, tasks, strict=True):
        [prediction] = task["predictions"]
        assert prediction["model_version"] == "wafer-v1"
        assert prediction["score"] == pytest.approx(item["score"])
        assert prediction["result"][0]["value"] == {"choices": ["Donut"]}
    assert ls.tasks_of_set(project.id, 1)[0]["predictions"] == []

    first = tasks[0]
    prediction_id = first["predictions"][0]["id"]
    annotation_id = ls.accept_prediction(
        first["id"], project.id, first["predictions"][0]["result"], prediction_id
    )
    accepted = ls.task(first["id"])
    assert accepted["total_annotations"] == 1 and accepted["is_labeled"]
    [annotation] = accepted["annotations"]
    assert annotation["id"] == annotation_id
    assert annotation["parent_prediction"] == prediction_id
    assert annotation["completed_by"] == ls.current_user_id()
    assert annotation["result"][0]["value"] == {"choices": ["Donut"]}

    unlabelled = ls.tasks_of_set(project.id, 2, only_unlabelled=True)
    assert [t["id"] for t in unlabelled] == set_two[1:]


@pytest.mark.e2e
def test_foreign_task_ids_are_refused(ls: LabelStudioClient, project: Project) -> None:
    with pytest.raises(LabelStudioError, match="HTTP 400"):
        ls.create_predictions(project.id, [{"task": 10**9, "result": [], "model_version": "x"}])


@pytest.mark.e2e
def test_set_model_version_needs_predictions_of_that_version(
    ls: LabelStudioClient, project: Project, label_config: LabelConfig
) -> None:
    assert ls.project_model_version(project.id) == ""
    with pytest.raises(LabelStudioError, match="doesn't exist") as refused:
        ls.set_model_version(project.id, "wafer-v2")
    assert refused.value.status_code == 400
    item = {
        "task": project.task_ids[0],
        "result": choice(label_config, "Center"),
        "score": 0.9,
        "model_version": "wafer-v2",
    }
    ls.create_predictions(project.id, [item])
    ls.set_model_version(project.id, "wafer-v2")
    assert ls.project_model_version(project.id) == "wafer-v2"
    ls.set_model_version(project.id, "")
    assert ls.project_model_version(project.id) == ""


# ---- Data Manager views ----------------------------------------------------------------------


@pytest.mark.e2e
def test_view_filters_and_orders_on_the_server(ls: LabelStudioClient, project: Project) -> None:
    set_two = project.ids_of_set(2)
    entropies = dict(zip(set_two, (0.3, 0.9, 0.6), strict=True))
    for task_id, entropy in entropies.items():
        ls.update_task_data(task_id, {"entropy": entropy})

    view_id = ls.create_view(
        project.id,
        "Set 2: most uncertain first",
        [TaskFilter("data.set", FilterOperator.EQUAL, "Number", 2)],
        ["-data.entropy"],
        hidden_columns=["data.image"],
    )
    view = ls.view(view_id)
    assert view["title"] == "Set 2: most uncertain first"
    assert view["ordering"] == ["-tasks:data.entropy"]
    assert view["filters"] == {
        "conjunction": "and",
        "items": [
            {"filter": "filter:tasks:data.set", "operator": "equal", "type": "Number", "value": 2}
        ],
    }
    assert view["hiddenColumns"]["explore"] == ["tasks:data.image"]

    by_entropy = sorted(entropies, key=lambda t: -entropies[t])
    assert [t["id"] for t in ls.tasks(project.id, view=view_id)] == by_entropy

    # Same title: the tab is updated, not duplicated.
    again = ls.create_view(
        project.id,
        "Set 2: most uncertain first",
        [TaskFilter("data.entropy", FilterOperator.GREATER, "Number", 0.5)],
        ["data.entropy"],
    )
    assert again == view_id
    assert [t["id"] for t in ls.tasks(project.id, view=view_id)] == sorted(
        (t for t in entropies if entropies[t] > 0.5), key=lambda t: entropies[t]
    )


# ---- webhooks and the ML backend -------------------------------------------------------------


@pytest.mark.e2e
def test_webhook_is_stored_with_its_header_and_not_duplicated(
    ls: LabelStudioClient, project: Project
) -> None:
    url = "http://127.0.0.1:9/webhook"
    webhook_id = ls.register_webhook(project.id, url, {"Authorization": "Bearer hook-secret"})
    [stored] = [w for w in ls.webhooks(project.id) if w["url"] == url]
    assert stored["id"] == webhook_id
    assert stored["headers"] == {"Authorization": "Bearer hook-secret"}
    assert stored["send_payload"] and not stored["send_for_all_actions"]
    assert set(stored["actions"]) == set(WEBHOOK_ACTIONS)

    assert ls.register_webhook(project.id, url, {"Authorization": "Bearer rotated"}) == webhook_id
    [stored] = [w for w in ls.webhooks(project.id) if w["url"] == url]
    assert stored["headers"] == {"Authorization": "Bearer rotated"}


@pytest.mark.e2e
def test_start_training_is_not_a_webhook_action(ls: LabelStudioClient, project: Project) -> None:
    with pytest.raises(LabelStudioError, match="START_TRAINING"):
        ls.register_webhook(project.id, "http://127.0.0.1:9/x", {}, actions=["START_TRAINING"])


@pytest.mark.e2e
def test_webhook_payloads(
    ls: LabelStudioClient, project: Project, receiver: Receiver, label_config: LabelConfig
) -> None:
    actions = ["TASKS_CREATED", *WEBHOOK_ACTIONS]
    ls.register_webhook(
        project.id, receiver.url + "/webhook", {"Authorization": "Bearer hook"}, actions
    )

    ls.import_tasks(project.id, task_data(lot="HOOKED")[:2])
    created = receiver.wait_for("/webhook", "TASKS_CREATED")
    assert set(created.body) == TASKS_CREATED_KEYS
    assert [t["data"]["lot"] for t in created.body["tasks"]] == ["HOOKED", "HOOKED"]
    assert created.headers["Authorization"] == "Bearer hook"

    task_id = project.task_ids[0]
    annotation_id = ls.accept_prediction(task_id, project.id, choice(label_config, "Scratch"), None)
    event = receiver.wait_for("/webhook", "ANNOTATION_CREATED")
    body = event.body
    assert set(body) == ANNOTATION_CREATED_KEYS
    assert set(body["annotation"]) == ANNOTATION_KEYS
    assert body["annotation"]["id"] == annotation_id
    assert body["annotation"]["task"] == task_id
    assert body["annotation"]["completed_by"] == ls.current_user_id()
    assert body["annotation"]["parent_prediction"] is None
    assert body["annotation"]["result"] == choice(label_config, "Scratch")
    assert body["task"]["id"] == task_id and body["task"]["data"] == project.data[0]
    assert body["project"]["id"] == project.id
    assert "label_config" in body["project"] and "model_version" in body["project"]
    assert event.headers["Authorization"] == "Bearer hook"


@pytest.mark.e2e
def test_bulk_events_come_without_payload_to_the_url_that_names_the_project(
    ls: LabelStudioClient, project: Project, receiver: Receiver, label_config: LabelConfig
) -> None:
    url = bulk_webhook_url(receiver.url, project.id)
    ls.register_webhook(
        project.id, url, {"Authorization": "Bearer hook"}, BULK_WEBHOOK_ACTIONS, send_payload=False
    )
    [stored] = [w for w in ls.webhooks(project.id) if w["url"] == url]
    assert not stored["send_payload"] and set(stored["actions"]) == set(BULK_WEBHOOK_ACTIONS)
    path = f"/webhook?project={project.id}"

    ls.import_tasks(project.id, task_data(lot="BULK")[:2])
    created = receiver.wait_for(path, "TASKS_CREATED")
    assert created.body == {"action": "TASKS_CREATED"}
    assert created.headers["Authorization"] == "Bearer hook"
    tasks = project.task_ids[:3]
    ls.create_predictions(
        project.id,
        [
            {"task": t, "result": choice(label_config, "Donut"), "model_version": "v1"}
            for t in tasks
        ],
    )
    ls.accept_predictions(project.id, tasks, "v1")
    accepted = receiver.wait_for(path, "ANNOTATIONS_CREATED")
    assert accepted.body == {"action": "ANNOTATIONS_CREATED"}


@pytest.mark.e2e
def test_connect_ml_backend(ls: LabelStudioClient, project: Project, receiver: Receiver) -> None:
    backend_id = ls.connect_ml_backend(project.id, receiver.url, "wafer-resnet", ("ls", "pw"))
    health = receiver.wait_for("/health")
    setup = receiver.wait_for("/setup")
    basic = "Basic " + base64.b64encode(b"ls:pw").decode()
    assert health.headers["Authorization"] == setup.headers["Authorization"] == basic
    assert {"project", "schema", "hostname", "access_token"} <= set(setup.body)
    [backend] = ls.ml_backends(project.id)
    assert backend["id"] == backend_id and backend["title"] == "wafer-resnet"
    # Connecting sets an empty project.model_version to the backend's title.
    assert ls.project_model_version(project.id) == "wafer-resnet"

    # ... and registers <url>/webhook for all actions, without the basic-auth header.
    hook_url = receiver.url + "/webhook"
    [auto] = [w for w in ls.webhooks(project.id) if w["url"] == hook_url]
    assert auto["headers"] == {} and auto["send_for_all_actions"]
    assert ls.register_webhook(project.id, hook_url, {"Authorization": basic}) == auto["id"]
    [fixed] = [w for w in ls.webhooks(project.id) if w["url"] == hook_url]
    assert fixed["headers"] == {"Authorization": basic} and not fixed["send_for_all_actions"]


# ---- a second user ---------------------------------------------------------------------------


@pytest.mark.e2e
def test_an_engineer_gets_an_own_token(
    label_studio: LabelStudioServer,
    ls: LabelStudioClient,
    project: Project,
    label_config: LabelConfig,
) -> None:
    email = f"engineer-{uuid.uuid4().hex[:8]}@example.com"
    engineer = create_user(label_studio, email, secrets.token_urlsafe(12))
    assert engineer.token != label_studio.api_key
    with LabelStudioClient.connect(label_studio.url, engineer.token) as as_engineer:
        engineer_id = as_engineer.current_user_id()
        assert engineer_id != ls.current_user_id()
        task_id = project.task_ids[1]
        as_engineer.accept_prediction(task_id, project.id, choice(label_config, "Loc"), None)
    [annotation] = ls.task(task_id)["annotations"]
    assert annotation["completed_by"] == engineer_id
