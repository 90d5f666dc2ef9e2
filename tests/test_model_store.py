"""Model versions per project: publishing, serving, damaged files and crashes mid-publish."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.classifier import WaferClassifier, build_network, load_version, read_card, save_version
from backend.model_card import ModelCard
from backend.model_store import ModelStore

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parent.parent
CODES = np.random.default_rng(0).integers(0, 3, (4, 16, 16)).astype(np.uint8)


def classifier(
    version: str, seed: int = 0, project: int | None = None, through: int | None = None
) -> WaferClassifier:
    card = ModelCard(
        version,
        ("Center", "none"),
        16,
        "resnet18",
        (0.0, 0.0),
        metrics={"validation_accuracy": 0.5 + seed / 10},
        trained_through_set=through,
        project=project,
    )
    network = build_network("resnet18", 2, seed=seed)
    head = network.get_submodule("fc.linear")
    assert isinstance(head, torch.nn.Linear)
    with torch.no_grad():  # a visible difference between seeds in the (zero-biased) head
        head.bias.copy_(torch.tensor([seed * 0.5, -seed * 0.5]))
    return WaferClassifier(network, card, CPU)


def predictions(model: WaferClassifier | None) -> np.ndarray:
    assert model is not None
    return model.predict_proba(CODES)


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


# --- models per project ------------------------------------------------------------------------


def test_two_projects_in_one_model_dir_each_serve_their_own(tmp_path: Path) -> None:
    a = ModelStore.for_project(tmp_path, 1, CPU)
    b = ModelStore.for_project(tmp_path, 2, CPU)
    b.publish(classifier("v001-set0", seed=2, project=2, through=3))
    # project A has no model, and nothing that says a set of A was learnt
    assert a.current_version() is None and a.load_current() is None
    assert a.current_card() is None and a.versions() == [] and a.problems() == []
    assert a.next_version("set0") == "v001-set0"  # B's numbers do not count for A
    fresh_b = ModelStore.for_project(tmp_path, 2, CPU)
    card_b = fresh_b.current_card()
    assert card_b is not None and card_b.trained_through_set == 3
    # A publishes its own version of the same name; B keeps serving its own
    a.publish(classifier("v001-set0", seed=1, project=1, through=0))
    card_a = ModelStore.for_project(tmp_path, 1, CPU).current_card()
    assert card_a is not None and (card_a.project, card_a.trained_through_set) == (1, 0)
    served_a = predictions(ModelStore.for_project(tmp_path, 1, CPU).load_current())
    served_b = predictions(ModelStore.for_project(tmp_path, 2, CPU).load_current())
    assert not np.allclose(served_a, served_b, atol=1e-3)
    np.testing.assert_allclose(served_a, predictions(classifier("v001-set0", seed=1)), atol=1e-5)
    assert ModelStore.projects(tmp_path) == [1, 2]


@pytest.mark.parametrize("project", [0, -1, True, "1", 1.0])
def test_a_store_needs_a_project_id(tmp_path: Path, project: object) -> None:
    with pytest.raises(ValueError, match="not a Label Studio project id"):
        ModelStore.for_project(tmp_path, project, CPU)  # type: ignore[arg-type]


def test_models_in_the_old_single_project_layout_are_not_served_to_any_project(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ModelStore(tmp_path, CPU).publish(classifier("v001-set0", project=7, through=1))
    with caplog.at_level(logging.WARNING, logger="backend.model_store"):
        store = ModelStore.for_project(tmp_path, 3, CPU)
    assert store.current_version() is None and store.versions() == []
    [note] = store.problems()
    assert "not served" in note and "MODEL_DIR/projects/7" in note
    assert str(tmp_path) not in note
    assert any("MODEL_DIR/projects/7" in r.getMessage() for r in caplog.records)
    # once moved as the note says, project 7 serves it
    (tmp_path / "projects" / "7").mkdir(parents=True)
    for name in ("versions", "CURRENT"):
        (tmp_path / name).rename(tmp_path / "projects" / "7" / name)
    moved = ModelStore.for_project(tmp_path, 7, CPU)
    assert moved.current_version() == "v001-set0" and moved.problems() == []


# --- a CURRENT that cannot be served ------------------------------------------------------------


def two_versions(root: Path) -> tuple[ModelStore, np.ndarray]:
    store = ModelStore(root, CPU)
    store.publish(classifier("v001-set0", seed=1))
    first = predictions(store.load_current())
    store.publish(classifier("v002-set1", seed=2))
    return store, first


def assert_falls_back(
    root: Path, store: ModelStore, first: np.ndarray, caplog: pytest.LogCaptureFixture
) -> list[str]:
    """The store serves v001-set0 (the newest readable), says why, and logs it."""
    with caplog.at_level(logging.ERROR, logger="backend.model_store"):
        for reader in (store, ModelStore(root, CPU)):  # the same process and a fresh one
            assert reader.current_version() == "v001-set0"
            np.testing.assert_allclose(predictions(reader.load_current()), first, atol=1e-6)
            card = reader.current_card()
            assert card is not None and card.version == "v001-set0"
    problems = store.problems()
    assert len(problems) == 1 and "serving v001-set0 instead" in problems[0]
    assert str(root) not in problems[0] and "/" not in problems[0]
    assert any(r.levelno == logging.ERROR for r in caplog.records)
    return problems


def test_a_truncated_current_weights_file_falls_back_to_the_newest_readable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, first = two_versions(tmp_path)
    assert predictions(store.load_current()).shape == (4, 2) and store.problems() == []
    weights = store.path_of("v002-set1")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    [problem] = assert_falls_back(tmp_path, store, first, caplog)
    assert problem.startswith("model version v002-set1 named in CURRENT is unreadable")


def test_the_newest_readable_version_is_served_when_several_are_damaged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, first = two_versions(tmp_path)
    store.publish(classifier("v003-set2", seed=3))
    for version in ("v002-set1", "v003-set2"):
        store.path_of(version).write_bytes(b"PK\x03\x04 not a checkpoint")
    assert_falls_back(tmp_path, store, first, caplog)
    # nothing readable at all: no model, and the problem says so
    store.path_of("v001-set0").write_bytes(b"")
    assert store.load_current() is None and store.current_version() is None
    assert "no model is served" in store.problems()[0]


@pytest.mark.parametrize(
    "current",
    [
        b"../../etc/passwd\n",
        b"/etc/passwd\n",
        b"v009-set8\n",  # a version that does not exist
        b"\xff\xfe\x00garbage\x81",
        b"v" * 5000,
        b"",
    ],
    ids=["relative-path", "absolute-path", "missing", "garbage", "huge", "empty"],
)
def test_a_current_that_names_no_readable_version_falls_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, current: bytes
) -> None:
    store, first = two_versions(tmp_path)
    store.path_of("v002-set1").unlink()  # v001-set0 is the newest left
    (tmp_path / "CURRENT").write_bytes(current)
    assert_falls_back(tmp_path, store, first, caplog)


def test_no_file_outside_the_store_is_ever_read(tmp_path: Path) -> None:
    root = tmp_path / "models"
    store, _ = two_versions(root)
    # a perfectly good checkpoint outside the store, reached by links from inside it
    outside = save_version(classifier("v003-set2", seed=3), tmp_path / "elsewhere" / "x.pt")
    (root / "versions" / "v003-set2.pt").symlink_to(outside)
    (root / "CURRENT").write_text("v003-set2\n")
    assert store.versions() == ["v001-set0", "v002-set1"]
    with pytest.raises(ValueError, match="leads outside"):
        store.path_of("v003-set2")
    assert store.current_version() == "v002-set1"
    assert "v003-set2 named in CURRENT leads outside" in store.problems()[0]
    # CURRENT itself a link to a file outside that holds a good version name
    (tmp_path / "name").write_text("v001-set0\n")
    (root / "CURRENT").unlink()
    (root / "CURRENT").symlink_to(tmp_path / "name")
    assert store.current_version() == "v002-set1"
    assert store.problems() == ["CURRENT does not name a model version; serving v002-set1 instead"]


def read_without_blocking(call: Callable[[], object], unblock: Path | None) -> object:
    """`call()` in a thread; fails when it is still running after 10 s (and then writes to the
    FIFO `unblock`, so that the stuck reader ends and the test process can exit)."""
    found: list[object] = []
    thread = threading.Thread(target=lambda: found.append(call()), daemon=True)
    thread.start()
    thread.join(timeout=10)
    if thread.is_alive():
        if unblock is not None:
            fd = os.open(unblock, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)  # the reader sees end of file
        thread.join(timeout=10)
        pytest.fail("reading the store blocked on a file that is not a regular file")
    return found[0]


@pytest.mark.parametrize("kind", ["fifo", "directory", "link-to-fifo"])
def test_a_current_that_is_not_a_regular_file_never_blocks_the_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    """Before: `open(CURRENT).read()` on a FIFO waited for a writer for good, holding the
    store's lock, so /health, /predict and every job of the project hung behind it."""
    store, first = two_versions(tmp_path)
    store.path_of("v002-set1").unlink()
    current = tmp_path / "CURRENT"
    current.unlink()
    fifo: Path | None = None
    if kind == "fifo":
        os.mkfifo(current)
        fifo = current
    elif kind == "directory":
        current.mkdir()
    else:
        fifo = tmp_path / "versions" / "name"
        os.mkfifo(fifo)
        current.symlink_to(fifo)
    fresh = ModelStore(tmp_path, CPU)
    assert read_without_blocking(fresh.current_version, fifo) == "v001-set0"
    [problem] = fresh.problems()
    what = "a directory" if kind == "directory" else "a FIFO"
    assert problem == f"CURRENT is {what}, not a regular file; serving v001-set0 instead"
    assert read_without_blocking(store.current_version, fifo) == "v001-set0"
    np.testing.assert_allclose(predictions(store.load_current()), first, atol=1e-6)


