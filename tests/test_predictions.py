"""Tasks -> wafer predictions -> Label Studio entries, with a tiny untrained ResNet18."""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from backend.classifier import WaferClassifier, build_network
from backend.encoding import render_picture, resize_nearest
from backend.images import ImageError, ImageRules, data_url, model_input, png_bytes
from backend.label_config import LabelConfig
from backend.model_card import ModelCard
from backend.predictions import (
    ERROR_ROUTE,
    WaferPrediction,
    predict_tasks,
    tasks_to_label_studio,
    to_label_studio,
)
from backend.routing import STUDY_RULES, RoutingRule, sureness
from backend.uncertainty import Measure, entropy, least_confidence, margin

SIZE = 16
VERSION = "wafer-test-1"


class CountingClassifier(WaferClassifier):
    """Records the shape of every predict_proba batch."""

    def __init__(self, network: torch.nn.Module, card: ModelCard) -> None:
        super().__init__(network=network, card=card, device=torch.device("cpu"))
        self.batches: list[tuple[int, ...]] = []

    def predict_proba(
        self, codes: np.ndarray, batch_size: int = 256, progress: str | None = None
    ) -> np.ndarray:
        self.batches.append(codes.shape)
        return super().predict_proba(codes, batch_size, progress)


@pytest.fixture(scope="module")
def network(label_config: LabelConfig) -> torch.nn.Module:
    return build_network("resnet18", len(label_config.failure_types), seed=0)


@pytest.fixture
def classifier(network: torch.nn.Module, label_config: LabelConfig) -> CountingClassifier:
    k = len(label_config.failure_types)
    card = ModelCard(VERSION, label_config.failure_types, SIZE, "resnet18", (0.0,) * k)
    return CountingClassifier(network, card)


def wafer(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3, size=(20 + seed, 22)).astype(np.uint8)


def codes_of(value: str) -> np.ndarray:
    """A fake fetch: 'good-N' -> the codes of wafer N; anything else cannot be read."""
    if value.startswith("good-"):
        return resize_nearest(wafer(int(value[5:])), SIZE)
    raise ImageError(f"could not fetch image {value}: HTTP 404 Not Found")


def task(task_id: int, image: str, field: str = "image") -> dict[str, Any]:
    return {"id": task_id, "data": {field: image}, "project": 1}


def test_order_is_kept_and_a_bad_image_does_not_stop_the_others(
    classifier: CountingClassifier, label_config: LabelConfig
) -> None:
    tasks = [
        task(10, "good-0"),
        task(11, "/data/upload/1/missing.png"),
        task(12, "good-1"),
        {"id": 13, "data": {"picture": "good-2"}},  # not the config's image field
        task(14, "good-2"),
    ]
    rule = STUDY_RULES[Measure.LEAST_CONFIDENCE]
    out = predict_tasks(tasks, classifier, label_config, rule, codes_of)
    assert [p.task_id for p in out] == [10, 11, 12, 13, 14]
    assert [p.route == ERROR_ROUTE for p in out] == [False, True, False, True, False]
    assert classifier.batches == [(3, SIZE, SIZE)]  # one batched call for the readable ones

    bad = out[1]
    assert bad.error is not None and "task 11" in bad.error and "HTTP 404" in bad.error
    assert bad.failure_type is None and bad.score is None and bad.probabilities == {}
    assert out[3].error is not None and "'image'" in out[3].error

    direct = classifier.predict_proba(np.stack([resize_nearest(wafer(s), SIZE) for s in (0, 1, 2)]))
    for p, row in zip([out[0], out[2], out[4]], direct, strict=True):
        assert p.ok and p.error is None
        assert list(p.probabilities) == list(label_config.failure_types)
        np.testing.assert_allclose(list(p.probabilities.values()), row, atol=1e-6)
        assert p.failure_type == label_config.failure_types[int(np.argmax(row))]
        # The default rule of these tests routes by least confidence: the score is max p.
        assert p.score == pytest.approx(max(p.probabilities.values()), rel=1e-12)


def test_uncertainty_and_route_agree_with_the_measures(
    classifier: CountingClassifier, label_config: LabelConfig
) -> None:
    tasks = [task(i, f"good-{i}") for i in range(4)]
    for rule in STUDY_RULES.values():
        out = predict_tasks(tasks, classifier, label_config, rule, codes_of)
        probs = np.array([list(p.probabilities.values()) for p in out])
        np.testing.assert_allclose(
            np.array([p.least_confidence for p in out], dtype=float), least_confidence(probs)
        )
        np.testing.assert_allclose(np.array([p.margin for p in out], dtype=float), margin(probs))
        np.testing.assert_allclose(np.array([p.entropy for p in out], dtype=float), entropy(probs))
        assert [p.route for p in out] == rule.routes(probs).tolist()
        # The score is the sureness by the rule's measure, and the routes split at one cut.
        scores = np.array([p.score for p in out], dtype=float)
        np.testing.assert_allclose(scores, sureness(probs, rule.measure), rtol=1e-12)
        auto = np.array([p.route == "auto" for p in out])
        if auto.any():
            assert scores[~auto].max(initial=-1.0) < scores[auto].min()
    everyone = RoutingRule(Measure.ENTROPY, -math.inf)
    nobody = RoutingRule(Measure.ENTROPY, math.inf)
    assert {
        p.route for p in predict_tasks(tasks, classifier, label_config, everyone, codes_of)
    } == {"engineer"}
    assert {p.route for p in predict_tasks(tasks, classifier, label_config, nobody, codes_of)} == {
        "auto"
    }


