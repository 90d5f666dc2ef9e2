"""Decode-time bombs and the decode budget (issue 15, rows 2 and 3).

Row 2: a picture whose decoding costs far more than its pixels (a progressive JPEG with its last
scan repeated, structure that Pillow walks in Python one step at a time) is refused from its
structure BEFORE a decoder runs. Row 3: the pixels a request hands to a general decoder are
summed against WAFER_REQUEST_MAX_PIXELS; past it, the remaining tasks get an error of their own
and the rest of the request goes on.

Every bomb here is built in the test and must be refused before decoding: the tests watch
Pillow's decoder (`ImageFile.load`) instead of timing anything (seconds are in the benchmark
notes of the change, not in tests).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from backend.classifier import WaferClassifier, build_network
from backend.encoding import PALETTE, render_picture, resize_nearest
from backend.images import (
    ImageError,
    ImageRules,
    data_url,
    model_input,
    picture_codes,
    picture_reader,
    png_bytes,
    read_picture,
)
from backend.label_config import LabelConfig
from backend.model_card import ModelCard
from backend.picture_structure import STRUCTURE_LIMITS, picture_structure
from backend.predictions import ERROR_ROUTE, WaferPrediction, predict_tasks, read_pictures
from backend.routing import STUDY_RULES
from backend.settings import Settings
from backend.uncertainty import Measure

SIZE = 16
BLUE = tuple(int(c) for c in PALETTE[1])


def die_map(seed: int = 0, h: int = 25, w: int = 27) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3, size=(h, w)).astype(np.uint8)


def saved(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def progressive_jpeg(side: int, extra_scans: int) -> bytes:
    """A one-colour progressive JPEG whose last scan is repeated ``extra_scans`` times before
    EOI (the table's row 2: each repeat is another pass over every pixel, ~14 bytes each)."""
    data = saved(Image.new("RGB", (side, side), BLUE), "JPEG", progressive=True, quality=80)
    assert data.endswith(b"\xff\xd9")
    last = data.rfind(b"\xff\xda")
    return data[:-2] + data[last:-2] * extra_scans + b"\xff\xd9"


def lossless_webp(side: int) -> bytes:
    """A one-colour lossless WebP: ~200 bytes however large (the table's row 3)."""
    return saved(Image.new("RGB", (side, side), BLUE), "WEBP", lossless=True)


def gif_with_comment_blocks(blocks: int) -> bytes:
    """A small GIF with a comment extension of ``blocks`` one-byte sub-blocks before its image:
    Pillow reads each sub-block in Python while opening it."""
    data = saved(Image.new("P", (64, 64)), "GIF")
    flags = data[10]
    start = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    return data[:start] + b"\x21\xfe" + b"\x01x" * blocks + b"\x00" + data[start:]


def png_with_chunks(chunks: int) -> bytes:
    """A small RGB PNG with ``chunks`` empty ancillary chunks before its pixels."""
    data = saved(Image.new("RGB", (64, 64), BLUE), "PNG")
    empty = struct.pack(">I", 0) + b"abCd" + struct.pack(">I", zlib.crc32(b"abCd"))
    return data[:33] + empty * chunks + data[33:]


def jpeg_with(prefix: bytes) -> bytes:
    """A small baseline JPEG with ``prefix`` right after its SOI marker."""
    data = saved(Image.new("RGB", (64, 64), BLUE), "JPEG")
    return data[:2] + prefix + data[2:]


def rle8_bmp(width: int = 8, height: int = 4) -> bytes:
    """A run-length-encoded 8-bit BMP (Pillow decodes RLE in Python, one step per run)."""
    rows = b"".join(bytes([width, 1, 0, 0]) for _ in range(height)) + b"\x00\x01"
    palette = b"".join(bytes([b, g, r, 0]) for r, g, b in PALETTE.tolist()) + bytes(4 * 253)
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(rows), 0, 0, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset) + info + palette + rows


def animated(fmt: str, frames: int = 3) -> bytes:
    images = [Image.new("RGB", (32, 32), (i * 60, 105, 170)) for i in range(frames)]
    options: dict[str, Any] = {"save_all": True, "append_images": images[1:], "duration": 100}
    if fmt == "WEBP":
        options["lossless"] = True
    return saved(images[0], fmt, **options)


