"""The torch side: symmetries, prior correction, learning a separable pattern, versions on disk."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from backend import classifier as clf
from backend.classifier import WaferClassifier, build_network, load_version, save_version
from backend.model_card import ModelCard
from backend.replay import RetrainPolicy, plan_retraining
from backend.training import (
    EarlyStopping,
    TrainConfig,
    class_weights,
    logit_adjustment,
    symmetries,
    train_bounded,
    train_network,
)

CPU = torch.device("cpu")


def wafers_with_and_without_a_centre_blob(
    rng: np.random.Generator, n: int, size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Class 0: failing dies in the centre; class 1: a few scattered failing dies."""
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 < (size / 2) ** 2
    codes = np.where(disc, 1, 0).astype(np.uint8)[None].repeat(n, axis=0)
    labels = rng.integers(0, 2, size=n)
    for i in range(n):
        noise = disc & (rng.random((size, size)) < 0.05)
        codes[i][noise] = 2
        if labels[i] == 0:
            r = rng.integers(3, 6)
            codes[i][(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < r * r] = 2
    return codes, labels.astype(np.int64)


def test_symmetries_are_rotations_or_mirrors_of_each_wafer() -> None:
    codes = torch.randint(0, 3, (64, 5, 5), dtype=torch.uint8)
    out = symmetries(codes, torch.Generator().manual_seed(1))
    for before, after in zip(codes, out, strict=True):
        variants = [torch.rot90(before, k, (0, 1)) for k in range(4)]
        variants += [torch.flip(v, (1,)) for v in variants]
        assert any(torch.equal(after, v) for v in variants)
    assert not torch.equal(out, codes)  # some wafers were actually turned


def test_balanced_sampling_weights() -> None:
    labels = np.array([0] * 900 + [1] * 100)
    np.testing.assert_allclose(class_weights(labels, 3, "none"), [1, 1, 0])
    sqrt = class_weights(labels, 3, "sqrt")
    drawn = np.array([900, 100, 0]) * sqrt
    np.testing.assert_allclose(drawn[:2] / drawn[:2].sum(), [0.75, 0.25])


def test_logit_adjustment_restores_the_real_class_prior() -> None:
    labels = np.array([0] * 900 + [1] * 100)
    adjust = logit_adjustment(labels, 3, "sqrt")
    # A network that learned the training prior (0.75 / 0.25) outputs these logits:
    logits = np.log([0.75, 0.25, 1e-12]) + adjust
    prior = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(prior[:2], [0.9, 0.1], rtol=1e-6)
    assert adjust[2] == 0.0


def test_training_learns_a_separable_pattern_and_predicts_probabilities() -> None:
    rng = np.random.default_rng(0)
    codes, labels = wafers_with_and_without_a_centre_blob(rng, 192)
    network = build_network("resnet18", 2, seed=0)
    config = TrainConfig(epochs=3, batch_size=32, learning_rate=3e-3, seed=0)
    report = train_network(network, codes, labels, 2, config, CPU)
    # Learnt: well below the cross-entropy of a coin flip (ln 2). Epoch-to-epoch loss is not
    # monotone on a CPU whose thread count varies with load, so no ordering is asserted.
    assert report.loss_per_epoch[-1] < 0.5 * np.log(2)
    card = ModelCard(
        "t", ("Center", "none"), 32, "resnet18", tuple(logit_adjustment(labels, 2, config.balance))
    )
    model = WaferClassifier(network, card, CPU)
    test_codes, test_labels = wafers_with_and_without_a_centre_blob(np.random.default_rng(1), 128)
    probs = model.predict_proba(test_codes, batch_size=50)
    assert probs.shape == (128, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    assert np.mean(probs.argmax(1) == test_labels) > 0.9
    with pytest.raises(ValueError, match=r"expected die codes \(n, 32, 32\)"):
        model.predict_proba(test_codes[:, :16, :16])


def test_same_seed_same_initial_weights_and_global_state_untouched() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_network("resnet18", 3, seed=7)
    after = torch.rand(1)
    b = build_network("resnet18", 3, seed=7)
    assert torch.equal(before, after)
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def small_model() -> WaferClassifier:
    card = ModelCard(
        "v1",
        ("Center", "Donut", "none"),
        16,
        "resnet18",
        (0.0, 0.5, -0.5),
        metrics={"validation_accuracy": 0.9},
    )
    return WaferClassifier(build_network("resnet18", 3, seed=0), card, CPU)


def test_version_round_trip(tmp_path: Path) -> None:
    model = small_model()
    codes = np.random.default_rng(0).integers(0, 3, (8, 16, 16)).astype(np.uint8)
    path = save_version(model, tmp_path / "models" / "v1.pt")
    loaded = load_version(path, CPU)
    assert loaded.card == model.card
    np.testing.assert_allclose(loaded.predict_proba(codes), model.predict_proba(codes), atol=1e-6)


def test_logits_in_eight_views_are_the_probabilities_of_the_drawn_wafer() -> None:
    model = small_model()
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 3, (5, 16, 16)).astype(np.uint8)
    views = model.predict_logits(codes, views=8)
    assert views.shape == (8, 5, 3)
    # view 0 is the wafer as drawn; its softmax is predict_proba (logit adjustment included)
    np.testing.assert_allclose(
        torch.softmax(torch.from_numpy(views[0]), 1).numpy(), model.predict_proba(codes), atol=1e-5
    )
    # view 1 (a quarter turn) of a wafer is view 0 of the same wafer turned by hand
    turned = np.ascontiguousarray(np.rot90(codes, 1, axes=(1, 2)))
    np.testing.assert_allclose(views[1], model.predict_logits(turned)[0], atol=1e-4)
    # a wafer with all 8 symmetries looks the same in every view
    plain = np.ones((1, 16, 16), np.uint8)
    same = model.predict_logits(plain, views=8)
    np.testing.assert_allclose(same, np.broadcast_to(same[:1], same.shape), atol=1e-4)
    with pytest.raises(ValueError, match="views"):
        model.predict_logits(codes, views=9)


def test_a_crash_while_saving_keeps_the_old_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_version(small_model(), tmp_path / "v.pt")
    before = path.read_bytes()

    def broken_save(obj: object, handle: Any) -> None:
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(clf.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_version(small_model(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["v.pt"]


def test_a_damaged_version_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable model version"):
        load_version(bad, CPU)


def test_a_sample_budget_caps_training() -> None:
    codes, labels = wafers_with_and_without_a_centre_blob(np.random.default_rng(0), 96, 16)
    config = TrainConfig(epochs=5, batch_size=32, max_samples=128, seed=0)
    assert config.total_steps(96) == 4
    report = train_network(build_network("resnet18", 2, seed=0), codes, labels, 2, config, CPU)
    assert (report.samples, report.steps) == (128, 4)
    assert len(report.loss_per_epoch) == 2  # one full pass of 3 batches, then 1 batch
    with pytest.raises(ValueError, match="max_samples"):
        TrainConfig(batch_size=32, max_samples=16)


def trained_blob_model(seed: int = 0) -> tuple[torch.nn.Module, np.ndarray, np.ndarray]:
    codes, labels = wafers_with_and_without_a_centre_blob(np.random.default_rng(seed), 192)
    network = build_network("resnet18", 2, seed=0)
    train_network(
        network, codes, labels, 2, TrainConfig(epochs=3, batch_size=32, learning_rate=3e-3), CPU
    )
    return network, codes, labels


def test_early_stopping_keeps_the_start_weights_when_training_only_hurts() -> None:
    network, codes, labels = trained_blob_model()
    before = {k: v.clone() for k, v in network.named_parameters()}
    wrong = np.random.default_rng(9).permutation(labels)  # labels unrelated to the wafers
    val_codes, val_labels = wafers_with_and_without_a_centre_blob(np.random.default_rng(1), 64)
    stopping = EarlyStopping(
        val_codes, val_labels, np.zeros(2), checks=4, patience=1, check_start=True
    )
    config = TrainConfig(epochs=2, batch_size=32, learning_rate=1e-2, seed=0)
    report = train_network(network, codes, wrong, 2, config, CPU, stopping=stopping)
    assert report.best_samples == 0
    planned = config.total_steps(len(codes))
    assert 0.5 * planned <= report.steps < planned  # stopped early, not before half the steps
    assert report.validation_losses[1] > report.validation_losses[0]
    for name, value in network.named_parameters():
        assert torch.equal(value, before[name]), name


def test_bounded_retraining_stays_within_budget_and_keeps_what_it_learnt() -> None:
    network, codes, labels = trained_blob_model()
    new_codes, new_labels = wafers_with_and_without_a_centre_blob(np.random.default_rng(2), 96)
    all_codes = np.concatenate([codes, new_codes])
    all_labels = np.concatenate([labels, new_labels])
    is_new = np.arange(len(all_labels)) >= len(labels)
    by_person = np.ones(len(all_labels), dtype=bool)
    policy = RetrainPolicy(samples_per_new_wafer=2.0, validation_fraction=0.2)
    plan = plan_retraining(
        all_labels, by_person, is_new, np.arange(len(all_labels)), policy, np.random.default_rng(0)
    )
    config = TrainConfig(batch_size=32, learning_rate=1e-3, seed=1, balance="sqrt")
    report, adjust = train_bounded(network, all_codes, all_labels, plan, 2, config, CPU)
    assert report.samples <= plan.budget == 2 * plan.new
    assert report.best_samples is not None and report.best_samples <= report.samples
    np.testing.assert_allclose(adjust, logit_adjustment(all_labels[plan.eligible], 2, "sqrt"))
    assert np.abs(adjust).max() > 0  # the replay pool was drawn balanced and is corrected for
    card = ModelCard("b", ("Center", "none"), 32, "resnet18", tuple(adjust))
    test_codes, test_labels = wafers_with_and_without_a_centre_blob(np.random.default_rng(3), 128)
    probs = WaferClassifier(network, card, CPU).predict_proba(test_codes)
    assert np.mean(probs.argmax(1) == test_labels) > 0.9