def test_label_studio_entries(classifier: CountingClassifier, label_config: LabelConfig) -> None:
    tasks = [task(1, "good-0"), task(2, "broken")]
    good, bad = predict_tasks(
        tasks, classifier, label_config, STUDY_RULES[Measure.MARGIN], codes_of
    )
    entry = to_label_studio(good, label_config, VERSION)
    assert entry == {
        "result": [
            {
                "from_name": "failure_type",
                "to_name": "wafer_map",
                "type": "choices",
                "value": {"choices": [good.failure_type]},
            }
        ],
        "score": good.score,
        "model_version": VERSION,
    }
    assert isinstance(entry["score"], float) and 0.0 < entry["score"] <= 1.0
    failed = to_label_studio(bad, label_config, VERSION)
    assert "result" not in failed  # Label Studio skips it, keeps the batch, retries next time
    assert failed["model_version"] == VERSION
    assert "broken" in failed["error"]
    entries = tasks_to_label_studio([good, bad], label_config, VERSION)
    assert entries == [entry, failed]
    json.dumps(entries)  # plain JSON types only


def test_an_unknown_failure_type_is_refused(label_config: LabelConfig) -> None:
    p = WaferPrediction(
        task_id=1,
        failure_type="Galaxy",
        score=0.9,
        probabilities={"Galaxy": 0.9},
        least_confidence=0.1,
        margin=0.8,
        entropy=0.3,
        route="auto",
    )
    with pytest.raises(ValueError, match="Galaxy"):
        to_label_studio(p, label_config, VERSION)


def test_a_model_whose_classes_the_config_lacks_is_refused_before_fetching(
    network: torch.nn.Module, label_config: LabelConfig
) -> None:
    names = (*label_config.failure_types[:-1], "Galaxy")
    card = ModelCard("odd", names, SIZE, "resnet18", (0.0,) * len(names))
    model = CountingClassifier(network, card)
    fetched: list[str] = []

    def fetch(value: str) -> np.ndarray:
        fetched.append(value)
        return codes_of(value)

    with pytest.raises(ValueError, match="lacks: Galaxy"):
        predict_tasks([task(1, "good-0")], model, label_config, STUDY_RULES[Measure.MARGIN], fetch)
    assert fetched == [] and model.batches == []


def test_wrong_codes_from_fetch_are_task_errors(
    classifier: CountingClassifier, label_config: LabelConfig
) -> None:
    def fetch(value: str) -> np.ndarray:
        if value == "small":
            return np.zeros((8, 8), dtype=np.uint8)
        if value == "odd":
            return np.full((SIZE, SIZE), 7, dtype=np.uint8)
        return codes_of(value)

    tasks = [task(1, "small"), task(2, "odd"), task(3, "good-0"), {"data": {"image": 5}}]
    out = predict_tasks(tasks, classifier, label_config, STUDY_RULES[Measure.MARGIN], fetch)
    assert [p.route == ERROR_ROUTE for p in out] == [True, True, False, True]
    assert "shape (8, 8)" in (out[0].error or "")
    assert "found 7" in (out[1].error or "")
    assert out[3].task_id is None and "task #3" in (out[3].error or "")


def test_no_readable_task_means_no_model_call(
    classifier: CountingClassifier, label_config: LabelConfig
) -> None:
    rule = STUDY_RULES[Measure.MARGIN]
    assert predict_tasks([], classifier, label_config, rule, codes_of) == []
    out = predict_tasks([task(1, "x"), task(2, "y")], classifier, label_config, rule, codes_of)
    assert [p.route for p in out] == [ERROR_ROUTE, ERROR_ROUTE]
    assert classifier.batches == []


def test_pictures_from_data_urls_predict_like_the_die_maps(
    classifier: CountingClassifier, label_config: LabelConfig
) -> None:
    """L1 and L2 together: annotator PNGs in the tasks give the die maps' own prediction."""
    client = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(404)))
    fetch = functools.partial(
        model_input,
        client=client,
        label_studio_url=None,
        api_key=None,
        size=SIZE,
        rules=ImageRules(allowed_hosts=("pictures.example",)),
    )
    maps = [wafer(s) for s in range(3)]
    tasks = [task(i, data_url(png_bytes(render_picture(m)))) for i, m in enumerate(maps)]
    tasks.append(task(3, "http://pictures.example/gone.png"))
    out = predict_tasks(tasks, classifier, label_config, STUDY_RULES[Measure.ENTROPY], fetch)
    direct = classifier.predict_proba(np.stack([resize_nearest(m, SIZE) for m in maps]))
    for p, row in zip(out[:3], direct, strict=True):
        np.testing.assert_allclose(list(p.probabilities.values()), row, atol=1e-6)
    assert out[3].route == ERROR_ROUTE and "gone.png: HTTP 404" in (out[3].error or "")
