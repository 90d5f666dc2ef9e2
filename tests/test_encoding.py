import numpy as np
import pytest

from backend.encoding import (
    PALETTE,
    codes_from_picture,
    encode_wafers,
    one_hot,
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
    assert picture.shape == (30, 30, 3)
    # every die is one 10 x 10 block of its palette colour
    np.testing.assert_array_equal(picture[10:20, 10:20], np.broadcast_to(PALETTE[2], (10, 10, 3)))
    assert len({tuple(c) for c in PALETTE}) == 3
    # the colours differ strongly in lightness, not only in hue
    lightness = PALETTE.astype(float) @ [0.299, 0.587, 0.114]
    assert np.min(np.abs(np.subtract.outer(lightness, lightness))[np.triu_indices(3, 1)]) > 40


@pytest.mark.parametrize(
    ("h", "w", "size"), [(25, 27, 64), (52, 51, 64), (120, 90, 64), (26, 26, 224)]
)
def test_picture_decodes_to_the_same_model_input(h: int, w: int, size: int) -> None:
    rng = np.random.default_rng(h + w + size)
    die_map = random_map(rng, h, w)
    picture = render_picture(die_map)
    codes = codes_from_picture(picture)
    np.testing.assert_array_equal(resize_nearest(codes, size), resize_nearest(die_map, size))


def test_decoding_tolerates_small_colour_shifts() -> None:
    die_map = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    picture = render_picture(die_map, pixels=4).astype(np.int16) + 9
    np.testing.assert_array_equal(
        codes_from_picture(np.clip(picture, 0, 255).astype(np.uint8))[::2, ::2], die_map
    )


@pytest.mark.parametrize("bad", [np.zeros((0, 3), np.uint8), np.zeros((2, 2, 2), np.uint8)])
def test_bad_maps_are_rejected(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        resize_nearest(bad, 8)
    with pytest.raises(ValueError):
        render_picture(bad)
