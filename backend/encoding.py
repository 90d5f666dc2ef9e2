"""Wafer-map encoding: die map -> model input, and die map <-> the picture an annotator sees.

Layer L0 (numpy only). A die map holds 0 (off wafer), 1 (good die) or 2 (failing die).

The model input is the die map resized to S x S by nearest neighbour and one-hot encoded into three
channels (off wafer, good, failing). Sample positions use integer arithmetic, so:
- a map at most S dies high and wide keeps every die (nothing is lost at S = 64 for maps up to
  64 dies wide, which covers 98% of the labelled WM-811K wafers);
- the annotator picture (each die a crisp k x k block of one colour) decodes back to exactly the
  same model input as the die map it was drawn from, whatever k is. The backend can therefore
  predict from the PNG that Label Studio holds.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from backend.wafers import WaferMaps

OFF_WAFER, GOOD_DIE, FAILING_DIE = 0, 1, 2
N_CHANNELS = 3

#: Annotator colours: light grey off the wafer, steel blue for good dies, amber for failing dies
#: (distinct in lightness and hue, also for red-green colour blindness).
PALETTE: npt.NDArray[np.uint8] = np.array(
    [[232, 232, 232], [62, 105, 170], [255, 176, 0]], dtype=np.uint8
)

#: The longer side of the annotator picture aims at this many pixels (integer die blocks).
DEFAULT_PICTURE_PIXELS = 384


def sample_positions(length: int, size: int) -> npt.NDArray[np.intp]:
    """Source index, along one axis of `length` dies, for each of `size` output pixels.

    The centre of output pixel i falls on die floor((2i + 1) * length / (2 size)).
    """
    if length < 1 or size < 1:
        raise ValueError(f"need a positive length and size, got {length} and {size}")
    i = np.arange(size, dtype=np.int64)
    return ((2 * i + 1) * length // (2 * size)).astype(np.intp)


def resize_nearest(die_map: npt.NDArray[np.uint8], size: int) -> npt.NDArray[np.uint8]:
    """One die map (h, w) -> (size, size) by nearest neighbour."""
    if die_map.ndim != 2 or die_map.size == 0:
        raise ValueError(f"a die map is a non-empty 2-D array, got shape {die_map.shape}")
    rows = sample_positions(die_map.shape[0], size)
    cols = sample_positions(die_map.shape[1], size)
    return np.ascontiguousarray(die_map[np.ix_(rows, cols)], dtype=np.uint8)


def encode_wafers(wafers: WaferMaps, size: int) -> npt.NDArray[np.uint8]:
    """All die maps -> (n, size, size) uint8 codes, vectorised over wafers of the same shape.

    Codes rather than one-hot floats keep 155,000 wafers at 64 x 64 within 640 MB; the classifier
    expands them to one-hot on its device (`one_hot`).
    """
    n = len(wafers)
    out = np.empty((n, size, size), dtype=np.uint8)
    if n == 0:
        return out
    shapes, group = np.unique(wafers.shapes, axis=0, return_inverse=True)
    group = group.reshape(-1)
    for g, (h, w) in enumerate(shapes):
        members = np.flatnonzero(group == g)
        gather = wafers.offsets[members][:, None] + np.arange(int(h) * int(w))
        maps = wafers.flat[gather].reshape(len(members), int(h), int(w))
        rows = sample_positions(int(h), size)
        cols = sample_positions(int(w), size)
        out[members] = maps[:, rows][:, :, cols]
    return out


def one_hot(codes: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """(n, S, S) codes -> (n, 3, S, S) float32 one-hot channels (off wafer, good, failing)."""
    if codes.size and codes.max() >= N_CHANNELS:
        raise ValueError(f"die codes must be 0, 1 or 2, found {int(codes.max())}")
    channels = np.arange(N_CHANNELS, dtype=np.uint8)[None, :, None, None]
    return (codes[:, None, :, :] == channels).astype(np.float32)


def picture_scale(shape: tuple[int, int], pixels: int = DEFAULT_PICTURE_PIXELS) -> int:
    """Integer block size so that the longer side of the picture is close to `pixels`."""
    return max(1, pixels // max(shape))


def render_picture(
    die_map: npt.NDArray[np.uint8], pixels: int = DEFAULT_PICTURE_PIXELS
) -> npt.NDArray[np.uint8]:
    """Die map -> (h k, w k, 3) RGB picture: each die a k x k block of its palette colour."""
    if die_map.ndim != 2 or die_map.size == 0:
        raise ValueError(f"a die map is a non-empty 2-D array, got shape {die_map.shape}")
    if die_map.max() >= len(PALETTE):
        raise ValueError(f"die codes must be 0, 1 or 2, found {int(die_map.max())}")
    k = picture_scale((die_map.shape[0], die_map.shape[1]), pixels)
    blocks = np.repeat(np.repeat(die_map, k, axis=0), k, axis=1)
    return PALETTE[blocks]


def codes_from_picture(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """RGB picture -> per-pixel die codes, each pixel given the nearest palette colour.

    Tolerates small colour shifts (resampling, lossy viewers); a picture with no pixels, or not
    (h, w, 3), is rejected.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"expected an RGB picture (h, w, 3), got shape {rgb.shape}")
    diff = rgb[:, :, None, :].astype(np.int32) - PALETTE[None, None, :, :].astype(np.int32)
    return np.argmin((diff * diff).sum(axis=3), axis=2).astype(np.uint8)