@pytest.fixture
def decoder_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every call of Pillow's decoder; a call fails the picture with MemoryError, so a test sees
    both whether a decoder ran and that a refusal came before it."""
    calls: list[str] = []

    def watched(self: ImageFile.ImageFile, *args: Any, **kwargs: Any) -> Any:
        calls.append(str(self.format))
        raise MemoryError

    monkeypatch.setattr(ImageFile.ImageFile, "load", watched)
    yield calls


# ---- row 2: the cost of one picture, read from its structure ----------------------------------


def test_a_progressive_jpeg_with_repeated_scans_is_refused_before_decoding(
    decoder_calls: list[str],
) -> None:
    """The table's row 2 (measured before: 2000 x 2000, +1,000 scans 3.1 s, +5,000 15.6 s;
    one 395 kB task held /predict 52.7 s). Refused by its scan count, no decoder run."""
    bomb = progressive_jpeg(1024, 20_000)
    assert len(bomb) < 400_000
    for read in (read_picture, lambda data: picture_codes(data, SIZE)):
        with pytest.raises(ImageError, match=r"JPEG picture has \d[\d,]* scans.*refused before"):
            read(bomb)
    with pytest.raises(ImageError, match="scans"):
        model_input(data_url(bomb), httpx.Client(), label_studio_url=None, api_key=None, size=16)
    assert decoder_calls == []


def test_an_ordinary_progressive_jpeg_is_still_read() -> None:
    """libjpeg writes 10 scans for colour (6 for grey): well within the scan limit."""
    plain = progressive_jpeg(384, 0)
    assert plain.count(b"\xff\xda") == 10
    codes = picture_codes(plain, SIZE)
    assert codes.shape == (SIZE, SIZE) and set(np.unique(codes)) == {1}
    grey = saved(Image.new("L", (64, 64), 100), "JPEG", progressive=True)
    assert read_picture(grey).shape == (64, 64, 3)


@pytest.mark.parametrize(
    ("name", "bomb", "reason"),
    [
        ("JPEG fill bytes", jpeg_with(b"\xff" * 100_000), "JPEG picture.*segments"),
        ("JPEG comments", jpeg_with(b"\xff\xfe\x00\x02" * 10_000), "JPEG picture.*segments"),
        ("JPEG junk", jpeg_with(b"\xff\xfe\x00\x02" + b"\x00" * 10_000), "JPEG picture.*segments"),
        ("PNG chunks", png_with_chunks(10_000), "PNG picture.*chunks"),
        ("GIF blocks", gif_with_comment_blocks(10_000), "GIF picture.*blocks"),
        ("BMP run lengths", rle8_bmp(), "run-length"),
    ],
)
def test_structure_that_pillow_walks_in_python_is_bounded(
    name: str, bomb: bytes, reason: str, decoder_calls: list[str]
) -> None:
    """Pillow opens a JPEG, PNG or GIF with a Python loop over its segments, chunks or blocks
    (and decodes run-length BMPs in Python): within the 16 MiB download limit these cost 3-9 s
    a picture (measured before: 15 MiB of JPEG fill bytes 9.4 s, 4 M comment segments 5.2 s,
    1.3 M PNG chunks 5.3 s, 7 M GIF sub-blocks 3.3 s). Refused from the structure first."""
    with pytest.raises(ImageError, match=reason + r".*refused before decoding"):
        read_picture(bomb)
    with pytest.raises(ImageError, match=reason):
        picture_codes(bomb, SIZE)
    assert decoder_calls == [], name


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animations_are_refused(fmt: str, decoder_calls: list[str]) -> None:
    """A wafer picture is one frame; an animation is not one (and a future decoder that
    composites frames would pay for all of them)."""
    with pytest.raises(ImageError, match=rf"{fmt} picture has 3 frames.*one frame"):
        read_picture(animated(fmt))
    assert decoder_calls == []


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_one_frame_pictures_of_animation_formats_are_read(fmt: str) -> None:
    rgb = read_picture(animated(fmt, frames=1))
    assert rgb.shape == (32, 32, 3)


# ---- row 3: pixels per picture and per request ------------------------------------------------


def largest_picture() -> int:
    """Pixels of the largest picture `render_picture` draws for a WM-811K die map (height 6-300,
    width 3-205): a die map at most 384 dies on its longer side is drawn k x k pixels a die,
    k = 384 // that side, so the picture is at most 384 x 384."""
    biggest = 0
    for h in range(1, 301):
        for w in range(1, min(h, 205) + 1):
            k = max(1, 384 // max(h, w))
            biggest = max(biggest, h * w * k * k)
    assert biggest == render_picture(np.ones((48, 48), np.uint8)).size == 384 * 384
    return biggest


def test_the_default_limits_fit_the_real_pictures_with_a_wide_margin() -> None:
    settings = Settings.from_env({})
    largest = largest_picture()
    assert settings.image_max_pixels == 1024 * 1024
    assert settings.image_max_pixels >= 7 * largest
    assert settings.request_max_pixels >= 600 * largest
    rules = ImageRules.from_settings(settings)
    assert (rules.max_pixels, rules.request_max_pixels) == (
        settings.image_max_pixels,
        settings.request_max_pixels,
    )
    custom = Settings.from_env({"WAFER_REQUEST_MAX_PIXELS": "5000000"})
    assert custom.request_max_pixels == 5_000_000
    with pytest.raises(ValueError, match="WAFER_REQUEST_MAX_PIXELS"):
        Settings.from_env({"WAFER_REQUEST_MAX_PIXELS": "0"})


def test_a_tiny_four_megapixel_webp_is_refused_before_decoding(decoder_calls: list[str]) -> None:
    """The table's row 3: a 2000 x 2000 lossless WebP of ~200 bytes decoded in 29-62 ms; 20,000
    in one request took ~10 min. Over the default per-picture limit now."""
    bomb = lossless_webp(2000)
    assert len(bomb) < 300
    with pytest.raises(ImageError, match=r"more than 1,048,576 pixels.*refused before decoding"):
        model_input(data_url(bomb), httpx.Client(), label_studio_url=None, api_key=None, size=16)
    assert decoder_calls == []


SIZE_KINDS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "PNG": ("PNG", "RGB", {}),
    "JPEG": ("JPEG", "RGB", {}),
    "JPEG-progressive": ("JPEG", "L", {"progressive": True}),
    "GIF": ("GIF", "P", {}),
    "WEBP-lossy (VP8)": ("WEBP", "RGB", {"quality": 50}),
    "WEBP-lossless (VP8L)": ("WEBP", "RGB", {"lossless": True}),
    "WEBP-alpha (VP8X)": ("WEBP", "RGBA", {"quality": 50}),
    "BMP": ("BMP", "RGB", {}),
}


