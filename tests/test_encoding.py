import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from backend.encoding import (
    PALETTE,
    codes_from_picture,
    encode_wafers,
    one_hot,
    palette_png,
    palette_png_codes,
    palette_png_size,
    picture_colours,
    render_picture,
    resize_nearest,
    sample_positions,
)
from backend.wafers import WaferMaps

CLASSES = ("Center", "none")


def random_map(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 3, size=(h, w)).astype(np.uint8)


@pytest.mark.parametrize("length", [1, 3, 25, 33, 63, 64])
def test_every_die_is_kept_when_the_map_fits(length: int) -> None:
    positions = sample_positions(length, 64)
    assert set(positions.tolist()) == set(range(length))
    assert np.all(np.diff(positions) >= 0)


def test_downsampling_picks_evenly_spread_dies() -> None:
    assert sample_positions(300, 3).tolist() == [50, 150, 250]


@pytest.mark.parametrize(("h", "w"), [(25, 27), (26, 26), (6, 3), (64, 64)])
def test_resize_round_trip_recovers_the_die_map(h: int, w: int) -> None:
    rng = np.random.default_rng(h * 100 + w)
    die_map = random_map(rng, h, w)
    image = resize_nearest(die_map, 64)
    assert image.shape == (64, 64)
    # Reading the image back at the first pixel of each die gives the original map.
    first_row = np.searchsorted(sample_positions(h, 64), np.arange(h))
    first_col = np.searchsorted(sample_positions(w, 64), np.arange(w))
    np.testing.assert_array_equal(image[np.ix_(first_row, first_col)], die_map)


def test_batch_encoding_matches_one_by_one() -> None:
    rng = np.random.default_rng(0)
    maps = [random_map(rng, h, w) for h, w in [(25, 27), (30, 34), (25, 27), (100, 80), (7, 9)]]
    wafers = WaferMaps.from_maps(maps, ["none"] * len(maps), CLASSES)
    codes = encode_wafers(wafers, 32)
    assert codes.shape == (5, 32, 32) and codes.dtype == np.uint8
    for i, die_map in enumerate(maps):
        np.testing.assert_array_equal(codes[i], resize_nearest(die_map, 32))


def test_one_hot_has_exactly_one_channel_per_pixel() -> None:
    codes = np.array([[[0, 1], [2, 1]]], dtype=np.uint8)
    hot = one_hot(codes)
    assert hot.shape == (1, 3, 2, 2)
    np.testing.assert_array_equal(hot.sum(axis=1), 1.0)
    np.testing.assert_array_equal(hot.argmax(axis=1), codes)
    with pytest.raises(ValueError, match="0, 1 or 2"):
        one_hot(np.array([[[3]]], dtype=np.uint8))


def test_picture_is_crisp_and_uses_three_distinct_colours() -> None:
    die_map = np.array([[0, 1, 1], [1, 2, 1], [0, 1, 0]], dtype=np.uint8)
    picture = render_picture(die_map, pixels=30)
    assert picture.shape == (30, 30) and picture.dtype == np.uint8
    # every die is one 10 x 10 block of its palette index, i.e. its die code
    np.testing.assert_array_equal(picture[10:20, 10:20], np.full((10, 10), 2))
    np.testing.assert_array_equal(picture[::10, ::10], die_map)
    colours = picture_colours(picture)
    assert colours.shape == (30, 30, 3)
    np.testing.assert_array_equal(colours[10:20, 10:20], np.broadcast_to(PALETTE[2], (10, 10, 3)))
    assert len({tuple(c) for c in PALETTE}) == 3
    # the colours differ strongly in lightness, not only in hue
    lightness = PALETTE.astype(float) @ [0.299, 0.587, 0.114]
    assert np.min(np.abs(np.subtract.outer(lightness, lightness))[np.triu_indices(3, 1)]) > 40


