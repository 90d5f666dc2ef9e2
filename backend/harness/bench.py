"""`python -m backend bench`: how fast each way from a wafer to a prediction is here. Layer L3.

A benchmark that prints figures and writes them as JSON; nothing here asserts a speed. In one run
on the machine at hand it measures, each after a warm-up on the same shapes and as the fastest
of a few runs in which the ways compared take turns (`fastest`):

- **the study's way**: resnet50, one wafer at a time (batch 1), fp32, 224 x 224 input;
- **the raw model**: a plain torchvision resnet18/resnet50 on ready one-hot inputs already on the
  device (``torch.inference_mode``, the engine's precision and memory layout), per batch size;
- **the engine's in-memory predict**: `WaferClassifier.predict_proba` on die-code arrays;
- **/predict**: batches of Label Studio tasks whose pictures are data-URL PNGs drawn by the
  project's own renderer (as `import-sets` makes them), POSTed as pre-serialised JSON to the Flask
  app of `backend.app.create_app` around a real `WaferLabelingService`, through Flask's test client
  (in process: no sockets, no gunicorn), with the model published into a temporary MODEL_DIR;
- **training**: the engine's `train_network` against a plain PyTorch loop (random batches, one-hot,
  cross-entropy, AdamW) on the same network, batch size, precision and number of samples;
- **the wafer cache**: load time and peak RSS of `load_wafers` from the cache, in a child process;
- **pictures**: drawing and encoding the /predict wafers' pictures as data URLs (what
  `import-sets` does per wafer), as the palette PNGs drawn now and as the RGB PNGs drawn before,
  and decoding each kind back to the model input (`backend.images.model_input`).

Ratios (the issue's targets): ``predict_http_vs_raw`` (>= 0.80) is the LOWEST /predict over raw
wafers/s over the backbones and batch sizes measured; ``train_engine_vs_plain`` (>= 0.85) the
lowest engine over plain training samples/s; ``engine_vs_study_way`` is the engine's predict at
the study's backbone (resnet50 when measured) and the largest batch over the study's way.
Every per-configuration ratio is in the JSON too, keyed ``name:backbone:bBATCH``. ``picture_encode_palette_vs_rgb`` and ``picture_decode_palette_vs_rgb``
compare the two kinds of pictures of the same wafers (wafers/s).

Real WM-811K wafers come from the conversion cache (WAFER_DATA + WAFER_CACHE_DIR) when it exists;
otherwise synthetic round wafers with random failing dies are used and the output says so (the
model does the same work on them; only the pictures' sizes differ).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import torch
import torchvision
from flask.testing import FlaskClient
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torchvision import models

from backend.app import create_app
from backend.classifier import (
    WaferClassifier,
    autocast,
    batches,
    build_network,
    cpu_has_bf16,
    pick_device,
    to_inputs,
)
from backend.encoding import (
    N_CHANNELS,
    encode_wafers,
    one_hot,
    picture_colours,
    render_picture,
    resize_nearest,
)
from backend.files import atomic_write_text
from backend.images import data_url, model_input, png_bytes
from backend.label_config import LabelConfig
from backend.model_card import ModelCard
from backend.model_store import ModelStore
from backend.service import WaferLabelingService
from backend.settings import REPO_ROOT, Settings
from backend.sources.cache import cache_file_for
from backend.training import TrainConfig, recalibrate_batch_norm, train_network
from backend.wafer_sets import wafer_task
from backend.wafers import WaferMaps

#: The issue's targets for the ratios that have one.
TARGETS = {"predict_http_vs_raw": 0.80, "train_engine_vs_plain": 0.85}
#: The Label Studio project the benchmark's model is published for.
BENCH_PROJECT = 1
STUDY_BACKBONE = "resnet50"
#: What /predict is sent through (printed and written with the figures).
HTTP_SERVER = "Flask test client (in process, no sockets)"


@dataclass(frozen=True)
class BenchPlan:
    """How much to measure. Wafer counts are rounded up to whole batches."""

    device: str = "cpu"
    backbones: tuple[str, ...] = ("resnet18", "resnet50")
    batch_sizes: tuple[int, ...] = (64, 256)
    image_size: int = 64
    study_image_size: int = 224
    study_wafers: int = 40
    predict_wafers: int = 1024
    train_backbones: tuple[str, ...] = ("resnet18", "resnet50")
    train_batch_size: int = 64
    train_samples: int = 2048
    train_epochs: int = 2
    repeats: int = 3
    train_repeats: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.backbones or not self.batch_sizes:
            raise ValueError("name at least one backbone and one batch size")
        if min(self.batch_sizes) < 1 or self.train_batch_size < 2:
            raise ValueError("batch sizes must be at least 1 (training: at least 2)")
        counts = (self.study_wafers, self.predict_wafers, self.train_samples, self.train_epochs)
        if min(*counts, self.repeats, self.train_repeats) < 1:
            raise ValueError("wafer, sample, epoch and repeat counts must be positive")
        if self.train_samples < self.train_batch_size * self.train_epochs:
            raise ValueError("train-samples must hold at least one batch per epoch")

    @classmethod
    def quick(cls, device: str = "cpu") -> BenchPlan:
        """A few minutes on a 2-core CPU: fewer wafers, one training network."""
        return cls(
            device=device,
            study_wafers=4,
            predict_wafers=256,
            train_backbones=("resnet18",),
            train_samples=512,
        )

    def wafers_needed(self) -> int:
        largest = max(self.batch_sizes)
        return max(
            self.study_wafers + 1,
            largest * math.ceil(self.predict_wafers / largest),
            self.train_samples // self.train_epochs,
        )


# ---- timing helpers ---------------------------------------------------------------------------

#: Something to time: one full pass of a measurement (its warm-up was done beforehand).
Work = Callable[[], object]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, work: Work) -> float:
    """Seconds `work` takes, the device's queue drained before and after."""
    _sync(device)
    start = time.perf_counter()
    work()
    _sync(device)
    return time.perf_counter() - start


