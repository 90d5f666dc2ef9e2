"""Wafer-map pictures in and out: PNG bytes, data URLs, and fetching the image a task points at.

Layer L1 (httpx + Pillow). A Label Studio task names its picture in one of these ways:

- a ``data:image/png;base64,...`` URL, decoded here without any network access;
- an ``http(s)://`` URL, fetched with the caller's `httpx.Client`;
- a Label Studio relative URL (``/data/upload/...``, ``/data/local-files/?d=...``, or any other
  path starting with ``/``), resolved against ``label_studio_url``.

The API token (``Authorization: Token <api_key>``) goes only to requests whose origin (scheme,
host, port) is the Label Studio origin, re-checked at every redirect, so a redirect to cloud
storage or a picture hosted elsewhere never sees it. Every failure is an `ImageError` whose
message names the picture but never the token.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.parse
from collections.abc import Mapping

import httpx
import numpy as np
import numpy.typing as npt
from PIL import Image

from backend.encoding import codes_from_picture, resize_nearest

#: Largest picture download accepted (a 384-pixel wafer PNG is a few kilobytes).
DEFAULT_MAX_BYTES = 32 * 2**20
#: Redirects followed before giving up.
MAX_REDIRECTS = 5
#: How much of a URL an error message quotes.
URL_QUOTE_CHARS = 200


class ImageError(ValueError):
    """A task's picture cannot be fetched or decoded; the message says which and why."""


