"""Fetching and decoding task pictures: bounded, never from internal addresses, never logged.

Fakes only at clear seams: httpx.MockTransport for protocol cases, a stub resolver for host
names. Everything about connections, deadlines, redirects and logging runs against real HTTP
servers on 127.0.0.1 (the only address these tests send traffic to); other address ranges are
proven refused by the pure check and the stub resolver, never by connecting to them.
"""

from __future__ import annotations

import functools
import io
import ipaddress
import logging
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpcore
import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from backend.addresses import (
    AddressRefusedError,
    IPAddress,
    check_addresses,
    host_listed,
    parse_hosts,
    refusal,
)
from backend.classifier import WaferClassifier, build_network
from backend.encoding import PALETTE, picture_colours, render_picture, resize_nearest
from backend.image_client import (
    GuardedNetwork,
    ImageClient,
    image_client,
    redact_urls,
)
from backend.images import (
    ImageError,
    ImageRules,
    data_url,
    fetch_image,
    model_input,
    picture_codes,
    picture_reader,
    png_bytes,
    read_picture,
)
from backend.label_config import LabelConfig
from backend.model_card import ModelCard
from backend.predictions import ERROR_ROUTE, predict_tasks
from backend.routing import STUDY_RULES
from backend.settings import Settings
from backend.uncertainty import Measure

LS = "http://ls.example:8080"
TOKEN = "0123456789abcdef0123456789abcdef01234567"
PUBLIC = ipaddress.ip_address("93.184.216.34")
PICTURES = ImageRules(allowed_hosts=("pictures.example",))


def die_map(seed: int = 0, h: int = 25, w: int = 27) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3, size=(h, w)).astype(np.uint8)


def public_resolver(host: str, port: int) -> list[IPAddress]:
    """Every name is a public address (for MockTransport tests: nothing connects)."""
    return [PUBLIC]