@pytest.mark.parametrize("kind", list(SIZE_KINDS))
def test_the_size_is_read_before_a_decoder_opens_the_picture(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening is not free (Pillow's WebP reader sets up the whole canvas: 4.7 ms for the
    212-byte 2000 x 2000 WebP, 47 s for 20,000 refused ones in one request): a picture over the
    limit is refused from its header without Image.open, in every format, and the size read
    there is the one Pillow reads."""
    fmt, mode, options = SIZE_KINDS[kind]
    small = saved(Image.new(mode, (301, 203)), fmt, **options)
    with Image.open(io.BytesIO(small)) as image:
        assert image.size == (301, 203)
    structure = picture_structure(small, STRUCTURE_LIMITS)
    assert structure is not None and (structure.width, structure.height) == (301, 203)
    large = saved(Image.new(mode, (1100, 1000)), fmt, **options)

    def no_open(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("opened")

    monkeypatch.setattr(Image, "open", no_open)
    with pytest.raises(ImageError, match=r"more than 1,048,576 pixels.*refused before decoding"):
        picture_codes(large, SIZE)
    with pytest.raises(ImageError, match=r"more than 60,000 pixels.*refused before decoding"):
        read_picture(small, max_pixels=60_000)  # 301 x 203 = 61,103


@pytest.fixture(scope="module")
def classifier(label_config: LabelConfig) -> WaferClassifier:
    k = len(label_config.failure_types)
    card = ModelCard("v-test", label_config.failure_types, SIZE, "resnet18", (0.0,) * k)
    network = build_network("resnet18", k, seed=0)
    return WaferClassifier(network=network, card=card, device=torch.device("cpu"))


def tasks_of(values: list[str], label_config: LabelConfig) -> list[dict[str, Any]]:
    return [{"id": i, "data": {label_config.image_value: v}} for i, v in enumerate(values)]


def test_a_request_past_its_pixel_budget_gets_errors_for_the_remaining_tasks(
    classifier: WaferClassifier, label_config: LabelConfig
) -> None:
    """Through the service's own reader: pictures that need a general decoder are summed; the
    one that would pass the budget and every task after it get an error naming
    WAFER_REQUEST_MAX_PIXELS, the others their predictions."""
    ours = data_url(png_bytes(render_picture(die_map(1))))
    webp = data_url(lossless_webp(1024))  # 1,048,576 pixels each
    settings = Settings(request_max_pixels=2 * 1024 * 1024 + 10)
    fetch = picture_reader(settings, SIZE, httpx.Client())
    tasks = tasks_of([ours, webp, ours, webp, webp, ours, webp], label_config)
    out = predict_tasks(tasks, classifier, label_config, STUDY_RULES[Measure.MARGIN], fetch)
    assert [p.route == ERROR_ROUTE for p in out] == [False] * 4 + [True] * 3
    for p in out[4:]:
        assert "WAFER_REQUEST_MAX_PIXELS" in (p.error or "")
        assert "2,097,162-pixel" in (p.error or "") and "smaller request" in (p.error or "")
    # Our own palette pictures are read without a decoder: they are not counted.
    many_ours = tasks_of([ours] * 40, label_config)
    tiny = picture_reader(Settings(request_max_pixels=1), SIZE, httpx.Client())
    assert all(
        p.ok
        for p in predict_tasks(
            many_ours, classifier, label_config, STUDY_RULES[Measure.MARGIN], tiny
        )
    )
    # Each request starts with the whole budget again.
    again = predict_tasks(tasks[:4], classifier, label_config, STUDY_RULES[Measure.MARGIN], fetch)
    assert all(p.ok for p in again)


def test_a_request_of_tiny_webps_stops_decoding_at_the_budget(
    classifier: WaferClassifier, label_config: LabelConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The table's reproduction (100 tasks of a tiny big WebP: 2.9 s of decoding) with the
    default settings: the general decoder runs for at most budget / picture pixels tasks."""
    decoded: dict[int, ImageFile.ImageFile] = {}  # the pictures a decoder ran on
    load = ImageFile.ImageFile.load

    def counted(self: ImageFile.ImageFile) -> Any:
        decoded[id(self)] = self
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counted)
    settings = Settings(request_max_pixels=20 * 1024 * 1024)
    webp = data_url(lossless_webp(1024))
    fetch = picture_reader(settings, SIZE, httpx.Client())
    tasks = tasks_of([webp] * 100, label_config)
    out = predict_tasks(tasks, classifier, label_config, STUDY_RULES[Measure.MARGIN], fetch)
    assert sum(p.ok for p in out) == 20
    assert sum(i.size[0] * i.size[1] for i in decoded.values()) == 20 * 1024 * 1024
    assert all("WAFER_REQUEST_MAX_PIXELS" in (p.error or "") for p in out[20:])


