"""`python -m backend bench` at a tiny size: every figure there, positive, and every ratio the
quotient of the figures it is built from. No speed is asserted."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backend.cli import main
from backend.harness.bench import BenchPlan, bench_data, report_lines, run_bench, write_json
from backend.label_config import LabelConfig
from backend.settings import Settings
from backend.sources import load_wafers
from backend.sources.arrays import save_npz
from backend.wafers import WaferMaps

TINY = BenchPlan(
    backbones=("resnet18",),
    batch_sizes=(4, 8),
    image_size=16,
    study_image_size=32,
    study_wafers=2,
    predict_wafers=8,
    train_backbones=("resnet18",),
    train_batch_size=4,
    train_samples=16,
    train_epochs=2,
    repeats=1,
    train_repeats=1,
)


def round_wafer(rng: np.random.Generator, dies: int) -> np.ndarray:
    y, x = np.mgrid[:dies, :dies]
    on_wafer = (y - (dies - 1) / 2) ** 2 + (x - (dies - 1) / 2) ** 2 <= (dies / 2) ** 2
    die_map = np.where(on_wafer, 1, 0).astype(np.uint8)
    die_map[on_wafer & (rng.random((dies, dies)) < 0.2)] = 2
    return die_map


@pytest.fixture
def cached_settings(tmp_path: Path, label_config: LabelConfig) -> Settings:
    """A small wafer file of our own, converted once into a cache, as WM-811K would be."""
    rng = np.random.default_rng(0)
    classes = label_config.failure_types
    maps = [round_wafer(rng, int(rng.integers(12, 30))) for _ in range(24)]
    wafers = WaferMaps.from_maps(maps, [classes[i % len(classes)] for i in range(24)], classes)
    data = tmp_path / "fab.npz"
    save_npz(wafers, data)
    load_wafers(data, classes, tmp_path / "cache", progress=False)
    return dataclasses.replace(
        Settings(), data_path=data, cache_dir=tmp_path / "cache", device="cpu"
    )


def positive_numbers(value: Any, where: str = "") -> list[str]:
    """Paths of the numbers in `value` that are not positive and finite."""
    bad = []
    if isinstance(value, dict):
        for key, item in value.items():
            bad += positive_numbers(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            bad += positive_numbers(item, f"{where}[{i}]")
    elif (
        isinstance(value, float | int)
        and not isinstance(value, bool)
        and not (math.isfinite(value) and value > 0)
    ):
        bad.append(where)
    return bad


@pytest.mark.slow
def test_bench_writes_every_figure_and_ratio(
    cached_settings: Settings, label_config: LabelConfig, tmp_path: Path
) -> None:
    result = run_bench(TINY, cached_settings, label_config)
    out = tmp_path / "bench.json"
    write_json(result, out)
    saved = json.loads(out.read_text())

    for key in ("date", "torch", "device", "machine", "figures", "ratios", "targets", "data"):
        assert key in saved, key
    for key in ("cpu_model", "cpu_count", "cpus_usable", "load_average_start"):
        assert key in saved["machine"], key
    assert saved["device"] == "cpu"
    assert saved["data"]["real"] is True
    figures = saved["figures"]
    assert positive_numbers(figures) == []
    assert figures["cache"]["wafers"] == 24
    assert figures["cache"]["peak_rss_mib"] >= figures["cache"]["rss_before_load_mib"]
    assert figures["study_way"]["backbone"] == "resnet50"
    assert figures["study_way"]["batch"] == 1
    assert figures["study_way"]["input"] == 32
    assert figures["study_way"]["precision"] == "fp32"
    configs = {(f["backbone"], f["batch"]) for f in figures["raw_forward"]}
    assert configs == {("resnet18", 4), ("resnet18", 8)}
    for name in ("engine_predict", "predict_http"):
        assert {(f["backbone"], f["batch"]) for f in figures[name]} == configs
        assert all(f["wafers"] == 8 for f in figures[name])
    plain, engine = figures["train_plain"][0], figures["train_engine"][0]
    assert plain["samples"] == engine["samples"] == 16
    assert plain["precision"] == engine["precision"]

    ratios = saved["ratios"]
    raw = {(f["backbone"], f["batch"]): f["wafers_per_s"] for f in figures["raw_forward"]}
    http = {
        f"predict_http_vs_raw:{f['backbone']}:b{f['batch']}": f["wafers_per_s"]
        / raw[(f["backbone"], f["batch"])]
        for f in figures["predict_http"]
    }
    for key, value in http.items():
        assert ratios[key] == pytest.approx(value, rel=1e-12)
    assert ratios["predict_http_vs_raw"] == pytest.approx(min(http.values()), rel=1e-12)
    for f in figures["engine_predict"]:
        assert ratios[f"engine_vs_raw:resnet18:b{f['batch']}"] == pytest.approx(
            f["wafers_per_s"] / raw[("resnet18", f["batch"])], rel=1e-12
        )
    assert ratios["train_engine_vs_plain"] == pytest.approx(
        engine["samples_per_s"] / plain["samples_per_s"], rel=1e-12
    )
    largest = max(figures["engine_predict"], key=lambda f: f["batch"])
    assert ratios["engine_vs_study_way"] == pytest.approx(
        largest["wafers_per_s"] / figures["study_way"]["wafers_per_s"], rel=1e-12
    )
    pictures = figures["pictures"]
    assert pictures["wafers"] == 8 and pictures["input"] == 16
    for step in ("encode", "decode"):
        for kind in ("rgb", "palette"):
            assert pictures[f"{step}_{kind}_wafers_per_s"] == pytest.approx(
                8 / pictures[f"{step}_{kind}_s"], rel=1e-12
            )
        assert ratios[f"picture_{step}_palette_vs_rgb"] == pytest.approx(
            pictures[f"{step}_palette_wafers_per_s"] / pictures[f"{step}_rgb_wafers_per_s"],
            rel=1e-12,
        )
    # The palette PNGs are the smaller data URLs (not a speed: their size).
    assert pictures["data_url_chars_palette"] < pictures["data_url_chars_rgb"]
    assert positive_numbers(ratios) == []
    assert saved["targets"] == {"predict_http_vs_raw": 0.80, "train_engine_vs_plain": 0.85}

    text = "\n".join(report_lines(saved))
    for name in (
        "predict_http_vs_raw",
        "train_engine_vs_plain",
        "engine_vs_study_way",
        "picture_encode_palette_vs_rgb",
        "picture_decode_palette_vs_rgb",
    ):
        assert f"| {name} | {ratios[name]:.3f} |" in text
    assert ">= 0.80" in text and ">= 0.85" in text
    assert "Flask test client" in text


def test_without_a_cache_synthetic_wafers_are_used_and_said(
    tmp_path: Path, label_config: LabelConfig
) -> None:
    settings = dataclasses.replace(
        Settings(), data_path=tmp_path / "missing.zip", cache_dir=tmp_path / "cache"
    )
    data = bench_data(settings, label_config, 10, seed=0)
    assert not data.real
    assert len(data.wafers) == 10
    assert "synthetic" in data.note and "no wafer cache" in data.note


def test_plan_refuses_what_cannot_be_measured() -> None:
    with pytest.raises(ValueError, match="batch"):
        BenchPlan(batch_sizes=(0,))
    with pytest.raises(ValueError, match="one batch per epoch"):
        BenchPlan(train_samples=10, train_batch_size=64)
    assert BenchPlan.quick("cuda").device == "cuda"


def test_cli_offers_bench(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--quick", "--json", "--device"):
        assert flag in help_text
