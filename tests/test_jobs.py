"""The loop's decisions (pure) and its exactly-once enqueueing (against a real Redis, db 15)."""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from rq import Queue

from backend.label_config import LabelConfig
from backend.loop_keys import (
    ADVANCE_DEBOUNCE_S,
    EVENTS_QUEUE,
    TRAINING_QUEUE,
    advance_key,
    read_ahead_job_id,
    request_advance,
    request_read_ahead,
    request_retrain,
    retrain_job_id,
    retrain_key,
    retrain_pending,
)
from backend.loop_state import (
    LabelSource,
    NextStep,
    SetState,
    annotation_source,
    label_of,
    next_step,
    serving_rule,
    set_states,
    trained_through,
)
from backend.model_card import HeldOutScores, ModelCard
from backend.routing import Route, RoutingRule
from backend.settings import ROUTE_MEASURES, Settings
from backend.uncertainty import Measure

DEAD_REDIS_URL = "redis://127.0.0.1:1/0"
AUTO_USER = 1
ENGINEER = 7
VERSION = "v001-set0"


def annotation(
    annotation_id: int,
    user: int,
    choice: str,
    *,
    parent: int | None = None,
    cancelled: bool = False,
    from_name: str = "failure_type",
) -> dict[str, Any]:
    return {
        "id": annotation_id,
        "completed_by": user,
        "parent_prediction": parent,
        "was_cancelled": cancelled,
        "result": [
            {
                "from_name": from_name,
                "to_name": "wafer_map",
                "type": "choices",
                "value": {"choices": [choice]},
            }
        ],
    }


def task(
    set_number: Any,
    annotations: Sequence[dict[str, Any]] = (),
    predicted_by: Sequence[str] = (),
) -> dict[str, Any]:
    return {
        "data": {"image": "data:image/png;base64,", "set": set_number},
        "annotations": list(annotations),
        "predictions": [{"model_version": v, "result": []} for v in predicted_by],
    }


def known(set_number: int, n: int) -> list[dict[str, Any]]:
    return [task(set_number, [annotation(100 + i, AUTO_USER, "none")]) for i in range(n)]


def card(
    *,
    metrics: dict[str, float] | None = None,
    trained_through_set: int | None = None,
    route_measure: str | None = None,
) -> ModelCard:
    return ModelCard(
        version=VERSION,
        failure_types=("Center", "none"),
        image_size=16,
        backbone="resnet18",
        logit_adjustment=(0.0, 0.0),
        metrics=metrics or {},
        trained_through_set=trained_through_set,
        route_measure=route_measure,
    )


# ---- who labelled what -------------------------------------------------------------------------


def test_annotation_source() -> None:
    assert annotation_source(annotation(1, AUTO_USER, "none", parent=5), AUTO_USER) is (
        LabelSource.AUTO
    )
    assert annotation_source(annotation(2, AUTO_USER, "none"), AUTO_USER) is LabelSource.KNOWN
    assert annotation_source(annotation(3, ENGINEER, "none"), AUTO_USER) is LabelSource.ENGINEER
    assert annotation_source(annotation(4, ENGINEER, "none", parent=5), AUTO_USER) is (
        LabelSource.ENGINEER
    )


def test_label_of_prefers_a_person_over_a_newer_auto_label(label_config: LabelConfig) -> None:
    person = annotation(3, ENGINEER, "Scratch")
    auto = annotation(9, AUTO_USER, "Center", parent=4)
    assert label_of(task(1, [person, auto]), label_config, AUTO_USER) == "Scratch"
    assert label_of(task(1, [auto, person]), label_config, AUTO_USER) == "Scratch"
    # Of two people's labels the latest one counts.
    later = annotation(5, ENGINEER, "Donut")
    assert label_of(task(1, [later, person, auto]), label_config, AUTO_USER) == "Donut"
    # Alone, the auto label is the label.
    assert label_of(task(1, [auto]), label_config, AUTO_USER) == "Center"


def test_label_of_ignores_cancelled_and_foreign_results(label_config: LabelConfig) -> None:
    cancelled = annotation(8, ENGINEER, "Scratch", cancelled=True)
    auto = annotation(2, AUTO_USER, "Center", parent=1)
    assert label_of(task(1, [cancelled, auto]), label_config, AUTO_USER) == "Center"
    foreign = annotation(9, ENGINEER, "Loc", from_name="comment")
    assert label_of(task(1, [foreign, auto]), label_config, AUTO_USER) == "Center"
    assert label_of(task(1, [cancelled]), label_config, AUTO_USER) is None
    assert label_of(task(1, [foreign]), label_config, AUTO_USER) is None
    empty = annotation(4, ENGINEER, "none")
    empty["result"][0]["value"]["choices"] = []
    assert label_of(task(1, [empty]), label_config, AUTO_USER) is None
    assert label_of(task(1), label_config, AUTO_USER) is None


