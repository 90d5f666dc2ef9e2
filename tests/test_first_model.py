"""`python -m backend import-wafers` and `python -m backend train` against a real Label Studio:
a labelled history as set 0, a first model trained offline on it and served for the project."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from redis import Redis

from backend.classifier import WaferClassifier, build_network
from backend.cli import main
from backend.cli_labelstudio import publish_as_next
from backend.first_model import cached_first_model, history_from_wafers
from backend.harness.stack import LabelStudioServer
from backend.label_config import DEFAULT_LABEL_CONFIG, LabelConfig
from backend.labelstudio import LabelStudioClient, set_filter
from backend.loop_state import trained_through
from backend.model_store import ModelStore
from backend.retraining import holdout_key
from backend.service import WaferLabelingService
from backend.settings import Settings
from backend.sources.arrays import save_npz
from backend.sources.cache import LoadReport
from backend.splits import stable_holdout, stratified_sample, wafer_key
from backend.training import TrainConfig
from backend.wafers import WaferMaps

pytestmark = pytest.mark.slow

CPU = torch.device("cpu")


@pytest.fixture
def history_file(
    real_wafers: tuple[WaferMaps, LoadReport], tmp_path: Path, label_config: LabelConfig
) -> Path:
    """About 300 labelled WM-811K wafers (every failure type) as a fab's .npz."""
    wafers = real_wafers[0]
    labelled = np.flatnonzero(wafers.labels >= 0)
    rng = np.random.default_rng(5)
    picked = labelled[stratified_sample(wafers.labels[labelled], 0.0018, rng)]
    path = tmp_path / "history.npz"
    save_npz(wafers.subset(np.sort(picked)), path)
    return path


@pytest.fixture
def cli_env(
    label_studio: LabelStudioServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """The environment the commands read; returns MODEL_DIR."""
    model_dir = tmp_path / "models"
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.api_key)
    monkeypatch.setenv("MODEL_DIR", str(model_dir))
    monkeypatch.setenv("WAFER_DEVICE", "cpu")
    return model_dir


