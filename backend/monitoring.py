"""What fab monitoring scrapes: the backend's `/metrics` in the Prometheus text format. Layer L1
(prometheus_client; it reads the model and wafer stores and rq's job registries, writes nothing).

Two kinds of figures:

- The backend's own traffic, counted as it happens in the gunicorn process (thread-safe):
  requests and their latency per route, wafers predicted, picture errors.
- The loop's state, read at scrape time from where the truth is kept, so every process that
  does the work (the rq worker's forked jobs included) is seen without a shared metrics
  directory: per project the served model version, the open set and how its wafers were
  routed (auto labels, engineers, unreadable), the cut, the model's age; per queue the jobs
  waiting, running, finished and failed, and how long the finished ones took.

Names are prefixed ``wafer_``, in base units (seconds), with ``_total`` on counters.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

from backend.audit import latest_breach
from backend.model_card import ModelCard
from backend.model_store import ModelStore
from backend.wafer_store import WaferStore

log = logging.getLogger(__name__)

#: The content type of the text format (what Prometheus asks for).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Request latency buckets, seconds: /health and webhooks answer in milliseconds, a /predict of
#: a whole set takes minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: How many finished jobs of a queue are read for their durations per scrape (newest first).
FINISHED_JOBS_READ = 100


@dataclass(frozen=True)
class RequestMetrics:
    """The backend's own traffic, on `registry`."""

    requests: Counter
    latency: Histogram
    wafers: Counter
    picture_errors: Counter

    @classmethod
    def on(cls, registry: CollectorRegistry) -> RequestMetrics:
        return cls(
            requests=Counter(
                "wafer_http_requests",
                "HTTP requests answered, by route, method and status code",
                ("route", "method", "status"),
                registry=registry,
            ),
            latency=Histogram(
                "wafer_http_request_duration_seconds",
                "Time to answer a request, by route",
                ("route",),
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            wafers=Counter(
                "wafer_predicted_wafers", "Wafers predicted through /predict", registry=registry
            ),
            picture_errors=Counter(
                "wafer_picture_errors",
                "Task pictures that could not be read (the task got an error, not a label)",
                registry=registry,
            ),
        )

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def predicted(self, wafers: int, picture_errors: int) -> None:
        self.wafers.inc(wafers)
        self.picture_errors.inc(picture_errors)


class LoopCollector(Collector):
    """The loop's state per project and per job queue, read when scraped."""

    def __init__(
        self,
        model_dir: Path,
        served_card: Callable[[int], ModelCard | None],
        redis: Redis,
        queues: Sequence[str],
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        """`served_card` reads the card of the version a project serves (CURRENT and the card
        only, never the weights)."""
        self.model_dir, self.served_card = model_dir, served_card
        self.redis, self.queues, self.now = redis, queues, now

    def collect(self) -> Iterator[Metric]:
        yield from self._projects()
        yield from self._jobs()

    def _projects(self) -> Iterable[Metric]:
        served = InfoMetricFamily(
            "wafer_model", "The model version a project serves", labels=("project",)
        )
        age = GaugeMetricFamily(
            "wafer_model_age_seconds",
            "Seconds since the served model was trained (a retraining follows each finished set)",
            labels=("project",),
        )
        trained = GaugeMetricFamily(
            "wafer_model_trained_through_set",
            "The last wafer set the served model learnt from",
            labels=("project",),
        )
        open_set = GaugeMetricFamily(
            "wafer_open_set",
            "The highest wafer set pre-annotated so far (the one engineers label now)",
            labels=("project",),
        )
        routed = GaugeMetricFamily(
            "wafer_set_wafers",
            "Wafers of a set by where their label comes from, as the set was routed",
            labels=("project", "set", "route"),
        )
        cut = GaugeMetricFamily(
            "wafer_set_cut",
            "The prediction score at and above which a set's wafers are auto-labelled",
            labels=("project", "set"),
        )
        audited = GaugeMetricFamily(
            "wafer_set_audit_wafers",
            "A set's blind audit wafers, labelled by engineers so far or pending",
            labels=("project", "set", "state"),
        )
        accuracy = GaugeMetricFamily(
            "wafer_set_audited_accuracy_ratio",
            "A set's auto-label accuracy on its labelled audit wafers",
            labels=("project", "set"),
        )
        accuracy_low = GaugeMetricFamily(
            "wafer_set_audited_accuracy_lower_ratio",
            "Lower end of the exact 95% interval on a set's audited auto-label accuracy",
            labels=("project", "set"),
        )
        labeling_high = GaugeMetricFamily(
            "wafer_set_labeling_accuracy_upper_ratio",
            "Upper end of the 95% interval on a set's labeling accuracy from its audit "
            "(below the target: the promise is broken)",
            labels=("project", "set"),
        )
        broken = GaugeMetricFamily(
            "wafer_promise_broken",
            "1 while the newest finished audit shows a set below the target accuracy "
            "(the next sets are routed cautiously), else 0",
            labels=("project",),
        )
        since = GaugeMetricFamily(
            "wafer_last_set_finished_seconds",
            "Seconds since the newest audited set was finished (its audit recorded)",
            labels=("project",),
        )
        for project in ModelStore.projects(self.model_dir):
            name = str(project)
            try:
                card = self.served_card(project)
            except (OSError, ValueError) as exc:
                log.warning("metrics: project %s: %s", name, exc)
                card = None
            if card is not None:
                served.add_metric([name], {"version": card.version, "backbone": card.backbone})
                created = _parse_time(card.created)
                if created is not None:
                    age.add_metric([name], (self.now() - created).total_seconds())
                if card.trained_through_set is not None:
                    trained.add_metric([name], card.trained_through_set)
            wafers = WaferStore.for_project(self.model_dir, project)
            routings = wafers.routings()
            if routings:
                open_set.add_metric([name], max(r.set_number for r in routings))
            for routing in routings:
                number = str(routing.set_number)
                for route, count in (
                    ("auto", routing.auto),
                    ("engineer", routing.engineer),
                    ("unreadable", routing.unreadable),
                ):
                    routed.add_metric([name, number, route], count)
                routed.add_metric([name, number, "audit"], len(routing.audit))
                if routing.cut is not None:
                    cut.add_metric([name, number], routing.cut)
            audits = wafers.audits()
            for audit in audits:
                number = str(audit.set_number)
                audited.add_metric([name, number, "labelled"], audit.audited)
                audited.add_metric([name, number, "pending"], audit.pending)
                if audit.accuracy is not None:
                    accuracy.add_metric([name, number], audit.accuracy)
                    accuracy_low.add_metric([name, number], audit.accuracy_interval[0])
                    labeling_high.add_metric([name, number], audit.labeling_interval[1])
            if audits:
                broken.add_metric([name], 1.0 if latest_breach(audits) is not None else 0.0)
                finished = [a for a in audits if a.pending == 0]
                recorded = _parse_time(finished[-1].recorded_at) if finished else None
                if recorded is not None:
                    since.add_metric([name], (self.now() - recorded).total_seconds())
        yield from (served, age, trained, open_set, routed, cut)
        yield from (audited, accuracy, accuracy_low, labeling_high, broken, since)

    def _jobs(self) -> Iterable[Metric]:
        jobs = GaugeMetricFamily(
            "wafer_jobs",
            "Loop jobs by queue and state (finished and failed: as long as rq keeps them)",
            labels=("queue", "state"),
        )
        took = GaugeMetricFamily(
            "wafer_job_duration_seconds",
            f"How long the newest finished jobs took (up to {FINISHED_JOBS_READ} a queue)",
            labels=("queue", "quantile"),
        )
        up = GaugeMetricFamily("wafer_redis_up", "Whether the backend reaches Redis (1) or not")
        try:
            for name in self.queues:
                queue = Queue(name, connection=self.redis)
                finished = FinishedJobRegistry(queue=queue)
                counts = {
                    "queued": queue.count,
                    "started": StartedJobRegistry(queue=queue).count,
                    "finished": finished.count,
                    "failed": FailedJobRegistry(queue=queue).count,
                }
                for state, count in counts.items():
                    jobs.add_metric([name, state], count)
                seconds = _durations(queue, finished.get_job_ids(-FINISHED_JOBS_READ, -1))
                for q in (0.5, 0.9, 1.0):
                    if seconds:
                        took.add_metric([name, str(q)], _quantile(seconds, q))
        except RedisError as exc:
            log.warning("metrics: Redis is not reachable: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield from (up, jobs, took)


def _durations(queue: Queue, job_ids: Sequence[str]) -> list[float]:
    seconds = []
    for job in queue.job_class.fetch_many(list(job_ids), connection=queue.connection):
        if job is not None and job.started_at is not None and job.ended_at is not None:
            seconds.append((job.ended_at - job.started_at).total_seconds())
    return sorted(seconds)


def _quantile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def _parse_time(text: str) -> dt.datetime | None:
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry's figures in the Prometheus text format."""
    return generate_latest(registry)
