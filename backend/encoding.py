"""Wafer-map encoding: die map -> model input, and die map <-> the picture an annotator sees.

Layer L0 (numpy and the standard library). A die map holds 0 (off wafer), 1 (good die) or 2
(failing die).

The model input is the die map resized to S x S by nearest neighbour and one-hot encoded into three
channels (off wafer, good, failing). Sample positions use integer arithmetic, so:
- a map at most S dies high and wide keeps every die (nothing is lost at S = 64 for maps up to
  64 dies wide, which covers 98% of the labelled WM-811K wafers);
- the annotator picture (each die a crisp k x k block of one colour) decodes back to exactly the
  same model input as the die map it was drawn from, whatever k is. The backend can therefore
  predict from the PNG that Label Studio holds.

The picture is a palette PNG (`palette_png`: 2 bits a pixel, the palette `PALETTE`), which
`palette_png_codes` samples straight from the inflated rows, without a general image decoder.
"""

from __future__ import annotations

import functools
import struct
import zlib

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
    """Die map -> (h k, w k) palette picture: each die a k x k block of its die code.

    Each pixel holds an index into `PALETTE` (which is also the die code), so the picture is
    stored as a palette PNG (`backend.images.png_bytes`) that shows the palette's colours;
    `picture_colours` gives the same picture as RGB.
    """
    if die_map.ndim != 2 or die_map.size == 0:
        raise ValueError(f"a die map is a non-empty 2-D array, got shape {die_map.shape}")
    if die_map.max() >= len(PALETTE):
        raise ValueError(f"die codes must be 0, 1 or 2, found {int(die_map.max())}")
    k = picture_scale((die_map.shape[0], die_map.shape[1]), pixels)
    # Widen the rows first, then repeat whole rows: the fastest order (contiguous copies).
    wide = np.repeat(die_map.astype(np.uint8, copy=False), k, axis=1)
    return np.repeat(wide, k, axis=0)