@pytest.mark.parametrize(("h", "w"), [(25, 27), (52, 51), (1, 1), (300, 7)])
def test_picture_blocks_are_the_die_map_repeated(h: int, w: int) -> None:
    die_map = random_map(np.random.default_rng(h * w), h, w)
    picture = render_picture(die_map)
    k = max(1, 384 // max(h, w))
    np.testing.assert_array_equal(picture, np.kron(die_map, np.ones((k, k), dtype=np.uint8)))


@pytest.mark.parametrize(
    ("h", "w", "size"), [(25, 27, 64), (52, 51, 64), (120, 90, 64), (26, 26, 224)]
)
def test_picture_decodes_to_the_same_model_input(h: int, w: int, size: int) -> None:
    rng = np.random.default_rng(h + w + size)
    die_map = random_map(rng, h, w)
    picture = picture_colours(render_picture(die_map))
    codes = codes_from_picture(picture)
    np.testing.assert_array_equal(resize_nearest(codes, size), resize_nearest(die_map, size))


def test_decoding_tolerates_small_colour_shifts() -> None:
    die_map = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    picture = picture_colours(render_picture(die_map, pixels=4)).astype(np.int16) + 9
    np.testing.assert_array_equal(
        codes_from_picture(np.clip(picture, 0, 255).astype(np.uint8))[::2, ::2], die_map
    )


def test_colour_matching_is_nearest_colour_with_ties_to_the_first() -> None:
    """Every colour of a grid through the RGB cube (ties included) gets the code of the nearest
    palette colour by squared distance, the lowest code on a tie, as the one-array form did."""
    axis = np.arange(0, 256, 3)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 1, 3)
    grid = np.concatenate([grid, PALETTE[:, None, :]]).astype(np.uint8)
    diff = grid[:, :, None, :].astype(np.int64) - PALETTE[None, None].astype(np.int64)
    expected = np.argmin((diff * diff).sum(axis=3), axis=2)
    codes = codes_from_picture(grid)
    assert codes.dtype == np.uint8
    np.testing.assert_array_equal(codes, expected)
    np.testing.assert_array_equal(codes[-3:, 0], [0, 1, 2])


@pytest.mark.parametrize("bad", [np.zeros((0, 3), np.uint8), np.zeros((2, 2, 2), np.uint8)])
def test_bad_maps_are_rejected(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        resize_nearest(bad, 8)
    with pytest.raises(ValueError):
        render_picture(bad)
    with pytest.raises(ValueError):
        picture_colours(bad)
    with pytest.raises(ValueError):
        palette_png(bad)
    with pytest.raises(ValueError, match="0, 1 or 2"):
        palette_png(np.full((2, 2), 3, np.uint8))


# ---- the palette PNG ----------------------------------------------------------------------------


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """(kind, body) of every chunk of a PNG."""
    out, position = [], 8
    while position < len(png):
        (length,) = struct.unpack(">I", png[position : position + 4])
        out.append((png[position + 4 : position + 8], png[position + 8 : position + 8 + length]))
        position += 12 + length
    return out


def build(parts: list[tuple[bytes, bytes]], tail: bytes = b"") -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunk(k, b) for k, b in parts) + tail


def rows_of(png: bytes) -> bytes:
    return zlib.decompress(b"".join(b for k, b in chunks(png) if k == b"IDAT"))


