"""Image fuzz: mutated pictures of every format Pillow writes here give a picture or an
`ImageError`, never another exception (which would fail a whole /predict batch).

Seeded (numpy Generator), so a failure reproduces: the message names the seed format, the
mutation and the input index. The counts are printed (run with -s to see them).
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections import Counter
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from PIL import Image

from backend.encoding import (
    PALETTE,
    codes_from_picture,
    palette_png_codes,
    picture_colours,
    render_picture,
    sample_positions,
)
from backend.images import ImageError, data_url, model_input, png_bytes, read_picture

SEED = 20261201
PER_FORMAT = 200
SIZE = 16

Mutation = Callable[[bytes, np.random.Generator], bytes]


def wafer_picture() -> np.ndarray:
    """A wafer's palette picture (die codes as palette indices)."""
    die_map = np.random.default_rng(0).integers(0, 3, size=(22, 26)).astype(np.uint8)
    return render_picture(die_map, pixels=104)


def seeds() -> dict[str, bytes]:
    """One valid picture per (format, mode) Pillow can write here, our palette PNG as the
    backend writes it and as Pillow re-saves it (8 bits, filtered rows, the die palette), and
    animations (GIF, WebP, APNG), which the structure check walks frame by frame."""
    picture = wafer_picture()
    rgb = Image.fromarray(picture_colours(picture))
    resaved = Image.frombytes("P", picture.shape[::-1], picture.tobytes())
    resaved.putpalette(PALETTE.tobytes() + bytes(3 * 253))
    buffer = io.BytesIO()
    resaved.save(buffer, format="PNG")
    out: dict[str, bytes] = {"PNG-ours": png_bytes(picture), "PNG-ours-resaved": buffer.getvalue()}
    options: dict[str, tuple[str, dict[str, object]]] = {
        "PNG-RGB": ("PNG", {}),
        "PNG-P": ("PNG", {}),
        "PNG-1": ("PNG", {}),
        "JPEG": ("JPEG", {"quality": 90}),
        "JPEG-progressive": ("JPEG", {"quality": 80, "progressive": True}),
        "GIF": ("GIF", {}),
        "TIFF": ("TIFF", {}),
        "TIFF-deflate": ("TIFF", {"compression": "tiff_deflate"}),
        "BMP": ("BMP", {}),
        "BMP-P": ("BMP", {}),
        "DDS": ("DDS", {}),
        "WEBP": ("WEBP", {"quality": 80}),
        "WEBP-lossless": ("WEBP", {"lossless": True}),
    }
    for name, (fmt, kwargs) in options.items():
        image = rgb
        if name.endswith("-P") or fmt == "GIF":
            image = rgb.quantize(colors=8)
        elif name.endswith("-1"):
            image = rgb.convert("1")
        buffer = io.BytesIO()
        try:
            image.save(buffer, format=fmt, **kwargs)
        except (KeyError, OSError, ValueError):  # a format this Pillow cannot write
            continue
        out[name] = buffer.getvalue()
    frames = [rgb.rotate(angle) for angle in (0, 90, 180)]
    for fmt, lossless in (("GIF", False), ("WEBP", True), ("PNG", False)):
        buffer = io.BytesIO()
        extra = {"lossless": True} if lossless else {}
        try:
            frames[0].save(
                buffer, format=fmt, save_all=True, append_images=frames[1:], duration=100, **extra
            )
        except (KeyError, OSError, ValueError):
            continue
        out[f"{fmt}-animated"] = buffer.getvalue()
    return out


def flip_bits(data: bytes, rng: np.random.Generator) -> bytes:
    buffer = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        position = int(rng.integers(0, len(buffer)))
        buffer[position] ^= 1 << int(rng.integers(0, 8))
    return bytes(buffer)


def truncate(data: bytes, rng: np.random.Generator) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def overwrite_header(data: bytes, rng: np.random.Generator) -> bytes:
    """Overwrite 1, 2 or 4 bytes within the first 140 (the size, depth, count fields)."""
    buffer = bytearray(data)
    width = int(rng.choice([1, 2, 4]))
    position = int(rng.integers(0, max(1, min(len(buffer), 140) - width)))
    value = rng.choice([0, 1, 0xFF, 0x7F, int(rng.integers(0, 256))], size=width).astype(np.uint8)
    buffer[position : position + width] = bytes(value)
    return bytes(buffer)


def splice(data: bytes, rng: np.random.Generator) -> bytes:
    """Cut a random span out, or repeat one (duplicated chunks, frames, strips)."""
    start = int(rng.integers(0, len(data)))
    end = min(len(data), start + int(rng.integers(1, 256)))
    if rng.random() < 0.5:
        return data[:start] + data[end:]
    return data[:end] + data[start:end] + data[end:]


def random_tail(data: bytes, rng: np.random.Generator) -> bytes:
    """The header kept, the rest random bytes."""
    keep = int(rng.integers(8, 200))
    return (
        data[:keep]
        + rng.integers(0, 256, size=int(rng.integers(0, 4096)), dtype=np.uint8).tobytes()
    )


