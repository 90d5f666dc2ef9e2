"""The pure rules behind the HTTP hardening of issue 15: one project-id parser, the webhook's
own token (and `setup-project` registering it instead of the Basic pair), the memory bound of
parsing JSON."""

from __future__ import annotations

import base64
import dataclasses
import json
import tracemalloc
from collections.abc import Mapping, Sequence
from typing import Any, cast

import pytest

from backend.app import MemoryBudget, RequestLimits, parse_cost
from backend.labelstudio import LabelStudioClient
from backend.project_ids import MAX_PROJECT_ID, ProjectIdError, parse_project_id
from backend.projects import wire_project
from backend.settings import Settings
from backend.webhook_auth import carries_webhook_token, webhook_headers, webhook_token

AUTH = ("labeler", "s3cret-pass")


# ---- project ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "number"),
    [(7, 7), ("7", 7), ("7.1700000000", 7), ("7.", 7), (MAX_PROJECT_ID, MAX_PROJECT_ID)],
)
def test_label_studios_project_ids(value: str | int, number: int) -> None:
    assert parse_project_id(value) == number


@pytest.mark.parametrize(
    "value",
    [None, "", "-1", 0, -1, "0", "+9", " 7", "7 ", "1_000", "٣", "٣٢", "x.1", ".2", "1e3",
     10**30, "9" * 20, MAX_PROJECT_ID + 1, True, 2.0, [2], {"id": 2}],
)  # fmt: skip
def test_everything_else_is_refused(value: Any) -> None:
    with pytest.raises(ProjectIdError):
        parse_project_id(value)


# ---- the webhook token -------------------------------------------------------------------------


def test_the_webhook_token_is_derived_or_set_and_reveals_nothing() -> None:
    derived = webhook_token(AUTH)
    assert derived is not None and len(derived) >= 32
    assert derived == webhook_token(AUTH)  # the backend and setup-project agree
    assert AUTH[1] not in derived and base64.b64encode(":".join(AUTH).encode()).decode() != derived
    assert webhook_token((AUTH[0], AUTH[1] + "x")) != derived
    assert webhook_token(("other", AUTH[1])) != derived
    assert webhook_token(AUTH, "my-secret") == "my-secret"
    assert webhook_token(None, "my-secret") is None  # no credentials: everything is open
    assert webhook_headers(None) == {}
    assert webhook_headers("t0k") == {"Authorization": "Bearer t0k"}


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        ("Bearer t0k=", True),
        ("bearer  t0k= ", True),
        ("Bearer t0k", False),
        ("Bearer t0k==", False),
        ("Basic t0k=", False),
        ("t0k=", False),
        ("", False),
        (None, False),
    ],
)
def test_only_the_token_passes(header: str | None, ok: bool) -> None:
    assert carries_webhook_token(header, "t0k=") is ok
    assert carries_webhook_token(header, None) is False


class FakeLabelStudio:
    """What `wire_project` calls, with one project whose webhook an older setup-project
    registered with the Basic pair."""

    def __init__(self, label_config: str) -> None:
        self.label_config = label_config
        old = base64.b64encode(":".join(AUTH).encode()).decode()
        self.hooks: dict[str, dict[str, str]] = {
            "http://127.0.0.1:9090/webhook": {"Authorization": f"Basic {old}"}
        }
        self.payloads: dict[str, tuple[tuple[str, ...], bool]] = {}

    def find_project(self, title: str) -> int | None:
        return 4

    def project_label_config(self, project: int) -> str:
        return self.label_config

    def ml_backends(self, project: int) -> list[dict[str, Any]]:
        return [{"id": 9, "url": "http://127.0.0.1:9090"}]

    def register_webhook(
        self,
        project: int,
        url: str,
        headers: Mapping[str, str],
        actions: Sequence[str] = (),
        *,
        send_payload: bool = True,
    ) -> int:
        self.hooks[url] = dict(headers)  # Label Studio replaces the stored headers
        self.payloads[url] = (tuple(actions), send_payload)
        return 11 if send_payload else 12

    def current_user_id(self) -> int:
        return 3

    def create_view(self, project: int, title: str, *args: Any, **kwargs: Any) -> int:
        return 20


