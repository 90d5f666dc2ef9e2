"""The lever study (`python -m backend.study.levers`) on a small synthetic pack: packed codes
round-trip, a pretrained lever and a self-training lever run and report, a rerun skips them; a
committee keeps its members' probabilities and is scored by views and by disagreement."""

from __future__ import annotations

import json
import lzma
import warnings
from pathlib import Path

import numpy as np
import pytest

from backend.label_config import LabelConfig
from backend.sources.arrays import save_npz
from backend.study.levers import (
    HELD_OUT,
    SET_1,
    TRAIN,
    committee_scores,
    main,
    pack_codes,
    unpack_codes,
)
from backend.wafers import WaferMaps
from tests.test_pretraining import round_wafers


def test_packed_codes_round_trip() -> None:
    codes = np.random.default_rng(0).integers(0, 3, (5, 8, 8), dtype=np.uint8)
    packed = pack_codes(codes)
    assert packed.shape == (5, 8, 2) and packed.dtype == np.uint8
    assert np.array_equal(unpack_codes(packed), codes)


@pytest.fixture
def pack(tmp_path: Path, label_config: LabelConfig) -> Path:
    """60 labelled wafers (two failure types told apart by a centre blob) and 64 unlabelled."""
    codes = round_wafers(60, 20, seed=1)
    labels = np.arange(60) % 2
    codes[labels == 0, 8:12, 8:12] = 2
    classes = label_config.failure_types
    wafers = WaferMaps.from_maps(list(codes), [classes[0] if y == 0 else "none" for y in labels],
                                 classes)  # fmt: skip
    save_npz(wafers, tmp_path / "labelled.npz")
    parts = np.repeat([TRAIN, HELD_OUT, SET_1], [30, 10, 20]).astype(np.int8)
    np.save(tmp_path / "parts.npy", parts)
    with lzma.open(tmp_path / "unlabelled48.xz", "wb") as f:
        f.write(pack_codes(round_wafers(64, 48, seed=2)).tobytes())
    return tmp_path