def fastest(device: torch.device, works: Mapping[str, Work], repeats: int) -> dict[str, float]:
    """The shortest of `repeats` timings of each work, the works taking turns in each round.

    Others' load on the machine only ever slows a run down, so the fastest run is the best
    estimate of what the code itself costs, and taking turns exposes the works compared with
    each other to the same moments of load.
    """
    best = dict.fromkeys(works, math.inf)
    for _ in range(repeats):
        for name, work in works.items():
            best[name] = min(best[name], _timed(device, work))
    return best


def precision_of(device: torch.device) -> str:
    """The precision the engine computes in on `device` (`backend.classifier.autocast`)."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()):
        return "bf16 autocast"
    return "fp32"


def whole_batches(wafers: int, batch: int) -> int:
    return batch * math.ceil(wafers / batch)


# ---- the measurements: each prepares its inputs, warms up, and returns the work to time -------


def plain_network(backbone: str, n_classes: int, device: torch.device) -> nn.Module:
    """A torchvision ResNet as anyone would build it: 3 input channels (the project's one-hot
    off-wafer/good/failing), one output per failure type, channels_last on `device`."""
    constructors = {"resnet18": models.resnet18, "resnet50": models.resnet50}
    network = constructors[backbone](weights=None, num_classes=n_classes)
    return network.to(device).to(memory_format=torch.channels_last)


def study_way(wafers: WaferMaps, n: int, n_classes: int, size: int, device: torch.device) -> Work:
    """The study's way: resnet50, fp32, each wafer alone: resized to size x size, one-hot,
    one forward pass (per-wafer preparation is inside the timing, as in a loop over images).
    Wafer `n` is the warm-up."""
    network = plain_network(STUDY_BACKBONE, n_classes, device).eval()

    def run(indices: range) -> None:
        with torch.inference_mode():
            for i in indices:
                x = torch.from_numpy(one_hot(resize_nearest(wafers.die_map(i), size)[None]))
                network(x.to(device).contiguous(memory_format=torch.channels_last))

    run(range(n, n + 1))
    return lambda: run(range(n))


def raw_forward(
    backbone: str, codes: npt.NDArray[np.uint8], batch: int, n_classes: int, device: torch.device
) -> Work:
    """The raw model: forward passes only, inputs one-hot and on the device beforehand."""
    network = plain_network(backbone, n_classes, device).eval()
    inputs = to_inputs(torch.from_numpy(codes).to(device))

    def run(parts: Iterable[slice]) -> None:
        with torch.inference_mode(), autocast(device):
            for part in parts:
                network(inputs[part])

    run([slice(0, batch)])
    return lambda: run(batches(len(codes), batch))


def engine_classifier(
    backbone: str, labels: LabelConfig, size: int, device: torch.device, seed: int
) -> WaferClassifier:
    """The engine's classifier with fresh weights (the same compute as a trained one), with a
    card that serves it with a fixed routing threshold."""
    n = len(labels.failure_types)
    card = ModelCard(
        version=f"v001-bench-{backbone}",
        failure_types=labels.failure_types,
        image_size=size,
        backbone=backbone,
        logit_adjustment=(0.0,) * n,
        trained_through_set=0,
        metrics={"route_threshold": 0.5},
    )
    network = build_network(backbone, n, seed).to(device).to(memory_format=torch.channels_last)
    return WaferClassifier(network=network, card=card, device=device)


def engine_predict(classifier: WaferClassifier, codes: npt.NDArray[np.uint8], batch: int) -> Work:
    """`predict_proba` on die codes in memory, at `batch`."""
    classifier.predict_proba(codes[:batch], batch_size=batch)
    return lambda: classifier.predict_proba(codes, batch_size=batch)


def label_studio_tasks(
    wafers: WaferMaps, labels: LabelConfig, source: str, first_id: int = 1
) -> list[dict[str, Any]]:
    """Every wafer as the full task dict Label Studio sends to /predict: the data `import-sets`
    writes (a data-URL PNG from the project's renderer, set, source, wafer id, lot, slot) and
    the task's own fields."""
    tasks = []
    for i in range(len(wafers)):
        task = wafer_task(wafers, i, 1, labels, with_label=False, source=source)
        task.update(
            id=first_id + i,
            project=BENCH_PROJECT,
            meta={},
            created_at="2026-12-01T00:00:00.000000Z",
            updated_at="2026-12-01T00:00:00.000000Z",
            is_labeled=False,
            overlap=1,
            inner_id=first_id + i,
            total_annotations=0,
            cancelled_annotations=0,
            total_predictions=0,
            annotations=[],
            predictions=[],
            drafts=[],
            file_upload=None,
        )
        tasks.append(task)
    return tasks


def predict_bodies(
    tasks: Sequence[dict[str, Any]], batch: int, label_config_xml: str
) -> list[bytes]:
    """/predict bodies of `batch` tasks each, serialised once (Label Studio's side of the cost)."""
    return [
        json.dumps(
            {
                "tasks": list(tasks[part]),
                "project": f"{BENCH_PROJECT}.1764547200",
                "label_config": label_config_xml,
                "params": {"login": None, "password": None, "context": None},
            }
        ).encode()
        for part in batches(len(tasks), batch)
    ]


@contextmanager
def quiet(logger_name: str, level: int = logging.ERROR) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def predict_app(settings: Settings, classifier: WaferClassifier, model_dir: Path) -> FlaskClient:
    """A test client of the real app and service, `classifier` published for BENCH_PROJECT in
    `model_dir` (empty) and served."""
    ModelStore.for_project(model_dir, BENCH_PROJECT, classifier.device).publish(classifier)
    service_settings = replace(
        settings,
        model_dir=model_dir,
        device=classifier.device.type,
        image_size=classifier.card.image_size,
        backbone=classifier.card.backbone,
        label_studio_api_key="",
        route_threshold=None,
    )
    with quiet("backend.app"):  # its warning that no credentials are set
        app = create_app(WaferLabelingService(service_settings), basic_auth=None)
    return app.test_client()


def post_predict(client: FlaskClient, body: bytes) -> None:
    """One /predict; a RuntimeError unless every task came back with a prediction."""
    response = client.post("/predict", data=body, content_type="application/json")
    answer = response.get_json()
    if response.status_code != 200 or not isinstance(answer, dict):
        raise RuntimeError(
            f"/predict answered {response.status_code}: {response.get_data()[:300]!r}"
        )
    failed = [r for r in answer["results"] if not r.get("result")]
    if failed:
        raise RuntimeError(f"/predict failed {len(failed)} tasks: {failed[0]}")


def predict_http(client: FlaskClient, bodies: Sequence[bytes]) -> Work:
    """POST every body to /predict, one after the other."""
    post_predict(client, bodies[0])

    def run() -> None:
        for body in bodies:
            post_predict(client, body)

    return run


def rgb_picture_url(die_map: npt.NDArray[np.uint8]) -> str:
    """A wafer's picture as drawn before palette PNGs: an RGB PNG data URL (same look)."""
    return data_url(png_bytes(picture_colours(render_picture(die_map))))


def palette_picture_url(die_map: npt.NDArray[np.uint8]) -> str:
    """A wafer's picture as `import-sets` draws it now: a palette PNG data URL."""
    return data_url(png_bytes(render_picture(die_map)))


def picture_works(wafers: WaferMaps, size: int) -> tuple[dict[str, Work], dict[str, float]]:
    """Works drawing+encoding every wafer's picture (``encode_rgb``, ``encode_palette``) and
    decoding each kind back to the (size, size) model input (``decode_rgb``,
    ``decode_palette``), and the mean data-URL length of each kind.

    The decodes are checked once: both kinds give the die map's model input, or RuntimeError.
    """
    maps = [wafers.die_map(i) for i in range(len(wafers))]
    urls = {
        "rgb": [rgb_picture_url(m) for m in maps],
        "palette": [palette_picture_url(m) for m in maps],
    }
    http = httpx.Client()

    def decode(values: Sequence[str]) -> list[npt.NDArray[np.uint8]]:
        return [
            model_input(v, http, label_studio_url=None, api_key=None, size=size) for v in values
        ]

    expected = encode_wafers(wafers, size)
    for kind, values in urls.items():
        if not np.array_equal(np.stack(decode(values)), expected):
            raise RuntimeError(f"the {kind} pictures do not decode to the wafers' model input")
    works: dict[str, Work] = {
        "encode_rgb": lambda: [rgb_picture_url(m) for m in maps],
        "encode_palette": lambda: [palette_picture_url(m) for m in maps],
        "decode_rgb": lambda: decode(urls["rgb"]),
        "decode_palette": lambda: decode(urls["palette"]),
    }
    lengths = {kind: float(np.mean([len(v) for v in values])) for kind, values in urls.items()}
    return works, lengths


def plain_training(
    network: nn.Module,
    codes: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    batch: int,
    device: torch.device,
    generator: torch.Generator,
) -> None:
    """The loop a PyTorch user writes: random batches, one-hot, cross-entropy, AdamW steps."""
    optimiser = torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=1e-4)
    network.train()
    for _ in range(steps):
        pick = torch.randint(0, len(codes), (batch,), generator=generator).to(device)
        x = F.one_hot(codes[pick].long(), N_CHANNELS).permute(0, 3, 1, 2).float()
        with autocast(device):
            loss = F.cross_entropy(
                network(x.contiguous(memory_format=torch.channels_last)), targets[pick]
            )
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()