def picture_colours(picture: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """(h, w) palette picture -> (h, w, 3) RGB: what the annotator sees (and what the pictures
    drawn before palette PNGs held, pixel for pixel)."""
    if picture.ndim != 2 or picture.size == 0:
        raise ValueError(f"a palette picture is a non-empty 2-D array, got shape {picture.shape}")
    if picture.max() >= len(PALETTE):
        raise ValueError(f"palette indices must be 0, 1 or 2, found {int(picture.max())}")
    return PALETTE[picture]


def codes_from_picture(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """RGB picture -> per-pixel die codes, each pixel given the nearest palette colour.

    Tolerates small colour shifts (resampling, lossy viewers); a picture with no pixels, or not
    (h, w, 3), is rejected.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"expected an RGB picture (h, w, 3), got shape {rgb.shape}")
    pixels = rgb.astype(np.int32)
    red, green, blue = pixels[:, :, 0], pixels[:, :, 1], pixels[:, :, 2]
    # Squared distance to each palette colour, channel by channel (3x faster than one
    # (h, w, 3, 3) difference array); argmin keeps the first colour on a tie, as always.
    distances = np.stack(
        [(red - int(r)) ** 2 + (green - int(g)) ** 2 + (blue - int(b)) ** 2 for r, g, b in PALETTE]
    )
    return distances.argmin(axis=0).astype(np.uint8)


# ---- the picture as a palette PNG -------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Bits a pixel of the palette PNGs (4 colours fit; the palette has 3).
PNG_BITS = 2
#: zlib level of `palette_png`. Level 1 encodes about 1.6x faster but makes the PNG about twice
#: as large, and every /predict body carries the pictures (measured on WM-811K wafers).
PNG_COMPRESS_LEVEL = 6
_PIXELS_PER_BYTE = 8 // PNG_BITS
#: IHDR of a palette PNG after width and height: bit depth, colour type 3 (palette),
#: compression 0, filter method 0, no interlace.
_IHDR_TAIL = bytes([PNG_BITS, 3, 0, 0, 0])
_PLTE = PALETTE.tobytes()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def palette_png(picture: npt.NDArray[np.uint8]) -> bytes:
    """(h, w) palette picture (`render_picture`) -> PNG bytes: colour type 3 (palette), 2 bits
    a pixel, the palette `PALETTE`, every row unfiltered, one IDAT chunk.

    Unfiltered rows compress well here (a k x k block repeats each row k times) and let
    `palette_png_codes` read the rows without undoing filters.
    """
    if picture.ndim != 2 or picture.size == 0 or picture.dtype != np.uint8:
        raise ValueError(
            f"a palette picture is a non-empty 2-D uint8 array, got {picture.shape} {picture.dtype}"
        )
    if picture.max() >= len(PALETTE):
        raise ValueError(f"palette indices must be 0, 1 or 2, found {int(picture.max())}")
    h, w = picture.shape
    row_bytes = -(-w // _PIXELS_PER_BYTE)
    padded = np.zeros((h, row_bytes * _PIXELS_PER_BYTE), dtype=np.uint8)
    padded[:, :w] = picture
    quads = padded.reshape(h, row_bytes, _PIXELS_PER_BYTE)
    rows = np.zeros((h, 1 + row_bytes), dtype=np.uint8)  # column 0: filter type 0 (none)
    rows[:, 1:] = (quads[:, :, 0] << 6) | (quads[:, :, 1] << 4) | (quads[:, :, 2] << 2)
    rows[:, 1:] |= quads[:, :, 3]
    return b"".join(
        (
            PNG_SIGNATURE,
            _png_chunk(b"IHDR", struct.pack(">II", w, h) + _IHDR_TAIL),
            _png_chunk(b"PLTE", _PLTE),
            _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), PNG_COMPRESS_LEVEL)),
            _png_chunk(b"IEND", b""),
        )
    )


def palette_png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG whose header is a `palette_png` header; None otherwise."""
    if len(data) < 33 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    length, width, height = struct.unpack(">III", data[8:12] + data[16:24])
    if length != 13 or data[24:29] != _IHDR_TAIL or width < 1 or height < 1:
        return None
    if zlib.crc32(data[12:29]) != struct.unpack(">I", data[29:33])[0]:
        return None
    return width, height


def palette_png_codes(data: bytes, size: int, max_pixels: int) -> npt.NDArray[np.uint8] | None:
    """Die codes (size, size) sampled from a PNG of exactly `palette_png`'s form; None for any
    other bytes (another PNG, a damaged one, another format), which a general decoder then reads.

    The form: the signature; IHDR as `palette_png` writes it with at most `max_pixels` pixels;
    PLTE equal to `PALETTE`; IDAT chunks holding one complete zlib stream that inflates to
    exactly the rows, each unfiltered; IEND and nothing after it; every CRC right; every sampled
    index a die code. Such bytes are a valid PNG that any decoder reads to the same indices, so
    the codes equal those of the general way (`codes_from_picture` of the RGB pixels). Only the
    rows' bytes are inflated (at most ``max_pixels / 4`` plus a byte a row), never more.
    """
    shape = palette_png_size(data)
    if shape is None or size < 1:
        return None
    width, height = shape
    if width * height > max_pixels:
        return None
    row_bytes = 1 + -(-width // _PIXELS_PER_BYTE)
    expected = height * row_bytes
    view = memoryview(data)
    idat: list[memoryview] = []
    position, seen_plte = 33, False
    while True:
        if position + 12 > len(data):
            return None
        length = int.from_bytes(view[position : position + 4])
        end = position + 12 + length
        if end > len(data) or zlib.crc32(view[position + 4 : end - 4]) != int.from_bytes(
            view[end - 4 : end]
        ):
            return None
        kind = bytes(view[position + 4 : position + 8])
        body = view[position + 8 : end - 4]
        position = end
        if kind == b"PLTE" and not seen_plte:
            if body != _PLTE:
                return None
            seen_plte = True
        elif kind == b"IDAT" and seen_plte:  # consecutive: nothing else may come between
            idat.append(body)
        elif kind == b"IEND" and idat and length == 0 and position == len(data):
            break
        else:
            return None
    inflate = zlib.decompressobj()
    try:
        raw = inflate.decompress(b"".join(idat), expected + 1)
    except zlib.error:
        return None
    if not inflate.eof or inflate.unused_data or len(raw) != expected:
        return None
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, row_bytes)
    if rows[:, 0].any():  # a filtered row
        return None
    columns, shifts = _packed_columns(width, size)
    codes = rows[sample_positions(height, size)][:, columns]  # a new (size, size) array
    codes >>= shifts
    codes &= (1 << PNG_BITS) - 1
    if int(codes.max()) >= len(PALETTE):
        return None
    return codes


@functools.lru_cache(maxsize=1024)
def _packed_columns(width: int, size: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.uint8]]:
    """For each of `size` sample columns of a `palette_png` row of `width` pixels: the byte
    that holds it (counting the filter byte) and the right shift that brings it down."""
    cols = sample_positions(width, size)
    columns = 1 + cols // _PIXELS_PER_BYTE
    shifts = (8 - PNG_BITS - PNG_BITS * (cols % _PIXELS_PER_BYTE)).astype(np.uint8)
    columns.setflags(write=False)
    shifts.setflags(write=False)
    return columns, shifts
