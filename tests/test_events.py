"""Webhook payloads -> queued work, against a real Redis (db 15)."""

from __future__ import annotations

from typing import Any

import pytest
from redis import Redis
from rq import Queue

from backend.events import EventError, QueueUnavailableError, handle_event, project_of
from backend.loop_keys import (
    EVENTS_QUEUE,
    TRAINING_QUEUE,
    advance_key,
    full_advance_key,
    opened_key,
)

DEAD_REDIS_URL = "redis://127.0.0.1:1/0"
AUTO_USER = 1
ENGINEER = 7


def auto() -> int | None:
    return AUTO_USER


def unknown() -> int | None:
    return None


def events_queued(redis: Redis) -> int:
    return Queue(EVENTS_QUEUE, connection=redis).count


def annotation(user: Any) -> dict[str, Any]:
    return {"id": 11, "completed_by": user, "task": 3, "result": []}


def created(user: Any, project: Any = None) -> dict[str, Any]:
    return {
        "action": "ANNOTATION_CREATED",
        "project": {"id": 2, "title": "wafers"} if project is None else project,
        "annotation": annotation(user),
        "task": {"id": 3, "data": {"set": 1}},
    }


def test_unhandled_actions_queue_nothing(redis: Redis) -> None:
    for action in ("PROJECT_UPDATED", "TASKS_DELETED", "ANNOTATIONS_DELETED"):
        outcome = handle_event({"action": action, "project": {"id": 2}}, redis, auto)
        assert outcome == {"status": "ignored", "action": action}
    assert redis.dbsize() == 0


def test_the_backends_own_annotation_is_ignored(redis: Redis) -> None:
    outcome = handle_event(created(AUTO_USER), redis, auto)
    assert outcome["status"] == "ignored"
    assert outcome["action"] == "ANNOTATION_CREATED"
    # completed_by may also come as a user object
    assert handle_event(created({"id": AUTO_USER}), redis, auto)["status"] == "ignored"
    assert redis.dbsize() == 0


@pytest.mark.parametrize("key", ["annotation", "annotations"])
def test_bulk_annotations_all_by_the_backend_are_ignored(redis: Redis, key: str) -> None:
    payload = {
        "action": "ANNOTATIONS_CREATED",
        "project": {"id": 2},
        key: [annotation(AUTO_USER), annotation({"id": AUTO_USER}), annotation(AUTO_USER)],
    }
    assert handle_event(payload, redis, auto)["status"] == "ignored"
    assert redis.dbsize() == 0
    # One person among them is enough to queue.
    payload[key] = [annotation(AUTO_USER), annotation(ENGINEER)]
    assert handle_event(payload, redis, auto) == {
        "status": "queued",
        "action": "ANNOTATIONS_CREATED",
        "project": 2,
    }
    assert events_queued(redis) == 1


def test_a_persons_annotation_is_queued_once(redis: Redis) -> None:
    assert handle_event(created(ENGINEER), redis, auto) == {
        "status": "queued",
        "action": "ANNOTATION_CREATED",
        "project": 2,
    }
    assert redis.exists(advance_key(2))
    again = handle_event(created(ENGINEER), redis, auto)
    assert again["status"] == "already queued"
    updated = {**created(ENGINEER), "action": "ANNOTATION_UPDATED"}
    assert handle_event(updated, redis, auto)["status"] == "already queued"
    assert events_queued(redis) == 1
    assert Queue(TRAINING_QUEUE, connection=redis).count == 0
    job = Queue(EVENTS_QUEUE, connection=redis).jobs[0]
    assert job.func_name == "backend.jobs.advance_job"
    # a person's label asks for a light advance, and nothing asked for a full one
    assert job.args == (2, True)
    assert not redis.exists(full_advance_key(2))


def test_start_training_and_tasks_created_are_queued(redis: Redis) -> None:
    start = {"action": "START_TRAINING", "project": {"id": 3, "title": "wafers"}}
    assert handle_event(start, redis, auto) == {
        "status": "queued",
        "action": "START_TRAINING",
        "project": 3,
    }
    tasks = {"action": "TASKS_CREATED", "project": {"id": 4}, "tasks": [{"id": 1}]}
    assert handle_event(tasks, redis, auto) == {
        "status": "queued",
        "action": "TASKS_CREATED",
        "project": 4,
    }
    assert events_queued(redis) == 2
    jobs = sorted(j.args for j in Queue(EVENTS_QUEUE, connection=redis).jobs)
    assert jobs == [(3, False), (4, False)]
    assert redis.exists(full_advance_key(3)) and redis.exists(full_advance_key(4))


