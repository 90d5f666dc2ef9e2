"""/metrics for fab monitoring: the Prometheus text format, read back with its own parser."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis
from rq import Queue, SimpleWorker

from backend.audit import SetAudit
from backend.classifier import WaferClassifier, build_network
from backend.model_card import ModelCard
from backend.model_store import ModelStore
from backend.monitoring import LoopCollector, RequestMetrics, exposition
from backend.wafer_store import SetRouting, WaferStore

CPU = torch.device("cpu")
NOW = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.UTC)


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = exposition(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_request_figures_are_counted_per_route_in_base_units() -> None:
    registry = CollectorRegistry()
    metrics = RequestMetrics.on(registry)
    metrics.observe("/predict", "POST", 200, 0.3)
    metrics.observe("/predict", "POST", 200, 0.1)
    metrics.observe("/health", "GET", 200, 0.002)
    metrics.predicted(wafers=512, picture_errors=3)
    got = samples(registry)
    key = (("method", "POST"), ("route", "/predict"), ("status", "200"))
    assert got[("wafer_http_requests_total", key)] == 2
    assert got[("wafer_http_request_duration_seconds_sum", (("route", "/predict"),))] == (
        pytest.approx(0.4)
    )
    assert (
        got[("wafer_http_request_duration_seconds_bucket", (("le", "0.005"), ("route", "/health")))]
        == 1
    )
    assert got[("wafer_predicted_wafers_total", ())] == 512
    assert got[("wafer_picture_errors_total", ())] == 3


def publish(model_dir: Path, project: int, version: str, through: int) -> ModelCard:
    card = ModelCard(
        version,
        ("Center", "none"),
        16,
        "resnet18",
        (0.0, 0.0),
        trained_through_set=through,
        project=project,
        created="2026-12-04T11:00:00+00:00",
    )
    ModelStore.for_project(model_dir, project, CPU).publish(
        WaferClassifier(build_network("resnet18", 2, seed=0), card, CPU)
    )
    return card


def test_the_loop_state_is_read_from_the_stores_and_rq(tmp_path: Path, redis: Redis) -> None:
    card = publish(tmp_path, 7, "v002-set1", through=1)
    wafers = WaferStore.for_project(tmp_path, 7)
    for number, (auto, engineer, cut) in {1: (900, 100, 0.97), 2: (850, 140, 0.985)}.items():
        wafers.set_dir(number).mkdir(parents=True)
        wafers.save_routing(SetRouting(number, "v002-set1", "margin", cut, auto, engineer, 10))
    # Set 1's blind audit finished: 45 of 50 agree, so its labeling accuracy is at most about
    # 1 - 0.9 * (1 - 0.967) < 99.5%: the promise is broken.
    wafers.save_audit(
        SetAudit(
            1, "v002-set1", 1000, 900, 50, 45, 0, 0.995, recorded_at="2026-12-04T11:30:00+00:00"
        )
    )
    queue = Queue("wafermap-events", connection=redis)
    queue.enqueue("math.sqrt", 4)
    queue.enqueue("math.sqrt", -1)  # fails: a math domain error
    SimpleWorker([queue], connection=redis).work(burst=True)
    queue.enqueue("math.sqrt", 9)  # waiting

    registry = CollectorRegistry()
    cards = {7: card}
    registry.register(
        LoopCollector(
            tmp_path, cards.get, redis, ["wafermap-events", "wafermap-training"], lambda: NOW
        )
    )
    got = samples(registry)
    assert (
        got[
            (
                "wafer_model_info",
                (("backbone", "resnet18"), ("project", "7"), ("version", "v002-set1")),
            )
        ]
        == 1
    )
    assert got[("wafer_model_age_seconds", (("project", "7"),))] == 3600
    assert got[("wafer_model_trained_through_set", (("project", "7"),))] == 1
    assert got[("wafer_open_set", (("project", "7"),))] == 2
    assert got[("wafer_set_wafers", (("project", "7"), ("route", "engineer"), ("set", "2")))] == 140
    assert got[("wafer_set_cut", (("project", "7"), ("set", "1")))] == pytest.approx(0.97)
    assert got[("wafer_set_wafers", (("project", "7"), ("route", "audit"), ("set", "1")))] == 0
    assert (
        got[("wafer_set_audit_wafers", (("project", "7"), ("set", "1"), ("state", "labelled")))]
        == 50
    )
    assert got[("wafer_set_audited_accuracy_ratio", (("project", "7"), ("set", "1")))] == 0.9
    low = got[("wafer_set_audited_accuracy_lower_ratio", (("project", "7"), ("set", "1")))]
    assert 0.75 < low < 0.9
    assert (
        got[("wafer_set_labeling_accuracy_upper_ratio", (("project", "7"), ("set", "1")))] < 0.995
    )
    assert got[("wafer_promise_broken", (("project", "7"),))] == 1
    assert got[("wafer_last_set_finished_seconds", (("project", "7"),))] == 1800
    jobs = {
        state: got[("wafer_jobs", (("queue", "wafermap-events"), ("state", state)))]
        for state in ("queued", "started", "finished", "failed")
    }
    assert jobs == {"queued": 1, "started": 0, "finished": 1, "failed": 1}
    assert got[("wafer_redis_up", ())] == 1
    assert (
        "wafer_job_duration_seconds",
        (("quantile", "0.5"), ("queue", "wafermap-events")),
    ) in got


def test_a_dead_redis_is_a_figure_not_an_error(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    registry.register(LoopCollector(tmp_path, lambda _: None, dead, ["wafermap-events"]))
    got = samples(registry)
    assert got[("wafer_redis_up", ())] == 0
    assert not any(name == "wafer_jobs" for name, _ in got)