def test_a_card_that_is_a_fifo_is_read_from_the_weights(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, CPU)
    store.publish(classifier("v001-set0", seed=1))
    card = store.card_path_of("v001-set0")
    card.unlink()
    os.mkfifo(card)
    found = read_without_blocking(lambda: store.card("v001-set0"), card)
    assert isinstance(found, ModelCard) and found.version == "v001-set0"


# --- damaged cards ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["{}", "not json {", "[1, 2]", '{"version": 3}', "\udcff"])
def test_a_damaged_card_is_read_from_the_weights(tmp_path: Path, text: str) -> None:
    store = ModelStore(tmp_path, CPU)
    store.publish(classifier("v001-set0", seed=1))
    expected = read_card(store.path_of("v001-set0"))
    store.card_path_of("v001-set0").write_bytes(text.encode(errors="surrogateescape"))
    assert store.card("v001-set0") == expected
    assert store.versions() == ["v001-set0"]
    assert store.current_card() == expected


def test_a_version_without_a_readable_card_is_reported_by_name(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, CPU)
    store.publish(classifier("v001-set0", seed=1))
    store.publish(classifier("v002-set1", seed=2))
    store.card_path_of("v001-set0").write_text("{}")
    store.path_of("v001-set0").write_bytes(b"damaged")
    with pytest.raises(ValueError) as raised:
        store.card("v001-set0")
    assert str(raised.value) == "model version v001-set0 is unreadable (damaged card and weights)"
    assert store.card("v002-set1").version == "v002-set1"  # the others still list
    with pytest.raises(ValueError, match="model version v009-x does not exist"):
        store.card("v009-x")