def test_levers_run_report_and_resume(pack: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = pack / "levers.json"
    args = ["run", "--pack", str(pack), "--out", str(out), "--unlabelled",
            str(pack / "unlabelled48.xz"), "--pretrain-epochs", "1", "--pretrain-batch", "16",
            "--only", "cnn48-e20-pre", "cnn48-self-p95"]  # fmt: skip
    assert main(args) == 0
    results = json.loads(out.read_text())
    assert results["_pretraining"]["wafers"] == 64
    assert (pack / "pretrained-wafercnn48.pt").is_file()
    for name in ("cnn48-e20-pre", "cnn48-self-p95"):
        r = results[name]
        assert r["train_wafers"] == 30 and r["set1_wafers"] == 20
        assert 0 <= r["set1_accuracy"] <= 1 and 0 <= r["set1_engineer_share"] <= 1
    assert 0 <= results["cnn48-self-p95"]["pseudo_labelled"] <= 64
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count("(from --out)") == 2


def _sure(label: int, n_classes: int = 3, p: float = 0.9) -> list[float]:
    row = [(1 - p) / (n_classes - 1)] * n_classes
    row[label] = p
    return row


def test_committee_scores_by_views_and_by_disagreement() -> None:
    """Ten wafers of class 0. Wafer 9: both members' first drawing is sure of 1, their other
    drawings of 0 (the 8 drawings put it right; in one drawing the members agree on the wrong
    answer). Wafer 1: member A says 1 and member B says 0 in every drawing, both unsure (the
    members disagree). The others: every drawing sure of 0."""
    n, views = 10, 8
    members = np.tile(np.array(_sure(0)), (2, views, n, 1))
    members[:, 0, 9] = _sure(1)
    members[0, :, 1] = _sure(1, p=0.6)
    members[1, :, 1] = _sure(0, p=0.55)
    members[:, :, 2] = [0.9, 0.1, 0]  # a probability of exactly 0 (float16 rounds small ones so)
    true = np.zeros(n, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no log(0) on the way
        scores = committee_scores(members.astype(np.float16), true, 3)
    assert scores["set1_accuracy"] == pytest.approx(0.8)  # wafers 1 and 9 wrong in drawing 0
    assert scores["set1_views8_accuracy"] == pytest.approx(0.9)  # wafer 9 put right
    assert [m["accuracy"] for m in scores["set1_members"]] == pytest.approx([0.8, 0.9])
    # by the consensus margin, sure-wrong wafer 9 comes last: every wafer goes to engineers
    assert scores["set1_engineer_share"] == pytest.approx(1.0)
    # query by committee sends wafer 1 first, but it cannot see wafer 9, which the members
    # agree on: wafer 9 is reached only after the whole tie of agreed wafers
    assert scores["set1_disagreement_engineer_share"] == pytest.approx(1.0)
    # over all drawings only wafer 1 is wrong, and the eight-views measure sends it first
    assert scores["set1_views8_engineer_share"] == pytest.approx(0.1)
    assert scores["set1_views8_engineer_share_agreement"] == pytest.approx(0.1)


def test_one_member_has_no_committee_figures() -> None:
    members = np.tile(np.array(_sure(0)), (1, 8, 4, 1))
    scores = committee_scores(members, np.zeros(4, dtype=np.int64), 3)
    assert scores["set1_accuracy"] == 1.0 and scores["set1_engineer_share"] == 0.0
    assert "set1_members" not in scores and "set1_disagreement_engineer_share" not in scores


def test_a_committee_lever_keeps_each_members_probabilities(
    pack: Path, label_config: LabelConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    out = pack / "committee.json"
    args = ["run", "--pack", str(pack), "--out", str(out), "--only", "cnn48-e20-x3"]
    assert main(args) == 0
    r = json.loads(out.read_text())["cnn48-e20-x3"]
    assert len(r["set1_members"]) == 3
    stored = [np.load(pack / "committee-probs" / f"cnn48-e20-x3-seed{s}.npy") for s in (0, 1, 2)]
    for probs in stored:
        assert probs.shape == (8, 20, 9) and probs.dtype == np.float16
        assert np.allclose(probs.astype(np.float64).sum(-1), 1, atol=1e-2)
    # the stored members give back the reported figures
    none = label_config.failure_types.index("none")
    true = np.where(np.arange(40, 60) % 2 == 0, 0, none)  # set 1: wafers 40..59
    assert committee_scores(np.stack(stored), true, 9)["set1_accuracy"] == r["set1_accuracy"]
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("cnn48-e20-x3") and line.count("%") == 6
    # any mix of kept members is scored as a committee without training
    capsys.readouterr()
    pick = ["committee", "--pack", str(pack), "--out", str(out), "--name", "two-of-three",
            "cnn48-e20-x3-seed0", "cnn48-e20-x3-seed2"]  # fmt: skip
    assert main(pick) == 0
    both = json.loads(out.read_text())
    two = both["two-of-three"]
    assert len(two["set1_members"]) == 2 and two["set1_members"][1] == r["set1_members"][2]
    assert two["train_seconds"] == pytest.approx(r["train_seconds"] * 2 / 3)
    assert "cnn48-e20-x3" in both  # the committee's own row is kept
    assert capsys.readouterr().out.splitlines()[-1].startswith("two-of-three")
    with pytest.raises(SystemExit) as exits:
        main([*pick[:-1], "cnn48-e20-x3-seed7"])
    assert exits.value.code == 2
    assert "cnn48-e20-x3-seed7" in capsys.readouterr().err
    del both["cnn48-e20-x3"]  # its members kept, its run not finished (stopped mid-committee)
    out.write_text(json.dumps(both))
    with pytest.raises(SystemExit):
        main(pick)
    assert "cnn48-e20-x3 has not finished" in capsys.readouterr().err