def with_rows(png: bytes, rows: bytes, pieces: int = 1) -> bytes:
    """`png` with its IDAT replaced by `rows` compressed, split over `pieces` IDAT chunks."""
    parts = chunks(png)
    packed = zlib.compress(rows)
    step = -(-len(packed) // pieces)
    idat = [(b"IDAT", packed[i : i + step]) for i in range(0, len(packed), step)]
    return build([parts[0], parts[1], *idat, parts[-1]])


@pytest.mark.parametrize(("h", "w"), [(25, 27), (52, 51), (1, 1), (3, 7), (300, 200), (64, 64)])
def test_palette_png_reads_back_as_the_model_input(h: int, w: int) -> None:
    die_map = random_map(np.random.default_rng(h * 1000 + w), h, w)
    picture = render_picture(die_map)
    png = palette_png(picture)
    assert palette_png_size(png) == (picture.shape[1], picture.shape[0])
    for size in (1, 16, 64, 224):
        codes = palette_png_codes(png, size, max_pixels=4_000_000)
        assert codes is not None and codes.dtype == np.uint8 and codes.shape == (size, size)
        np.testing.assert_array_equal(codes, resize_nearest(die_map, size))


def test_palette_png_is_a_standard_png_with_the_die_palette() -> None:
    """Any decoder (here Pillow) reads the same indices and the annotator's colours."""
    die_map = random_map(np.random.default_rng(3), 30, 41)
    picture = render_picture(die_map)
    png = palette_png(picture)
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        assert (image.format, image.mode, image.size) == ("PNG", "P", picture.shape[::-1])
        assert "transparency" not in image.info
        np.testing.assert_array_equal(np.asarray(image), picture)
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), picture_colours(picture))
    kinds = [kind for kind, _ in chunks(png)]
    assert kinds == [b"IHDR", b"PLTE", b"IDAT", b"IEND"]
    assert dict(chunks(png))[b"PLTE"] == PALETTE.tobytes()
    # 2 bits a pixel, every row unfiltered
    rows = rows_of(png)
    row_bytes = 1 + -(-picture.shape[1] // 4)
    assert len(rows) == picture.shape[0] * row_bytes
    assert set(rows[::row_bytes]) == {0}


def test_palette_png_codes_reads_chunks_split_anywhere() -> None:
    die_map = random_map(np.random.default_rng(4), 20, 22)
    png = palette_png(render_picture(die_map))
    split = with_rows(png, rows_of(png), pieces=5)
    assert [k for k, _ in chunks(split)].count(b"IDAT") == 5
    codes = palette_png_codes(split, 32, max_pixels=4_000_000)
    assert codes is not None
    np.testing.assert_array_equal(codes, resize_nearest(die_map, 32))


def variants() -> dict[str, bytes]:
    """Bytes that are not exactly a `palette_png` (each a reason to leave them to Pillow)."""
    die_map = random_map(np.random.default_rng(5), 12, 14)
    picture = render_picture(die_map, pixels=48)
    png = palette_png(picture)
    parts = chunks(png)
    rows = bytearray(rows_of(png))
    row_bytes = 1 + -(-picture.shape[1] // 4)
    filtered = bytearray(rows)
    filtered[row_bytes] = 2  # row 1 "Up" filtered: still a valid PNG, not our form
    index_3 = bytearray(rows)
    for row in range(1, len(rows) // row_bytes, 4):  # index 3 (not a die code) in some rows
        index_3[row * row_bytes + 1 : (row + 1) * row_bytes] = b"\xff" * (row_bytes - 1)
    broken_crc = bytearray(png)
    broken_crc[-20] ^= 1  # inside the IDAT body
    rgb = io.BytesIO()
    Image.fromarray(picture_colours(picture)).save(rgb, format="PNG")
    other_palette = [parts[0], (b"PLTE", bytes(9)), *parts[2:]]
    transparent = [parts[0], parts[1], (b"tRNS", b"\x00"), *parts[2:]]
    return {
        "rgb png": rgb.getvalue(),
        "jpeg-ish": b"\xff\xd8\xff\xe0" + png[4:],
        "empty": b"",
        "signature only": png[:8],
        "truncated": png[:-5],
        "trailing bytes": png + b"\x00",
        "broken crc": bytes(broken_crc),
        "other palette": build(other_palette),
        "no palette": build([parts[0], *parts[2:]]),
        "transparency chunk": build(transparent),
        "filtered row": with_rows(png, bytes(filtered)),
        "index 3": with_rows(png, bytes(index_3)),
        "too few rows": with_rows(png, bytes(rows[:-row_bytes])),
        "too many rows": with_rows(png, bytes(rows) + bytes(row_bytes)),
        "bytes after the stream": build(
            [parts[0], parts[1], (b"IDAT", zlib.compress(bytes(rows)) + b"\x00"), parts[-1]]
        ),
        "no IEND": build(parts[:-1]),
        "8-bit header": build([(b"IHDR", parts[0][1][:8] + b"\x08" + parts[0][1][9:]), *parts[1:]]),
    }


@pytest.mark.parametrize("name", list(variants()))
def test_anything_but_a_palette_png_is_left_to_the_general_decoder(name: str) -> None:
    assert palette_png_codes(variants()[name], 16, max_pixels=4_000_000) is None


def test_the_variants_differ_from_a_palette_png_only_where_they_say() -> None:
    """The rows edited by `variants` are read when left in our form (the test can fail)."""
    die_map = random_map(np.random.default_rng(5), 12, 14)
    png = palette_png(render_picture(die_map, pixels=48))
    rebuilt = with_rows(png, rows_of(png), pieces=2)
    codes = palette_png_codes(rebuilt, 16, max_pixels=4_000_000)
    assert codes is not None
    np.testing.assert_array_equal(codes, resize_nearest(die_map, 16))


def test_the_pixel_limit_holds_before_anything_is_inflated() -> None:
    png = palette_png(render_picture(random_map(np.random.default_rng(6), 10, 10), pixels=40))
    assert palette_png_codes(png, 8, max_pixels=1600) is not None
    assert palette_png_codes(png, 8, max_pixels=1599) is None
    # a header claiming 100,000 x 100,000 pixels over a few bytes of rows
    parts = chunks(png)
    header = struct.pack(">II", 100_000, 100_000) + parts[0][1][8:]
    assert palette_png_codes(build([(b"IHDR", header), *parts[1:]]), 8, 4_000_000) is None