# --- versions over time -------------------------------------------------------------------------


def test_versions_stay_loadable_and_predict_as_when_published(tmp_path: Path) -> None:
    store = ModelStore.for_project(tmp_path, 4, CPU)
    published = {}
    for number, seed in enumerate((5, 1, 3), start=1):
        version = store.next_version(f"set{number - 1}")
        model = classifier(version, seed=seed)
        store.publish(model)
        published[version] = predictions(model)
    assert list(published) == ["v001-set0", "v002-set1", "v003-set2"]
    # the seeds give visibly different models, so loading the wrong file would show
    values = list(published.values())
    assert not np.allclose(values[0], values[1], atol=1e-3)
    assert not np.allclose(values[1], values[2], atol=1e-3)
    reopened = ModelStore.for_project(tmp_path, 4, CPU)
    assert reopened.versions() == list(published)
    np.testing.assert_allclose(predictions(reopened.load_current()), values[2], atol=1e-6)
    for version, expected in published.items():
        old = load_version(reopened.path_of(version), CPU)
        assert old.card.version == version == reopened.card(version).version
        np.testing.assert_allclose(predictions(old), expected, atol=1e-6)


def test_versions_keep_their_order_when_file_times_change(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, CPU)
    for version in ("v001-set0", "v002-set1", "v010-set9"):
        store.publish(classifier(version))
    os.utime(store.path_of("v001-set0"))  # e.g. copied without keeping times
    assert store.versions() == ["v001-set0", "v002-set1", "v010-set9"]
    store.path_of("v002-set1").unlink()  # a deleted version never leads to a clash
    assert store.next_version("set10") == "v011-set10"


