"""Blind audits: the promise checked on each set where nobody knows the true labels. Layer L0.

When the pre-annotation opens a set it draws a random sample of the set's wafers, at one rate
among the wafers routed to an automatic label and those routed to engineers (a proportional
stratified sample, so the sample is a random sample of the set):

- **audit wafers**: the sample's auto-routed wafers. They are not auto-accepted. Engineers label
  them blind: their prediction carries no label (nothing is pre-selected) and the set's cut as
  its score less one float step, so the engineer queue lists them after the uncertain wafers,
  the accept step never takes them, and nothing marks them as audits;
- the sample's engineer-routed wafers, which engineers label anyway.

Once labelled, the audit wafers give the set's auto-label accuracy with an exact
(Clopper-Pearson) interval, and from it the set's labeling accuracy; the whole sample is a
random person-labelled sample of a routed set, which later models calibrate their routing on
(`backend.splits.unrouted_holdout`). A set whose labeling accuracy's upper bound is below the
target breaks the promise: the next set is routed with half the error budget until an audit
clears (`cautious_target`).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import numpy.typing as npt

from backend.calibration import largest_rate

#: Two-sided confidence of the audited accuracy's interval.
AUDIT_CONFIDENCE = 0.95


def audit_size(auto_wafers: int, fraction: float, minimum: int) -> int:
    """How many of a set's `auto_wafers` are audited: `fraction` of them, at least `minimum`,
    never more than there are. `fraction` 0 turns audits off."""
    if auto_wafers < 0 or minimum < 0 or not 0.0 <= fraction <= 1.0:
        raise ValueError(
            f"need auto_wafers >= 0, minimum >= 0 and 0 <= fraction <= 1, got "
            f"{auto_wafers}, {minimum}, {fraction}"
        )
    if fraction == 0.0 or auto_wafers == 0:
        return 0
    return min(auto_wafers, max(math.ceil(fraction * auto_wafers - 1e-9), minimum))


@dataclass(frozen=True)
class AuditDraw:
    """Indices (into the set's wafers) of the audit wafers and of the sample's engineer-routed
    wafers."""

    audit: npt.NDArray[np.intp]
    sampled: npt.NDArray[np.intp]


def draw_audit(
    auto: npt.ArrayLike, fraction: float, minimum: int, rng: np.random.Generator
) -> AuditDraw:
    """A random sample of a set at one rate in both routes: `audit_size` of the auto-routed
    wafers (`auto` True), and the same share of the engineer-routed ones, rounded."""
    routed = np.asarray(auto, dtype=np.bool_)
    if routed.ndim != 1:
        raise ValueError(f"auto must be 1-D, got shape {routed.shape}")
    auto_idx, engineer_idx = np.flatnonzero(routed), np.flatnonzero(~routed)
    k = audit_size(int(auto_idx.size), fraction, minimum)
    if k == 0:
        empty = np.zeros(0, dtype=np.intp)
        return AuditDraw(empty, empty)
    rate = k / auto_idx.size
    k_engineer = min(int(engineer_idx.size), round(rate * engineer_idx.size))
    audit = np.sort(rng.choice(auto_idx, size=k, replace=False))
    sampled = np.sort(rng.choice(engineer_idx, size=k_engineer, replace=False))
    return AuditDraw(audit.astype(np.intp), sampled.astype(np.intp))


def accuracy_interval(agreed: int, audited: int, confidence: float) -> tuple[float, float]:
    """The exact two-sided (Clopper-Pearson) interval on an accuracy seen as `agreed` of
    `audited`; (0, 1) without evidence."""
    if not 0 <= agreed <= audited:
        raise ValueError(f"need 0 <= agreed <= audited, got {agreed}, {audited}")
    if audited == 0:
        return 0.0, 1.0
    alpha = (1.0 - confidence) / 2.0
    wrong = audited - agreed
    error_high = float(largest_rate([wrong], [audited], alpha)[0])
    # The lowest error rate: one minus the highest accuracy the agreements allow.
    accuracy_high = float(largest_rate([agreed], [audited], alpha)[0])
    return max(0.0, 1.0 - error_high), min(1.0, accuracy_high)


@dataclass(frozen=True)
class SetAudit:
    """What the audit of one set found. `auto_labels` are the set's accepted auto labels (the
    audit wafers are not among them); `agreed` of the `audited` audit wafers carry a person's
    label equal to the model's; `pending` audit wafers wait for a label."""

    set_number: int
    model_version: str
    wafers: int
    auto_labels: int
    audited: int
    agreed: int
    pending: int
    target_accuracy: float
    confidence: float = AUDIT_CONFIDENCE
    recorded_at: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat())

    @property
    def accuracy(self) -> float | None:
        """The audited auto-label accuracy (None before any audit wafer is labelled)."""
        return self.agreed / self.audited if self.audited else None

    @property
    def accuracy_interval(self) -> tuple[float, float]:
        return accuracy_interval(self.agreed, self.audited, self.confidence)

    def _labeling(self, auto_accuracy: float) -> float:
        share = self.auto_labels / self.wafers if self.wafers else 0.0
        return 1.0 - share * (1.0 - auto_accuracy)

    @property
    def labeling_accuracy(self) -> float | None:
        """The set's labeling accuracy as the audit estimates it: engineer labels (audits
        included) count as right, auto labels as right at the audited rate."""
        return None if self.accuracy is None else self._labeling(self.accuracy)

    @property
    def labeling_interval(self) -> tuple[float, float]:
        low, high = self.accuracy_interval
        return self._labeling(low), self._labeling(high)

    @property
    def breached(self) -> bool:
        """Whether the audit shows the promise broken: even the upper end of the set's labeling
        accuracy interval is below the target."""
        return self.audited > 0 and self.labeling_interval[1] < self.target_accuracy

    def summary(self) -> dict[str, object]:
        """The stored fields with the derived figures, for `status`, logs and reports."""
        low, high = self.accuracy_interval
        lab_low, lab_high = self.labeling_interval
        return asdict(self) | {
            "audited_accuracy": self.accuracy,
            "audited_accuracy_low": low,
            "audited_accuracy_high": high,
            "labeling_accuracy": self.labeling_accuracy,
            "labeling_accuracy_low": lab_low,
            "labeling_accuracy_high": lab_high,
            "breached": self.breached,
        }

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> SetAudit:
        data = json.loads(text)
        return cls(
            set_number=int(data["set_number"]),
            model_version=str(data["model_version"]),
            wafers=int(data["wafers"]),
            auto_labels=int(data["auto_labels"]),
            audited=int(data["audited"]),
            agreed=int(data["agreed"]),
            pending=int(data["pending"]),
            target_accuracy=float(data["target_accuracy"]),
            confidence=float(data.get("confidence", AUDIT_CONFIDENCE)),
            recorded_at=str(data.get("recorded_at", "")),
        )


