from pathlib import Path

import numpy as np
import pytest
import torch

from backend.classifier import ModelCard, WaferClassifier, build_network, read_card
from backend.model_store import ModelStore

CPU = torch.device("cpu")


def classifier(version: str, seed: int = 0) -> WaferClassifier:
    card = ModelCard(
        version,
        ("Center", "none"),
        16,
        "resnet18",
        (0.0, 0.0),
        metrics={"validation_accuracy": 0.5 + seed / 10},
    )
    return WaferClassifier(build_network("resnet18", 2, seed=seed), card, CPU)


def test_empty_store_serves_nothing(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, CPU)
    assert store.current_version() is None and store.load_current() is None
    assert store.versions() == [] and store.next_version("set1") == "v001-set1"


def test_publish_keeps_old_versions_and_switches_the_served_one(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, CPU)
    store.publish(classifier("v001-set0", seed=1))
    store.publish(classifier("v002-set1", seed=2))
    assert store.versions() == ["v001-set0", "v002-set1"]
    assert store.current_version() == "v002-set1"
    assert store.card("v001-set0").metrics["validation_accuracy"] == pytest.approx(0.6)
    # a second process (a fresh store on the same directory) serves the same version
    other = ModelStore(tmp_path, CPU)
    served = other.load_current()
    assert served is not None and served.card.version == "v002-set1"
    mine = store.load_current()
    assert mine is not None
    codes = np.random.default_rng(0).integers(0, 3, (4, 16, 16)).astype(np.uint8)
    np.testing.assert_allclose(served.predict_proba(codes), mine.predict_proba(codes), atol=1e-6)


def test_an_existing_version_is_never_overwritten(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, CPU)
    store.publish(classifier("v001-set0"))
    before = store.path_of("v001-set0").read_bytes()
    with pytest.raises(ValueError, match="exists already"):
        store.publish(classifier("v001-set0", seed=5))
    assert store.path_of("v001-set0").read_bytes() == before


def test_a_crash_while_publishing_keeps_serving_the_old_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ModelStore(tmp_path, CPU)
    store.publish(classifier("v001-set0"))

    def crash(obj: object, handle: object) -> None:
        raise OSError("worker killed")

    monkeypatch.setattr("backend.classifier.torch.save", crash)
    with pytest.raises(OSError, match="worker killed"):
        store.publish(classifier("v002-set1"))
    assert store.current_version() == "v001-set0"
    assert store.versions() == ["v001-set0"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == [
        "CURRENT",
        "v001-set0.card.json",
        "v001-set0.pt",
        "versions",
    ]


def test_cards_are_read_without_the_weights(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, CPU)
    assert store.current_card() is None
    store.publish(classifier("v001-set0"))
    from_json = store.card("v001-set0")
    assert from_json == read_card(store.path_of("v001-set0"))
    assert store.current_card() == from_json
    store.card_path_of("v001-set0").unlink()  # versions written before the JSON card existed
    assert store.card("v001-set0") == from_json


@pytest.mark.parametrize("bad", ["", "../escape", "a/b", "x" * 101])
def test_version_names_cannot_leave_the_directory(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="not a usable model version name"):
        ModelStore(tmp_path, CPU).path_of(bad)