def test_new_wafers_make_a_queued_light_advance_full(redis: Redis) -> None:
    assert handle_event(created(ENGINEER, {"id": 6}), redis, auto)["status"] == "queued"
    assert not redis.exists(full_advance_key(6))
    tasks = {"action": "TASKS_CREATED", "project": {"id": 6}, "tasks": [{"id": 1}]}
    assert handle_event(tasks, redis, auto)["status"] == "already queued"
    # the queued job was asked for by a label, but the flag makes it do its whole pass
    assert redis.exists(full_advance_key(6))


def test_bulk_events_without_payload_ask_for_a_full_advance(redis: Redis) -> None:
    """The bulk webhook (`backend.labelstudio.BULK_WEBHOOK_ACTIONS`) sends no annotations: whose
    they were is unknown (the backend's accept step, or labelled history imported), so the
    advance does its whole pass."""
    for action, project in (("ANNOTATIONS_CREATED", "8"), ("TASKS_CREATED", "9")):
        answer = handle_event({"action": action, "project": project}, redis, auto)
        assert answer == {"status": "queued", "action": action, "project": int(project)}
    jobs = sorted(j.args for j in Queue(EVENTS_QUEUE, connection=redis).jobs)
    assert jobs == [(8, False), (9, False)]
    assert redis.exists(full_advance_key(8)) and redis.exists(full_advance_key(9))


def test_project_as_a_plain_id(redis: Redis) -> None:
    assert project_of({"action": "TASKS_CREATED", "project": 5}) == 5
    assert project_of({"action": "TASKS_CREATED", "project": "6"}) == 6
    assert handle_event({"action": "TASKS_CREATED", "project": "6"}, redis, auto)["project"] == 6


@pytest.mark.parametrize(
    "project", [None, {}, {"id": None}, {"id": True}, "abc", {"id": "x1"}, [2]]
)
def test_a_payload_without_a_usable_project_is_an_event_error(redis: Redis, project: Any) -> None:
    payload: dict[str, Any] = {"action": "START_TRAINING"}
    if project is not None:
        payload["project"] = project
    with pytest.raises(EventError, match="project"):
        handle_event(payload, redis, auto)
    assert redis.dbsize() == 0


@pytest.mark.parametrize(
    "project",
    ["-1", 0, -3, "0", "1_000", "+9", " 7", "7 ", 10**30, "9" * 20, 2**63, "٣", "٣٢", 2.0],
)
def test_ids_that_predict_refuses_are_refused_here_too(redis: Redis, project: Any) -> None:
    """`int()` took each of these, and each got a debounce key and a job of its own."""
    with pytest.raises(EventError, match="project"):
        handle_event({"action": "START_TRAINING", "project": {"id": project}}, redis, auto)
    with pytest.raises(EventError, match="project"):
        handle_event({"action": "TASKS_CREATED", "project": project}, redis, auto)
    assert redis.dbsize() == 0


def test_label_studios_ids_are_taken(redis: Redis) -> None:
    for project, number in ((7, 7), ("7", 7), ("7.1700000000", 7), (2**63 - 1, 2**63 - 1)):
        assert project_of({"action": "START_TRAINING", "project": {"id": project}}) == number


@pytest.mark.parametrize("payload", [{}, {"action": ""}, {"action": 3}, {"project": {"id": 2}}])
def test_a_payload_without_an_action_is_an_event_error(
    redis: Redis, payload: dict[str, Any]
) -> None:
    with pytest.raises(EventError, match="action"):
        handle_event(payload, redis, auto)
    assert redis.dbsize() == 0


def test_a_dead_redis_is_queue_unavailable() -> None:
    dead = Redis.from_url(DEAD_REDIS_URL)
    with pytest.raises(QueueUnavailableError) as raised:
        handle_event(created(ENGINEER), dead, auto)
    message = str(raised.value)
    assert "Redis" in message
    assert "ANNOTATION_CREATED" in message and "project 2" in message
    assert "start Redis" in message and "Start Training" in message


def test_an_unknown_backend_user_counts_as_a_person(redis: Redis) -> None:
    assert handle_event(created(AUTO_USER), redis, unknown)["status"] == "queued"
    assert events_queued(redis) == 1


def test_an_annotation_event_without_annotations_is_queued(redis: Redis) -> None:
    payload = {"action": "ANNOTATION_CREATED", "project": {"id": 2}}
    assert handle_event(payload, redis, auto)["status"] == "queued"
    assert events_queued(redis) == 1


def test_new_tasks_make_the_open_set_be_looked_at_again(redis: Redis) -> None:
    redis.hset(opened_key(4), "1", "v001-set0")
    handle_event({"action": "START_TRAINING", "project": {"id": 4}}, redis, auto)
    assert redis.hget(opened_key(4), "1") == b"v001-set0"
    handle_event({"action": "TASKS_CREATED", "project": {"id": 4}, "tasks": []}, redis, auto)
    assert not redis.exists(opened_key(4))