def audit_set(
    set_number: int,
    model_version: str,
    audit: Mapping[int, str],
    person_labels: Mapping[int, str | None],
    wafers: int,
    auto_labels: int,
    target_accuracy: float,
) -> SetAudit:
    """The audit of a set: `audit` maps each audit wafer's task id to the model's label,
    `person_labels` a task id to the label a person gave it (None or absent: not yet)."""
    labelled = {t: person_labels.get(t) for t in audit}
    done = {t: label for t, label in labelled.items() if label is not None}
    return SetAudit(
        set_number=set_number,
        model_version=model_version,
        wafers=wafers,
        auto_labels=auto_labels,
        audited=len(done),
        agreed=sum(label == audit[t] for t, label in done.items()),
        pending=len(audit) - len(done),
        target_accuracy=target_accuracy,
    )


def latest_breach(audits: Sequence[SetAudit]) -> SetAudit | None:
    """The newest finished audit (no wafer pending, highest set) when it breached, else None:
    one audit that clears ends the caution."""
    finished = [a for a in audits if a.pending == 0 and a.audited > 0]
    if not finished:
        return None
    newest = max(finished, key=lambda a: a.set_number)
    return newest if newest.breached else None


def cautious_target(target_accuracy: float) -> float:
    """The target a set is routed to after a breached audit: half the error budget."""
    return 1.0 - (1.0 - target_accuracy) / 2.0