# ---- set counts and the next step --------------------------------------------------------------


def test_set_states_counts_every_source() -> None:
    tasks = [
        task(1, [annotation(1, AUTO_USER, "none", parent=11)], [VERSION]),
        task(1, [annotation(2, ENGINEER, "Loc")], [VERSION]),
        task(1, [annotation(3, AUTO_USER, "none")]),
        task(1, [], [VERSION]),
        task(1, [annotation(4, ENGINEER, "Loc", cancelled=True)], ["v000-old"]),
        # an engineer correcting an auto label counts once, as the engineer's
        task(1, [annotation(5, AUTO_USER, "none", parent=12), annotation(6, ENGINEER, "Loc")]),
        task("2", [annotation(7, ENGINEER, "Donut")]),
        task(None, [annotation(8, ENGINEER, "Donut")]),
        task(True, []),
        {"annotations": []},
    ]
    states = set_states(tasks, AUTO_USER, VERSION)
    assert list(states) == [1, 2]
    assert states[1] == SetState(
        number=1, total=6, auto=1, engineer=2, known=1, waiting=2, predicted=3
    )
    assert not states[1].finished
    assert states[2] == SetState(
        number=2, total=1, auto=0, engineer=1, known=0, waiting=0, predicted=0
    )
    assert states[2].finished
    # Without a served model nothing counts as predicted.
    assert set_states(tasks, AUTO_USER, None)[1].predicted == 0


def test_initial_set_labelled_without_model_retrains_set_0() -> None:
    tasks = known(0, 4) + [task(1) for _ in range(3)]
    states = set_states(tasks, AUTO_USER, None)
    assert states[0].known == 4 and states[0].finished
    assert next_step(states, trained_through(None)) == NextStep("retrain", 0)


def test_initial_set_unfinished_without_model_waits() -> None:
    tasks = [*known(0, 3), task(0), task(1)]
    assert next_step(set_states(tasks, AUTO_USER, None), None) == NextStep("wait")


def test_model_through_set_0_opens_unpredicted_set_1() -> None:
    tasks = known(0, 4) + [task(1) for _ in range(3)] + [task(2) for _ in range(3)]
    states = set_states(tasks, AUTO_USER, VERSION)
    assert next_step(states, 0) == NextStep("open", 1)
    # Partly predicted is still open.
    partly = [*known(0, 4), task(1, [], [VERSION]), task(1)]
    assert next_step(set_states(partly, AUTO_USER, VERSION), 0) == NextStep("open", 1)


def test_fully_predicted_set_with_waiting_wafers_waits() -> None:
    tasks = [
        *known(0, 4),
        task(1, [annotation(1, AUTO_USER, "none", parent=1)], [VERSION]),
        task(1, [], [VERSION]),
        task(1, [], [VERSION]),
        task(2),
    ]
    states = set_states(tasks, AUTO_USER, VERSION)
    assert states[1].predicted == states[1].total == 3
    assert next_step(states, 0) == NextStep("wait", 1)


def test_finished_set_1_retrains_set_1() -> None:
    tasks = [
        *known(0, 4),
        task(1, [annotation(1, AUTO_USER, "none", parent=1)], [VERSION]),
        task(1, [annotation(2, ENGINEER, "Loc")], [VERSION]),
        task(2),
    ]
    states = set_states(tasks, AUTO_USER, VERSION)
    assert next_step(states, 0) == NextStep("retrain", 1)
    # Once the served model has learnt set 1, the next set opens.
    assert next_step(states, 1) == NextStep("open", 2)


def test_a_gap_never_retrains_a_later_finished_set() -> None:
    tasks = [
        *known(0, 2),
        task(1, [annotation(1, ENGINEER, "Loc")]),
        task(1),
        task(2, [annotation(2, ENGINEER, "Loc")]),
        task(2, [annotation(3, ENGINEER, "Donut")]),
    ]
    states = set_states(tasks, AUTO_USER, VERSION)
    assert states[2].finished and not states[1].finished
    assert next_step(states, 0) == NextStep("open", 1)
    assert next_step(states, None) == NextStep("retrain", 0)


def test_everything_finished_and_learnt_waits() -> None:
    tasks = [*known(0, 2), task(1, [annotation(1, ENGINEER, "Loc")])]
    assert next_step(set_states(tasks, AUTO_USER, VERSION), 1) == NextStep("wait")
    assert next_step({}, None) == NextStep("wait")


def test_trained_through_reads_the_card() -> None:
    assert trained_through(None) is None
    assert trained_through(card()) is None
    assert trained_through(card(trained_through_set=2)) == 2
    assert trained_through(card(trained_through_set=0)) == 0


# ---- the routing rule in force -----------------------------------------------------------------


