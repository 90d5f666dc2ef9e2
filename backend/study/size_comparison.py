"""Which model input size? Accuracy and speed of several sizes on one and the same split.

Layer L2. Backs the default S (WAFER_IMAGE_SIZE): every size trains the same backbone with the same
seed on the same stratified training wafers and is scored on the same held-out wafers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from backend.classifier import WaferClassifier, build_network, pick_device
from backend.encoding import encode_wafers
from backend.label_config import LabelConfig
from backend.model_card import ModelCard
from backend.splits import stratified_sample, stratified_train_val
from backend.study.metrics import confusion_matrix, macro_f1
from backend.training import TrainConfig, logit_adjustment, train_network
from backend.wafers import WaferMaps


def compare_sizes(
    wafers: WaferMaps,
    labels: LabelConfig,
    sizes: Sequence[int],
    subsample: float,
    test_fraction: float,
    backbone: str,
    epochs: int,
    batch_size: int,
    device_name: str,
    seed: int,
) -> str:
    """Train and score one model per size; return a markdown table of the figures."""
    rng = np.random.default_rng(seed)
    if subsample < 1:
        wafers = wafers.subset(stratified_sample(wafers.labels, subsample, rng))
    true = wafers.labels.astype(np.int64)
    train, test = stratified_train_val(true, test_fraction, rng)
    device = pick_device(device_name)
    k = len(labels.failure_types)
    rows = [
        f"{len(train):,} training and {len(test):,} test wafers, {backbone}, {epochs} epochs, {device}",
        "",
        "| input | test accuracy | macro-F1 (8 defects) | train wafers/s | predict wafers/s | encode s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for size in sizes:
        t0 = time.perf_counter()
        codes = encode_wafers(wafers, size)
        encode_s = time.perf_counter() - t0
        network = build_network(backbone, k, seed)
        config = TrainConfig(epochs=epochs, batch_size=batch_size, seed=seed)
        report = train_network(
            network, codes[train], true[train], k, config, device, progress=f"train at {size}"
        )
        card = ModelCard(
            version=f"size-{size}",
            failure_types=labels.failure_types,
            image_size=size,
            backbone=backbone,
            logit_adjustment=tuple(logit_adjustment(true[train], k, config.balance)),
        )
        model = WaferClassifier(network=network, card=card, device=device)
        t0 = time.perf_counter()
        probs = model.predict_proba(codes[test], progress=f"predict at {size}")
        predict_s = time.perf_counter() - t0
        predicted = probs.argmax(1)
        cm = confusion_matrix(true[test], predicted, k)
        rows.append(
            f"| {size}x{size} | {100 * np.mean(predicted == true[test]):.2f}% | "
            f"{macro_f1(cm, labels.defect_classes):.4f} | {report.samples_per_second:.1f} | "
            f"{len(test) / predict_s:.1f} | {encode_s:.2f} |"
        )
    return "\n".join(rows)
