"""Learning a starting point from wafers nobody labelled: contrastive pretraining over wafer views.

Layer L1 (torch).

Most wafer maps a fab keeps are never labelled (WM-811K: 638,507 of 811,457). Contrastive learning
(SimCLR: Chen et al., 2020; on wafer maps: Kahng and Kim, IEEE TSM 2021) teaches the backbone, from
the maps alone, which wafers look alike: each wafer is drawn twice as a *view*, and the network is
trained so that the two views of one wafer lie close together and apart from every other wafer in
the batch (the NT-Xent loss). The views keep the failure pattern and change what does not matter:

- one of the 8 symmetries of the square (a pattern does not change when the wafer turns or mirrors);
- up to ``max_drop`` of the failing dies passed (a pattern survives losing some of its dies);
- up to ``max_noise`` of the good dies failed at random (the background scatter of any wafer).

The backbone's weights, without the projection head, go to a weights file that the first model
(``train --weights FILE``) and the worker's retraining (``WAFER_WEIGHTS``) start from
(`backend.classifier.build_network`). Pretraining is resumable: a checkpoint beside the output is
rewritten atomically every ``checkpoint_seconds`` and at the end of every pass, and a rerun with
the same wafers and settings carries on from it; the weights file appears only at the end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from tqdm import tqdm

from backend.classifier import (
    PRETRAIN_FORMAT,
    WEIGHTS_KIND,
    Float32Head,
    autocast,
    build_network,
    to_inputs,
)
from backend.files import atomic_writer
from backend.training import symmetries
from backend.wafers import DIE_FAIL, DIE_GOOD

CHECKPOINT_KIND = "wafer-pretraining-checkpoint"


@dataclass(frozen=True)
class PretrainConfig:
    epochs: int = 10
    batch_size: int = 256
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    #: NT-Xent temperature: lower sharpens the contrast between wafers.
    temperature: float = 0.2
    projection_dim: int = 128
    #: Each view passes a random share in [0, max_drop] of its failing dies ...
    max_drop: float = 0.3
    #: ... and fails a random share in [0, max_noise] of its good dies.
    max_noise: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 4:
            raise ValueError("need at least 1 epoch and a batch of at least 4 wafers")
        if not 0 <= self.max_drop < 1 or not 0 <= self.max_noise < 1:
            raise ValueError("max_drop and max_noise must be in [0, 1)")
        if self.temperature <= 0 or self.projection_dim < 1:
            raise ValueError("temperature must be > 0 and projection_dim >= 1")

    def steps_per_epoch(self, wafers: int) -> int:
        return max(1, wafers // self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PretrainReport:
    wafers: int
    steps: int
    #: Steps this run did (fewer than `steps` when it carried on from a checkpoint).
    steps_run: int
    seconds: float
    cpu_seconds: float
    loss_per_epoch: tuple[float, ...]
    resumed_from_step: int
    batch_size: int

    @property
    def wafers_per_second(self) -> float:
        """Wafers (two views each) through the network per second in this run."""
        return self.steps_run * self.batch_size / self.seconds if self.seconds > 0 else math.nan


def wafer_views(
    codes: torch.Tensor, config: PretrainConfig, generator: torch.Generator
) -> torch.Tensor:
    """One random view of each wafer of a (n, S, S) uint8 batch (see the module's docstring).

    `generator` lives on the batch's device; the symmetry draw uses a CPU generator of its own,
    seeded from it, so the views are reproducible from the generator's state alone.
    """
    n = codes.shape[0]
    cpu = torch.Generator().manual_seed(
        int(torch.randint(0, 2**62, (1,), generator=generator, device=codes.device))
    )
    views = symmetries(codes, cpu)
    shape = (n, 1, 1)
    drop = torch.rand(shape, generator=generator, device=codes.device) * config.max_drop
    noise = torch.rand(shape, generator=generator, device=codes.device) * config.max_noise
    draw = torch.rand(views.shape, generator=generator, device=codes.device)
    passed = (views == DIE_FAIL) & (draw < drop)
    failed = (views == DIE_GOOD) & (draw < noise)
    views = torch.where(passed, torch.full_like(views, DIE_GOOD), views)
    return torch.where(failed, torch.full_like(views, DIE_FAIL), views)


def nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view must pick its partner among the other 2n - 1 views of the batch."""
    n = first.shape[0]
    z = F.normalize(torch.cat([first, second]).float(), dim=1)
    similarity = z @ z.T / temperature
    similarity.fill_diagonal_(-math.inf)
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(similarity, partner)


class ProjectionHead(nn.Module):
    """The small network between the backbone's features and the contrastive loss (dropped after)."""

    def __init__(self, features: int, out: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(features, features), nn.ReLU(), nn.Linear(features, out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.layers(x.float())


def encoder_of(backbone: str, seed: int) -> tuple[nn.Module, int]:
    """The backbone without its classification layer (`fc` -> identity), and its feature width."""
    network = build_network(backbone, 1, seed)
    head = network.fc
    assert isinstance(head, Float32Head)
    width = head.linear.in_features
    network.fc = nn.Identity()
    return network, width


def checkpoint_path_for(out: Path) -> Path:
    return out.with_name(out.name + ".checkpoint")


def _identity(
    backbone: str, image_size: int, config: PretrainConfig, wafers: int
) -> dict[str, Any]:
    return {
        "backbone": backbone,
        "image_size": image_size,
        "config": config.to_dict(),
        "wafers": wafers,
    }


def _read_checkpoint(path: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"{path} is not a pretraining checkpoint; move it away to start afresh")
    if state.get("format") != PRETRAIN_FORMAT or state.get("identity") != identity:
        raise ValueError(
            f"{path} belongs to another pretraining run ({state.get('identity')}); run again "
            f"with the same wafers and settings, or delete it to start afresh"
        )
    return state


def pretrain(
    codes: npt.NDArray[np.uint8],
    backbone: str,
    config: PretrainConfig,
    device: torch.device,
    out: Path,
    *,
    progress: bool = True,
    checkpoint_seconds: float = 300.0,
    stop_after_steps: int | None = None,
    log: Callable[[str], None] = print,
) -> PretrainReport:
    """Pretrain `backbone` on die codes (n, S, S) without labels and write the weights to `out`.

    Carries on from `out`'s checkpoint when one exists for the same wafers and settings.
    `stop_after_steps` ends this run early (leaving the checkpoint), e.g. to split the work.
    """
    n, size = len(codes), int(codes.shape[1])
    if n < config.batch_size:
        raise ValueError(
            f"pretraining needs at least one batch of {config.batch_size} wafers, got {n}"
        )
    identity = _identity(backbone, size, config, n)
    encoder, width = encoder_of(backbone, config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        head = ProjectionHead(width, config.projection_dim)
    encoder.to(device).to(memory_format=torch.channels_last)
    head.to(device)
    parameters = list(encoder.parameters()) + list(head.parameters())
    optimiser = torch.optim.AdamW(
        parameters, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    per_epoch = config.steps_per_epoch(n)
    total_steps = config.epochs * per_epoch
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=config.learning_rate, total_steps=total_steps
    )
    generator = torch.Generator(device=device).manual_seed(config.seed)
    checkpoint = checkpoint_path_for(out)
    state = _read_checkpoint(checkpoint, identity)
    step, losses, epoch_loss = 0, [], 0.0
    if state is not None:
        encoder.load_state_dict(state["encoder"])
        head.load_state_dict(state["head"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        step, losses, epoch_loss = state["step"], list(state["losses"]), state["epoch_loss"]
        log(f"carrying on from {checkpoint}: step {step:,} of {total_steps:,}")
    resumed_from = step

    def save_checkpoint() -> None:
        with atomic_writer(checkpoint) as f:
            torch.save(
                {
                    "kind": CHECKPOINT_KIND,
                    "format": PRETRAIN_FORMAT,
                    "identity": identity,
                    "encoder": encoder.state_dict(),
                    "head": head.state_dict(),
                    "optimiser": optimiser.state_dict(),
                    "schedule": schedule.state_dict(),
                    "generator": generator.get_state(),
                    "step": step,
                    "losses": losses,
                    "epoch_loss": epoch_loss,
                },
                f,
            )

    data = torch.from_numpy(np.ascontiguousarray(codes)).to(device)
    encoder.train()
    head.train()
    start, cpu_start, saved_at = time.perf_counter(), time.process_time(), time.perf_counter()
    bar = tqdm(
        total=total_steps, initial=step, desc="pretraining", unit="step", disable=not progress
    )
    last = total_steps if stop_after_steps is None else min(total_steps, step + stop_after_steps)
    try:
        while step < last:
            epoch, position = divmod(step, per_epoch)
            # the order of a pass depends only on the seed and the pass, so a resumed run sees the same
            order = torch.randperm(
                n, generator=torch.Generator().manual_seed(config.seed * 1000 + epoch)
            )
            for pos in range(position, per_epoch):
                if step >= last:
                    break
                pick = order[pos * config.batch_size : (pos + 1) * config.batch_size].to(device)
                batch = data[pick]
                views = torch.cat(
                    [wafer_views(batch, config, generator), wafer_views(batch, config, generator)]
                )
                with autocast(device):
                    projected = head(encoder(to_inputs(views)))
                    first, second = projected.chunk(2)
                    loss = nt_xent(first, second, config.temperature)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                epoch_loss += float(loss.detach())
                step += 1
                bar.update()
                if pos == per_epoch - 1:
                    losses.append(epoch_loss / per_epoch)
                    epoch_loss = 0.0
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
                    save_checkpoint()
                    saved_at = time.perf_counter()
                elif time.perf_counter() - saved_at > checkpoint_seconds:
                    save_checkpoint()
                    saved_at = time.perf_counter()
    except KeyboardInterrupt:
        save_checkpoint()
        bar.close()
        log(f"interrupted at step {step:,}; run again to carry on ({checkpoint})")
        raise
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    report = PretrainReport(
        wafers=n,
        steps=step,
        steps_run=step - resumed_from,
        seconds=seconds,
        cpu_seconds=time.process_time() - cpu_start,
        loss_per_epoch=tuple(losses),
        resumed_from_step=resumed_from,
        batch_size=config.batch_size,
    )
    if step < total_steps:
        save_checkpoint()
        log(f"stopped at step {step:,} of {total_steps:,}; run again to carry on ({checkpoint})")
        return report
    save_weights(encoder, out, identity, report)
    checkpoint.unlink(missing_ok=True)
    return report


def save_weights(
    encoder: nn.Module, out: Path, identity: dict[str, Any], report: PretrainReport
) -> None:
    """The backbone's weights (no classification layer) with what made them, written atomically."""
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    with atomic_writer(out) as f:
        torch.save(
            {
                "kind": WEIGHTS_KIND,
                "format": PRETRAIN_FORMAT,
                "method": "contrastive (SimCLR over wafer views)",
                **identity,
                "state_dict": state,
                "steps": report.steps,
                "loss_per_epoch": list(report.loss_per_epoch),
            },
            f,
        )
