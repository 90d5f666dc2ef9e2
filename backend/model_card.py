"""A model version's card: what it takes to use the version besides its weights, and the facts
the labeling loop decides on. Layer L0 (pure).

The loop's facts are typed fields: the last set the model learnt from (`trained_through_set`),
the project it serves, the uncertainty measure it routes by and its scores on held-out
person-labelled wafers (`HeldOutScores`, from which each set's cut is calibrated). `training`
keeps the recipe and run figures for people (epochs, learning rate, seconds, wafers); nothing
decides on it.

Cards are stored as JSON beside the weights (and inside the checkpoint). Cards written before
the loop's facts were fields kept them in `training`; `ModelCard.from_dict` still reads those.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Keys that older cards kept in `training` and that are fields now.
_LOOP_FACTS = ("trained_through_set", "project", "route_measure", "validation")


@dataclass(frozen=True)
class HeldOutScores:
    """A model's uncertainty scores on its held-out, person-labelled wafers, and whether it
    classified each one right: what a set's cut is calibrated on."""

    measure: str
    scores: tuple[float, ...]
    correct: tuple[bool, ...]

    def __post_init__(self) -> None:
        if len(self.scores) != len(self.correct):
            raise ValueError(
                f"held-out scores: {len(self.scores)} scores but {len(self.correct)} outcomes"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HeldOutScores:
        return cls(
            measure=str(data["measure"]),
            scores=tuple(float(x) for x in data["scores"]),
            correct=tuple(bool(x) for x in data["correct"]),
        )


@dataclass(frozen=True)
class ModelCard:
    """Everything needed to use a model version besides its weights."""

    version: str
    failure_types: tuple[str, ...]
    image_size: int
    backbone: str
    logit_adjustment: tuple[float, ...]
    metrics: Mapping[str, float] = field(default_factory=dict)
    #: The last wafer set the model learnt from (0: the labelled history); None for models
    #: outside the loop (the study's, benchmarks').
    trained_through_set: int | None = None
    #: The Label Studio project the version was trained for.
    project: int | None = None
    #: The uncertainty measure its cut is on (`backend.uncertainty.Measure` values).
    route_measure: str | None = None
    validation: HeldOutScores | None = None
    #: The recipe and run figures, for people; the loop decides on none of it.
    training: Mapping[str, Any] = field(default_factory=dict)
    created: str = field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values only, as `torch.load(weights_only=True)` accepts nothing else."""
        return json.loads(json.dumps(asdict(self), default=_plain))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        training = dict(data.get("training") or {})
        legacy = {key: training.pop(key) for key in _LOOP_FACTS if key in training}

        def fact(key: str) -> Any:
            return data[key] if data.get(key) is not None else legacy.get(key)

        validation = fact("validation")
        measure = fact("route_measure")
        return cls(
            version=str(data["version"]),
            failure_types=tuple(data["failure_types"]),
            image_size=int(data["image_size"]),
            backbone=str(data["backbone"]),
            logit_adjustment=tuple(float(x) for x in data["logit_adjustment"]),
            metrics=dict(data.get("metrics") or {}),
            trained_through_set=_whole_number(fact("trained_through_set")),
            project=_whole_number(fact("project")),
            route_measure=None if measure is None else str(measure),
            validation=HeldOutScores.from_dict(validation)
            if isinstance(validation, Mapping)
            else None,
            training=training,
            created=str(data.get("created", "")),
        )


def _whole_number(value: Any) -> int | None:
    """An integer fact (a set, a project id) as stored, or None for anything else (a bool, a
    string, a fraction)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value) if float(value).is_integer() else None


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} cannot go into a model card")