def png_bytes(rgb: npt.NDArray[np.uint8]) -> bytes:
    """(h, w, 3) uint8 RGB -> lossless PNG bytes."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected a (h, w, 3) uint8 RGB picture, got {rgb.shape} {rgb.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(png: bytes) -> str:
    """PNG bytes -> ``data:image/png;base64,...`` (what a task's image field may hold)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def read_picture(data: bytes) -> npt.NDArray[np.uint8]:
    """Image bytes in any format Pillow reads (PNG, JPEG, ...) -> (h, w, 3) uint8 RGB.

    Transparency is dropped, palette and grey pictures are expanded; the first frame of an
    animation is used. Empty, truncated, corrupt or oversized (decompression bomb) payloads
    raise `ImageError`.
    """
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise ImageError(f"the image is too large to decode safely: {exc}") from exc
    # Pillow reports unreadable input as OSError (UnidentifiedImageError, truncated data),
    # ValueError, or SyntaxError (a broken PNG chunk).
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(
            f"the image cannot be decoded ({len(data)} bytes, starting {data[:8]!r}): {exc}"
        ) from exc
    return np.asarray(rgb, dtype=np.uint8)


def _quote(url: str | httpx.URL, *, keep_query: bool = True) -> str:
    """A URL fit for an error message: no user:password part, at most URL_QUOTE_CHARS long.

    ``keep_query=False`` shows the query as ``?...``: on hosts other than Label Studio it may
    hold a signature (presigned cloud-storage URLs).
    """
    text = str(url)
    if text[:5].lower() == "data:":
        return "a data: URL"
    try:
        parsed = httpx.URL(text)
        if parsed.userinfo:
            parsed = parsed.copy_with(userinfo=b"")
        if parsed.query and not keep_query:
            parsed = parsed.copy_with(query=None)
            text = str(parsed) + "?..."
        else:
            text = str(parsed)
    except httpx.InvalidURL:
        pass
    if len(text) > URL_QUOTE_CHARS:
        text = text[:URL_QUOTE_CHARS] + "..."
    return text


def _decode_data_url(value: str) -> bytes:
    header, comma, payload = value.partition(",")
    if not comma:
        raise ImageError("the data: URL has no ',' before its payload")
    params = [p.strip().lower() for p in header[len("data:") :].split(";")]
    if "base64" in params:
        try:
            return base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageError(f"the data: URL holds invalid base64: {exc}") from exc
    return urllib.parse.unquote_to_bytes(payload)


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, url.port if url.port is not None else default


def _resolve(value: str, label_studio_url: str | None) -> httpx.URL:
    if value.startswith("/") and not value.startswith("//"):
        if not label_studio_url:
            raise ImageError(
                f"the image {_quote(value)} is a Label Studio URL; set LABEL_STUDIO_URL (and "
                "LABEL_STUDIO_API_KEY) so that the backend can download it"
            )
        try:
            return httpx.URL(label_studio_url.rstrip("/") + value)
        except httpx.InvalidURL as exc:
            raise ImageError(f"the image URL {_quote(value)} is not valid: {exc}") from exc
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL as exc:
        raise ImageError(f"the image reference {_quote(value)} is not a valid URL: {exc}") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise ImageError(
            f"the image reference {_quote(value)} is not supported: expected a data: URL, an "
            "http(s) URL or a Label Studio URL starting with /data/"
        )
    return url


def _hint(status: int, on_label_studio: bool, url: httpx.URL) -> str:
    if not on_label_studio:
        return ""
    if status in (401, 403):
        return " (check LABEL_STUDIO_API_KEY: Label Studio refused the token)"
    if status == 404 and url.path.startswith("/data/local-files"):
        return (
            " (Label Studio serves local files only under a local storage that covers their "
            "folder, with LOCAL_FILES_SERVING_ENABLED=true)"
        )
    return ""


def _download(
    url: httpx.URL,
    client: httpx.Client,
    label_studio: httpx.URL | None,
    api_key: str | None,
    max_bytes: int,
) -> bytes:
    for _ in range(MAX_REDIRECTS + 1):
        on_label_studio = label_studio is not None and _origin(url) == _origin(label_studio)
        headers: Mapping[str, str] = (
            {"Authorization": f"Token {api_key}"} if on_label_studio and api_key else {}
        )
        shown = _quote(url, keep_query=on_label_studio)
        if url.scheme not in ("http", "https"):
            raise ImageError(f"could not fetch image {shown}: redirected to a non-http(s) URL")
        try:
            with client.stream("GET", url, headers=headers, follow_redirects=False) as response:
                if response.is_redirect:
                    url = response.url.join(response.headers["Location"])
                    continue
                if response.status_code >= 400:
                    raise ImageError(
                        f"could not fetch image {shown}: HTTP {response.status_code} "
                        f"{response.reason_phrase}{_hint(response.status_code, on_label_studio, url)}"
                    )
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise ImageError(
                        f"the image {shown} is {declared} bytes, over the {max_bytes} limit"
                    )
                chunks: list[bytes] = []
                size = 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise ImageError(f"the image {shown} is over the {max_bytes}-byte limit")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.InvalidURL as exc:
            raise ImageError(f"a redirect from {shown} points at an invalid URL: {exc}") from exc
        except httpx.TimeoutException as exc:
            raise ImageError(f"timed out fetching image {shown}") from exc
        except httpx.HTTPError as exc:
            # The message of a transport error names the URL at most, never request headers.
            raise ImageError(f"could not fetch image {shown}: {type(exc).__name__}: {exc}") from exc
    raise ImageError(f"more than {MAX_REDIRECTS} redirects fetching image {shown}")


def fetch_image(
    value: str,
    client: httpx.Client,
    *,
    label_studio_url: str | None,
    api_key: str | None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> bytes:
    """The raw bytes of the picture a task's image value points at (see the module docstring).

    ``label_studio_url`` is the Label Studio base URL (e.g. ``http://127.0.0.1:8080``); without
    it, relative URLs are an `ImageError` asking to set LABEL_STUDIO_URL. Timeouts come from
    ``client``. Redirects are followed (at most MAX_REDIRECTS), the token only to Label Studio.
    """
    if not isinstance(value, str) or not value.strip():
        raise ImageError(f"the task's image value must be a non-empty string, got {value!r:.80}")
    value = value.strip()
    if value[:5].lower() == "data:":
        return _decode_data_url(value)
    label_studio: httpx.URL | None = None
    if label_studio_url:
        try:
            label_studio = httpx.URL(label_studio_url)
        except httpx.InvalidURL as exc:
            raise ImageError(f"LABEL_STUDIO_URL {label_studio_url!r} is not a valid URL") from exc
        if label_studio.scheme not in ("http", "https") or not label_studio.host:
            raise ImageError(f"LABEL_STUDIO_URL {label_studio_url!r} is not an http(s) URL")
    url = _resolve(value, label_studio_url)
    return _download(url, client, label_studio, api_key, max_bytes)


def model_input(
    value: str,
    client: httpx.Client,
    *,
    label_studio_url: str | None,
    api_key: str | None,
    size: int,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> npt.NDArray[np.uint8]:
    """A task's image value -> (size, size) uint8 die codes, the classifier's input.

    For a picture drawn by `backend.encoding.render_picture` this equals
    ``resize_nearest(die_map, size)`` of the die map it was drawn from.
    """
    data = fetch_image(
        value, client, label_studio_url=label_studio_url, api_key=api_key, max_bytes=max_bytes
    )
    return resize_nearest(codes_from_picture(read_picture(data)), size)
