"""What decoding a picture will cost, read from its container before any decoder runs. Layer L0.

A picture's pixel count (read from its header and checked by `backend.images`) is not the whole
cost of decoding it. Measured with Pillow 13 (libjpeg-turbo, libwebp) on the 2-core host:

- every scan of a progressive JPEG is another pass over every pixel: a 2000 x 2000 JPEG whose
  14-byte last scan is repeated 20,000 times (395 kB) took 52.8 s to decode, and the 16 MiB
  download limit left room for ~45 min;
- Pillow opens a JPEG, PNG or GIF with a Python loop, one step per segment, chunk, sub-block or
  stray byte, and decodes run-length BMPs in Python: 15 MiB of JPEG fill bytes took 9.4 s to
  open, 4 M comment segments 5.2 s, 1.3 M empty PNG chunks 5.3 s, 7 M GIF sub-blocks 3.3 s.

`picture_structure` walks the container (never the compressed pixels) and refuses, with a
`StructureRefusedError` saying why, a picture beyond `StructureLimits`: more JPEG scans than
encoders write, more than one frame, more parts than a real picture has, a run-length BMP. It
also reads the width and height, so that a picture too large is refused before a decoder even
opens it (Pillow's WebP reader sets up the whole canvas when it opens a file: 4.7 ms for a
212-byte picture of 2000 x 2000, 47 s for 20,000 of them in one request). Its own work is
bounded the same way: it stops at the first limit passed, and long runs are skipped with
``bytes.find``, ``bytes.count`` and regular expressions, in C. What it does not understand
(another format, a truncated or damaged file) it leaves to the decoder, which refuses that in
its own words: this is a cost check, not a validator.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

#: Start of a JPEG scan (SOS). Inside entropy-coded data an 0xFF byte is always followed by
#: 0x00 or a restart marker, so every scan starts with these two bytes and they cannot hide.
_SOS = b"\xff\xda"
_FILL = re.compile(rb"\xff+")
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RST0-7, SOI: no length
#: Start-of-frame markers (SOF0-SOF15 less DHT, JPG and DAC): they hold the size.
_JPEG_FRAME = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_BMP_RUN_LENGTH = {1: "RLE8", 2: "RLE4"}


@dataclass(frozen=True)
class StructureLimits:
    """How much structure a picture may have.

    ``max_scans``: JPEG scans. libjpeg's progressive script writes 10 (6 for grey, 18 for
    CMYK), a baseline JPEG has 1 to 4; each scan costs a pass over the pixels (~0.8 ms a
    megapixel here), so 32 is a wide margin that keeps a 1-megapixel JPEG within ~30 ms.
    ``max_frames``: a wafer picture is one frame; the decoders read only the first anyway.
    ``max_parts``: PNG chunks, JPEG segments and stray bytes before the first scan, RIFF chunks
    of a WebP, GIF blocks (plus one per 128 bytes for the sub-blocks of its pixel data, which
    real encoders write 255 bytes long). A real picture has tens (libpng cuts pixel data into
    8 KiB chunks: 2,048 for 16 MiB); Pillow walks many of them in Python at a few microseconds
    each.
    """

    max_scans: int = 32
    max_frames: int = 1
    max_parts: int = 4096


#: The default limits (a module-level value, so that it can be a default argument).
STRUCTURE_LIMITS = StructureLimits()


@dataclass(frozen=True)
class PictureStructure:
    """What the walk found: the format (Pillow's name), the size the header gives (0 x 0 when
    it could not be read: the decoder then reads it), frames, JPEG scans, parts walked."""

    format: str
    width: int = 0
    height: int = 0
    frames: int = 1
    scans: int = 1
    parts: int = 0

    @property
    def pixels(self) -> int:
        return self.width * self.height


class StructureRefusedError(ValueError):
    """The picture would cost more to decode than its pixels (the message says why)."""


def picture_structure(data: bytes, limits: StructureLimits) -> PictureStructure | None:
    """The structure of a PNG, JPEG, GIF, WebP or BMP picture within ``limits``; None for other
    bytes (left to a decoder); `StructureRefusedError` for one beyond the limits."""
    if data.startswith(_PNG_SIGNATURE):
        found = _png(data, limits)
    elif data.startswith(b"\xff\xd8\xff"):
        found = _jpeg(data, limits)
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        found = _gif(data, limits)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        found = _webp(data, limits)
    elif data[:2] == b"BM":
        found = _bmp(data)
    else:
        return None
    if found.frames > limits.max_frames:
        raise StructureRefusedError(
            f"the {found.format} picture has {found.frames:,} frames; a wafer picture is one "
            "frame (an animation is refused)"
        )
    return found


def _too_many(fmt: str, what: str, limit: int) -> StructureRefusedError:
    return StructureRefusedError(
        f"the {fmt} picture has more than {limit:,} {what}, far more than a real picture (a "
        "decoder walks each one in turn)"
    )


def _png(data: bytes, limits: StructureLimits) -> PictureStructure:
    width = height = 0
    if data[12:16] == b"IHDR":
        width, height = int.from_bytes(data[16:20]), int.from_bytes(data[20:24])
    position, parts, frames, controls = 8, 0, 1, 0
    while position + 8 <= len(data):
        parts += 1
        if parts > limits.max_parts:
            raise _too_many("PNG", "chunks", limits.max_parts)
        length = int.from_bytes(data[position : position + 4])
        kind = data[position + 4 : position + 8]
        if kind == b"acTL" and length >= 4:
            frames = max(frames, int.from_bytes(data[position + 8 : position + 12]))
        elif kind == b"fcTL":
            controls += 1
        elif kind == b"IEND":
            break
        position += 12 + length
    return PictureStructure("PNG", width, height, frames=max(frames, controls), parts=parts)


def _jpeg(data: bytes, limits: StructureLimits) -> PictureStructure:
    """Segments up to the first scan, as Pillow's Python loop reads them (a step per segment,
    per fill byte and per stray byte), then the scans: every SOS marker from there on (libjpeg
    reads those in C; a marker inside a later segment's body would only be counted in excess)."""
    position, steps, width, height = 2, 0, 0, 0
    while position < len(data):
        if data[position] != 0xFF:  # stray bytes: Pillow skips them one at a time
            following = data.find(b"\xff", position)
            following = len(data) if following < 0 else following
            steps += following - position
            position = following
        else:
            fill = _FILL.match(data, position)
            end = fill.end() if fill is not None else position + 1
            steps += end - position
            position = end
            if position >= len(data):
                break
            marker = data[position]
            position += 1
            if marker == 0xDA:  # the first scan: the rest is libjpeg's
                scans = data.count(_SOS, position - 2)
                if scans > limits.max_scans:
                    raise StructureRefusedError(
                        f"the JPEG picture has {scans:,} scans (at most {limits.max_scans}: "
                        "each one is another pass over every pixel)"
                    )
                return PictureStructure("JPEG", width, height, scans=scans, parts=steps)
            if marker == 0xD9:
                break
            if marker not in _JPEG_STANDALONE and marker != 0x00:
                if position + 2 > len(data):
                    break
                if marker in _JPEG_FRAME and position + 7 <= len(data):
                    height = int.from_bytes(data[position + 3 : position + 5])
                    width = int.from_bytes(data[position + 5 : position + 7])
                position += int.from_bytes(data[position : position + 2])
        if steps > limits.max_parts:
            raise _too_many(
                "JPEG", "segments and stray bytes before its first scan", limits.max_parts
            )
    return PictureStructure("JPEG", width, height, scans=0, parts=steps)


def _gif(data: bytes, limits: StructureLimits) -> PictureStructure:
    """Blocks and sub-blocks, each a step (extensions before the first image are read by
    Pillow in Python); frames are the image descriptors. The size is the logical screen's,
    widened to every frame's extent (as Pillow widens it)."""
    limit = limits.max_parts + len(data) // 128
    steps, frames = 0, 0
    width, height = int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    flags = data[10] if len(data) > 10 else 0
    position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    while position < len(data):
        steps += 1
        if steps > limit:
            raise _too_many("GIF", "blocks", limit)
        introducer = data[position]
        if introducer == 0x3B:  # trailer
            break
        if introducer == 0x2C:  # image descriptor, local colour table, LZW code size
            frames += 1
            if position + 9 < len(data):
                left, top, across, down = struct.unpack_from("<4H", data, position + 1)
                width, height = max(width, left + across), max(height, top + down)
            local = data[position + 9] if position + 9 < len(data) else 0
            position += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0) + 1
        elif introducer == 0x21:  # extension: label
            position += 2
        else:  # a stray byte: Pillow skips it
            position += 1
            continue
        while position < len(data):  # sub-blocks up to the empty one
            size = data[position]
            position += 1 + size
            if size == 0:
                break
            steps += 1
            if steps > limit:
                raise _too_many("GIF", "blocks", limit)
    return PictureStructure("GIF", width, height, frames=max(frames, 1), parts=steps)


