"""Contrastive pretraining on wafers without labels: the views, the loss, resuming, the weights file
and how the classifier starts from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from backend.classifier import build_network
from backend.pretraining import (
    PretrainConfig,
    checkpoint_path_for,
    encoder_of,
    nt_xent,
    pretrain,
    wafer_views,
)
from backend.wafers import DIE_FAIL, DIE_GOOD, DIE_OFF_WAFER

CPU = torch.device("cpu")


def round_wafers(n: int, size: int, seed: int = 0) -> np.ndarray:
    """n die maps: a disc of good dies with a random scatter of failing ones, off-wafer corners."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    disc = yy**2 + xx**2 <= (size / 2) ** 2
    codes = np.where(disc, DIE_GOOD, DIE_OFF_WAFER).astype(np.uint8)
    codes = np.repeat(codes[None], n, axis=0)
    fail = (rng.random(codes.shape) < rng.uniform(0.05, 0.4, (n, 1, 1))) & disc
    codes[fail] = DIE_FAIL
    return codes


def test_a_view_keeps_the_wafer_outline_and_changes_only_dies_on_it() -> None:
    codes = torch.from_numpy(round_wafers(64, 16))
    config = PretrainConfig(max_drop=0.5, max_noise=0.1)
    views = wafer_views(codes, config, torch.Generator().manual_seed(1))
    off = (codes == DIE_OFF_WAFER).flatten(1).sum(1)
    assert torch.equal((views == DIE_OFF_WAFER).flatten(1).sum(1), off)
    assert set(torch.unique(views).tolist()) <= {DIE_OFF_WAFER, DIE_GOOD, DIE_FAIL}
    assert not torch.equal(views, codes)  # dies did change
    # Without die changes a view is one of the 8 symmetries of its wafer
    plain = wafer_views(
        codes, PretrainConfig(max_drop=0, max_noise=0), torch.Generator().manual_seed(2)
    )
    for wafer, view in zip(codes, plain, strict=True):
        turns = [torch.rot90(wafer, k, (0, 1)) for k in range(4)]
        assert any(torch.equal(view, t) or torch.equal(view, t.flip(1)) for t in turns)


def test_the_contrastive_loss_is_low_when_each_view_finds_its_partner() -> None:
    z = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    matched = nt_xent(z, z + 0.01 * torch.randn_like(z), temperature=0.2)
    shuffled = nt_xent(z, z[torch.randperm(32)], temperature=0.2)
    assert float(matched) + 2 < float(shuffled)  # ln(63) ~ 4.1 for a view that finds nothing


def test_pretraining_lowers_its_loss_on_wafers_it_can_tell_apart(tmp_path: Path) -> None:
    codes = round_wafers(256, 16)
    config = PretrainConfig(epochs=4, batch_size=32, learning_rate=3e-3)
    report = pretrain(codes, "wafercnn", config, CPU, tmp_path / "w.pt", progress=False)
    assert len(report.loss_per_epoch) == 4
    assert report.loss_per_epoch[-1] < report.loss_per_epoch[0]
    assert report.wafers_per_second > 0


def state_of(path: Path) -> dict[str, torch.Tensor]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["kind"] == "wafer-pretrained-weights" and payload["backbone"] == "wafercnn"
    return dict(payload["state_dict"])


def test_an_interrupted_pretraining_carries_on_to_the_same_weights(tmp_path: Path) -> None:
    codes = round_wafers(96, 12)
    config = PretrainConfig(epochs=2, batch_size=16)
    whole = pretrain(codes, "wafercnn", config, CPU, tmp_path / "whole.pt", progress=False)
    split = tmp_path / "split.pt"
    first = pretrain(codes, "wafercnn", config, CPU, split, progress=False, stop_after_steps=7)
    assert first.steps == 7 and not split.exists() and checkpoint_path_for(split).exists()
    rest = pretrain(codes, "wafercnn", config, CPU, split, progress=False)
    assert rest.resumed_from_step == 7 and rest.steps_run == whole.steps - 7
    assert split.exists() and not checkpoint_path_for(split).exists()
    assert rest.loss_per_epoch == pytest.approx(whole.loss_per_epoch, rel=1e-5)
    a, b = state_of(tmp_path / "whole.pt"), state_of(split)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key


def test_a_checkpoint_of_another_run_is_refused(tmp_path: Path) -> None:
    codes = round_wafers(64, 12)
    out = tmp_path / "w.pt"
    pretrain(codes, "wafercnn", PretrainConfig(epochs=2, batch_size=16), CPU, out,
             progress=False, stop_after_steps=2)  # fmt: skip
    with pytest.raises(ValueError, match="another pretraining run"):
        pretrain(codes, "wafercnn", PretrainConfig(epochs=3, batch_size=16), CPU, out,
                 progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="at least one batch"):
        pretrain(codes[:8], "wafercnn", PretrainConfig(batch_size=16), CPU, tmp_path / "x.pt")


def test_a_classifier_starts_from_pretrained_weights_with_a_fresh_head(tmp_path: Path) -> None:
    out = tmp_path / "w.pt"
    pretrain(round_wafers(64, 12), "wafercnn", PretrainConfig(epochs=1, batch_size=16), CPU, out,
             progress=False)  # fmt: skip
    saved = state_of(out)
    network = build_network("wafercnn", 9, seed=3, weights_path=out)
    state = network.state_dict()
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    fresh = build_network("wafercnn", 9, seed=3).state_dict()
    assert torch.equal(state["fc.linear.weight"], fresh["fc.linear.weight"])
    assert not torch.equal(state["features.0.weight"], fresh["features.0.weight"])
    with pytest.raises(ValueError, match="pretrained wafercnn weights, not resnet18"):
        build_network("resnet18", 9, 0, out)
    plain = tmp_path / "plain.pt"
    torch.save(encoder_of("wafercnn", 0)[0].state_dict(), plain)
    with pytest.raises(ValueError, match="only from `python -m backend pretrain`"):
        build_network("wafercnn", 9, 0, plain)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a weights file")
    with pytest.raises(ValueError, match="not a weights file"):
        build_network("wafercnn", 9, 0, junk)