def test_fixed_threshold_beats_the_card() -> None:
    settings = Settings(route_threshold=0.3, route_measure="least-confidence")
    calibrated = card(metrics={"route_threshold": 0.7}, route_measure="entropy")
    assert serving_rule(settings, calibrated) == RoutingRule(Measure.LEAST_CONFIDENCE, 0.3)
    assert serving_rule(settings, None) == RoutingRule(Measure.LEAST_CONFIDENCE, 0.3)


def test_calibrated_threshold_of_the_card_without_a_fixed_one() -> None:
    calibrated = card(metrics={"route_threshold": 0.2}, route_measure="entropy")
    assert serving_rule(Settings(), calibrated) == RoutingRule(Measure.ENTROPY, 0.2)
    # A card without its measure uses the configured one.
    plain = card(metrics={"route_threshold": 0.05})
    assert serving_rule(Settings(route_measure="margin"), plain) == RoutingRule(
        Measure.MARGIN, 0.05
    )


def test_every_settings_measure_names_a_measure() -> None:
    for name in ROUTE_MEASURES:
        rule = serving_rule(Settings(route_measure=name), None)
        assert rule.measure is Measure(name)
        fixed = serving_rule(Settings(route_measure=name, route_threshold=0.1), None)
        assert fixed == RoutingRule(Measure(name), 0.1)


def test_without_calibration_every_wafer_goes_to_engineers() -> None:
    confident = np.array([[1.0, 0.0], [0.999, 0.001]])
    for model_card in (None, card(metrics={"validation_accuracy": 0.99})):
        rule = serving_rule(Settings(), model_card)
        assert rule.threshold == -math.inf
        assert rule.routes(confident).tolist() == [Route.ENGINEER.value] * 2


# ---- enqueueing exactly once -------------------------------------------------------------------


def test_request_retrain_from_many_threads_enqueues_once(redis: Redis) -> None:
    threads = 8
    barrier = threading.Barrier(threads)

    def request() -> bool:
        barrier.wait(timeout=10)
        return request_retrain(redis, 5, 2)

    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(request) for _ in range(threads)]
        outcomes = [f.result(timeout=30) for f in futures]
    assert sorted(outcomes) == [False] * (threads - 1) + [True]
    queue = Queue(TRAINING_QUEUE, connection=redis)
    assert queue.job_ids == [retrain_job_id(5, 2)]
    job = queue.fetch_job(retrain_job_id(5, 2))
    assert job is not None and job.args == (5, 2)
    assert retrain_pending(redis, 5, 2)
    assert redis.get(retrain_key(5, 2)) == retrain_job_id(5, 2).encode()
    assert Queue(EVENTS_QUEUE, connection=redis).count == 0

    # Later requests for the same set stay refused; another set (or project) gets its own job.
    assert request_retrain(redis, 5, 2) is False
    assert request_retrain(redis, 5, 3) is True
    assert request_retrain(redis, 6, 2) is True
    assert sorted(queue.job_ids) == sorted(
        [retrain_job_id(5, 2), retrain_job_id(5, 3), retrain_job_id(6, 2)]
    )


def test_request_read_ahead_enqueues_once_and_never_beside_the_sets_retraining(
    redis: Redis,
) -> None:
    queue = Queue(TRAINING_QUEUE, connection=redis)
    assert request_read_ahead(redis, 7, 1)
    assert not request_read_ahead(redis, 7, 1)  # one waits already
    assert queue.job_ids == [read_ahead_job_id(7, 1)]
    assert request_read_ahead(redis, 7, 2)  # another set's is its own
    # a set whose retraining is already asked for is read by that retraining
    assert request_retrain(redis, 8, 1)
    assert not request_read_ahead(redis, 8, 1)
    assert queue.job_ids == [read_ahead_job_id(7, 1), read_ahead_job_id(7, 2), retrain_job_id(8, 1)]
    # once the waiting one is gone (finished, failed), a new one may be enqueued
    waiting = queue.fetch_job(read_ahead_job_id(7, 1))
    assert waiting is not None
    waiting.delete(remove_from_queue=True)
    assert request_read_ahead(redis, 7, 1)


def test_a_read_ahead_keeps_the_loop_busy_only_where_background_work_counts(
    redis: Redis,
) -> None:
    from backend.harness.simulated_engineers import loop_busy

    assert not loop_busy(redis)
    assert request_read_ahead(redis, 7, 1)
    assert loop_busy(redis) and not loop_busy(redis, background=False)
    assert request_retrain(redis, 7, 1)  # queued behind it: engineers wait for that one
    assert loop_busy(redis, background=False)


def test_request_retrain_on_a_dead_redis_raises() -> None:
    dead = Redis.from_url(DEAD_REDIS_URL)
    with pytest.raises(RedisConnectionError):
        request_retrain(dead, 5, 2)