def _webp(data: bytes, limits: StructureLimits) -> PictureStructure:
    """Chunks; frames are the ANMF chunks; the size is the canvas (VP8X) or the one image's
    (VP8: 14 bits each after the start code; VP8L: 14 bits each, minus one, after 0x2f)."""
    width = height = 0
    first = data[12:16]
    if first == b"VP8X" and len(data) >= 30:
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
    elif first == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width = int.from_bytes(data[26:28], "little") & 0x3FFF
        height = int.from_bytes(data[28:30], "little") & 0x3FFF
    elif first == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        width, height = 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    position, parts, frames = 12, 0, 0
    while position + 8 <= len(data):
        parts += 1
        if parts > limits.max_parts:
            raise _too_many("WEBP", "chunks", limits.max_parts)
        kind = data[position : position + 4]
        size = int.from_bytes(data[position + 4 : position + 8], "little")
        if kind == b"ANMF":
            frames += 1
        position += 8 + size + (size & 1)
    return PictureStructure("WEBP", width, height, frames=max(frames, 1), parts=parts)


def _bmp(data: bytes) -> PictureStructure:
    header = int.from_bytes(data[14:18], "little") if len(data) >= 18 else 0
    width = height = 0
    if header == 12 and len(data) >= 22:
        width, height = struct.unpack_from("<2H", data, 18)
    elif header >= 40 and len(data) >= 26:
        across, down = struct.unpack_from("<2i", data, 18)
        width, height = abs(across), abs(down)
    if header >= 40 and len(data) >= 34:
        compression = int.from_bytes(data[30:34], "little")
        if compression in _BMP_RUN_LENGTH:
            raise StructureRefusedError(
                f"the BMP picture is run-length encoded ({_BMP_RUN_LENGTH[compression]}), which "
                "Pillow decodes in Python, a step a run"
            )
    return PictureStructure("BMP", width, height, parts=1)