def test_outside_a_request_no_budget_applies(
    classifier: WaferClassifier, label_config: LabelConfig
) -> None:
    """The worker reads a set's pictures with `read_pictures` directly: a task it cannot read is
    marked unreadable for good, so a request's budget is no reason to fail one there."""
    webp = data_url(lossless_webp(1024))
    fetch = picture_reader(Settings(request_max_pixels=1), SIZE, httpx.Client())
    read = read_pictures(tasks_of([webp] * 3, label_config), classifier, label_config, fetch)
    assert not any(isinstance(r, WaferPrediction) for r in read)


def test_a_good_picture_after_a_bomb_is_still_read(
    classifier: WaferClassifier, label_config: LabelConfig
) -> None:
    """Bad input gets a clear error for that task and loses nothing else."""
    maps = [die_map(3, 30, 28), die_map(4, 20, 24)]
    values = [
        data_url(png_bytes(render_picture(maps[0]))),
        data_url(progressive_jpeg(1024, 5_000)),
        data_url(lossless_webp(2000)),
        data_url(png_bytes(render_picture(maps[1]))),
    ]
    fetch = picture_reader(Settings(), SIZE, httpx.Client())
    out = predict_tasks(
        tasks_of(values, label_config), classifier, label_config, STUDY_RULES[Measure.MARGIN], fetch
    )
    assert [p.ok for p in out] == [True, False, False, True]
    assert "scans" in (out[1].error or "") and "pixels" in (out[2].error or "")
    direct = classifier.predict_proba(np.stack([resize_nearest(m, SIZE) for m in maps]))
    for p, row in zip([out[0], out[3]], direct, strict=True):
        np.testing.assert_allclose(list(p.probabilities.values()), row, atol=1e-6)
