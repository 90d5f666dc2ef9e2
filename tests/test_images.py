"""Fetching and decoding task pictures, with a fake at httpx's transport seam."""

from __future__ import annotations

import io
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from PIL import Image

from backend.encoding import render_picture, resize_nearest
from backend.images import (
    ImageError,
    data_url,
    fetch_image,
    model_input,
    png_bytes,
    read_picture,
)

LS = "http://ls.example:8080"
TOKEN = "0123456789abcdef0123456789abcdef01234567"


def die_map(seed: int = 0, h: int = 25, w: int = 27) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3, size=(h, w)).astype(np.uint8)


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


def test_read_picture_handles_other_formats_and_modes() -> None:
    rgb = render_picture(die_map())
    np.testing.assert_array_equal(read_picture(png_bytes(rgb)), rgb)
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert("RGBA").save(buffer, format="PNG")
    np.testing.assert_array_equal(read_picture(buffer.getvalue()), rgb)
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
    with pytest.raises(ImageError, match=r"empty|cannot be decoded"):
        read_picture(payload)
    assert issubclass(ImageError, ValueError)


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


def test_label_studio_urls_get_the_token() -> None:
    client, seen = fake_client(serve(PNG))
    for value in ("/data/upload/3/abc-wafer.png", "/data/local-files/?d=wafers/set3/w1.png"):
        data = fetch_image(value, client, label_studio_url=LS + "/", api_key=TOKEN)
        assert data == PNG
    assert [r.url.host for r in seen] == ["ls.example", "ls.example"]
    assert [r.url.path for r in seen] == ["/data/upload/3/abc-wafer.png", "/data/local-files/"]
    assert seen[1].url.params["d"] == "wafers/set3/w1.png"
    assert all(r.headers["Authorization"] == f"Token {TOKEN}" for r in seen)
    # An absolute URL on the Label Studio origin is Label Studio too.
    fetch_image(f"{LS}/data/upload/1/x.png", client, label_studio_url=LS, api_key=TOKEN)
    assert seen[-1].headers["Authorization"] == f"Token {TOKEN}"


@pytest.mark.parametrize(
    "value",
    [
        "http://pictures.example/wafer.png",
        "https://ls.example:8080/data/upload/1/x.png",  # other scheme: other origin
        "http://ls.example:9090/data/upload/1/x.png",  # other port
        "http://evil.example/data/upload/1/x.png?ls.example:8080",
    ],
)
def test_other_hosts_never_see_the_token(value: str) -> None:
    client, seen = fake_client(serve(PNG))
    assert fetch_image(value, client, label_studio_url=LS, api_key=TOKEN) == PNG
    assert len(seen) == 1
    assert "Authorization" not in seen[0].headers


def test_a_redirect_away_from_label_studio_drops_the_token() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "ls.example":
            return httpx.Response(303, headers={"Location": "https://bucket.example/w.png?sig=1"})
        return httpx.Response(200, content=PNG)

    client, seen = fake_client(handler)
    assert (
        fetch_image(
            "/tasks/7/presign/?fileuri=czM6Ly9i", client, label_studio_url=LS, api_key=TOKEN
        )
        == PNG
    )
    assert [r.url.host for r in seen] == ["ls.example", "bucket.example"]
    assert seen[0].headers["Authorization"] == f"Token {TOKEN}"
    assert "Authorization" not in seen[1].headers


def test_endless_redirects_stop() -> None:
    client, seen = fake_client(lambda r: httpx.Response(302, headers={"Location": "/again"}))
    with pytest.raises(ImageError, match="redirects"):
        fetch_image("http://pictures.example/w.png", client, label_studio_url=None, api_key=None)
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
        fetch_image("http://pictures.example/w.png", client, label_studio_url=LS, api_key=TOKEN)


def test_timeouts_and_connection_errors_are_image_errors() -> None:
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client, _ = fake_client(timeout)
    with pytest.raises(ImageError, match=r"timed out fetching image http://ls\.example:8080/data"):
        fetch_image("/data/upload/1/w.png", client, label_studio_url=LS, api_key=TOKEN)
    client, _ = fake_client(refused)
    with pytest.raises(ImageError, match="ConnectError") as caught:
        fetch_image("/data/upload/1/w.png", client, label_studio_url=LS, api_key=TOKEN)
    assert TOKEN not in str(caught.value)


def test_credentials_in_a_url_are_not_quoted() -> None:
    client, _ = fake_client(lambda r: httpx.Response(403))
    with pytest.raises(ImageError) as caught:
        fetch_image(
            "http://user:secret@pictures.example/w.png", client, label_studio_url=None, api_key=None
        )
    assert "secret" not in str(caught.value)


def test_oversized_downloads_are_refused() -> None:
    client, _ = fake_client(serve(b"x" * 1000))
    with pytest.raises(ImageError, match="limit"):
        fetch_image(
            "http://pictures.example/w.png",
            client,
            label_studio_url=None,
            api_key=None,
            max_bytes=100,
        )


@pytest.mark.parametrize(
    "value", ["s3://bucket/w.png", "file:///etc/passwd", "wafer.png", "", "   "]
)
def test_unsupported_references(value: str) -> None:
    client, seen = fake_client(serve(PNG))
    with pytest.raises(ImageError):
        fetch_image(value, client, label_studio_url=LS, api_key=TOKEN)
    assert seen == []


def test_a_fetched_non_image_is_an_image_error() -> None:
    client, _ = fake_client(serve(b"<html>login</html>"))
    with pytest.raises(ImageError, match="cannot be decoded"):
        model_input(
            "http://pictures.example/w.png", client, label_studio_url=None, api_key=None, size=16
        )


def test_queries_of_other_hosts_are_not_quoted() -> None:
    """A presigned cloud URL carries its signature in the query; errors leave it out."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "ls.example":
            location = "https://bucket.example/w.png?X-Amz-Signature=abc123secret"
            return httpx.Response(302, headers={"Location": location})
        return httpx.Response(403)

    client, _ = fake_client(handler)
    with pytest.raises(ImageError) as caught:
        fetch_image("/tasks/1/presign/?fileuri=czM6", client, label_studio_url=LS, api_key=TOKEN)
    message = str(caught.value)
    assert "https://bucket.example/w.png?..." in message and "HTTP 403" in message
    assert "abc123secret" not in message and TOKEN not in message


def test_a_redirect_to_nowhere_is_an_image_error() -> None:
    client, _ = fake_client(lambda r: httpx.Response(302, headers={"Location": "ftp://x/w.png"}))
    with pytest.raises(ImageError, match="non-http"):
        fetch_image("http://pictures.example/w.png", client, label_studio_url=None, api_key=None)