def test_request_retrain_releases_its_key_when_the_enqueue_fails(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: Queue, *args: Any, **kwargs: Any) -> None:
        raise RedisConnectionError("connection lost")

    monkeypatch.setattr(Queue, "enqueue", refuse)
    with pytest.raises(RedisConnectionError):
        request_retrain(redis, 5, 2)
    assert not retrain_pending(redis, 5, 2)
    monkeypatch.undo()
    assert Queue(TRAINING_QUEUE, connection=redis).count == 0
    # The next request can win.
    assert request_retrain(redis, 5, 2) is True
    assert Queue(TRAINING_QUEUE, connection=redis).job_ids == [retrain_job_id(5, 2)]


def test_request_advance_is_debounced(redis: Redis) -> None:
    queue = Queue(EVENTS_QUEUE, connection=redis)
    assert request_advance(redis, 4) is True
    assert request_advance(redis, 4) is False
    assert queue.count == 1
    ttl: Any = redis.ttl(advance_key(4))
    assert 0 < ttl <= ADVANCE_DEBOUNCE_S
    job = queue.fetch_job(queue.job_ids[0])
    assert job is not None and job.args == (4, False)
    # Another project is not held back.
    assert request_advance(redis, 9) is True
    assert queue.count == 2
    # The job clears the key when it starts; then the next event enqueues again.
    redis.delete(advance_key(4))
    assert request_advance(redis, 4) is True
    assert queue.count == 3
    assert Queue(TRAINING_QUEUE, connection=redis).count == 0


def test_request_advance_releases_its_key_when_the_enqueue_fails(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: Queue, *args: Any, **kwargs: Any) -> None:
        raise RedisConnectionError("connection lost")

    monkeypatch.setattr(Queue, "enqueue", refuse)
    with pytest.raises(RedisConnectionError):
        request_advance(redis, 4)
    assert not redis.exists(advance_key(4))


def test_serving_rule_calibrates_to_the_batch_with_stored_validation() -> None:
    import numpy as np

    from backend.settings import Settings
    from backend.uncertainty import margin

    # 400 validation wafers: confident ones (margin score 0.0) all right, unsure ones (0.9) half
    # wrong; the batch's unsure wafers (score 1.0) are less sure still.
    scores = [0.0] * 300 + [0.9] * 100
    correct = [True] * 300 + [True, False] * 50
    card = ModelCard(
        version="v002-set1",
        failure_types=("a", "b"),
        image_size=16,
        backbone="resnet18",
        logit_adjustment=(0.0, 0.0),
        validation=HeldOutScores("margin", tuple(scores), tuple(correct)),
    )
    confident = np.array([[1.0, 0.0]] * 8 + [[0.5, 0.5]] * 2)
    expected = Settings(target_accuracy=0.99, promise_confidence=0.0)
    rule = serving_rule(expected, card, confident)
    routes = rule.routes(confident)
    assert list(routes[:8]) == ["auto"] * 8 and list(routes[8:]) == ["engineer"] * 2
    assert margin(confident)[0] == 1.0
    # A stricter target than the evidence can promise sends everything to engineers.
    strict = serving_rule(Settings(target_accuracy=0.9999, promise_confidence=0.0), card, confident)
    assert (strict.routes(confident) == "engineer").all()
    # The per-set promise (the default, 95%): a batch of 10 at 99% may hold no wrong label.
    # Were one of its 8 confident wafers wrong, 300 error-free confident held-out wafers (the
    # wafers being exchangeable) would come with probability 8/308 < 5%: those 8 are auto ...
    promised = serving_rule(Settings(target_accuracy=0.99), card, confident)
    assert list(promised.routes(confident)) == ["auto"] * 8 + ["engineer"] * 2
    # ... while 30 error-free held-out wafers (8/38 > 5%) cannot promise it: all to engineers.
    few = dataclasses.replace(card, validation=HeldOutScores("margin", (0.0,) * 30, (True,) * 30))
    promised = serving_rule(Settings(target_accuracy=0.99), few, confident)
    assert (promised.routes(confident) == "engineer").all()
    # A set of 2,000 such wafers may hold 20 wrong labels; with 3,000 error-free confident
    # held-out wafers (not 300) the confident ones are auto-labelled, the unsure ones not (the
    # held-out unsure wafers score 0.5, below the set's 1.0: half of them are wrong).
    more = HeldOutScores(
        "margin", (0.0,) * 3000 + (0.5,) * 100, (True,) * 3000 + (True, False) * 50
    )
    big = np.repeat(confident, 200, axis=0)
    card = dataclasses.replace(card, validation=more)
    routes = serving_rule(Settings(target_accuracy=0.99), card, big).routes(big)
    assert (routes[margin(big) > 0.5] == "auto").all()
    assert (routes[margin(big) < 0.5] == "engineer").all()