@pytest.mark.parametrize("secret", ["", "hook-secret-1"])
def test_setup_project_replaces_a_stored_basic_header_with_the_token(secret: str) -> None:
    settings = dataclasses.replace(Settings(), basic_auth=AUTH, webhook_secret=secret)
    fake = FakeLabelStudio(settings.label_config_path.read_text())
    client = cast(LabelStudioClient, fake)
    wiring = wire_project(client, settings, "wafers", "http://127.0.0.1:9090/")
    assert (wiring.webhook, wiring.bulk_webhook) == (11, 12)
    # both webhooks (one person's label with its payload; the bulk events without)
    for headers in fake.hooks.values():
        assert headers == {"Authorization": f"Bearer {webhook_token(AUTH, secret)}"}
    assert "Basic" not in json.dumps(fake.hooks)
    assert AUTH[1] not in json.dumps(fake.hooks)


def test_setup_project_without_credentials_registers_no_header() -> None:
    settings = Settings()
    fake = FakeLabelStudio(settings.label_config_path.read_text())
    wiring = wire_project(
        cast(LabelStudioClient, fake), settings, "wafers", "http://127.0.0.1:9090"
    )
    assert fake.hooks == {
        "http://127.0.0.1:9090/webhook": {},
        f"http://127.0.0.1:9090/webhook?project={wiring.project}": {},
    }
    assert fake.payloads[f"http://127.0.0.1:9090/webhook?project={wiring.project}"] == (
        ("ANNOTATIONS_CREATED", "TASKS_CREATED"),
        False,
    )
    assert fake.payloads["http://127.0.0.1:9090/webhook"] == (
        ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"),
        True,
    )


# ---- the memory bound of parsing ----------------------------------------------------------------

SHAPES = {
    "empty objects": b"[" + b",".join([b"{}"] * 50_000) + b"]",
    "empty lists": b"[" + b",".join([b"[]"] * 50_000) + b"]",
    "one-key objects": b"[" + b",".join([b'{"a":0}'] * 50_000) + b"]",
    "nested objects": b"[" + b",".join([b'{"a":{"b":[]}}'] * 30_000) + b"]",
    "distinct keys": b"{" + b",".join(f'"k{i}":0'.encode() for i in range(50_000)) + b"}",
    "floats": b"[" + b",".join([b"1.5"] * 50_000) + b"]",
    "short strings": b"[" + b",".join([b'"ab"'] * 50_000) + b"]",
    "wide strings": json.dumps(["a" * 50 + "\U0001f600"] * 5_000, ensure_ascii=False).encode(),
    "escaped strings": json.dumps(["\u00e9" * 40] * 5_000).encode(),
    "escaped wide strings": json.dumps(["a" * 300 + "\u0100"] * 2_000).encode(),
    "escaped astral strings": json.dumps(["a" * 1000 + "\U0001f600"] * 500).encode(),
    "picture tasks": json.dumps(
        {
            "project": "2.1700000000",
            "tasks": [
                {
                    "id": i,
                    "data": {"image": "data:image/png;base64," + "QUJD" * 800, "set": 1},
                    "annotations": [],
                    "predictions": [],
                    "meta": {},
                    "created_at": "2026-12-04T10:00:00Z",
                    "is_labeled": False,
                    "project": 2,
                }
                for i in range(500)
            ],
        }
    ).encode(),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_parse_cost_bounds_what_parsing_takes(name: str) -> None:
    data = SHAPES[name]
    tracemalloc.start()
    try:
        parsed = json.loads(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del parsed
    assert peak <= parse_cost(data), (name, peak, parse_cost(data))
    if name == "picture tasks":  # Label Studio's bodies are not overcharged
        assert parse_cost(data) < 3 * len(data)


def test_the_memory_budget_refuses_rather_than_waits() -> None:
    budget = MemoryBudget(100)
    assert budget.take(60) and not budget.take(41) and budget.take(40)
    assert budget.used == 100 and not budget.take(1)
    budget.give(100)
    assert budget.used == 0 and not budget.take(-1)
    with pytest.raises(ValueError):
        MemoryBudget(0)


def test_route_limits() -> None:
    limits = RequestLimits()
    assert limits.body_limit("/predict") == limits.body_limit("/webhook") == 64 * 2**20
    assert limits.body_limit("/setup") == limits.body_limit("/versions") == 2**20
    assert RequestLimits(max_body_bytes=2048).body_limit("/setup") == 2048
    assert "WAFER_MAX_REQUEST_MB" in limits.too_large("/predict")
    assert "1 MiB, the most /setup takes" in limits.too_large("/setup")
    with pytest.raises(ValueError):
        RequestLimits(memory_bytes=0)