def training_works(
    backbone: str,
    codes: npt.NDArray[np.uint8],
    labels: npt.NDArray[np.int64],
    n_classes: int,
    plan: BenchPlan,
    device: torch.device,
) -> tuple[dict[str, Work], int]:
    """Works "plain", "engine" and "recalibration", and the samples each loop trains on.

    Plain and engine: the same network, batch size, precision and number of samples. The
    engine's work is `train_network` whole: sampling, augmentation, schedule and its final
    BatchNorm recalibration (a fixed pass over up to 2,048 wafers, also timed alone).
    """
    batch = plan.train_batch_size
    config = TrainConfig(epochs=plan.train_epochs, batch_size=batch, seed=plan.seed)
    steps = plan.train_epochs * (len(codes) // batch)
    generator = torch.Generator().manual_seed(plan.seed)
    data = torch.from_numpy(np.ascontiguousarray(codes)).to(device)
    targets = torch.from_numpy(labels).to(device)
    plain = build_network(backbone, n_classes, plan.seed).to(device)
    plain = plain.to(memory_format=torch.channels_last)
    engine = build_network(backbone, n_classes, plan.seed)
    # Warm-ups on the shapes timed: two steps of each loop.
    plain_training(plain, data, targets, 2, batch, device, generator)
    warm = replace(config, epochs=1)
    train_network(engine, codes[: 2 * batch], labels[: 2 * batch], n_classes, warm, device)
    works: dict[str, Work] = {
        "plain": lambda: plain_training(plain, data, targets, steps, batch, device, generator),
        "engine": lambda: train_network(engine, codes, labels, n_classes, config, device),
        "recalibration": lambda: recalibrate_batch_norm(engine, data, device, batch, generator),
    }
    return works, steps * batch


def cache_figures(settings: Settings, classes: Sequence[str]) -> dict[str, Any]:
    """Load the wafer cache in a fresh child process: seconds, and the child's resident memory
    after its imports and at its peak (VmRSS / VmHWM of /proc/self/status: `ru_maxrss` would
    carry this process's peak over into the child)."""
    child = (
        "import json, re, sys, time\n"
        "from pathlib import Path\n"
        "from backend.sources import load_wafers\n"
        "def mib(field):\n"
        "    text = Path('/proc/self/status').read_text()\n"
        "    return int(re.search(field + r':\\s+(\\d+) kB', text).group(1)) / 1024\n"
        "path, classes, cache = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]\n"
        "before = mib('VmRSS')\n"
        "start = time.perf_counter()\n"
        "wafers, report = load_wafers(Path(path), classes, Path(cache), progress=False)\n"
        "seconds = time.perf_counter() - start\n"
        "print(json.dumps({'wafers': len(wafers), 'from_cache': report.from_cache,\n"
        "                  'load_s': seconds, 'rss_before_load_mib': before,\n"
        "                  'peak_rss_mib': mib('VmHWM')}))\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            child,
            str(settings.data_path),
            json.dumps(list(classes)),
            str(settings.cache_dir),
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO_ROOT,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"loading the wafer cache in a child process failed: {done.stderr[-500:]}"
        )
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    figures["file"] = str(cache_file_for(settings.data_path, classes, settings.cache_dir, False))
    return figures


# ---- the data ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchData:
    wafers: WaferMaps
    source: str
    real: bool
    note: str


def synthetic_wafers(n: int, classes: Sequence[str], seed: int) -> WaferMaps:
    """Round wafers of 25-60 dies across with 2-30% failing dies, random failure types."""
    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(n):
        dies = int(rng.integers(25, 61))
        y, x = np.mgrid[:dies, :dies]
        centre = (dies - 1) / 2
        on_wafer = (y - centre) ** 2 + (x - centre) ** 2 <= (dies / 2) ** 2
        die_map = np.where(on_wafer, 1, 0).astype(np.uint8)
        die_map[on_wafer & (rng.random((dies, dies)) < rng.uniform(0.02, 0.3))] = 2
        maps.append(die_map)
    return WaferMaps.from_maps(maps, rng.integers(0, len(classes), n), classes)


def bench_data(settings: Settings, labels: LabelConfig, n: int, seed: int) -> BenchData:
    """`n` real wafers drawn at random from the conversion cache, or synthetic ones."""
    classes = labels.failure_types
    cache = None
    if settings.data_path.is_file():
        cache = cache_file_for(settings.data_path, classes, settings.cache_dir, False)
    if cache is None or not cache.is_file():
        where = cache if cache is not None else settings.data_path
        return BenchData(
            synthetic_wafers(n, classes, seed),
            "synthetic",
            real=False,
            note=f"no wafer cache at {where} (run `python -m backend convert`): synthetic wafers",
        )
    from backend.sources import load_wafers

    wafers, _ = load_wafers(settings.data_path, classes, settings.cache_dir, progress=False)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(wafers), size=min(n, len(wafers)), replace=False))
    while len(pick) < n:  # a tiny file: repeat its wafers
        pick = np.concatenate([pick, pick[: n - len(pick)]])
    return BenchData(
        wafers.subset(pick),
        settings.data_path.stem,
        real=True,
        note=f"{n:,} real wafers drawn at random from {len(wafers):,} in {cache.name}",
    )


