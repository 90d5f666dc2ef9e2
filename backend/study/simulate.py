"""The uncertainty-labeling study, reproduced: train, predict a set, route, count; set after set.

Layer L2 (combines the torch classifier, the data and the pure core).

Loops (each feeds its own labels back into training, as the study did, one loop per method):
- `least-confidence`, `margin`, `entropy`: the study's hand-set thresholds;
- `calibrated`: ours: the threshold is chosen per set on held-out labelled wafers so that the
  set's labeling accuracy meets `target_accuracy` with `confidence` (backend.calibration);
- `auto-labeling`: baseline, argmax for every wafer, no engineer.
Baselines that need no loop of their own, computed on the same split:
- Reject Option: the model trained once on the initial set, each study threshold applied to every
  set without retraining;
- Random routing: per set, as many engineer labels as a measure used, picked at random, applied to
  that measure's predictions (its labels are not fed back);
- Active Learning: engineers label everything.
Set 1 is predicted by one model trained on the initial set, shared by every loop.
Retraining (`retrain`): `scratch` trains a new model on every labelled wafer (the study),
`warm` continues the previous model on every labelled wafer, `bounded` continues it on the
wafers of the newest set plus a class-balanced replay of earlier ones, within a per-phase
sample budget that does not grow with the history, early stopping on held-out wafers that a
person labelled (backend.replay). Each phase records the samples its training saw, its
seconds, and the model's accuracy and macro-F1 on its held-out wafers and on the set it
predicts (`set_accuracy`, `set_macro_f1`: the model alone, before any engineer).
A run writes one file per finished phase under DIR/phases and resumes from them.
"""

from __future__ import annotations

import csv
import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from tqdm import tqdm

from backend.calibration import calibrate
from backend.classifier import (
    WaferClassifier,
    build_network,
    load_version,
    pick_device,
    save_version,
)
from backend.encoding import encode_wafers
from backend.files import atomic_text_writer, atomic_write_text, atomic_writer
from backend.label_config import LabelConfig
from backend.model_card import ModelCard
from backend.replay import RetrainPolicy, plan_retraining
from backend.routing import STUDY_RULES, RoutingRule
from backend.splits import (
    SetOrder,
    StudySplit,
    stable_holdout,
    stratified_sample,
    stratified_train_val,
    study_split,
)
from backend.study import plots
from backend.study.metrics import confusion_matrix, macro_f1
from backend.study.report import SetOutcome, study_markdown, summarize
from backend.training import (
    TrainConfig,
    TrainReport,
    logit_adjustment,
    train_bounded,
    train_network,
)
from backend.uncertainty import Measure, uncertainty
from backend.wafers import WaferMaps

STUDY_LOOPS = ("least-confidence", "margin", "entropy")
ALL_LOOPS = (*STUDY_LOOPS, "calibrated", "auto-labeling")
RETRAIN = ("scratch", "warm", "bounded")
CALIBRATE_ON = ("phase", "initial")


