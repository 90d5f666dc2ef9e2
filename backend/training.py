"""Training a wafer-map classifier: class balance, wafer symmetries as augmentation, one cycle.

Layer L1 (torch).
- Class imbalance ("none" is 85% of WM-811K): wafers are drawn uniformly ("none", the default),
  or with probability proportional to count^-1/2 of their class ("sqrt"), or count^-1
  ("inverse"). The shift of the class prior balancing causes is recorded as a logit adjustment
  and undone at prediction. Measured on the study's initial 10%
  (`python -m backend.study.classifier_sweep`, 17,295 wafers of set 1 as test): uniform drawing gave 95.7% accuracy against 90.9% for
  "sqrt" with the adjustment (resnet18 at 32, 5 epochs; macro-F1 0.717 / 0.659), and 96.2%
  against 90.9% for the small `wafercnn` (macro-F1 0.747 / 0.742), so balancing is no longer
  the default.
- Augmentation follows the physics: a wafer's failure pattern does not change when the wafer is
  rotated by 90 degrees or mirrored, so each wafer is drawn in one of the 8 symmetries of the square.
- AdamW with a one-cycle learning-rate schedule, bf16 autocast where fast, channels_last, seeded.
- Optional: label smoothing, mixup, a cap on the samples seen (a compute budget), and early
  stopping on held-out wafers (the best checkpoint is kept).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from tqdm import tqdm

from backend.classifier import autocast, batches, to_inputs
from backend.replay import BALANCE_POWER, RetrainPlan, pool_weights

BALANCES = tuple(BALANCE_POWER)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    balance: str = "none"
    augment: bool = True
    seed: int = 0
    #: Cross-entropy label smoothing (0 = none).
    label_smoothing: float = 0.0
    #: Mixup Beta(alpha, alpha) on the one-hot inputs (0 = none).
    mixup: float = 0.0
    #: Stop after this many samples (a compute budget), whatever `epochs` says; None = no cap.
    max_samples: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("need at least 1 epoch and a batch of at least 2 wafers")
        if self.balance not in BALANCES:
            raise ValueError(f"balance must be one of {', '.join(BALANCES)}")
        if not 0 <= self.label_smoothing < 1 or self.mixup < 0:
            raise ValueError("label_smoothing must be in [0, 1) and mixup >= 0")
        if self.max_samples is not None and self.max_samples < self.batch_size:
            raise ValueError("max_samples must allow at least one batch")

    def total_steps(self, wafers: int) -> int:
        """Optimiser steps for a training set of `wafers`: `epochs` passes, capped by
        `max_samples`."""
        steps = self.epochs * max(1, wafers // self.batch_size)
        if self.max_samples is not None:
            steps = min(steps, self.max_samples // self.batch_size)
        return steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainReport:
    wafers: int
    samples: int
    seconds: float
    loss_per_epoch: tuple[float, ...]
    #: Process CPU time (all threads), a fairer cost than `seconds` on a shared machine.
    cpu_seconds: float = 0.0
    #: Steps actually run (early stopping may end before the planned steps).
    steps: int = 0
    #: Held-out loss at each check and the sample count of the checkpoint kept (early stopping).
    validation_losses: tuple[float, ...] = ()
    best_samples: int | None = None

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else math.nan


def class_weights(
    labels: npt.NDArray[np.integer], n_classes: int, balance: str
) -> npt.NDArray[np.float64]:
    """Per-class sampling weight per wafer (0 for classes with no wafers)."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    power = BALANCE_POWER[balance]
    weights = np.zeros(n_classes)
    present = counts > 0
    weights[present] = counts[present] ** -power
    return weights


def logit_adjustment(
    labels: npt.NDArray[np.integer], n_classes: int, balance: str
) -> npt.NDArray[np.float64]:
    """log(real class prior) - log(training class prior): add to logits to undo balancing.

    Classes absent from training get 0 (they are never predicted confidently anyway).
    """
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    drawn = counts * class_weights(labels, n_classes, balance)
    adjust = np.zeros(n_classes)
    present = counts > 0
    adjust[present] = np.log(counts[present] / counts.sum()) - np.log(drawn[present] / drawn.sum())
    return adjust