# ---- the run ----------------------------------------------------------------------------------


def _figure(
    backbone: str,
    size: int,
    batch: int,
    count: int,
    seconds: float,
    precision: str,
    unit: str = "wafers",
) -> dict[str, Any]:
    return {
        "backbone": backbone,
        "input": size,
        "batch": batch,
        unit: count,
        "seconds": seconds,
        f"{unit}_per_s": count / seconds,
        "precision": precision,
    }


def machine_facts(device: torch.device) -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "bf16_cpu": cpu_has_bf16(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average_start": round(os.getloadavg()[0], 2),
    }


def _key(name: str, backbone: str, batch: int | None = None) -> str:
    return f"{name}:{backbone}" + (f":b{batch}" if batch is not None else "")


def _ratios(
    figures: dict[str, Any], backbones: Sequence[str]
) -> tuple[dict[str, float], dict[str, str]]:
    ratios: dict[str, float] = {}
    basis: dict[str, str] = {}
    raw = {(f["backbone"], f["batch"]): f["wafers_per_s"] for f in figures["raw_forward"]}
    for name, key in (("engine_predict", "engine_vs_raw"), ("predict_http", "predict_http_vs_raw")):
        for f in figures[name]:
            ratios[_key(key, f["backbone"], f["batch"])] = (
                f["wafers_per_s"] / raw[(f["backbone"], f["batch"])]
            )
    per_config = {k: v for k, v in ratios.items() if k.startswith("predict_http_vs_raw:")}
    worst = min(per_config, key=per_config.__getitem__)
    ratios["predict_http_vs_raw"] = per_config[worst]
    basis["predict_http_vs_raw"] = f"lowest over backbones and batch sizes ({worst})"
    plain = {f["backbone"]: f["samples_per_s"] for f in figures["train_plain"]}
    for f in figures["train_engine"]:
        ratios[_key("train_engine_vs_plain", f["backbone"])] = (
            f["samples_per_s"] / plain[f["backbone"]]
        )
    per_backbone = {k: v for k, v in ratios.items() if k.startswith("train_engine_vs_plain:")}
    worst = min(per_backbone, key=per_backbone.__getitem__)
    ratios["train_engine_vs_plain"] = per_backbone[worst]
    basis["train_engine_vs_plain"] = f"lowest over backbones ({worst})"
    backbone = STUDY_BACKBONE if STUDY_BACKBONE in backbones else backbones[0]
    engine = max(
        (f for f in figures["engine_predict"] if f["backbone"] == backbone),
        key=lambda f: f["batch"],
    )
    ratios["engine_vs_study_way"] = engine["wafers_per_s"] / figures["study_way"]["wafers_per_s"]
    pictures = figures["pictures"]
    for step in ("encode", "decode"):
        ratios[f"picture_{step}_palette_vs_rgb"] = (
            pictures[f"{step}_palette_wafers_per_s"] / pictures[f"{step}_rgb_wafers_per_s"]
        )
        basis[f"picture_{step}_palette_vs_rgb"] = (
            "draw + PNG + data URL per wafer"
            if step == "encode"
            else f"data URL -> model input ({pictures['input']} x {pictures['input']}) per wafer"
        ) + f", palette over RGB pictures of the same {pictures['wafers']:,} wafers"
    basis["engine_vs_study_way"] = (
        f"engine predict {backbone} at {engine['input']}, batch {engine['batch']} over the "
        f"study's way ({STUDY_BACKBONE} at {figures['study_way']['input']}, batch 1, fp32)"
    )
    return ratios, basis