def fake_client(
    handler: Callable[[httpx.Request], httpx.Response],
) -> tuple[httpx.Client, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    return httpx.Client(transport=httpx.MockTransport(record), timeout=2.0), seen


def serve(content: bytes) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(200, content=content)


PNG = png_bytes(render_picture(die_map()))


def png_bomb(width: int, height: int) -> bytes:
    """A 1-bit greyscale PNG of width x height black pixels, a few kB however large."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    row = b"\x00" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    compressed = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", compressed)
        + chunk(b"IEND", b"")
    )


def dds_without_pixel_format() -> bytes:
    """A 64 x 64 DDS whose pixel-format flags are 0: Pillow's DDS reader raises
    NotImplementedError for it (it made /predict answer 500 for a whole batch)."""
    header = struct.pack(
        "<4s7I44x8I5I",
        b"DDS ",
        124,
        0x1 | 0x2 | 0x4 | 0x1000,  # caps, height, width, pixel format
        64,
        64,
        64 * 4,
        0,
        0,
        32,  # pixel format: size 32, flags 0, fourcc 0, 32 bits, masks
        0,
        0,
        32,
        0x00FF0000,
        0x0000FF00,
        0x000000FF,
        0xFF000000,
        0x1000,
        0,
        0,
        0,
        0,
    )
    return header + b"\x7f" * (64 * 64 * 4)


# ---- the address check (pure: no DNS, no sockets) ---------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("10.0.0.1", "private"),
        ("10.255.255.254", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata service
        ("100.64.0.1", "carrier-grade NAT"),
        ("100.127.255.254", "carrier-grade NAT"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "private"),  # reserved, and private to ipaddress
        ("255.255.255.255", "private"),
        ("192.0.2.10", "private"),  # documentation range
        ("198.18.0.1", "private"),  # benchmarking range
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback (inside an IPv6 address)"),
        ("::ffff:10.1.2.3", "private (inside an IPv6 address)"),
        ("::ffff:169.254.169.254", "link-local (inside an IPv6 address)"),
        ("2002:7f00:1::", "loopback (inside an IPv6 address)"),  # 6to4 of 127.0.0.1
        ("2002:a00:1::", "private (inside an IPv6 address)"),  # 6to4 of 10.0.0.1
        ("64:ff9b::a9fe:a9fe", "link-local (inside an IPv6 address)"),  # NAT64 metadata
        ("::7f00:1", "reserved"),  # IPv4-compatible 127.0.0.1
        ("2001:db8::1", "private"),
        # Issue 15 row 12: ranges that ipaddress's is_private / is_global miss.
        ("fec0::1", "site-local"),  # deprecated site-local fec0::/10, still routed inside sites
        ("feff:ffff::1", "site-local"),
        ("fec0::ffff:7f00:1", "site-local"),
        ("3fff::1", "documentation"),  # 3fff::/20 (RFC 9637)
        ("3fff:fff:ffff::1", "documentation"),
        ("5f00::1", "SRv6 segment identifier"),  # 5f00::/16 (RFC 9602)
        ("64:ff9b:1::a00:1", "local-use NAT64"),  # 64:ff9b:1::/48 (RFC 8215)
        ("100:0:0:1::1", "dummy prefix"),  # 100:0:0:1::/64 (RFC 9780)
        ("192.88.99.1", "deprecated 6to4 relay anycast"),  # 192.88.99.0/24 (RFC 7526)
        ("2002:c058:6301::", "deprecated 6to4 relay anycast (inside an IPv6 address)"),
    ],
)
def test_internal_addresses_are_refused_by_the_check(address: str, reason: str) -> None:
    assert refusal(ipaddress.ip_address(address)) == reason
    with pytest.raises(AddressRefusedError, match="WAFER_IMAGE_HOSTS"):
        check_addresses("cdn.example", [PUBLIC, ipaddress.ip_address(address)])


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "93.184.216.34",
        "52.216.8.1",
        "2606:4700::1111",
        "::ffff:8.8.8.8",
        "3fff:1000::1",  # just past the documentation /20
        "2001:4860:4860::8888",
        "64:ff9b::808:808",  # NAT64 of a public address
    ],
)
def test_public_addresses_pass_the_check(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None
    assert check_addresses("cdn.example", [ipaddress.ip_address(address)])


def test_a_name_without_addresses_is_refused() -> None:
    with pytest.raises(AddressRefusedError, match="no address"):
        check_addresses("nowhere.example", [])


def test_host_lists() -> None:
    hosts = parse_hosts(" Images.Fab.Local., *.cdn.fab.local,10.1.2.3,[::1],, images.fab.local")
    assert hosts == ("images.fab.local", "*.cdn.fab.local", "10.1.2.3", "::1")
    assert host_listed("IMAGES.fab.local", hosts) and host_listed("a.b.cdn.fab.local", hosts)
    assert not host_listed("cdn.fab.local", hosts) and not host_listed("evilcdn.fab.local", hosts)
    assert host_listed("0:0::1", hosts) and not host_listed("10.1.2.4", hosts)
    assert parse_hosts("") == ()
    for bad in ("http://images.fab.local", "images.fab.local:8080", "a/b", "*.10.1.2.3", "a b"):
        with pytest.raises(ValueError, match="WAFER_IMAGE_HOSTS"):
            parse_hosts(bad)


def test_the_client_connects_to_the_address_it_checked() -> None:
    """Pinning against DNS rebinding: one resolution, and the connection goes to that address
    (the inner network backend is a recording stub: nothing is sent anywhere)."""
    answers = iter([[PUBLIC], [ipaddress.ip_address("127.0.0.1")]])
    asked: list[str] = []

    def rebinding(host: str, port: int) -> list[IPAddress]:
        asked.append(host)
        return next(answers)

    network = GuardedNetwork([], (), rebinding)
    connected: list[tuple[str, int]] = []

    class Recorder(httpcore.SyncBackend):
        def connect_tcp(self, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
            connected.append((host, port))
            return httpcore.NetworkStream()

    network._inner = Recorder()
    network.connect_tcp("cdn.example", 443)
    assert asked == ["cdn.example"] and connected == [(str(PUBLIC), 443)]
    with pytest.raises(httpcore.ConnectError, match="loopback"):
        network.connect_tcp("cdn.example", 443)
    assert connected == [(str(PUBLIC), 443)]


# ---- decoding -----------------------------------------------------------------------------------


def test_png_round_trip_gives_back_the_model_input() -> None:
    for seed, (h, w) in enumerate([(25, 27), (64, 64), (6, 3), (80, 50)]):
        wafer = die_map(seed, h, w)
        client, _ = fake_client(serve(png_bytes(render_picture(wafer))))
        for size in (16, 64):
            expected = resize_nearest(wafer, size)
            via_http = model_input(
                "http://pictures.example/w.png",
                client,
                label_studio_url=None,
                api_key=None,
                size=size,
                rules=PICTURES,
            )
            np.testing.assert_array_equal(via_http, expected)
            via_data = model_input(
                data_url(png_bytes(render_picture(wafer))),
                client,
                label_studio_url=None,
                api_key=None,
                size=size,
            )
            np.testing.assert_array_equal(via_data, expected)
            assert via_data.dtype == np.uint8


def old_rgb_png(wafer: np.ndarray) -> bytes:
    """The picture as drawn before palette PNGs (an RGB PNG, Pillow's encoder)."""
    buffer = io.BytesIO()
    Image.fromarray(picture_colours(render_picture(wafer))).save(buffer, format="PNG")
    return buffer.getvalue()


def pillow_palette_png(wafer: np.ndarray) -> bytes:
    """Our palette picture re-saved by an image tool: 8 bits a pixel, filtered rows, the die
    palette followed by 253 black entries."""
    picture = render_picture(wafer)
    height, width = picture.shape
    image = Image.frombytes("P", (width, height), picture.tobytes())
    image.putpalette(PALETTE.tobytes() + bytes(3 * 253))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def quantised_png(wafer: np.ndarray) -> bytes:
    """A palette PNG of the wafer's colours in another order (Pillow's quantiser)."""
    buffer = io.BytesIO()
    Image.fromarray(picture_colours(render_picture(wafer))).quantize(colors=8).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


PICTURE_KINDS: dict[str, Callable[[np.ndarray], bytes]] = {
    "palette (now)": lambda wafer: png_bytes(render_picture(wafer)),
    "rgb (before)": old_rgb_png,
    "re-saved palette": pillow_palette_png,
    "quantised": quantised_png,
}


@pytest.mark.parametrize("kind", list(PICTURE_KINDS))
def test_every_kind_of_wafer_picture_gives_the_die_maps_model_input(kind: str) -> None:
    """The round trip: the palette picture, the RGB picture drawn before and others of the
    same wafer all decode to the model input of the die map itself."""
    for seed, (h, w) in enumerate([(25, 27), (52, 51), (6, 3), (80, 50), (1, 1)]):
        wafer = die_map(seed, h, w)
        picture = PICTURE_KINDS[kind](wafer)
        client, _ = fake_client(serve(picture))
        for size in (16, 64, 224):
            expected = resize_nearest(wafer, size)
            via_data = model_input(
                data_url(picture), client, label_studio_url=None, api_key=None, size=size
            )
            assert via_data.dtype == np.uint8
            np.testing.assert_array_equal(via_data, expected, err_msg=f"{kind} {h}x{w} {size}")
            via_http = model_input(
                "http://pictures.example/w.png",
                client,
                label_studio_url=None,
                api_key=None,
                size=size,
                rules=PICTURES,
            )
            np.testing.assert_array_equal(via_http, expected)


def test_palette_pictures_need_neither_colour_conversion_nor_matching(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wafer = die_map(7, 40, 33)
    expected = resize_nearest(wafer, 64)
    palette, resaved = png_bytes(render_picture(wafer)), pillow_palette_png(wafer)

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise MemoryError

    # No RGB conversion: our palette PNGs, even re-saved by a tool, are read as indices.
    monkeypatch.setattr(Image.Image, "convert", refused)
    monkeypatch.setattr("backend.images.codes_from_picture", refused)
    for picture in (palette, resaved):
        np.testing.assert_array_equal(picture_codes(picture, 64), expected)
    with pytest.raises(ImageError, match=r"cannot be decoded \(MemoryError\)"):
        picture_codes(old_rgb_png(wafer), 64)  # the RGB way is taken there
    # Our own palette PNG needs no image decoder at all.
    monkeypatch.setattr(Image, "open", refused)
    np.testing.assert_array_equal(picture_codes(palette, 64), expected)
    with pytest.raises(ImageError, match=r"cannot be decoded \(MemoryError\)"):
        picture_codes(resaved, 64)  # that one does


def test_the_limits_hold_for_palette_pictures() -> None:
    palette = png_bytes(render_picture(die_map(8, 30, 30)))  # 360 x 360
    with pytest.raises(ImageError, match="more than 100,000 pixels"):
        picture_codes(palette, 16, max_pixels=100_000)
    with pytest.raises(ImageError, match="not a picture in an accepted format"):
        picture_codes(palette, 16, formats=("JPEG",))
    for broken in (palette[: len(palette) // 2], palette[:60], palette[:8]):
        with pytest.raises(ImageError, match=r"cannot be decoded|not a picture"):
            picture_codes(broken, 16)
    # A 9459 x 9459 header over the same small rows: refused from the header, nothing inflated.
    body = struct.pack(">II", 9459, 9459) + palette[24:29]
    bomb = palette[:16] + body + struct.pack(">I", zlib.crc32(b"IHDR" + body)) + palette[33:]
    with pytest.raises(ImageError, match=r"more than 1,048,576 pixels.*refused before decoding"):
        model_input(data_url(bomb), httpx.Client(), label_studio_url=None, api_key=None, size=16)


def test_a_decoder_failure_on_a_palette_picture_is_an_image_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    picture = pillow_palette_png(die_map(9))
    np.testing.assert_array_equal(picture_codes(picture, 16), resize_nearest(die_map(9), 16))

    def out_of_memory(self: Image.Image, *args: Any, **kwargs: Any) -> Any:
        raise MemoryError

    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", out_of_memory)
    with pytest.raises(ImageError, match=r"PNG picture cannot be decoded \(MemoryError\)"):
        picture_codes(picture, 16)


def test_read_picture_handles_other_formats_and_modes() -> None:
    rgb = picture_colours(render_picture(die_map()))
    np.testing.assert_array_equal(read_picture(png_bytes(rgb)), rgb)
    np.testing.assert_array_equal(read_picture(PNG), rgb)  # the palette PNG, expanded
    for fmt, mode in [("PNG", "RGBA"), ("PNG", "P"), ("GIF", "P"), ("BMP", "RGB"), ("WEBP", "RGB")]:
        buffer = io.BytesIO()
        image = Image.fromarray(rgb)
        image = image.quantize(colors=8) if mode == "P" else image.convert(mode)
        image.save(buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        np.testing.assert_array_equal(read_picture(buffer.getvalue()), rgb, err_msg=fmt + mode)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=95)
    jpeg = read_picture(buffer.getvalue())
    assert jpeg.shape == rgb.shape and jpeg.dtype == np.uint8


@pytest.mark.parametrize(
    "payload",
    [b"", b"not an image at all", PNG[:40], PNG[:8] + b"\x00" * 60, b"<html>404</html>"],
    ids=["empty", "text", "truncated", "broken-chunks", "html"],
)
def test_corrupt_bytes_are_an_image_error(payload: bytes) -> None:
    with pytest.raises(ImageError, match=r"empty|cannot be decoded|not a picture") as caught:
        read_picture(payload)
    assert issubclass(ImageError, ValueError)
    if payload:
        assert repr(payload[:8]) not in str(caught.value) and str(len(payload)) not in str(
            caught.value
        )


def test_a_decompression_bomb_is_refused_before_decoding() -> None:
    """The table's row: a ~10 kB 1-bit PNG of 9459 x 9459 pixels (~8 GiB decoded before)."""
    bomb = png_bomb(9459, 9459)
    assert len(bomb) < 20_000
    with pytest.raises(ImageError, match=r"more than 1,048,576 pixels.*refused before decoding"):
        read_picture(bomb)
    with pytest.raises(ImageError, match="more than 1,048,576 pixels"):
        model_input(data_url(bomb), httpx.Client(), label_studio_url=None, api_key=None, size=16)
    # Far beyond Pillow's own limit too (Image.open raises DecompressionBombError): refused from
    # the header before Pillow opens it.
    with pytest.raises(ImageError, match=r"more than 1,048,576 pixels.*refused before decoding"):
        read_picture(png_bomb(20_000, 20_000))
    with pytest.raises(ImageError, match="more than 100 pixels"):
        read_picture(PNG, max_pixels=100)


def test_a_picture_at_the_pixel_limit_costs_little_memory() -> None:
    """1024 x 1024 pixels of noise (the default WAFER_IMAGE_MAX_PIXELS) decoded to the model
    input in a fresh process: the peak RSS grows by far less than the ~100 bytes a pixel that
    the per-pixel palette match cost before (~400 MB at 4 megapixels)."""
    script = """
import resource, sys, numpy as np
from backend.images import png_bytes, read_picture, data_url, model_input
import httpx
rgb = np.random.default_rng(0).integers(0, 256, size=(1024, 1024, 3), dtype=np.uint8)
value = data_url(png_bytes(rgb))
del rgb
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
codes = model_input(value, httpx.Client(), label_studio_url=None, api_key=None, size=64)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(codes.shape, (after - before) // 1024)
"""
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout.split()
    assert out[:2] == ["(64,", "64)"]
    grown_mb = int(out[2])
    assert grown_mb < 40, f"decoding a 1-megapixel picture grew the peak RSS by {grown_mb} MB"


def test_every_decoder_failure_is_an_image_error(monkeypatch: pytest.MonkeyPatch) -> None:
    dds = dds_without_pixel_format()
    with pytest.raises(ImageError, match="not a picture in an accepted format"):
        read_picture(dds)
    # Even with every Pillow format allowed, the DDS reader's NotImplementedError is contained.
    with pytest.raises(ImageError, match="NotImplementedError"):
        read_picture(dds, formats=None)

    def out_of_memory(self: Image.Image, *args: Any, **kwargs: Any) -> Image.Image:
        raise MemoryError

    monkeypatch.setattr(Image.Image, "convert", out_of_memory)
    with pytest.raises(ImageError, match=r"PNG picture cannot be decoded \(MemoryError\)"):
        read_picture(PNG)


# ---- where pictures may come from (MockTransport: protocol cases) -------------------------------


def test_data_urls_need_no_network() -> None:
    client, seen = fake_client(serve(b""))
    value = data_url(PNG)
    assert value.startswith("data:image/png;base64,")
    assert fetch_image(value, client, label_studio_url=LS, api_key=TOKEN) == PNG
    # Line breaks inside the base64 text are tolerated.
    wrapped = value[:60] + "\n" + value[60:]
    assert fetch_image(wrapped, client, label_studio_url=None, api_key=None) == PNG
    assert seen == []
    with pytest.raises(ImageError, match="invalid base64"):
        fetch_image("data:image/png;base64,@@@@", client, label_studio_url=None, api_key=None)
    with pytest.raises(ImageError, match="no ','"):
        fetch_image("data:image/png;base64", client, label_studio_url=None, api_key=None)
    with pytest.raises(ImageError, match="byte limit"):
        fetch_image(
            value, client, label_studio_url=None, api_key=None, rules=ImageRules(max_bytes=100)
        )


def test_label_studio_urls_get_the_token() -> None:
    client, seen = fake_client(serve(PNG))
    values = (
        "/data/upload/3/abc-wafer.png",
        "/data/local-files/?d=wafers/set3/w1.png",
        "/storage-data/uploaded/?filepath=upload/1/w.png",
        "/tasks/7/resolve/?fileuri=czM6Ly9i",
    )
    for value in values:
        assert fetch_image(value, client, label_studio_url=LS + "/", api_key=TOKEN) == PNG
    assert {r.url.host for r in seen} == {"ls.example"}
    assert seen[1].url.path == "/data/local-files/"
    assert seen[1].url.params["d"] == "wafers/set3/w1.png"
    assert all(r.headers["Authorization"] == f"Token {TOKEN}" for r in seen)
    # An absolute URL on the Label Studio origin is Label Studio too.
    fetch_image(f"{LS}/data/upload/1/x.png", client, label_studio_url=LS, api_key=TOKEN)
    assert seen[-1].headers["Authorization"] == f"Token {TOKEN}"
    # Label Studio under a path prefix.
    fetch_image("/data/upload/1/x.png", client, label_studio_url=LS + "/ls", api_key=TOKEN)
    assert seen[-1].url.path == "/ls/data/upload/1/x.png"


@pytest.mark.parametrize(
    "value",
    [
        "/api/projects/1",
        "/api/current-user/whoami",
        f"{LS}/api/projects/1/export?exportType=JSON",
        "/data/upload/../../api/projects/1",
        "/user/login/",
        "/data/uploadx/1.png",
    ],
)
def test_label_studio_api_paths_are_never_fetched(value: str) -> None:
    client, seen = fake_client(serve(PNG))
    with pytest.raises(ImageError, match="not a picture path"):
        fetch_image(value, client, label_studio_url=LS, api_key=TOKEN)
    assert seen == []


@pytest.mark.parametrize(
    "value",
    [
        "http://pictures.example/wafer.png",
        "https://ls.example:8080/data/upload/1/x.png",  # other scheme: other origin
        "http://ls.example:9090/data/upload/1/x.png",  # other port
        "http://evil.example/data/upload/1/x.png?ls.example:8080",
    ],
)
def test_hosts_other_than_label_studio_and_the_listed_ones_are_refused(value: str) -> None:
    client, seen = fake_client(serve(PNG))
    with pytest.raises(ImageError, match="nor on a host listed in WAFER_IMAGE_HOSTS"):
        fetch_image(value, client, label_studio_url=LS, api_key=TOKEN)
    assert seen == []


@pytest.mark.parametrize(
    "value",
    [
        "http://pictures.example/wafer.png",
        "https://pictures.example:8080/data/upload/1/x.png",
        "http://a.cdn.example/x.png",
    ],
)
def test_listed_hosts_never_see_the_token(value: str) -> None:
    client, seen = fake_client(serve(PNG))
    rules = ImageRules(allowed_hosts=("pictures.example", "*.cdn.example"))
    assert fetch_image(value, client, label_studio_url=LS, api_key=TOKEN, rules=rules) == PNG
    assert len(seen) == 1
    assert "Authorization" not in seen[0].headers


def test_a_redirect_away_from_label_studio_drops_the_token() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "ls.example":
            return httpx.Response(303, headers={"Location": "https://bucket.example/w.png?sig=1"})
        return httpx.Response(200, content=PNG)

    client, seen = fake_client(handler)
    value = "/tasks/7/presign/?fileuri=czM6Ly9i"
    data = fetch_image(value, client, label_studio_url=LS, api_key=TOKEN, resolver=public_resolver)
    assert data == PNG
    assert [r.url.host for r in seen] == ["ls.example", "bucket.example"]
    assert seen[0].headers["Authorization"] == f"Token {TOKEN}"
    assert "Authorization" not in seen[1].headers


@pytest.mark.parametrize(
    "address", ["127.0.0.1", "10.0.0.5", "169.254.169.254", "fd00::1", "::ffff:192.168.0.1"]
)
def test_a_redirect_to_an_internal_address_is_refused_before_connecting(address: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": "http://internal.example/secret"})

    def resolver(host: str, port: int) -> list[IPAddress]:
        return [ipaddress.ip_address(address)]

    client, seen = fake_client(handler)
    with pytest.raises(ImageError, match=r"refused: internal\.example resolves to a") as caught:
        fetch_image(
            "/data/upload/1/w.png", client, label_studio_url=LS, resolver=resolver, api_key=TOKEN
        )
    assert [r.url.host for r in seen] == ["ls.example"]
    assert address not in str(caught.value)


def test_a_redirect_from_label_studio_to_its_login_page_says_what_to_check() -> None:
    client, seen = fake_client(
        lambda r: httpx.Response(
            302, headers={"Location": "/user/login/?next=/data/upload/1/w.png"}
        )
    )
    with pytest.raises(ImageError, match=r"not a picture.*LABEL_STUDIO_API_KEY"):
        fetch_image("/data/upload/1/w.png", client, label_studio_url=LS, api_key=TOKEN)
    assert len(seen) == 1


def test_endless_redirects_stop() -> None:
    client, seen = fake_client(lambda r: httpx.Response(302, headers={"Location": "/again"}))
    with pytest.raises(ImageError, match="redirects"):
        fetch_image(
            "http://pictures.example/w.png",
            client,
            label_studio_url=None,
            api_key=None,
            rules=PICTURES,
        )
    assert len(seen) == 6


def test_relative_url_without_label_studio_url_says_what_to_set() -> None:
    client, seen = fake_client(serve(PNG))
    with pytest.raises(ImageError, match="set LABEL_STUDIO_URL"):
        fetch_image("/data/upload/3/w.png", client, label_studio_url=None, api_key=TOKEN)
    assert seen == []


def test_http_errors_name_the_url_but_not_the_token() -> None:
    client, _ = fake_client(lambda r: httpx.Response(404))
    with pytest.raises(ImageError) as caught:
        fetch_image("/data/local-files/?d=w.png", client, label_studio_url=LS, api_key=TOKEN)
    message = str(caught.value)
    assert "HTTP 404" in message and f"{LS}/data/local-files/" in message
    assert "local storage" in message
    assert TOKEN not in message

    client, _ = fake_client(lambda r: httpx.Response(401))
    with pytest.raises(ImageError, match="LABEL_STUDIO_API_KEY") as caught:
        fetch_image("/data/upload/1/w.png", client, label_studio_url=LS, api_key=TOKEN)
    assert TOKEN not in str(caught.value)

    client, _ = fake_client(lambda r: httpx.Response(500))
    with pytest.raises(ImageError, match=r"pictures\.example/w\.png: HTTP 500"):
        fetch_image(
            "http://pictures.example/w.png",
            client,
            label_studio_url=LS,
            api_key=TOKEN,
            rules=PICTURES,
        )


def test_timeouts_and_connection_errors_are_image_errors() -> None:
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    client, _ = fake_client(timeout)
    with pytest.raises(ImageError, match=r"http://ls\.example:8080/data.*no complete answer"):
        fetch_image("/data/upload/1/w.png", client, label_studio_url=LS, api_key=TOKEN)
    client, _ = fake_client(refused)
    with pytest.raises(ImageError, match="the connection failed") as caught:
        fetch_image("/data/upload/1/w.png", client, label_studio_url=LS, api_key=TOKEN)
    assert TOKEN not in str(caught.value) and "111" not in str(caught.value)


def test_credentials_in_a_url_are_not_quoted() -> None:
    client, _ = fake_client(lambda r: httpx.Response(403))
    with pytest.raises(ImageError) as caught:
        fetch_image(
            "http://user:secret@pictures.example/w.png",
            client,
            label_studio_url=None,
            api_key=None,
            rules=PICTURES,
        )
    assert "secret" not in str(caught.value)


def test_oversized_downloads_are_refused() -> None:
    def declared(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"x" * 1000)  # Content-Length: 1000

    def streamed(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=iter([b"x" * 60] * 20))  # no Content-Length

    for handler in (declared, streamed):
        client, _ = fake_client(handler)
        with pytest.raises(ImageError, match="100-byte limit") as caught:
            fetch_image(
                "http://pictures.example/w.png",
                client,
                label_studio_url=None,
                api_key=None,
                rules=ImageRules(allowed_hosts=("pictures.example",), max_bytes=100),
            )
        assert "1000" not in str(caught.value) and "1,000" not in str(caught.value)


def test_a_compressed_answer_is_never_inflated() -> None:
    """A gzip answer of 100 MB of zeros is ~100 kB on the wire: read raw, it is not a picture."""
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    body = b"".join(bomb.compress(b"\0" * 2**20) for _ in range(100)) + bomb.flush()
    client, seen = fake_client(
        lambda r: httpx.Response(200, content=iter([body]), headers={"Content-Encoding": "gzip"})
    )
    with pytest.raises(ImageError, match="not a picture"):
        model_input(
            "http://pictures.example/w.png",
            client,
            label_studio_url=None,
            api_key=None,
            size=16,
            rules=ImageRules(allowed_hosts=("pictures.example",), max_bytes=2**20),
        )
    assert seen[0].headers["Accept-Encoding"] == "identity"


@pytest.mark.parametrize(
    "value", ["s3://bucket/w.png", "file:///etc/passwd", "wafer.png", "", "   ", "//evil/x"]
)
def test_unsupported_references(value: str) -> None:
    client, seen = fake_client(serve(PNG))
    with pytest.raises(ImageError):
        fetch_image(value, client, label_studio_url=LS, api_key=TOKEN)
    assert seen == []


def test_a_fetched_non_image_is_an_image_error() -> None:
    client, _ = fake_client(serve(b"<html>login</html>"))
    with pytest.raises(ImageError, match="not a picture") as caught:
        model_input(
            "http://pictures.example/w.png",
            client,
            label_studio_url=None,
            api_key=None,
            size=16,
            rules=PICTURES,
        )
    assert "login" not in str(caught.value) and "html" not in str(caught.value)


def test_queries_of_other_hosts_are_not_quoted() -> None:
    """A presigned cloud URL carries its signature in the query; errors leave it out."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "ls.example":
            location = "https://bucket.example/w.png?X-Amz-Signature=abc123secret"
            return httpx.Response(302, headers={"Location": location})
        return httpx.Response(403)

    client, _ = fake_client(handler)
    with pytest.raises(ImageError) as caught:
        fetch_image(
            "/tasks/1/presign/?fileuri=czM6",
            client,
            label_studio_url=LS,
            api_key=TOKEN,
            resolver=public_resolver,
        )
    message = str(caught.value)
    assert "https://bucket.example/w.png?..." in message and "HTTP 403" in message
    assert "abc123secret" not in message and TOKEN not in message


def test_a_redirect_to_nowhere_is_an_image_error() -> None:
    client, _ = fake_client(lambda r: httpx.Response(302, headers={"Location": "ftp://x/w.png"}))
    with pytest.raises(ImageError, match="non-http"):
        fetch_image(
            "http://pictures.example/w.png",
            client,
            label_studio_url=None,
            api_key=None,
            rules=PICTURES,
        )


# ---- real servers on 127.0.0.1 ------------------------------------------------------------------

Route = Callable[[BaseHTTPRequestHandler], None]


@dataclass
class Loopback:
    """A real HTTP server on 127.0.0.1 with routes by path; records every request it got."""

    routes: dict[str, Route]
    hits: list[str] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def loopback(routes: dict[str, Route]) -> Iterator[Loopback]:
    state = Loopback(routes)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.hits.append(self.path)
            route = state.routes.get(self.path.split("?")[0])
            if route is None:
                self.send_error(404)
            else:
                route(self)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def content(body: bytes, status: int = 200) -> Route:
    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return route


def redirect(location: str | Callable[[], str]) -> Route:
    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(302)
        handler.send_header("Location", location if isinstance(location, str) else location())
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return route


@pytest.fixture
def internal() -> Iterator[Loopback]:
    """The internal service a picture URL must never reach."""
    with loopback(
        {"/secret": content(b"INTERNAL: db password 42"), "/": content(b"INTERNAL")}
    ) as s:
        yield s


def clients(label_studio_url: str, hosts: tuple[str, ...] = ()) -> list[httpx.Client]:
    """The backend's own client, and a plain one (this module then checks each hop itself)."""
    return [image_client(label_studio_url, hosts), httpx.Client(timeout=5.0)]


def test_images_from_internal_addresses_are_never_fetched(internal: Loopback) -> None:
    """The table's row: a task image on 127.0.0.1, a Label Studio or listed URL that 302s there,
    or a Label Studio API path. Nothing reaches the internal server, and no message says what
    it would have answered or whether its port is open."""
    with (
        loopback(
            {
                "/data/upload/1/w.png": content(PNG),
                "/tasks/1/resolve/": redirect(f"{internal.url}/secret"),
                "/api/projects/1": content(b'{"token": "INTERNAL"}'),
            }
        ) as ls,
        loopback({"/w.png": redirect(f"{internal.url}/secret")}) as outside,
    ):
        listed = f"http://localhost:{outside.port}/w.png"
        for client in clients(ls.url, ("localhost",)):
            rules = ImageRules(allowed_hosts=("localhost",))
            fetch = functools.partial(
                fetch_image, client=client, label_studio_url=ls.url, api_key=TOKEN, rules=rules
            )
            assert fetch("/data/upload/1/w.png") == PNG  # Label Studio itself, on loopback
            messages = []
            for value in (
                f"{internal.url}/secret",
                f"http://[::ffff:127.0.0.1]:{internal.port}/secret",
                "/tasks/1/resolve/?fileuri=czM6",
                listed,
                "/api/projects/1",
                f"{ls.url}/api/projects/1",
            ):
                with pytest.raises(ImageError) as caught:
                    fetch(value)
                messages.append(str(caught.value))
            assert internal.hits == [], type(client)
            assert "/api/projects/1" not in ls.hits
            assert all("loopback" in m for m in messages[2:4]), messages
            for message in messages:
                assert "INTERNAL" not in message and "bytes" not in message
                assert "Connection refused" not in message and "Errno" not in message


def test_a_closed_port_and_an_open_one_look_alike() -> None:
    with loopback({"/": content(b"", status=404)}) as server:
        closed = socket_free_port()
        messages = []
        for port in (closed, server.port):
            with pytest.raises(ImageError) as caught:
                fetch_image(
                    f"http://localhost:{port}/nothing.png",
                    image_client(None, ("localhost",)),
                    label_studio_url=None,
                    api_key=None,
                    rules=ImageRules(allowed_hosts=("localhost",)),
                )
            messages.append(str(caught.value).replace(str(port), "PORT"))
    assert "the connection failed" in messages[0] and "111" not in messages[0]
    assert "HTTP 404" in messages[1]  # a listed host's answer is the operator's own business


def socket_free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dribble(every_s: float, total: int) -> Route:
    """A slow image server: headers at once, then one byte every ``every_s`` seconds."""

    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(total))
        handler.end_headers()
        handler.wfile.flush()
        sent = 0
        try:
            for _ in range(total):
                time.sleep(every_s)
                handler.wfile.write(b"\x89")
                handler.wfile.flush()
                sent += 1
        except OSError:
            pass
        finally:
            state_sent.append(sent)

    state_sent: list[int] = []
    route.sent = state_sent  # type: ignore[attr-defined]
    return route


@pytest.mark.parametrize("client_kind", ["image_client", "plain"])
def test_a_slow_image_server_is_cut_at_the_deadline(client_kind: str) -> None:
    """The table's row: a server sending a byte every few seconds held one fetch for 47 s (a
    timeout per read). Now the whole download ends at WAFER_IMAGE_TIMEOUT: here 1.5 s, while
    the server would take 8 s to send its 16 bytes."""
    slow = dribble(0.5, 16)
    with loopback({"/data/upload/slow.png": slow}) as ls:
        client = image_client(ls.url) if client_kind == "image_client" else httpx.Client(timeout=30)
        with pytest.raises(ImageError, match=r"no complete answer within 1.5 s"):
            fetch_image(
                "/data/upload/slow.png",
                client,
                label_studio_url=ls.url,
                api_key=TOKEN,
                rules=ImageRules(timeout_s=1.5),
            )
        client.close()
        for _ in range(100):  # the server notices the closed connection at its next write
            if slow.sent:  # type: ignore[attr-defined]
                break
            time.sleep(0.1)
    sent = slow.sent[0]  # type: ignore[attr-defined]
    assert sent < 8, f"the server sent {sent} of 16 bytes before the download was cut"


def test_presigned_urls_never_reach_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """The table's row: httpx logs "HTTP Request: GET <full url>" at INFO. A real redirect on
    loopback to a URL carrying a signature, with httpx's and httpcore's loggers at DEBUG."""
    signature = "X-Amz-Signature=f00dfeedc0ffee1234567890"
    with loopback({"/w.png": content(PNG)}) as bucket:
        presigned = (
            f"http://localhost:{bucket.port}/w.png?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            f"&X-Amz-Credential=AKIAEXAMPLE%2F20261201&{signature}"
        )
        with loopback({"/tasks/5/resolve/": redirect(presigned)}) as ls:
            for client in clients(ls.url, ("localhost",)):
                with (
                    caplog.at_level(logging.DEBUG, logger="httpx"),
                    caplog.at_level(logging.DEBUG, logger="httpcore"),
                ):
                    for name in ("httpcore.connection", "httpcore.http11"):
                        logging.getLogger(name).setLevel(logging.DEBUG)
                    data = fetch_image(
                        "/tasks/5/resolve/?fileuri=czM6Ly9idWNrZXQvdy5wbmc=",
                        client,
                        label_studio_url=ls.url,
                        api_key=TOKEN,
                        rules=ImageRules(allowed_hosts=("localhost",)),
                    )
                assert data == PNG
        assert len(bucket.hits) == 2 and signature in bucket.hits[0]  # the URL was really used
    requests = [r.getMessage() for r in caplog.records if r.name == "httpx"]
    assert any(f"localhost:{bucket.port}/w.png?..." in m for m in requests), requests
    assert any(r.name.startswith("httpcore") for r in caplog.records)
    logged = caplog.text + "".join(r.getMessage() + str(r.args) for r in caplog.records)
    for secret in ("f00dfeedc0ffee", "AKIAEXAMPLE", "X-Amz", TOKEN):
        assert secret not in logged


def test_redact_urls() -> None:
    text = 'GET https://u:p@b.example/k.png?X-Amz-Signature=1 "HTTP/1.1 200" and /x?y=1'
    assert redact_urls(text) == 'GET https://b.example/k.png?... "HTTP/1.1 200" and /x?y=1'


def test_the_service_fetches_with_a_guarded_client() -> None:
    settings = Settings(label_studio_url="http://127.0.0.1:1", image_hosts=("pictures.example",))
    fetch = picture_reader(settings, 16, httpx.Client())
    assert isinstance(fetch.keywords["client"], ImageClient)
    # one per process
    assert (
        picture_reader(settings, 16, httpx.Client()).keywords["client"] is fetch.keywords["client"]
    )
    own = image_client(None)
    assert picture_reader(settings, 16, own).keywords["client"] is own


# ---- a bad picture never fails its batch ---------------------------------------------------------


def test_a_bomb_and_a_dds_between_good_tasks_leave_the_good_ones_their_die_maps(
    label_config: LabelConfig,
) -> None:
    """The table's rows 'decompression bomb' and 'decoder errors other than OSError/ValueError':
    one /predict batch through the service's own fetch, from a real server on loopback."""
    size = 16
    maps = [die_map(1, 30, 28), die_map(2, 20, 24)]
    with loopback(
        {
            "/data/upload/good-1.png": content(png_bytes(render_picture(maps[0]))),
            "/data/upload/bomb.png": content(png_bomb(9459, 9459)),
            "/data/upload/wafer.dds": content(dds_without_pixel_format()),
            "/data/upload/good-2.png": content(png_bytes(render_picture(maps[1]))),
        }
    ) as ls:
        fetch = picture_reader(Settings(label_studio_url=ls.url), size, httpx.Client())
        tasks = [
            {"id": i, "data": {label_config.image_value: f"/data/upload/{name}"}}
            for i, name in enumerate(["good-1.png", "bomb.png", "wafer.dds", "good-2.png"])
        ]
        k = len(label_config.failure_types)
        card = ModelCard("v-test", label_config.failure_types, size, "resnet18", (0.0,) * k)
        network = build_network("resnet18", k, seed=0)
        classifier = WaferClassifier(network=network, card=card, device=torch.device("cpu"))
        out = predict_tasks(tasks, classifier, label_config, STUDY_RULES[Measure.MARGIN], fetch)
    assert [p.route == ERROR_ROUTE for p in out] == [False, True, True, False]
    assert "more than 1,048,576 pixels" in (out[1].error or "")
    assert "not a picture in an accepted format" in (out[2].error or "")
    direct = classifier.predict_proba(np.stack([resize_nearest(m, size) for m in maps]))
    for p, row in zip([out[0], out[3]], direct, strict=True):
        np.testing.assert_allclose(list(p.probabilities.values()), row, atol=1e-6)