@dataclass(frozen=True)
class StudyConfig:
    """Everything that decides a study's numbers (saved as DIR/config.json)."""

    subsample: float = 1.0
    initial_fraction: float = 0.1
    sets: int = 9
    set_order: str = SetOrder.RANDOM.value
    image_size: int = 64
    backbone: str = "resnet50"
    epochs: int = 5
    batch_size: int = 64
    learning_rate: float = 1e-3
    balance: str = "none"
    augment: bool = True
    retrain: str = "scratch"
    #: Bounded retraining (backend.replay): samples per retraining (None: epochs x new wafers)
    #: and replayed earlier wafers per new wafer.
    phase_budget: int | None = None
    replay_per_new_wafer: float = 1.0
    #: Peak learning rate of a bounded retraining, as a share of a fresh training's.
    retrain_learning_rate_scale: float = 1.0
    validation_fraction: float = 0.1
    loops: tuple[str, ...] = ALL_LOOPS
    target_accuracy: float = 0.995
    calibration_measure: str = Measure.MARGIN.value
    #: Which held-out wafers the calibrated method's cut is chosen on: "phase" (the phase's own
    #: person-labelled hold-out, which fills up with engineer labels, i.e. wafers picked for being
    #: uncertain) or "initial" (the initial set's random held-out share; `--retrain bounded` only,
    #: as only its models never train on those wafers).
    calibrate_on: str = "phase"
    confidence: float = 0.9
    seed: int = 0
    device: str = "auto"
    weights_path: str | None = None
    data: str = ""

    def __post_init__(self) -> None:
        if not 0 < self.subsample <= 1:
            raise ValueError("subsample is a fraction in (0, 1]")
        if self.retrain not in RETRAIN:
            raise ValueError(f"retrain must be one of {', '.join(RETRAIN)}")
        unknown = set(self.loops) - set(ALL_LOOPS)
        if unknown or not self.loops:
            raise ValueError(f"unknown loops {sorted(unknown)}; choose from {', '.join(ALL_LOOPS)}")
        if self.sets < 1:
            raise ValueError("need at least one wafer set")
        self.retrain_policy()  # checks the bounded-retraining settings
        if self.calibrate_on not in CALIBRATE_ON:
            raise ValueError(f"calibrate_on must be one of {', '.join(CALIBRATE_ON)}")
        if self.calibrate_on == "initial" and self.retrain != "bounded":
            raise ValueError(
                "calibrating on the initial set's held-out wafers needs --retrain bounded "
                "(other retraining trains later models on them)"
            )

    def retrain_policy(self) -> RetrainPolicy:
        """What `--retrain bounded` trains on and how long (backend.replay)."""
        return RetrainPolicy(
            phase_budget=self.phase_budget,
            samples_per_new_wafer=float(self.epochs),
            replay_per_new_wafer=self.replay_per_new_wafer,
            learning_rate_scale=self.retrain_learning_rate_scale,
            validation_fraction=self.validation_fraction,
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["loops"] = list(self.loops)
        return data


@dataclass
class Phase:
    """What one loop did with one set (saved as DIR/phases/<loop>/set<k>.npz)."""

    probs: npt.NDArray[np.float64]
    engineer: npt.NDArray[np.bool_]
    threshold: float
    info: dict[str, Any] = field(default_factory=dict)
    #: The held-out wafers the phase's model was checked (and the routing calibrated) on:
    #: indices into the study's wafers, the model's probabilities and the true labels. Empty in
    #: phases saved before these were kept.
    val_members: npt.NDArray[np.intp] = field(default_factory=lambda: np.zeros(0, np.intp))
    val_probs: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros((0, 0)))
    val_true: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass
class Trained:
    """A phase's model and how it did on its held-out wafers (indices into the study's wafers)."""

    model: WaferClassifier
    val_members: npt.NDArray[np.intp]
    val_probs: npt.NDArray[np.float64]
    val_true: npt.NDArray[np.int64]
    info: dict[str, Any]


