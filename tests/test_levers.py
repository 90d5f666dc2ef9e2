"""The lever study (`python -m backend.study.levers`) on a small synthetic pack: packed codes
round-trip, a pretrained lever and a self-training lever run and report, a rerun skips them."""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import numpy as np
import pytest

from backend.label_config import LabelConfig
from backend.sources.arrays import save_npz
from backend.study.levers import HELD_OUT, SET_1, TRAIN, main, pack_codes, unpack_codes
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
