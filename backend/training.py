"""Training a wafer-map classifier: class balance, wafer symmetries as augmentation, one cycle.

Layer L1 (torch).
- Class imbalance ("none" is 85% of WM-811K): wafers are drawn with probability proportional to
  count^-1/2 of their class ("sqrt"), or count^-1 ("inverse"), or uniformly ("none"). The shift of
  the class prior this causes is recorded as a logit adjustment and undone at prediction.
- Augmentation follows the physics: a wafer's failure pattern does not change when the wafer is
  rotated by 90 degrees or mirrored, so each wafer is drawn in one of the 8 symmetries of the square.
- AdamW with a one-cycle learning-rate schedule, bf16 autocast where fast, channels_last, seeded.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from tqdm import tqdm

from backend.classifier import autocast, batches, to_inputs

BALANCES = ("sqrt", "inverse", "none")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    balance: str = "sqrt"
    augment: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("need at least 1 epoch and a batch of at least 2 wafers")
        if self.balance not in BALANCES:
            raise ValueError(f"balance must be one of {', '.join(BALANCES)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainReport:
    wafers: int
    samples: int
    seconds: float
    loss_per_epoch: tuple[float, ...]

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else math.nan


def class_weights(
    labels: npt.NDArray[np.integer], n_classes: int, balance: str
) -> npt.NDArray[np.float64]:
    """Per-class sampling weight per wafer (0 for classes with no wafers)."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    power = {"sqrt": 0.5, "inverse": 1.0, "none": 0.0}[balance]
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
) -> None:
    """Recompute BatchNorm running statistics for the final weights.

    The running averages kept during training lag behind the weights; after a short training
    (a small set, few epochs) the network then predicts well in training mode and badly in
    evaluation mode. One pass over up to BATCH_NORM_WAFERS training wafers fixes that.
    """
    pick = torch.randperm(len(data), generator=generator)[:BATCH_NORM_WAFERS].to(device)
    inputs = (to_inputs(data[pick[part]]) for part in batches(len(pick), 4 * batch_size))
    with torch.no_grad(), autocast(device):
        torch.optim.swa_utils.update_bn(inputs, network)


def train_network(
    network: nn.Module,
    codes: npt.NDArray[np.uint8],
    labels: npt.NDArray[np.integer],
    n_classes: int,
    config: TrainConfig,
    device: torch.device,
    progress: str | None = None,
) -> TrainReport:
    """Train `network` in place on die codes (n, S, S) and class indices (n,)."""
    if len(codes) != len(labels) or len(codes) < 2:
        raise ValueError(f"need at least 2 wafers with one label each, got {len(codes)}")
    generator = torch.Generator().manual_seed(config.seed)
    per_wafer = torch.from_numpy(class_weights(labels, n_classes, config.balance)[labels])
    data = torch.from_numpy(np.ascontiguousarray(codes)).to(device)
    targets = torch.from_numpy(labels.astype(np.int64)).to(device)
    network.to(device).to(memory_format=torch.channels_last)
    n = len(codes)
    steps_per_epoch = max(1, n // config.batch_size)
    optimiser = torch.optim.AdamW(
        network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=config.learning_rate, total_steps=config.epochs * steps_per_epoch
    )
    losses: list[float] = []
    start = time.perf_counter()
    network.train()
    bar = tqdm(total=config.epochs * steps_per_epoch, desc=progress, disable=progress is None)
    for _ in range(config.epochs):
        order = torch.multinomial(per_wafer, n, replacement=True, generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            pick = order[step * config.batch_size : (step + 1) * config.batch_size].to(device)
            batch = data[pick]
            if config.augment:
                batch = symmetries(batch, generator)
            with autocast(device):
                loss = F.cross_entropy(network(to_inputs(batch)), targets[pick])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach())
            bar.update()
        losses.append(total / steps_per_epoch)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    recalibrate_batch_norm(network, data, device, config.batch_size, generator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return TrainReport(
        wafers=n,
        samples=config.epochs * steps_per_epoch * config.batch_size,
        seconds=seconds,
        loss_per_epoch=tuple(losses),
    )
