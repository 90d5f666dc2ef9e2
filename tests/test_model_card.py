"""The model card: the loop's facts are typed fields, and cards written before still load."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from backend.loop_state import trained_through
from backend.model_card import HeldOutScores, ModelCard


def card_dict(**extra: Any) -> dict[str, Any]:
    return {
        "version": "v002-set1",
        "failure_types": ["Center", "none"],
        "image_size": 16,
        "backbone": "resnet18",
        "logit_adjustment": [0.0, 0.0],
        **extra,
    }


def test_a_card_round_trips_through_json_with_its_loop_facts() -> None:
    card = ModelCard(
        version="v002-set1",
        failure_types=("Center", "none"),
        image_size=16,
        backbone="wafercnn",
        logit_adjustment=(0.0, 0.1),
        metrics={"validation_accuracy": 0.97},
        trained_through_set=1,
        project=7,
        route_measure="margin",
        validation=HeldOutScores("margin", (0.1, 0.9), (True, False)),
        training={"epochs": 20, "lr": np.float32(0.5)},
    )
    plain = json.loads(json.dumps(card.to_dict()))
    assert plain["trained_through_set"] == 1 and plain["validation"]["correct"] == [True, False]
    again = ModelCard.from_dict(plain)
    assert again == ModelCard.from_dict(card.to_dict())
    assert (again.trained_through_set, again.project, again.route_measure) == (1, 7, "margin")
    assert again.validation == HeldOutScores("margin", (0.1, 0.9), (True, False))
    assert again.training == {"epochs": 20, "lr": 0.5}


def test_a_card_written_before_the_typed_fields_still_loads() -> None:
    """Cards on disk from earlier versions kept the loop's facts in `training`."""
    old = card_dict(
        training={
            "epochs": 5,
            "trained_through_set": 3.0,
            "project": 4,
            "route_measure": "entropy",
            "validation": {"measure": "entropy", "scores": [0.5], "correct": [True]},
        }
    )
    card = ModelCard.from_dict(old)
    assert trained_through(card) == 3
    assert (card.project, card.route_measure) == (4, "entropy")
    assert card.validation == HeldOutScores("entropy", (0.5,), (True,))
    assert card.training == {"epochs": 5}  # the facts moved out of the free-form part


@pytest.mark.parametrize("value", [True, "2", 2.5, None, [2]])
def test_a_set_number_that_is_not_a_whole_number_reads_as_unknown(value: Any) -> None:
    assert ModelCard.from_dict(card_dict(trained_through_set=value)).trained_through_set is None
    legacy = card_dict(training={"trained_through_set": value})
    assert ModelCard.from_dict(legacy).trained_through_set is None


def test_held_out_scores_and_outcomes_must_pair_up() -> None:
    with pytest.raises(ValueError, match="2 scores but 1 outcomes"):
        HeldOutScores("margin", (0.1, 0.2), (True,))