def run_bench(
    plan: BenchPlan,
    settings: Settings,
    labels: LabelConfig,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Measure everything in `plan`; the JSON-ready result (see the module docstring)."""
    device = pick_device(plan.device)
    torch.manual_seed(plan.seed)
    facts = machine_facts(device)
    k = len(labels.failure_types)
    data = bench_data(settings, labels, plan.wafers_needed(), plan.seed)
    log(data.note)
    figures: dict[str, Any] = {}
    cache = None
    if data.real:
        log("wafer cache: load time and peak RSS in a child process ...")
        cache = cache_figures(settings, labels.failure_types)
    figures["cache"] = cache

    precision = precision_of(device)
    log(f"study's way: {STUDY_BACKBONE}, batch 1, fp32, {plan.study_image_size} ...")
    study = study_way(data.wafers, plan.study_wafers, k, plan.study_image_size, device)
    seconds = fastest(device, {"study": study}, plan.repeats)["study"]
    size = plan.study_image_size
    figures["study_way"] = _figure(STUDY_BACKBONE, size, 1, plan.study_wafers, seconds, "fp32")

    codes = encode_wafers(data.wafers, plan.image_size)
    label_config_xml = settings.label_config_path.read_text()
    n_predict = whole_batches(plan.predict_wafers, max(plan.batch_sizes))
    log(f"rendering {n_predict:,} wafer pictures as data-URL PNG tasks ...")
    predict_wafers = data.wafers.subset(np.arange(n_predict))
    tasks = label_studio_tasks(predict_wafers, labels, data.source)
    log(f"pictures of {n_predict:,} wafers: palette and RGB PNGs drawn, encoded, decoded ...")
    works, lengths = picture_works(predict_wafers, plan.image_size)
    best = fastest(torch.device("cpu"), works, plan.repeats)
    figures["pictures"] = {
        "wafers": n_predict,
        "input": plan.image_size,
        **{f"{name}_s": seconds for name, seconds in best.items()},
        **{f"{name}_wafers_per_s": n_predict / seconds for name, seconds in best.items()},
        **{f"data_url_chars_{kind}": chars for kind, chars in lengths.items()},
    }
    for name in ("raw_forward", "engine_predict", "predict_http"):
        figures[name] = []
    for backbone in plan.backbones:
        classifier = engine_classifier(backbone, labels, plan.image_size, device, plan.seed)
        with tempfile.TemporaryDirectory(prefix="wafer-bench-models-") as model_dir:
            client = predict_app(settings, classifier, Path(model_dir))
            for batch in plan.batch_sizes:
                n = whole_batches(plan.predict_wafers, batch)
                log(f"{backbone} at {plan.image_size}, batch {batch}: raw, engine, /predict ...")
                works = {
                    "raw_forward": raw_forward(backbone, codes[:n], batch, k, device),
                    "engine_predict": engine_predict(classifier, codes[:n], batch),
                    "predict_http": predict_http(
                        client, predict_bodies(tasks[:n], batch, label_config_xml)
                    ),
                }
                for name, seconds in fastest(device, works, plan.repeats).items():
                    figure = _figure(backbone, plan.image_size, batch, n, seconds, precision)
                    figures[name].append(figure)
                figures["predict_http"][-1]["server"] = HTTP_SERVER

    figures["train_plain"], figures["train_engine"] = [], []
    n_train = plan.train_samples // plan.train_epochs
    train_labels = data.wafers.labels[:n_train].astype(np.int64)
    for backbone in plan.train_backbones:
        log(f"training {backbone}: plain loop and engine, {plan.train_samples:,} samples each ...")
        works, samples = training_works(backbone, codes[:n_train], train_labels, k, plan, device)
        best = fastest(device, works, plan.train_repeats)
        batch = plan.train_batch_size
        for name in ("plain", "engine"):
            figure = _figure(
                backbone, plan.image_size, batch, samples, best[name], precision, unit="samples"
            )
            figure["wafers"] = n_train
            figures[f"train_{name}"].append(figure)
        figures["train_engine"][-1]["batch_norm_recalibration_s"] = best["recalibration"]
    ratios, basis = _ratios(figures, plan.backbones)
    facts["load_average_end"] = round(os.getloadavg()[0], 2)
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "machine": facts,
        "device": str(device),
        "plan": asdict(plan),
        "data": {"real": data.real, "source": data.source, "note": data.note},
        "predict_http_server": HTTP_SERVER,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "figures": figures,
        "ratios": ratios,
        "ratio_basis": basis,
        "targets": TARGETS,
    }


# ---- the printout -----------------------------------------------------------------------------


def report_lines(result: dict[str, Any]) -> list[str]:
    """The result as a person reads it: the machine, the figures, each ratio against its target."""
    m, f = result["machine"], result["figures"]
    busy = m["load_average_start"] > 0.5 * m["cpus_usable"]
    lines = [
        f"bench {result['date']} on {m['cpu_model']} ({m['cpus_usable']} CPUs usable, "
        f"{m['torch_threads']} torch threads), {result['device']}"
        + (f" ({m['gpu']})" if m["gpu"] else "")
        + f", torch {result['torch']}",
        f"load average {m['load_average_start']} at the start, {m['load_average_end']} at the end"
        + (": the machine was busy, so every figure is low and noisy" if busy else ""),
        f"data: {result['data']['note']}",
        f"/predict through: {result['predict_http_server']}",
        "",
        "| what | backbone | input | batch | precision | count | seconds | per second |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]

    def row(what: str, fig: dict[str, Any], unit: str = "wafers") -> str:
        return (
            f"| {what} | {fig['backbone']} | {fig['input']} | {fig['batch']} | "
            f"{fig['precision']} | {fig[unit]:,} {unit} | {fig['seconds']:.2f} | "
            f"{fig[f'{unit}_per_s']:,.1f} |"
        )

    lines.append(row("study's way", f["study_way"]))
    for raw, engine, http in zip(
        f["raw_forward"], f["engine_predict"], f["predict_http"], strict=True
    ):
        lines += [row("raw model forward", raw), row("engine predict_proba", engine)]
        lines.append(row("/predict (data-URL PNG tasks)", http))
    for plain, engine in zip(f["train_plain"], f["train_engine"], strict=True):
        lines += [row("training: plain loop", plain, "samples")]
        lines.append(row("training: engine", engine, "samples"))
        lines.append(
            f"|  of which BatchNorm recalibration | {engine['backbone']} | | | | | "
            f"{engine['batch_norm_recalibration_s']:.2f} | |"
        )
    cache = f["cache"]
    lines.append("")
    if cache:
        lines.append(
            f"wafer cache: {cache['wafers']:,} wafers loaded in {cache['load_s']:.2f} s; peak RSS "
            f"{cache['peak_rss_mib']:,.0f} MiB ({cache['rss_before_load_mib']:,.0f} MiB before "
            "the load), in a child process"
        )
    else:
        lines.append("wafer cache: not measured (no cache)")
    lines.append(f"this process's peak RSS: {result['peak_rss_mib']:,.0f} MiB")
    pictures = f.get("pictures")
    if pictures:
        lines += [
            "",
            f"| pictures of {pictures['wafers']:,} wafers, wafers/s | palette PNG | RGB PNG |",
            "|---|---:|---:|",
        ]
        for step, what in (("encode", "draw + PNG + data URL"), ("decode", "-> model input")):
            lines.append(
                f"| {what} | {pictures[f'{step}_palette_wafers_per_s']:,.0f} | "
                f"{pictures[f'{step}_rgb_wafers_per_s']:,.0f} |"
            )
        lines.append(
            f"| data URL (characters, mean) | {pictures['data_url_chars_palette']:,.0f} | "
            f"{pictures['data_url_chars_rgb']:,.0f} |"
        )
    lines += ["", "| ratio | value | target | met | basis |", "|---|---:|---:|---|---|"]
    ratios, basis = result["ratios"], result["ratio_basis"]
    names: tuple[str, ...] = ("predict_http_vs_raw", "train_engine_vs_plain", "engine_vs_study_way")
    names += tuple(
        n for n in ("picture_encode_palette_vs_rgb", "picture_decode_palette_vs_rgb") if n in ratios
    )
    for name in names:
        target = TARGETS.get(name)
        met = "" if target is None else ("yes" if ratios[name] >= target else "NO")
        shown = "" if target is None else f">= {target:.2f}"
        lines.append(f"| {name} | {ratios[name]:.3f} | {shown} | {met} | {basis[name]} |")
    for name in sorted(k for k in ratios if ":" in k):
        target = TARGETS.get(name.split(":")[0])
        met = "" if target is None else ("yes" if ratios[name] >= target else "NO")
        shown = "" if target is None else f">= {target:.2f}"
        lines.append(f"| {name} | {ratios[name]:.3f} | {shown} | {met} | |")
    return lines


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
