"""`python -m backend load-test`: a bounded load test of the backend on loopback. Layer L3.

Starts the real backend under gunicorn (gunicorn.conf.py: 24 threads, at most
WAFER_PREDICT_REQUESTS /predict calls taken at once) on 127.0.0.1 with a resnet18 served for one
project (random weights: the same compute as a trained one), then `clients` threads each send
`/predict` batches of `batch` wafer tasks (pictures as data URLs, as `import-sets` makes them)
until `seconds` pass or `max_requests` were sent, while another thread polls `/health` with Label
Studio's 1 s timeout. Prints p50/p99 latency of answered batches, wafers/s, refusals (503: the
backend was full), the slowest /health, and the worker's RSS before and after. A benchmark that
prints figures, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import re
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import torch

from backend.classifier import WaferClassifier, build_network
from backend.encoding import render_picture
from backend.harness.stack import free_port, running_backend
from backend.images import data_url, png_bytes
from backend.label_config import LabelConfig
from backend.model_card import ModelCard
from backend.model_store import ModelStore

LOAD_TEST_PROJECT = 1
VERSION = "v001-loadtest"


@dataclass(frozen=True)
class LoadPlan:
    """What to send: `clients` threads x `batch` tasks, for `seconds` or `max_requests`."""

    clients: int = 20
    batch: int = 100
    seconds: float = 60.0
    max_requests: int = 100_000
    image_size: int = 64

    def __post_init__(self) -> None:
        if min(self.clients, self.batch, self.max_requests) < 1 or self.seconds <= 0:
            raise ValueError("clients, batch, seconds and max-requests must be positive")


@dataclass
class LoadResult:
    """What came back."""

    latencies: list[float] = field(default_factory=list)  # of answered (200) batches, seconds
    statuses: dict[int, int] = field(default_factory=dict)
    wafers: int = 0  # tasks that got a prediction
    health_worst: float = 0.0
    health_failures: int = 0
    elapsed: float = 0.0
    rss_before: int = 0
    rss_after: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def lines(self, plan: LoadPlan) -> list[str]:
        sent = sum(self.statuses.values())
        ordered = sorted(self.latencies)

        def pct(q: float) -> str:
            if not ordered:
                return "n/a"
            return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))]:.3f} s"

        mean = f"{statistics.fmean(ordered):.3f} s" if ordered else "n/a"
        return [
            f"load: {plan.clients} clients x {plan.batch}-task batches for {self.elapsed:.1f} s",
            f"requests: {sent} sent, by status {dict(sorted(self.statuses.items()))}",
            f"latency of answered batches: p50 {pct(0.50)}, p99 {pct(0.99)}, mean {mean}",
            f"wafers predicted: {self.wafers} ({self.wafers / max(self.elapsed, 1e-9):.1f} "
            "wafers/s)",
            f"/health: slowest {self.health_worst:.3f} s, {self.health_failures} over 1 s or failed",
            f"backend worker RSS: {self.rss_before / 2**20:.0f} MiB before, "
            f"{self.rss_after / 2**20:.0f} MiB after",
        ]


def _die_map(rng: np.random.Generator, dies: int) -> npt.NDArray[np.uint8]:
    y, x = np.mgrid[:dies, :dies]
    centre = (dies - 1) / 2
    on_wafer = (y - centre) ** 2 + (x - centre) ** 2 <= (dies / 2) ** 2
    codes = np.where(on_wafer, 1, 0).astype(np.uint8)
    codes[on_wafer & (rng.random((dies, dies)) < 0.1)] = 2
    return codes


def _publish(model_dir: Path, labels: LabelConfig, image_size: int) -> None:
    n = len(labels.failure_types)
    card = ModelCard(
        version=VERSION,
        failure_types=labels.failure_types,
        image_size=image_size,
        backbone="resnet18",
        logit_adjustment=(0.0,) * n,
        trained_through_set=0,
        metrics={"route_threshold": 0.5},
    )
    network = build_network("resnet18", n, seed=0)
    store = ModelStore.for_project(model_dir, LOAD_TEST_PROJECT, torch.device("cpu"))
    store.publish(WaferClassifier(network=network, card=card, device=torch.device("cpu")))


def _worker_rss(log_path: Path) -> int:
    """RSS in bytes of the gunicorn worker named in its log (0 when unknown)."""
    found = re.findall(r"Booting worker with pid: (\d+)", log_path.read_text(errors="replace"))
    if not found:
        return 0
    try:
        status = Path(f"/proc/{found[-1]}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(match.group(1)) * 1024 if match else 0


def run_load_test(plan: LoadPlan, labels: LabelConfig) -> LoadResult:
    """Run `plan` against a fresh backend on loopback and return the figures."""
    rng = np.random.default_rng(0)
    pictures = [data_url(png_bytes(render_picture(_die_map(rng, 40)))) for _ in range(50)]
    result = LoadResult()
    with tempfile.TemporaryDirectory(prefix="wafer-load-") as tmp:
        work = Path(tmp)
        _publish(work / "models", labels, plan.image_size)
        env = {
            "MODEL_DIR": str(work / "models"),
            "WAFER_DEVICE": "cpu",
            "LABEL_STUDIO_URL": "http://127.0.0.1:1",
            "LOG_LEVEL": "WARNING",
        }
        log_path = work / "backend.log"
        with running_backend(env, free_port(), log_path) as url:
            body = {
                "project": f"{LOAD_TEST_PROJECT}.1700000000",
                "tasks": [
                    {
                        "id": i,
                        "project": LOAD_TEST_PROJECT,
                        "data": {"image": pictures[i % len(pictures)]},
                    }
                    for i in range(plan.batch)
                ],
            }
            httpx.post(f"{url}/predict", json=body, timeout=120).raise_for_status()  # warm up
            result.rss_before = _worker_rss(log_path)
            sent = iter(range(plan.max_requests))
            sent_lock = threading.Lock()
            start = time.monotonic()
            stop = start + plan.seconds

            def client() -> None:
                with httpx.Client(timeout=120) as http:
                    while time.monotonic() < stop:
                        with sent_lock:
                            if next(sent, None) is None:
                                return
                        began = time.monotonic()
                        try:
                            response = http.post(f"{url}/predict", json=body)
                            status = response.status_code
                        except httpx.HTTPError:
                            status = 0
                        took = time.monotonic() - began
                        answered = _predicted(response) if status == 200 else 0
                        with result.lock:
                            result.statuses[status] = result.statuses.get(status, 0) + 1
                            if status == 200:
                                result.latencies.append(took)
                                result.wafers += answered
                        if status == 503:
                            time.sleep(0.5)

            def health() -> None:
                with httpx.Client(timeout=1.0) as http:
                    while time.monotonic() < stop:
                        began = time.monotonic()
                        try:
                            ok = http.get(f"{url}/health").status_code == 200
                        except httpx.HTTPError:
                            ok = False
                        took = time.monotonic() - began
                        result.health_worst = max(result.health_worst, took)
                        result.health_failures += 0 if ok and took <= 1.0 else 1
                        time.sleep(0.25)

            threads = [threading.Thread(target=client) for _ in range(plan.clients)]
            threads.append(threading.Thread(target=health))
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            result.elapsed = time.monotonic() - start
            result.rss_after = _worker_rss(log_path)
    return result


def _predicted(response: httpx.Response) -> int:
    results: Any = response.json().get("results", [])
    return sum(1 for entry in results if isinstance(entry, dict) and "result" in entry)