class Study:
    """One study run in DIR: split, encode, loops, baselines, report."""

    def __init__(
        self,
        config: StudyConfig,
        wafers: WaferMaps,
        labels: LabelConfig,
        out: Path,
        log: Callable[[str], None] = print,
    ) -> None:
        self.config = config
        self.labels = labels
        self.out = out
        self.log = log
        self.device = pick_device(config.device)
        self.n_classes = len(labels.failure_types)
        rng = np.random.default_rng(config.seed)
        if config.subsample < 1:
            wafers = wafers.subset(stratified_sample(wafers.labels, config.subsample, rng))
        self.wafers = wafers
        self.true = wafers.labels.astype(np.int64)
        self.split: StudySplit = study_split(
            self.true, config.initial_fraction, config.sets, SetOrder(config.set_order), rng
        )
        self.codes: npt.NDArray[np.uint8] = np.empty((0, 0, 0), dtype=np.uint8)
        self.timings: dict[str, float] = {}

    # -- set-up ---------------------------------------------------------------------------
    def prepare(self) -> None:
        """Check or write config.json, write the split manifests, encode every wafer once."""
        self.out.mkdir(parents=True, exist_ok=True)
        config_file = self.out / "config.json"
        wanted = self.config.to_json()
        if config_file.exists():
            saved = json.loads(config_file.read_text())
            # settings added after a run was started count as their defaults
            defaults = StudyConfig().to_json()
            changed = sorted(k for k in wanted if saved.get(k, defaults.get(k)) != wanted[k])
            if changed:
                raise ValueError(
                    f"{self.out} holds a study run with other settings ({', '.join(changed)}); "
                    "resume it with the same flags or pick another --out"
                )
        else:
            atomic_write_text(config_file, json.dumps(wanted, indent=2))
        self.write_manifests()
        start = time.perf_counter()
        self.codes = encode_wafers(self.wafers, self.config.image_size)
        self.timings["encode_seconds"] = time.perf_counter() - start
        self.log(
            f"{len(self.wafers):,} wafers: initial set {len(self.split.initial):,}, "
            f"{len(self.split.sets)} sets of ~{len(self.split.sets[0]):,}; encoded at "
            f"{self.config.image_size}x{self.config.image_size} in "
            f"{self.timings['encode_seconds']:.1f} s; device {self.device}"
        )

    def write_manifests(self) -> None:
        """The study's CSVs: data_<all>, data_<initial>, data_<rest> (with each wafer's set)."""
        set_of = np.zeros(len(self.wafers), dtype=np.int64)
        for k, members in enumerate(self.split.sets, start=1):
            set_of[members] = k
        everything = np.arange(len(self.wafers))
        for name, members in (
            (f"data_{len(everything)}", everything),
            (f"data_{len(self.split.initial)}", self.split.initial),
            (f"data_{len(self.split.rest())}", self.split.rest()),
        ):
            self._write_csv(self.out / f"{name}.csv", members, set_of)

    def _write_csv(
        self, path: Path, members: npt.NDArray[np.intp], set_of: npt.NDArray[np.int64]
    ) -> None:
        names = self.labels.failure_types
        w = self.wafers
        with atomic_text_writer(path, newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["source_row", "lot", "wafer_index", "failure_type", "set"])
            for i in members:
                writer.writerow(
                    [w.source_row[i], w.lots[i], w.wafer_index[i], names[self.true[i]], set_of[i]]
                )

    # -- one phase ------------------------------------------------------------------------
    def _seed(self, loop: str, set_number: int) -> int:
        loop_id = (*ALL_LOOPS, "initial").index(loop)
        return int(
            np.random.SeedSequence([self.config.seed, loop_id, set_number]).generate_state(1)[0]
        )

    def initial_train_val(self) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
        """Wafer indices (into `self.wafers`) of the initial set's training and held-out parts,
        exactly as the initial model of a run with this config splits them."""
        members = self.split.initial
        rng = np.random.default_rng(self._seed("initial", 0))
        train, val = stratified_train_val(self.true[members], self.config.validation_fraction, rng)
        return members[train], members[val]

    def train_phase(
        self,
        members: npt.NDArray[np.intp],
        labels: npt.NDArray[np.int64],
        seed: int,
        desc: str,
        start_from: WaferClassifier | None = None,
        held_out: npt.NDArray[np.bool_] | None = None,
    ) -> Trained:
        """Train on `members` with `labels` (stratified hold-out for validation, or the wafers
        marked in `held_out`).

        Returns the classifier, its probabilities and labels on the held-out wafers, and timings.
        """
        c = self.config
        rng = np.random.default_rng(seed)
        if held_out is None:
            train, val = stratified_train_val(labels, c.validation_fraction, rng)
        else:
            train, val = np.flatnonzero(~held_out), np.flatnonzero(held_out)
        if start_from is not None:
            network = start_from.network
        else:
            weights = Path(c.weights_path) if c.weights_path else None
            network = build_network(c.backbone, self.n_classes, seed, weights)
        tc = TrainConfig(
            epochs=c.epochs,
            batch_size=c.batch_size,
            learning_rate=c.learning_rate,
            balance=c.balance,
            augment=c.augment,
            seed=seed,
        )
        report = train_network(
            network,
            self.codes[members[train]],
            labels[train],
            self.n_classes,
            tc,
            self.device,
            desc,
        )
        card = ModelCard(
            version=desc,
            failure_types=self.labels.failure_types,
            image_size=c.image_size,
            backbone=c.backbone,
            logit_adjustment=tuple(logit_adjustment(labels[train], self.n_classes, c.balance)),
            training=tc.to_dict() | {"wafers": len(train)},
        )
        return self._finish(network, card, report, members[val], labels[val], len(train))

    def _finish(
        self,
        network: torch.nn.Module,
        card: ModelCard,
        report: TrainReport,
        val_members: npt.NDArray[np.intp],
        val_labels: npt.NDArray[np.int64],
        train_wafers: int,
    ) -> Trained:
        """The trained model, its held-out probabilities and labels, and the phase's figures."""
        model = WaferClassifier(network=network, card=card, device=self.device)
        start = time.perf_counter()
        val_probs = model.predict_proba(self.codes[val_members])
        info = {
            "train_wafers": train_wafers,
            "validation_wafers": len(val_members),
            "train_seconds": report.seconds,
            "train_cpu_seconds": report.cpu_seconds,
            "train_samples": report.samples,
            "train_wafers_per_second": report.samples_per_second,
            "final_loss": report.loss_per_epoch[-1],
            "validation_predict_seconds": time.perf_counter() - start,
        } | {f"validation_{k}": v for k, v in model_scores(val_probs, val_labels).items()}
        return Trained(model, val_members, val_probs, val_labels, info)

    def train_bounded_phase(
        self,
        members: npt.NDArray[np.intp],
        labels: npt.NDArray[np.int64],
        by_person: npt.NDArray[np.bool_],
        is_new: npt.NDArray[np.bool_],
        seed: int,
        desc: str,
        start_from: WaferClassifier,
    ) -> Trained:
        """Continue `start_from` on the new wafers plus a replay sample (backend.replay),
        within the phase budget, early stopping on held-out person-labelled wafers."""
        c = self.config
        plan = plan_retraining(
            labels, by_person, is_new, members, c.retrain_policy(), np.random.default_rng(seed)
        )
        tc = TrainConfig(
            epochs=c.epochs,
            batch_size=c.batch_size,
            learning_rate=c.learning_rate,
            balance=c.balance,
            augment=c.augment,
            seed=seed,
        )
        codes = self.codes[members]
        report, adjust = train_bounded(
            start_from.network, codes, labels, plan, self.n_classes, tc, self.device, desc
        )
        card = ModelCard(
            version=desc,
            failure_types=self.labels.failure_types,
            image_size=c.image_size,
            backbone=c.backbone,
            logit_adjustment=tuple(adjust),
            training=tc.to_dict() | {"wafers": len(plan.train), "budget": plan.budget},
        )
        trained = self._finish(
            start_from.network,
            card,
            report,
            members[plan.validation],
            labels[plan.validation],
            len(plan.train),
        )
        trained.info |= {
            "new_wafers": plan.new,
            "replay_wafers": plan.replay,
            "phase_budget": plan.budget,
            "best_samples": report.best_samples,
            "validation_losses": list(report.validation_losses),
        }
        return trained

    def route(
        self,
        loop: str,
        probs: npt.NDArray[np.float64],
        val_probs: npt.NDArray[np.float64],
        val_true: npt.NDArray[np.int64],
    ) -> tuple[npt.NDArray[np.bool_], float, dict[str, Any]]:
        """Engineer flags for one set under a loop's rule, the threshold used, and notes."""
        if loop == "auto-labeling":
            return np.zeros(len(probs), dtype=bool), float("inf"), {}
        if loop in STUDY_LOOPS:
            rule = STUDY_RULES[Measure(loop)]
            return rule.needs_engineer(probs), rule.threshold, {}
        measure = Measure(self.config.calibration_measure)
        cal = calibrate(
            uncertainty(val_probs, measure),
            val_probs.argmax(1) == val_true,
            measure,
            self.config.target_accuracy,
            confidence=self.config.confidence,
            new_scores=uncertainty(probs, measure),
        )
        notes = {
            "predicted_accuracy": cal.predicted_accuracy,
            "expected_engineer_ratio": cal.expected_engineer_ratio,
        }
        return cal.rule.needs_engineer(probs), cal.rule.threshold, notes

    # -- the loops ------------------------------------------------------------------------
    def _phase_path(self, loop: str, set_number: int) -> Path:
        return self.out / "phases" / loop / f"set{set_number}.npz"

    def phase_model_path(self, loop: str, set_number: int) -> Path:
        """The model that predicted set `set_number` in `loop` (kept for the calibrated loop)."""
        return self.out / "models" / loop / f"set{set_number}.pt"

    def _save_phase(self, path: Path, phase: Phase) -> None:
        with atomic_writer(path) as handle:
            np.savez(
                handle,
                probs=phase.probs,
                engineer=phase.engineer,
                threshold=np.float64(phase.threshold),
                info=np.array(json.dumps(json_safe(phase.info))),
                val_members=phase.val_members,
                val_probs=phase.val_probs,
                val_true=phase.val_true,
            )

    @staticmethod
    def _load_phase(path: Path) -> Phase:
        with np.load(path, allow_pickle=False) as data:
            return Phase(
                probs=data["probs"],
                engineer=data["engineer"],
                threshold=float(data["threshold"]),
                info=json.loads(str(data["info"])),
                **{k: data[k] for k in ("val_members", "val_probs", "val_true") if k in data},
            )

    def initial_model(self) -> Trained:
        """The model trained on the initial set (true labels), shared by every loop.

        Trained once per run directory; later calls (and resumed runs) read it back.
        """
        c = self.config
        model_path = self.out / "models" / "initial.pt"
        held_out = self.out / "phases" / "initial.npz"
        if model_path.exists() and held_out.exists():
            with np.load(held_out, allow_pickle=False) as data:
                return Trained(
                    load_version(model_path, self.device),
                    data["val_members"] if "val_members" in data else np.zeros(0, np.intp),
                    data["val_probs"],
                    data["val_true"],
                    json.loads(str(data["info"])),
                )
        members = self.split.initial
        # A bounded run continues this model and checks it on a stable held-out share of the
        # person-labelled wafers, so this model must not have trained on that share either.
        person_check = (
            stable_holdout(members, c.validation_fraction) if c.retrain == "bounded" else None
        )
        if person_check is not None and (person_check.all() or not person_check.any()):
            person_check = None
        trained = self.train_phase(
            members,
            self.true[members],
            self._seed("initial", 0),
            "initial set",
            held_out=person_check,
        )
        save_version(trained.model, model_path)
        with atomic_writer(held_out) as handle:
            np.savez(
                handle,
                val_members=trained.val_members,
                val_probs=trained.val_probs,
                val_true=trained.val_true,
                info=np.array(json.dumps(json_safe(trained.info))),
            )
        return trained

    def run(self) -> dict[str, Any]:
        """All loops (resuming finished phases), then baselines and the report."""
        if not len(self.codes):
            self.prepare()
        c = self.config
        phases: dict[str, list[Phase]] = {}
        start = time.perf_counter()
        initial = self.initial_model()
        progress = tqdm(total=len(c.loops) * c.sets, desc="study phases", unit="phase")
        for loop in c.loops:
            phases[loop] = self.run_loop(loop, initial, progress)
        progress.close()
        reject_path = self.out / "phases" / "reject-option.npz"
        if not reject_path.exists():
            rest = self.codes[self.split.rest()]
            probs = initial.model.predict_proba(rest, progress="reject option")
            with atomic_writer(reject_path) as handle:
                np.savez(handle, probs=probs)
        with np.load(reject_path) as data:
            reject_probs = data["probs"]
        self.timings["study_seconds"] = time.perf_counter() - start
        return self.report(phases, reject_probs)

    def run_loop(
        self,
        loop: str,
        initial: Trained,
        progress: tqdm[Any],
    ) -> list[Phase]:
        """One method's pass over the sets; finished phases are read back, not redone."""
        c = self.config
        labelled = [self.split.initial]
        labels = [self.true[self.split.initial]]
        by_person = [np.ones(len(self.split.initial), dtype=bool)]
        latest = self.out / "models" / f"{loop}.pt"
        done: list[Phase] = []
        for k, members in enumerate(self.split.sets, start=1):
            path = self._phase_path(loop, k)
            if path.exists():
                phase = self._load_phase(path)
            else:
                if k == 1:
                    trained = Trained(
                        initial.model,
                        initial.val_members,
                        initial.val_probs,
                        initial.val_true,
                        dict(initial.info),
                    )
                else:
                    start_from = None
                    if c.retrain in ("warm", "bounded"):
                        start_from = load_version(
                            latest if latest.exists() else self.out / "models" / "initial.pt",
                            self.device,
                        )
                    if c.retrain == "bounded" and start_from is not None:
                        is_new = [np.zeros(len(m), dtype=bool) for m in labelled]
                        is_new[-1][:] = True
                        trained = self.train_bounded_phase(
                            np.concatenate(labelled),
                            np.concatenate(labels),
                            np.concatenate(by_person),
                            np.concatenate(is_new),
                            self._seed(loop, k),
                            f"{loop} set {k}",
                            start_from,
                        )
                    else:
                        trained = self.train_phase(
                            np.concatenate(labelled),
                            np.concatenate(labels),
                            self._seed(loop, k),
                            f"{loop} set {k}",
                            start_from=start_from,
                        )
                model, info = trained.model, trained.info
                t0 = time.perf_counter()
                probs = model.predict_proba(self.codes[members], progress=f"predict set {k}")
                info |= {
                    f"set_{name}": value
                    for name, value in model_scores(probs, self.true[members]).items()
                }
                info["predict_seconds"] = time.perf_counter() - t0
                info["predict_wafers_per_second"] = len(members) / max(
                    info["predict_seconds"], 1e-9
                )
                cal_probs, cal_true = trained.val_probs, trained.val_true
                if c.calibrate_on == "initial" and loop == "calibrated":
                    cal_true = self.true[initial.val_members]
                    cal_probs = model.predict_proba(self.codes[initial.val_members])
                engineer, threshold, notes = self.route(loop, probs, cal_probs, cal_true)
                phase = Phase(
                    probs,
                    engineer,
                    threshold,
                    info | notes,
                    trained.val_members,
                    trained.val_probs,
                    trained.val_true,
                )
                if c.retrain in ("warm", "bounded"):
                    save_version(model, latest)
                if loop == "calibrated":
                    # kept for routing studies after the run (backend.study.routing_study)
                    save_version(model, self.phase_model_path(loop, k))
                self._save_phase(path, phase)
            done.append(phase)
            labelled.append(members)
            labels.append(np.where(phase.engineer, self.true[members], phase.probs.argmax(1)))
            by_person.append(np.asarray(phase.engineer, dtype=np.bool_).reshape(-1))
            progress.update()
        return done

    # -- results --------------------------------------------------------------------------
    def _outcomes(
        self,
        engineer_by_set: Sequence[npt.NDArray[np.bool_]],
        probs_by_set: Sequence[npt.NDArray[np.float64]],
    ) -> list[SetOutcome]:
        out = []
        for k, (members, engineer, probs) in enumerate(
            zip(self.split.sets, engineer_by_set, probs_by_set, strict=True), start=1
        ):
            true = self.true[members]
            out.append(SetOutcome(k, true, np.where(engineer, true, probs.argmax(1)), engineer))
        return out

    def report(
        self, phases: dict[str, list[Phase]], reject_probs: npt.NDArray[np.float64]
    ) -> dict[str, Any]:
        """Summaries of every method and baseline; writes results.json, results.md and plots."""
        lc = self.labels
        methods: list[dict[str, Any]] = []

        def add(name: str, family: str, rule: str, outcomes: list[SetOutcome]) -> None:
            methods.append(
                summarize(name, family, rule, outcomes, lc.failure_types, lc.defect_classes)
            )

        for loop, done in phases.items():
            probs = [p.probs for p in done]
            engineer = [p.engineer for p in done]
            if loop in STUDY_LOOPS:
                rule: RoutingRule = STUDY_RULES[Measure(loop)]
                add(
                    f"{loop} (retrained)",
                    "study measure",
                    rule.describe(),
                    self._outcomes(engineer, probs),
                )
            elif loop == "calibrated":
                text = (
                    f"{self.config.calibration_measure} on the {self.config.calibrate_on} "
                    "hold-out, threshold set per set for "
                    f"{100 * self.config.target_accuracy:g}% at {100 * self.config.confidence:g}% confidence"
                )
                add(
                    f"calibrated {self.config.calibration_measure} (ours)",
                    "ours",
                    text,
                    self._outcomes(engineer, probs),
                )
            else:
                add(
                    "auto labeling",
                    "baseline",
                    "argmax for every wafer",
                    self._outcomes(engineer, probs),
                )
            if loop != "auto-labeling":
                rng = np.random.default_rng(self._seed(loop, 0))
                random_engineer = []
                for e in engineer:
                    pick = np.zeros(len(e), dtype=bool)
                    pick[rng.choice(len(e), size=int(e.sum()), replace=False)] = True
                    random_engineer.append(pick)
                add(
                    f"random at {loop} budget",
                    "baseline",
                    "same engineer count per set, random wafers",
                    self._outcomes(random_engineer, probs),
                )
        bounds = np.cumsum([0] + [len(s) for s in self.split.sets])
        reject_by_set = [reject_probs[a:b] for a, b in itertools.pairwise(bounds)]
        for measure in (Measure.LEAST_CONFIDENCE, Measure.MARGIN, Measure.ENTROPY):
            rule = STUDY_RULES[measure]
            engineer = [rule.needs_engineer(p) for p in reject_by_set]
            add(
                f"reject option, {measure.value}",
                "baseline",
                rule.describe() + ", initial model only",
                self._outcomes(engineer, reject_by_set),
            )
        add(
            "active learning",
            "baseline",
            "engineers label every wafer",
            self._outcomes([np.ones(len(s), dtype=bool) for s in self.split.sets], reject_by_set),
        )
        results = {
            "config": self.config.to_json(),
            "failure_types": list(lc.failure_types),
            "wafers": {
                "all": len(self.wafers),
                "initial": len(self.split.initial),
                "sets": [len(s) for s in self.split.sets],
            },
            "timings": self.timings,
            "phases": {
                loop: [p.info | {"threshold": p.threshold} for p in done]
                for loop, done in phases.items()
            },
            "methods": methods,
        }
        atomic_write_text(self.out / "results.json", json.dumps(json_safe(results), indent=2))
        atomic_write_text(self.out / "results.md", study_markdown(methods, lc.failure_types))
        plots.accuracy_vs_engineer_ratio(methods, self.out / "accuracy_vs_engineer_ratio.png")
        plots.engineer_labels_per_set(methods, self.out / "engineer_labels_per_set.png")
        plots.auto_label_confusion(
            [m for m in methods if m["family"] != "baseline" or m["name"] == "auto labeling"],
            lc.failure_types,
            self.out / "auto_label_confusion.png",
        )
        return results


def model_scores(probs: npt.NDArray[np.float64], true: npt.NDArray[np.int64]) -> dict[str, float]:
    """The model's own accuracy and macro-F1 (argmax against the truth, no engineer)."""
    if not len(true):
        return {"accuracy": float("nan"), "macro_f1": float("nan")}
    cm = confusion_matrix(true, probs.argmax(1), probs.shape[1])
    return {"accuracy": float(np.trace(cm) / cm.sum()), "macro_f1": macro_f1(cm)}


def json_safe(value: Any) -> Any:
    """Plain JSON: numpy scalars to Python numbers, NaN and infinities to null."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
