"""Eight-view routing served (`WAFER_ROUTE_MEASURE=eight-views`): the model sees each wafer in its
8 symmetric drawings, and the score is the offline study's `view_uncertainty`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.classifier import WaferClassifier, build_network
from backend.label_config import LabelConfig
from backend.loop_state import route_measure
from backend.model_card import HeldOutScores, ModelCard
from backend.predictions import predict_codes, wafer_probabilities
from backend.retraining import with_validation
from backend.routing import RoutingRule, scored_routes, sureness
from backend.settings import Settings
from backend.study.symmetric_views import summarize_views, view_uncertainty
from backend.uncertainty import (
    SURE_ONE_VIEW_MARGIN,
    Measure,
    first_view_for_sure,
    margin,
    max_uncertainty,
    mean_over_views,
    uncertainty,
    views_for,
)

SIZE = 16


def test_the_served_score_is_the_studys_view_uncertainty() -> None:
    rng = np.random.default_rng(3)
    drawn = rng.dirichlet(np.ones(9), size=(8, 40))
    served = uncertainty(drawn, Measure.EIGHT_VIEWS)
    assert served == pytest.approx(view_uncertainty(summarize_views(drawn)))
    # Views that disagree make a wafer less sure than its mean's margin alone says.
    mean, agreement = mean_over_views(drawn)
    assert np.all(served >= uncertainty(mean, Measure.MARGIN) - 1e-12)
    assert (agreement < 1).any() and (served > uncertainty(mean, Measure.MARGIN)).any()
    # The other measures read the mean of several drawings; one drawing agrees with itself.
    assert uncertainty(drawn, Measure.ENTROPY) == pytest.approx(uncertainty(mean, Measure.ENTROPY))
    one = drawn[0]
    assert uncertainty(one, Measure.EIGHT_VIEWS) == pytest.approx(uncertainty(one, Measure.MARGIN))
    assert sureness(drawn, Measure.EIGHT_VIEWS) == pytest.approx(1 - served)
    assert views_for(Measure.EIGHT_VIEWS) == 8 and views_for("margin") == 1
    with pytest.raises(ValueError):
        uncertainty(np.full((8, 2, 3), 0.5), Measure.EIGHT_VIEWS)  # rows sum to 1.5


def test_a_rule_on_eight_views_routes_and_describes_itself() -> None:
    drawn = np.stack([np.tile([[0.9, 0.1], [0.55, 0.45]], (1, 1))] * 8)
    drawn[4:, 1] = [0.45, 0.55]  # wafer 1: half the views call the other type
    rule = RoutingRule(Measure.EIGHT_VIEWS, 0.5)
    assert rule.needs_engineer(drawn).tolist() == [False, True]
    assert rule.describe() == "(p1 - p2) x agreement over 8 views < 0.5"
    routed = scored_routes(drawn, rule)
    assert routed.auto.tolist() == [True, False] and routed.cut == pytest.approx(0.8)


@pytest.fixture(scope="module")
def classifier(label_config: LabelConfig) -> WaferClassifier:
    k = len(label_config.failure_types)
    network = build_network("wafercnn", k, seed=0)
    card = ModelCard("v001-set0", label_config.failure_types, SIZE, "wafercnn", (0.0,) * k)
    return WaferClassifier(network=network, card=card, device=torch.device("cpu"))


def test_the_model_sees_the_eight_drawings_of_each_wafer(classifier: WaferClassifier) -> None:
    codes = np.random.default_rng(0).integers(0, 3, size=(5, SIZE, SIZE), dtype=np.uint8)
    drawn = classifier.predict_views(codes, 8)
    assert drawn.shape == (8, 5, len(classifier.card.failure_types))
    assert drawn.sum(axis=2) == pytest.approx(np.ones((8, 5)))
    assert drawn[0] == pytest.approx(classifier.predict_proba(codes), abs=1e-5)
    # Drawing 1 of a wafer is drawing 0 of the wafer turned by 90 degrees.
    turned = np.ascontiguousarray(np.rot90(codes, 1, axes=(1, 2)))
    assert drawn[1] == pytest.approx(classifier.predict_proba(turned), abs=1e-5)
    # A prediction over 8 views: the mean's type, scored and routed on all 8.
    predicted, routed = predict_codes(
        list(range(5)),
        codes,
        classifier,
        RoutingRule(Measure.EIGHT_VIEWS, 0.5),
        measure="eight-views",
    )
    mean, _ = mean_over_views(drawn)
    names = classifier.card.failure_types
    assert [p.failure_type for p in predicted] == [names[i] for i in mean.argmax(axis=1)]
    assert [p.score for p in predicted] == pytest.approx(
        (1 - uncertainty(drawn, Measure.EIGHT_VIEWS)).tolist(), abs=1e-9
    )
    assert routed.auto.tolist() == [p.route == "auto" for p in predicted]


def test_a_model_calibrated_on_eight_views_is_served_on_eight_views(
    classifier: WaferClassifier,
) -> None:
    rng = np.random.default_rng(1)
    drawn = rng.dirichlet(np.ones(9), size=(8, 30))
    truth = mean_over_views(drawn)[0].argmax(axis=1)
    truth[:3] = (truth[:3] + 1) % 9  # three wrong
    card, figures = with_validation(classifier.card, drawn, truth, Measure.EIGHT_VIEWS, 0.995)
    assert isinstance(card.validation, HeldOutScores)
    assert card.validation.measure == "eight-views"
    assert sum(not c for c in card.validation.correct) == 3
    assert figures["validation_accuracy"] == pytest.approx(27 / 30)
    # The card's calibration decides the measure, whatever the settings say now.
    assert route_measure(Settings(route_measure="margin"), card) is Measure.EIGHT_VIEWS
    assert route_measure(Settings(route_measure="margin"), None) is Measure.MARGIN
    fixed = Settings(route_measure="entropy", route_threshold=0.2)
    assert route_measure(fixed, card) is Measure.ENTROPY


def test_suspect_labels_are_confident_disagreements_only() -> None:
    from backend.retraining import suspect_labels

    probs = np.array([[0.95, 0.05], [0.6, 0.4], [0.05, 0.95], [0.92, 0.08]])
    truth = np.array([1, 1, 1, 0])
    # wafer 0: sure of type 0, labelled 1; wafer 1 disagrees but is unsure; 2 and 3 agree
    assert suspect_labels(probs, truth, 0.9).tolist() == [0]
    # on eight views: the mean decides
    drawn = np.stack([probs] * 4 + [probs[:, ::-1]] * 4)
    assert suspect_labels(drawn, truth, 0.9).tolist() == []


def test_eight_views_when_unsure_scores_sure_wafers_by_their_one_view() -> None:
    rng = np.random.default_rng(5)
    drawn = rng.dirichlet(np.full(3, 0.3), size=(8, 200))
    one = margin(drawn[0])
    sure = one >= SURE_ONE_VIEW_MARGIN
    assert sure.any() and (~sure).any()
    scored = uncertainty(drawn, Measure.EIGHT_VIEWS_WHEN_UNSURE)
    # Unsure in one view: all 8 drawings; sure: its one drawing's margin.
    assert scored[~sure] == pytest.approx(uncertainty(drawn, Measure.EIGHT_VIEWS)[~sure])
    assert scored[sure] == pytest.approx(1 - one[sure])
    # What the backend predicts (the sure wafers' first drawing repeated) scores the same as
    # all 8 drawings of every wafer: the held-out wafers and a set are scored alike.
    filled = first_view_for_sure(drawn, SURE_ONE_VIEW_MARGIN)
    assert np.all(filled[:, sure] == drawn[0, sure][None])
    assert np.array_equal(filled[:, ~sure], drawn[:, ~sure])
    assert uncertainty(filled, Measure.EIGHT_VIEWS_WHEN_UNSURE) == pytest.approx(scored)
    assert views_for(Measure.EIGHT_VIEWS_WHEN_UNSURE) == 8
    assert max_uncertainty(Measure.EIGHT_VIEWS_WHEN_UNSURE, 3) == 1.0
    assert (
        "1 view when its p1 - p2 >= 0.99"
        in RoutingRule(Measure.EIGHT_VIEWS_WHEN_UNSURE, 0.1).describe()
    )


def test_the_backend_draws_8_views_of_the_unsure_wafers_only(
    classifier: WaferClassifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    codes = np.random.default_rng(2).integers(0, 3, size=(40, SIZE, SIZE), dtype=np.uint8)
    full = classifier.predict_views(codes, 8)
    # A sure-margin between the wafers' own one-view margins: some sure, some not.
    margins = np.sort(margin(full[0]))
    gate = float((margins[19] + margins[20]) / 2)
    monkeypatch.setattr("backend.uncertainty.SURE_ONE_VIEW_MARGIN", gate)
    asked: list[tuple[int, int]] = []
    predict_views = WaferClassifier.predict_views

    def counted(self: WaferClassifier, part: np.ndarray, views: int = 8, **kw: object) -> object:
        asked.append((len(part), views))
        return predict_views(self, part, views, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(WaferClassifier, "predict_views", counted)
    drawn = wafer_probabilities(classifier, codes, Measure.EIGHT_VIEWS_WHEN_UNSURE)
    assert asked == [(40, 1), (20, 8)]
    assert drawn == pytest.approx(first_view_for_sure(full, gate), abs=1e-6)
    predicted, _ = predict_codes(
        list(range(40)),
        codes,
        classifier,
        RoutingRule(Measure.EIGHT_VIEWS_WHEN_UNSURE, 0.5),
        measure=Measure.EIGHT_VIEWS_WHEN_UNSURE,
    )
    expected = 1 - uncertainty(full, Measure.EIGHT_VIEWS_WHEN_UNSURE)
    assert [p.score for p in predicted] == pytest.approx(expected.tolist(), abs=1e-6)