def symmetries(codes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each wafer of a (n, S, S) batch in one of the 8 rotations/mirrorings, drawn at random."""
    kind = torch.randint(0, 8, (codes.shape[0],), generator=generator).to(codes.device)
    out = codes.clone()
    for k in range(8):
        chosen = kind == k
        if not bool(chosen.any()):
            continue
        part = torch.rot90(codes[chosen], k % 4, dims=(1, 2))
        out[chosen] = torch.flip(part, dims=(2,)) if k >= 4 else part
    return out


#: Wafers whose activations set the BatchNorm statistics after training.
BATCH_NORM_WAFERS = 2048


def recalibrate_batch_norm(
    network: nn.Module,
    data: torch.Tensor,
    device: torch.device,
    batch_size: int,
    generator: torch.Generator,
    weights: torch.Tensor | None = None,
) -> None:
    """Recompute BatchNorm running statistics for the final weights.

    The running averages kept during training lag behind the weights; after a short training
    (a small set, few epochs) the network then predicts well in training mode and badly in
    evaluation mode. One pass over up to BATCH_NORM_WAFERS training wafers fixes that. They
    are drawn uniformly, or without replacement by `weights` (one per wafer) when the training
    wafers are not a fair sample of what the model will see.
    """
    if weights is None:
        pick = torch.randperm(len(data), generator=generator)[:BATCH_NORM_WAFERS]
    else:
        count = min(BATCH_NORM_WAFERS, int((weights > 0).sum()))
        pick = torch.multinomial(weights, count, replacement=False, generator=generator)
    pick = pick.to(device)
    inputs = (to_inputs(data[pick[part]]) for part in batches(len(pick), 4 * batch_size))
    with torch.no_grad(), autocast(device):
        torch.optim.swa_utils.update_bn(inputs, network)


@dataclass(frozen=True)
class EarlyStopping:
    """Held-out wafers to check the network on during training.

    `checks` checks are spread evenly over the planned steps (plus one before the first step
    when `check_start`, for a network that continues an earlier one: if no step improves on
    it, it is kept as it was). The held-out loss is the cross-entropy of the probabilities the
    model will serve (logits plus `logit_adjustment`). Training stops after `patience` checks
    without improvement, but not before `min_fraction` of the planned steps: under the
    one-cycle schedule the held-out loss rises while the learning rate is high and falls, often
    below its start, as it anneals. The network ends with the weights of its best check.
    """

    codes: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.int64]
    logit_adjustment: npt.NDArray[np.float64]
    checks: int = 8
    patience: int = 3
    check_start: bool = False
    min_fraction: float = 0.5

    def __post_init__(self) -> None:
        if len(self.codes) != len(self.labels) or not len(self.codes):
            raise ValueError("early stopping needs held-out wafers, one label each")
        if not 0 <= self.min_fraction <= 1:
            raise ValueError("min_fraction must be in [0, 1]")
        if self.checks < 1 or self.patience < 1:
            raise ValueError("checks and patience must be at least 1")


def held_out_loss(
    network: nn.Module, stopping: EarlyStopping, device: torch.device, batch_size: int
) -> float:
    """Mean cross-entropy on the held-out wafers, network in evaluation mode (left in
    training mode afterwards)."""
    adjust = torch.tensor(stopping.logit_adjustment, dtype=torch.float32, device=device)
    targets = torch.from_numpy(stopping.labels.astype(np.int64)).to(device)
    total = 0.0
    network.eval()
    with torch.inference_mode(), autocast(device):
        for part in batches(len(stopping.codes), 4 * batch_size):
            x = torch.from_numpy(np.ascontiguousarray(stopping.codes[part])).to(device)
            logits = network(to_inputs(x)).float() + adjust
            total += float(F.cross_entropy(logits, targets[part], reduction="sum"))
    network.train()
    return total / len(stopping.codes)


def _loss(
    network: nn.Module,
    batch: torch.Tensor,
    targets: torch.Tensor,
    config: TrainConfig,
    rng: np.random.Generator,
    generator: torch.Generator,
) -> torch.Tensor:
    inputs = to_inputs(batch)
    smoothing = config.label_smoothing
    if config.mixup <= 0:
        return F.cross_entropy(network(inputs), targets, label_smoothing=smoothing)
    lam = float(rng.beta(config.mixup, config.mixup))
    partner = torch.randperm(len(batch), generator=generator).to(batch.device)
    mixed = (lam * inputs + (1 - lam) * inputs[partner]).contiguous(
        memory_format=torch.channels_last
    )
    logits = network(mixed)
    return lam * F.cross_entropy(logits, targets, label_smoothing=smoothing) + (
        1 - lam
    ) * F.cross_entropy(logits, targets[partner], label_smoothing=smoothing)


def train_network(
    network: nn.Module,
    codes: npt.NDArray[np.uint8],
    labels: npt.NDArray[np.integer],
    n_classes: int,
    config: TrainConfig,
    device: torch.device,
    progress: str | None = None,
    *,
    wafer_weights: npt.NDArray[np.float64] | None = None,
    stopping: EarlyStopping | None = None,
    norm_weights: npt.NDArray[np.float64] | None = None,
) -> TrainReport:
    """Train `network` in place on die codes (n, S, S) and class indices (n,).

    Wafers are drawn with `wafer_weights` when given (e.g. `backend.replay.pool_weights`, so a
    replay pool is drawn with the class prior of the whole history), else by class balance.
    `norm_weights` likewise picks the wafers that set the final BatchNorm statistics
    (`recalibrate_batch_norm`; default: uniformly).
    `loss_per_epoch` holds one mean loss per pass of n samples (the last one may be partial).
    """
    if len(codes) != len(labels) or len(codes) < 2:
        raise ValueError(f"need at least 2 wafers with one label each, got {len(codes)}")
    if wafer_weights is not None and (len(wafer_weights) != len(codes) or wafer_weights.sum() <= 0):
        raise ValueError("wafer_weights needs one non-negative weight per wafer, not all 0")
    generator = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    if wafer_weights is None:
        wafer_weights = class_weights(labels, n_classes, config.balance)[labels]
    per_wafer = torch.from_numpy(np.asarray(wafer_weights, dtype=np.float64))
    data = torch.from_numpy(np.ascontiguousarray(codes)).to(device)
    targets = torch.from_numpy(labels.astype(np.int64)).to(device)
    network.to(device).to(memory_format=torch.channels_last)
    n = len(codes)
    total_steps = config.total_steps(n)
    optimiser = torch.optim.AdamW(
        network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=config.learning_rate, total_steps=total_steps
    )
    check_at: set[int] = set()
    if stopping is not None:
        check_at = {
            max(1, round(total_steps * (i + 1) / stopping.checks)) for i in range(stopping.checks)
        }
    best_loss, best_step, stale = math.inf, 0, 0
    best_state: dict[str, torch.Tensor] | None = None
    val_losses: list[float] = []
    losses: list[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    network.train()
    if stopping is not None and stopping.check_start:
        best_loss = held_out_loss(network, stopping, device, config.batch_size)
        val_losses.append(best_loss)
        best_state = _snapshot(network)
    bar = tqdm(total=total_steps, desc=progress, disable=progress is None)
    step, stopped = 0, False
    while step < total_steps and not stopped:
        order = torch.multinomial(per_wafer, n, replacement=True, generator=generator)
        total, done = 0.0, 0
        for pos in range(0, max(1, n - config.batch_size + 1), config.batch_size):
            if step >= total_steps:
                break
            pick = order[pos : pos + config.batch_size].to(device)
            batch = data[pick]
            if config.augment:
                batch = symmetries(batch, generator)
            with autocast(device):
                loss = _loss(network, batch, targets[pick], config, rng, generator)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach())
            done += 1
            step += 1
            bar.update()
            if stopping is not None and step in check_at:
                val_losses.append(held_out_loss(network, stopping, device, config.batch_size))
                if val_losses[-1] < best_loss:
                    best_loss, best_step, stale = val_losses[-1], step, 0
                    best_state = _snapshot(network)
                else:
                    stale += 1
                    if stale >= stopping.patience and step >= stopping.min_fraction * total_steps:
                        stopped = True
                        break
        losses.append(total / done)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    if best_state is not None:
        network.load_state_dict(best_state)
    recalibrate_batch_norm(
        network,
        data,
        device,
        config.batch_size,
        generator,
        None if norm_weights is None else torch.from_numpy(np.asarray(norm_weights, np.float64)),
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return TrainReport(
        wafers=n,
        samples=step * config.batch_size,
        seconds=seconds,
        loss_per_epoch=tuple(losses),
        cpu_seconds=time.process_time() - cpu_start,
        steps=step,
        validation_losses=tuple(val_losses),
        best_samples=None if stopping is None else best_step * config.batch_size,
    )


def _snapshot(network: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in network.state_dict().items()}


def train_bounded(
    network: nn.Module,
    codes: npt.NDArray[np.uint8],
    labels: npt.NDArray[np.integer],
    plan: RetrainPlan,
    n_classes: int,
    config: TrainConfig,
    device: torch.device,
    progress: str | None = None,
) -> tuple[TrainReport, npt.NDArray[np.float64]]:
    """Continue `network` (in place) as `plan` says (`backend.replay.plan_retraining` over the
    same `codes` and `labels`): its pool drawn with the class prior of every eligible wafer,
    at most `plan.budget` samples, early stopping on `plan.validation` (which may keep the
    network as it came, if no step improves its held-out loss), the learning rate scaled by
    `plan.learning_rate_scale` (a continued model needs smaller steps). With no held-out wafers it
    trains the whole budget. Returns the report and the logit adjustment for the model card.
    """
    if plan.budget < 1 or len(plan.train) < 2:
        raise ValueError(f"nothing to retrain on: {len(plan.train)} wafers, budget {plan.budget}")
    adjust = logit_adjustment(labels[plan.eligible], n_classes, config.balance)
    budget = max(plan.budget, config.batch_size)
    per_pass = max(1, len(plan.train) // config.batch_size) * config.batch_size
    config = replace(
        config,
        max_samples=budget,
        epochs=-(-budget // per_pass),
        learning_rate=config.learning_rate * plan.learning_rate_scale,
    )
    stopping = None
    if len(plan.validation):
        stopping = EarlyStopping(
            codes[plan.validation],
            labels[plan.validation].astype(np.int64),
            adjust,
            checks=plan.checks,
            patience=plan.patience,
            check_start=True,
        )
    pool, eligible = labels[plan.train], labels[plan.eligible]
    weights = pool_weights(pool, eligible, n_classes, config.balance)
    # BatchNorm statistics from the pool drawn with the real class mix (the replay is balanced)
    real_mix = pool_weights(pool, eligible, n_classes, "none")
    report = train_network(
        network,
        codes[plan.train],
        labels[plan.train],
        n_classes,
        config,
        device,
        progress,
        wafer_weights=weights,
        stopping=stopping,
        norm_weights=real_mix,
    )
    return report, adjust


def use_every_core() -> int:
    """Let torch use every core this process may run on; the number of threads."""
    n = len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    return n