def huge_dimensions(data: bytes, rng: np.random.Generator) -> bytes:
    """Width and height set to large or absurd values in the format's own header fields
    (PNG with a valid CRC, so the reader trusts it)."""
    width, height = (
        int(rng.choice([2001, 9459, 65535, 100_000, 2**31 - 1])),
        int(rng.choice([2000, 9459, 65535, 100_000, 2**31 - 1])),
    )
    buffer = bytearray(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        body = struct.pack(">II", width, height) + data[24:29]
        buffer[16:29] = body
        buffer[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + body))
    elif data[:2] == b"BM":
        buffer[18:26] = struct.pack("<ii", width, -height if rng.random() < 0.5 else height)
    elif data[:4] == b"GIF8":
        buffer[6:10] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
    elif data[:4] == b"DDS ":
        buffer[12:20] = struct.pack("<II", height, width)
    elif data[:4] == b"RIFF" and data[12:16] == b"VP8L":
        bits = ((width - 1) & 0x3FFF) | (((height - 1) & 0x3FFF) << 14)
        buffer[21:25] = struct.pack(
            "<I", bits | (int.from_bytes(data[21:25], "little") & ~0xFFFFFFF)
        )
    elif data[:2] == b"\xff\xd8":
        marker = data.find(b"\xff\xc0")
        marker = marker if marker >= 0 else data.find(b"\xff\xc2")
        if marker >= 0:
            buffer[marker + 5 : marker + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
    else:  # TIFF and others: any 4 bytes of the first 64
        position = int(rng.integers(0, 60))
        buffer[position : position + 4] = struct.pack("<I", width)
    return bytes(buffer)


def rgb_way(data: bytes) -> np.ndarray:
    """The way every picture was decoded before palette PNGs: RGB, sampled, nearest colour."""
    rgb = read_picture(data)
    rows = sample_positions(rgb.shape[0], SIZE)
    cols = sample_positions(rgb.shape[1], SIZE)
    return codes_from_picture(rgb[np.ix_(rows, cols)])


def png_rows(data: bytes, rng: np.random.Generator) -> bytes:
    """A PNG's rows changed (bits flipped, rows cut or added, filter bytes set) and packed again
    with every CRC right, so the chunk structure stays valid; other formats: bits flipped."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return flip_bits(data, rng)
    parts, position = [], 8
    while position + 8 <= len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        parts.append(
            (data[position + 4 : position + 8], data[position + 8 : position + 8 + length])
        )
        position += 12 + length
    try:
        rows = bytearray(zlib.decompress(b"".join(b for k, b in parts if k == b"IDAT")))
    except zlib.error:
        return flip_bits(data, rng)
    change = int(rng.integers(0, 3))
    if change == 0 and rows:
        rows = bytearray(flip_bits(bytes(rows), rng))
    elif change == 1:
        rows = rows[: int(rng.integers(0, len(rows) + 1))] + bytes(int(rng.integers(0, 64)))
    elif rows:
        rows[int(rng.integers(0, len(rows)))] = int(rng.integers(0, 5))
    packed = zlib.compress(bytes(rows))
    out = [(k, b) for k, b in parts if k != b"IDAT" and k != b"IEND"]
    out += [(b"IDAT", packed), (b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(b)) + k + b + struct.pack(">I", zlib.crc32(k + b)) for k, b in out
    )


MUTATIONS: dict[str, Mutation] = {
    "flip_bits": flip_bits,
    "truncate": truncate,
    "overwrite_header": overwrite_header,
    "splice": splice,
    "random_tail": random_tail,
    "huge_dimensions": huge_dimensions,
    "png_rows": png_rows,
}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_mutated_pictures_give_a_picture_or_an_image_error() -> None:
    rng = np.random.default_rng(SEED)
    client = httpx.Client()
    counts: Counter[str] = Counter()
    causes: Counter[str] = Counter()
    failures: list[str] = []
    disagreements: list[str] = []
    corpus = seeds()
    assert {"PNG-ours", "PNG-ours-resaved", "PNG-RGB", "JPEG", "GIF", "TIFF", "BMP", "WEBP"} <= set(
        corpus
    )
    assert {"GIF-animated", "WEBP-animated", "PNG-animated"} <= set(corpus)
    for name, seed in corpus.items():
        inputs = [seed] + [
            MUTATIONS[str(rng.choice(list(MUTATIONS)))](seed, rng) for _ in range(PER_FORMAT)
        ]
        for index, data in enumerate(inputs):
            # The backend's path (accepted formats, via a data: URL) and every Pillow decoder.
            for path in ("model_input", "any_format"):
                counts["inputs"] += 1
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        if path == "model_input":
                            codes = model_input(
                                data_url(data),
                                client,
                                label_studio_url=None,
                                api_key=None,
                                size=SIZE,
                            )
                            assert codes.shape == (SIZE, SIZE) and int(codes.max()) <= 2
                            # Whatever way was taken, the RGB way gives the same codes.
                            try:
                                same = np.array_equal(codes, rgb_way(data))
                            except ImageError:
                                same = False
                            if not same:
                                disagreements.append(f"{name} input {index}")
                            if palette_png_codes(data, SIZE, 4_000_000) is not None:
                                counts["read_without_a_decoder"] += 1
                        else:
                            rgb = read_picture(data, formats=None)
                            assert rgb.ndim == 3 and rgb.shape[2] == 3
                    counts["pictures"] += 1
                except ImageError as exc:
                    counts["image_errors"] += 1
                    causes[type(exc.__cause__).__name__ if exc.__cause__ else "-"] += 1
                except Exception as exc:  # noqa: BLE001 - what this test exists to find
                    counts["other_exceptions"] += 1
                    failures.append(f"{name} input {index} via {path}: {type(exc).__name__}: {exc}")
    print(f"\nimage fuzz: {dict(counts)}")
    print("what the decoders raised inside the ImageErrors:", dict(causes.most_common()))
    assert counts["inputs"] == counts["pictures"] + counts["image_errors"] + len(failures)
    assert not failures, "\n".join(failures[:20])
    assert not disagreements, "the ways disagree on: " + ", ".join(disagreements[:20])
    assert counts["pictures"] > 0 and counts["image_errors"] > 0
    assert counts["read_without_a_decoder"] > 0
