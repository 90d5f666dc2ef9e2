"""A project's first model, trained offline on a labelled history: `python -m backend train`.

Layer L2 (the classifier and its training, the model store, the Label Studio client).

The worker's first retraining learns from set 0 alone, a few hundred wafers in a demo; a fab has
a labelled history of many thousands. This trains on that history (the labelled wafers of a
wafer-map file, or the project's set 0 in Label Studio) and publishes the version through the
project's model store, which writes weights and card atomically and serves it. Its card says
"trained through set 0", so the loop goes on with pre-annotating set 1, and the worker's later
retrainings warm-start from it (when WAFER_BACKBONE names the same backbone).

Validation follows the worker's rule, so routing is calibrated and stays honest: a stable share
(`backend.splits.stable_holdout`, WAFER_VALIDATION_FRACTION) of the person-labelled wafers is
held out, keyed by the wafer's own identity (source, wafer id: `backend.retraining.holdout_key`),
so a wafer the worker will hold out was never trained on here, whether or not it is a task of the
project yet, and training needs no Label Studio: `train --project ID --data FILE --model-dir DIR`
runs on a GPU box or in a build job and publishes into MODEL_DIR.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from tqdm import tqdm

from backend.classifier import WaferClassifier, build_network, load_version, save_version
from backend.encoding import resize_nearest
from backend.images import ImageError
from backend.label_config import LabelConfig
from backend.loop_state import (
    label_of,
    labelled_by_person,
)
from backend.model_card import ModelCard
from backend.predictions import wafer_probabilities
from backend.retraining import holdout_key, with_validation
from backend.settings import Settings
from backend.splits import stable_holdout, stratified_sample, wafer_key
from backend.training import TrainConfig, logit_adjustment, train_network
from backend.uncertainty import Measure
from backend.wafer_sets import INITIAL_SET
from backend.wafers import WaferMaps

log = logging.getLogger(__name__)

#: The set a first model counts as trained through.
TRAINED_THROUGH = INITIAL_SET


@dataclass(frozen=True)
class History:
    """Labelled wafers as model inputs.

    `holdout_keys` are what the stable holdout hashes (`backend.retraining.holdout_key`: the
    wafer's source and id). `by_person` marks labels a person gave (known labels of the
    history, engineer labels), the only ones fit to validate on.
    """

    codes: npt.NDArray[np.uint8]
    classes: npt.NDArray[np.int64]
    holdout_keys: npt.NDArray[np.int64]
    by_person: npt.NDArray[np.bool_]
    in_project: int
    origin: str
    skipped: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.classes.shape[0])


def history_from_wafers(
    wafers: WaferMaps,
    size: int,
    *,
    subsample: float,
    seed: int,
    source: str,
    origin: str,
    in_project: int = 0,
    progress: bool = True,
) -> History:
    """The labelled wafers of a file (a stratified `subsample` of them), as (size, size) codes.

    `source` is the file's source name in task data (`backend.wafer_sets.source_name`), which
    with a wafer's row keys the hold-out; `in_project` is how many of them are tasks already
    (for the report only).
    """
    labelled = np.flatnonzero(wafers.labels >= 0)
    if labelled.size < 2:
        raise ValueError(f"{origin} holds {labelled.size} labelled wafers; need at least 2")
    rng = np.random.default_rng(seed)
    chosen = labelled[stratified_sample(wafers.labels[labelled], subsample, rng)]
    codes = np.empty((chosen.size, size, size), dtype=np.uint8)
    for j, i in enumerate(
        tqdm(chosen.tolist(), desc="encoding wafers", unit="wafer", disable=not progress)
    ):
        codes[j] = resize_nearest(wafers.die_map(i), size)
    keys = np.array([wafer_key(source, int(w)) for w in wafers.source_row[chosen]], np.int64)
    return History(
        codes=codes,
        classes=wafers.labels[chosen].astype(np.int64),
        holdout_keys=keys,
        by_person=np.ones(chosen.size, dtype=np.bool_),
        in_project=in_project,
        origin=origin,
    )


def history_from_tasks(
    tasks: Sequence[Mapping[str, Any]],
    labels: LabelConfig,
    auto_user: int,
    fetch: Callable[[str], npt.NDArray[np.uint8]],
    size: int,
    *,
    origin: str,
    progress: bool = True,
) -> History:
    """Labelled tasks (e.g. the project's set 0, annotations included) as model inputs.

    `fetch` turns a task's image value into (size, size) die codes. Unreadable pictures and
    failure types outside the labeling config are skipped and counted.
    """
    codes: list[npt.NDArray[np.uint8]] = []
    classes: list[int] = []
    keys: list[int] = []
    by_person: list[bool] = []
    skipped: dict[str, int] = {}
    for task in tqdm(tasks, desc="reading pictures", unit="wafer", disable=not progress):
        failure_type = label_of(task, labels, auto_user)
        if failure_type is None:
            continue
        if failure_type not in labels.failure_types:
            skipped["unknown_failure_type"] = skipped.get("unknown_failure_type", 0) + 1
            continue
        try:
            codes.append(fetch(str((task.get("data") or {}).get(labels.image_value, ""))))
        except ImageError:
            skipped["unreadable_picture"] = skipped.get("unreadable_picture", 0) + 1
            continue
        classes.append(labels.failure_types.index(failure_type))
        keys.append(holdout_key(task))
        by_person.append(labelled_by_person(task, auto_user))
    if len(codes) < 2:
        raise ValueError(f"{origin} holds {len(codes)} usable labelled wafers; need at least 2")
    return History(
        codes=np.stack(codes),
        classes=np.asarray(classes, dtype=np.int64),
        holdout_keys=np.asarray(keys, dtype=np.int64),
        by_person=np.asarray(by_person, dtype=np.bool_),
        in_project=len(keys),
        origin=origin,
        skipped=skipped,
    )


def train_first_model(
    history: History,
    labels: LabelConfig,
    settings: Settings,
    config: TrainConfig,
    *,
    version: str,
    project: int,
    device: torch.device,
    progress: bool = True,
) -> tuple[WaferClassifier, dict[str, float]]:
    """Train a fresh network on the history, calibrate routing on its stable holdout, and return
    the classifier (card complete, trained through set 0) with speed figures.

    The backbone, input size, weights file, validation fraction, routing measure and target
    accuracy come from `settings`; epochs, batch size and seed from `config`.
    """
    n_classes = len(labels.failure_types)
    train, val = holdout_split(history, settings)
    if len(train) < 2:
        raise ValueError(f"only {len(train)} wafers left to train on after the holdout")
    network = build_network(settings.backbone, n_classes, config.seed, settings.weights_path)
    report = train_network(
        network,
        history.codes[train],
        history.classes[train],
        n_classes,
        config,
        device,
        progress="training" if progress else None,
    )
    card = ModelCard(
        version=version,
        failure_types=labels.failure_types,
        image_size=int(history.codes.shape[1]),
        backbone=settings.backbone,
        logit_adjustment=tuple(logit_adjustment(history.classes[train], n_classes, config.balance)),
        trained_through_set=TRAINED_THROUGH,
        project=project,
        route_measure=settings.route_measure,
        training=config.to_dict()
        | {
            "train_wafers": len(train),
            "validation_wafers": len(val),
            "warm_start": False,
            "skipped": dict(history.skipped),
            "train_seconds": round(report.seconds, 2),
            "offline": {"history": history.origin, "wafers_in_project": history.in_project},
        },
    )
    model, figures = validated(
        WaferClassifier(network=network, card=card, device=device), history, settings, progress
    )
    figures |= {
        "train_wafers": float(len(train)),
        "train_seconds": report.seconds,
        "train_wafers_per_second": len(train) * config.epochs / report.seconds,
    }
    return model, figures


def holdout_split(
    history: History, settings: Settings
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Indices of the history's training wafers and of its held-out, person-labelled ones (the
    worker's stable holdout, WAFER_VALIDATION_FRACTION)."""
    held_out = stable_holdout(history.holdout_keys, settings.validation_fraction)
    held_out &= history.by_person
    return np.flatnonzero(~held_out), np.flatnonzero(held_out)


def validated(
    model: WaferClassifier, history: History, settings: Settings, progress: bool = True
) -> tuple[WaferClassifier, dict[str, float]]:
    """The model with its card's routing made for `settings`: its scores on the history's
    held-out wafers by WAFER_ROUTE_MEASURE (each set's cut is calibrated to them) and the
    calibration figures at WAFER_TARGET_ACCURACY in its metrics. A cached network is validated
    again this way, so a change of routing never trains the network again."""
    train, val = holdout_split(history, settings)
    measure = Measure(settings.route_measure)
    card = dataclasses.replace(model.card, route_measure=measure.value, validation=None)
    model = WaferClassifier(network=model.network, card=card, device=model.device)
    figures: dict[str, float] = {}
    metrics: dict[str, float] = {"train_wafers": float(len(train))}
    if len(val):
        started = time.perf_counter()
        probs = wafer_probabilities(
            model,
            history.codes[val],
            measure,
            progress="validating" if progress else None,
        )
        figures["predict_wafers_per_second"] = len(val) / (time.perf_counter() - started)
        card, calibration = with_validation(
            card, probs, history.classes[val], measure, settings.target_accuracy
        )
        metrics |= calibration
    card = dataclasses.replace(card, metrics=metrics)
    return WaferClassifier(network=model.network, card=card, device=model.device), figures


def first_model_cache_key(
    history: History, settings: Settings, config: TrainConfig, data_identity: str
) -> str:
    """What a cached first model's network depends on: the wafers and their holdout keys, the
    labels, the network and its input, and the training settings. Not the routing: a cached
    network is validated again for the routing in force (`validated`)."""
    digest = hashlib.sha256()
    for part in (
        data_identity,
        settings.backbone,
        str(settings.image_size),
        str(settings.weights_path),
        str(settings.validation_fraction),
        json.dumps(config.to_dict(), sort_keys=True),
    ):
        digest.update(part.encode() + b"\0")
    for array in (history.codes, history.classes, history.holdout_keys, history.by_person):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:24]


def cached_first_model(
    history: History,
    labels: LabelConfig,
    settings: Settings,
    config: TrainConfig,
    *,
    version: str,
    project: int,
    device: torch.device,
    cache_dir: Path,
    data_identity: str,
    progress: bool = True,
) -> tuple[WaferClassifier, bool]:
    """`train_first_model`, trained once per `first_model_cache_key` and kept in
    `cache_dir/first-models/` (written atomically); returns (classifier, taken from the cache).
    The card names `version` and `project` whichever run trained it."""
    path = (
        cache_dir
        / "first-models"
        / (first_model_cache_key(history, settings, config, data_identity) + ".pt")
    )
    if path.is_file():
        try:
            cached = load_version(path, device)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            log.warning("cached first model %s unreadable (%s): training again", path, exc)
        else:
            card = dataclasses.replace(cached.card, version=version, project=project)
            model = WaferClassifier(network=cached.network, card=card, device=device)
            return validated(model, history, settings, progress)[0], True
    classifier, _ = train_first_model(
        history,
        labels,
        settings,
        config,
        version=version,
        project=project,
        device=device,
        progress=progress,
    )
    save_version(classifier, path)
    return classifier, False