def test_train_publishes_a_served_version_trained_through_set_0(
    ls: LabelStudioClient,
    history_file: Path,
    cli_env: Path,
    redis: Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    project = ls.create_project("first model", DEFAULT_LABEL_CONFIG.read_text())
    # Half of the history goes into Label Studio as set 0 (the rest stays history only).
    cache = ["--cache-dir", str(history_file.parent / "cache")]
    initial = ["import-wafers", "--project", str(project), "--data", str(history_file)]
    initial += ["--initial", "--subsample", "0.5", *cache]
    assert main(initial) == 0
    set0 = ls.tasks(project, [set_filter(0)])
    assert len(set0) > 100
    assert all(t["annotations"] and t["data"]["source"] == "history" for t in set0)
    # Again: nothing new, nothing twice.
    assert main(initial) == 0
    assert "imported 0 wafers" in capsys.readouterr().out
    assert len(ls.tasks(project, [set_filter(0)])) == len(set0)

    flags = ["--backbone", "resnet18", "--image-size", "16", "--epochs", "1"]
    flags += ["--batch-size", "32", "--model-dir", str(cli_env), *cache]
    code = main(["train", "--project", str(project), "--data", str(history_file), *flags])
    assert code == 0
    out = capsys.readouterr().out
    store = ModelStore.for_project(cli_env, project, CPU)
    version = store.current_version()
    assert version is not None and version in out
    model = store.load_current()
    assert model is not None
    card = model.card
    assert trained_through(card) == 0
    assert card.backbone == "resnet18" and card.image_size == 16
    probs = model.predict_proba(np.zeros((2, 16, 16), np.uint8))
    assert probs.shape == (2, len(card.failure_types))
    # The holdout is the worker's: keyed by each wafer's (source, id), tasks or not.
    with np.load(history_file) as saved:
        wafer_ids = saved["source_row"]
    keys = np.array([wafer_key("history", int(w)) for w in wafer_ids])
    assert sorted(holdout_key(t) for t in set0) == sorted(
        wafer_key("history", t["data"]["wafer_id"]) for t in set0
    )
    fraction = Settings.from_env(os.environ).validation_fraction
    held_out = int(stable_holdout(keys, fraction).sum())
    assert card.metrics["validation_wafers"] == held_out > 0
    assert card.training["train_wafers"] + held_out == len(wafer_ids)
    assert card.validation is not None and len(card.validation.scores) == held_out
    assert "route_threshold" in card.metrics

    # What Label Studio's /setup would be told for this project.
    settings = dataclasses.replace(Settings.from_env(os.environ), model_dir=cli_env)
    service = WaferLabelingService(settings, redis)
    assert service.setup(f"{project}.1700000000", DEFAULT_LABEL_CONFIG.read_text(), {}) == version

    # From the project's set 0 instead of a file: a newer version, all of set 0 and nothing else.
    code = main(["train", "--project", str(project), "--from-project", *flags])
    assert code == 0
    newer = store.current_version()
    assert newer is not None and newer != version
    card = store.card(newer)
    assert trained_through(card) == 0
    total = card.training["train_wafers"] + card.training["validation_wafers"]
    assert total == len(set0)
    held = stable_holdout(np.array([holdout_key(t) for t in set0]), fraction)
    assert card.training["validation_wafers"] == int(held.sum())


def test_import_wafers_says_what_is_wrong_with_the_input(
    ls: LabelStudioClient,
    cli_env: Path,
    tmp_path: Path,
    label_config: LabelConfig,
    capsys: pytest.CaptureFixture[str],
) -> None:
    project = ls.create_project("bad input", DEFAULT_LABEL_CONFIG.read_text())
    missing = tmp_path / "nowhere.npz"
    args = ["import-wafers", "--project", str(project), "--per-set", "5"]
    args += ["--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "--data", str(missing)]) == 2
    assert "not found" in capsys.readouterr().err

    maps = np.ones((3, 4, 4), np.uint8)
    unknown = tmp_path / "unknown.npz"
    np.savez(unknown, maps=maps, labels=np.array(["", "Crack", "Donut"]))
    assert main([*args, "--data", str(unknown)]) == 2
    err = capsys.readouterr().err
    assert "'Crack'" in err and "labeling config" in err

    fine = tmp_path / "fine.npz"
    np.savez(fine, maps=maps, labels=np.array(["", "", ""]))
    assert main([*args, "--data", str(fine)]) == 2
    assert "import the labelled history as set 0 first" in capsys.readouterr().err
    assert ls.tasks(project) == []


def test_a_first_model_is_trained_once_then_taken_from_the_cache(
    real_wafers: tuple[WaferMaps, LoadReport], tmp_path: Path, label_config: LabelConfig
) -> None:
    wafers = real_wafers[0]
    rng = np.random.default_rng(7)
    chosen = stratified_sample(wafers.labels, 120 / len(wafers), rng)
    # routed by one drawing first (a model this small is unsure of every wafer, where 8
    # drawings of the unsure ones are all 8 drawings)
    settings = dataclasses.replace(
        Settings(),
        backbone="resnet18",
        image_size=16,
        validation_fraction=0.3,
        route_measure="margin",
    )
    history = history_from_wafers(
        wafers.subset(chosen), 16, subsample=1.0, seed=0, source="t", origin="test", progress=False
    )
    config = TrainConfig(epochs=1, batch_size=32, seed=0)

    def first_model(train: TrainConfig, project: int = 3) -> tuple[WaferClassifier, bool]:
        return cached_first_model(
            history,
            label_config,
            settings,
            train,
            version="v001-set0",
            project=project,
            device=CPU,
            cache_dir=tmp_path,
            data_identity="LSWMD:1",
            progress=False,
        )

    first, cached = first_model(config)
    assert not cached
    [kept] = (tmp_path / "first-models").iterdir()
    again, cached = first_model(config, project=9)
    assert cached and again.card.project == 9
    assert again.card.metrics == first.card.metrics
    codes = history.codes[:8]
    np.testing.assert_allclose(again.predict_proba(codes), first.predict_proba(codes), atol=1e-6)
    # Other training settings are another model: trained, not taken.
    _, cached = first_model(dataclasses.replace(config, seed=1))
    assert not cached and len(list((tmp_path / "first-models").iterdir())) == 2
    # A damaged cache file is trained again, not trusted.
    kept.write_bytes(b"garbage")
    _, cached = first_model(config)
    assert not cached
    # Another routing is the same network, validated again: calibrated on the 8 drawings of its
    # held-out wafers (`WAFER_ROUTE_MEASURE=eight-views`), not trained again.
    settings = dataclasses.replace(settings, route_measure="eight-views")
    eight, cached = first_model(config)
    assert cached and eight.card.validation is not None
    assert eight.card.validation.measure == "eight-views" == eight.card.route_measure
    assert first.card.validation is not None
    assert len(eight.card.validation.scores) == len(first.card.validation.scores)
    assert eight.card.validation.scores != first.card.validation.scores
    np.testing.assert_allclose(eight.predict_proba(codes), first.predict_proba(codes), atol=1e-6)


def test_train_needs_no_label_studio_with_a_project_id_and_a_file(
    history_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first model trained where Label Studio is out of reach (a GPU box, a build job)."""
    model_dir = tmp_path / "models"
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:1")  # nothing answers there
    flags = ["--backbone", "resnet18", "--image-size", "16", "--epochs", "1", "--batch-size", "32"]
    flags += ["--model-dir", str(model_dir), "--cache-dir", str(tmp_path / "cache")]
    assert main(["train", "--project", "42", "--data", str(history_file), *flags]) == 0
    card = ModelStore.for_project(model_dir, 42, CPU).current_card()
    assert card is not None and card.project == 42 and trained_through(card) == 0
    # A title needs Label Studio to look it up: a clear error, not a crash
    assert main(["train", "--project", "Wafer maps", "--data", str(history_file), *flags]) == 2


def test_train_publishes_under_the_next_name_when_the_worker_took_its_name(
    tmp_path: Path, label_config: LabelConfig
) -> None:
    """The worker published v001-set0 while `train` trained: the offline model is served as
    v002-set0 instead of failing with 'exists already'."""
    store = ModelStore.for_project(tmp_path, 5, CPU)
    n = len(label_config.failure_types)

    def model(seed: int) -> WaferClassifier:
        from backend.classifier import build_network
        from backend.model_card import ModelCard

        card = ModelCard(
            "v001-set0",
            label_config.failure_types,
            16,
            "resnet18",
            (0.0,) * n,
            trained_through_set=0,
            project=5,
        )
        return WaferClassifier(build_network("resnet18", n, seed=seed), card, CPU)

    store.publish(model(1))  # the worker's weak first model
    published = publish_as_next(store, model(2), "set0")
    assert published.card.version == "v002-set0" == store.current_version()
    assert store.versions() == ["v001-set0", "v002-set0"]


def test_pretrain_then_a_first_model_starts_from_its_weights(
    history_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, label_config: LabelConfig
) -> None:
    """`pretrain` on wafers without labels, then `train --weights` on the labelled ones; a file
    with no unlabelled wafer is a clear error."""
    from backend.sources.arrays import load_npz

    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    wafers, _ = load_npz(history_file, label_config.failure_types)
    unlabelled = tmp_path / "unlabelled.npz"
    save_npz(dataclasses.replace(wafers, labels=np.full(len(wafers), -1, np.int16)), unlabelled)
    weights = tmp_path / "pretrained.pt"
    model = ["--backbone", "wafercnn", "--image-size", "16", "--device", "cpu"]
    cache = ["--cache-dir", str(tmp_path / "cache")]
    flags = [*model, *cache, "--epochs", "1", "--batch-size", "32"]
    assert main(["pretrain", "--data", str(unlabelled), "--out", str(weights), *flags]) == 0
    assert weights.is_file() and not weights.with_name("pretrained.pt.checkpoint").exists()
    assert (
        main(["pretrain", "--data", str(history_file), "--out", str(tmp_path / "x.pt"), *flags])
        == 2
    )
    model_dir = tmp_path / "models"
    train = ["train", "--project", "42", "--data", str(history_file), "--weights", str(weights)]
    assert main([*train, *flags, "--model-dir", str(model_dir)]) == 0
    served = ModelStore.for_project(model_dir, 42, CPU).load_current()
    assert served is not None and served.card.backbone == "wafercnn"
    # the served network's first convolution moved away from the pretrained start, but only by
    # fine-tuning: it is far closer to it than a network trained from scratch would be
    start = torch.load(weights, weights_only=True)["state_dict"]["features.0.weight"]
    first = served.network.state_dict()["features.0.weight"].cpu()
    scratch = build_network("wafercnn", len(label_config.failure_types), 0)
    assert torch.dist(first, start) < torch.dist(scratch.state_dict()["features.0.weight"], start)