# --- a publishing process killed -----------------------------------------------------------------

CHILD = """
import sys, time
from pathlib import Path
import backend.classifier as classifier_module
import backend.model_store as store_module
from tests.test_model_store import classifier

root, point, ready = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])

def stop() -> None:
    ready.touch()  # tell the test where it is, then wait for SIGKILL
    time.sleep(600)

if point == "weights":  # half the checkpoint written, then killed
    real_save = classifier_module.torch.save
    def half_save(obj, handle):
        real_save(obj, handle)
        handle.flush()
        handle.truncate(handle.tell() // 2)
        handle.flush()
        stop()
    classifier_module.torch.save = half_save
else:  # the new version stored, CURRENT being replaced
    real_write = store_module.atomic_write_text
    def write(path, text):
        if path.name == "CURRENT":
            with open(path.with_name(".CURRENT.partial"), "w") as handle:
                handle.write(text[:2])
            stop()
        real_write(path, text)
    store_module.atomic_write_text = write
store_module.ModelStore(root, classifier_module.torch.device("cpu")).publish(
    classifier("v002-set1", seed=2)
)
"""


@pytest.mark.parametrize("point", ["weights", "current"])
def test_a_process_killed_while_publishing_leaves_the_served_version(
    tmp_path: Path, point: str
) -> None:
    root = tmp_path / "models"
    store = ModelStore(root, CPU)
    store.publish(classifier("v001-set0", seed=1))
    before = predictions(store.load_current())
    ready = tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), point, str(ready)], cwd=REPO)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert child.poll() is None, f"the publishing process ended early ({child.returncode})"
            assert time.monotonic() < deadline, "the publishing process never got there"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        assert child.wait(timeout=60) == -signal.SIGKILL
    reader = ModelStore(root, CPU)
    assert reader.current_version() == "v001-set0" and reader.problems() == []
    assert (root / "CURRENT").read_text() == "v001-set0\n"
    np.testing.assert_allclose(predictions(reader.load_current()), before, atol=1e-6)
    np.testing.assert_allclose(predictions(load_version(reader.path_of("v001-set0"), CPU)), before)
    leftovers = [p.name for p in root.rglob(".*")]
    assert leftovers, "the kill left no partial file behind: it did not happen mid-write"
    if point == "weights":
        assert reader.versions() == ["v001-set0"]
    else:  # complete but never served; the next retraining takes the next number
        assert reader.versions() == ["v001-set0", "v002-set1"]
        assert json.loads(reader.card_path_of("v002-set1").read_text())["version"] == "v002-set1"
    assert reader.next_version("set2") == f"v00{len(reader.versions()) + 1}-set2"
    reader.publish(classifier(reader.next_version("set2"), seed=4))
    assert reader.current_version() == reader.versions()[-1]
