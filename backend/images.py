"""Wafer-map pictures in and out: PNG bytes, data URLs, and fetching the image a task points at.

Layer L1 (httpx + Pillow). A Label Studio task names its picture in one of these ways:

- a ``data:image/png;base64,...`` URL, decoded here without any network access;
- a Label Studio URL: relative (``/data/upload/...``, ``/data/local-files/?d=...``,
  ``/storage-data/uploaded/?filepath=...``, ``/tasks/<id>/resolve/?fileuri=...`` for cloud
  storage), resolved against LABEL_STUDIO_URL, or absolute on its origin. Only those picture
  paths: never Label Studio's API, even though the backend holds a token for it;
- an ``http(s)://`` URL on a host the operator lists in WAFER_IMAGE_HOSTS.

Redirects are followed (at most MAX_REDIRECTS) and every hop is checked again: on the Label
Studio origin only the picture paths, judged on the raw path as it is sent (a dot segment or a
backslash, percent-encoded or not, is refused before any request: a server or proxy that
decodes ``%2e%2e`` would otherwise serve the API to a picture path); elsewhere, unless the
host is listed, only hosts whose every address is public (`backend.addresses.refusal`: no
loopback, private, link-local, site-local, ...), so an image URL can never make the backend
read an internal service. The API token
(``Authorization: Token <api_key>``) goes only to the Label Studio origin (scheme, host, port),
re-checked at every redirect, so a presigned cloud-storage URL never sees it.

Bounds (`ImageRules`, from the WAFER_IMAGE_* settings): the whole download, redirects included,
ends by a deadline (not a timeout per read); at most ``max_bytes`` are read. Decoding has a
budget, checked BEFORE a decoder runs:

- per picture: its pixel count, read from its header (WAFER_IMAGE_MAX_PIXELS, 1024 x 1024 by
  default: 7 times the largest picture `backend.encoding.render_picture` draws, 384 x 384), and
  its structure (`backend.picture_structure`: JPEG scans, frames, chunks and segments), so that
  no picture costs much more than its pixels; only PNG, JPEG, GIF, WebP and BMP (what a browser
  shows in Label Studio) are decoded;
- per request: inside `request_pixel_budget` (`backend.predictions.predict_tasks` opens one
  for each /predict), the pixels handed to a general decoder are summed, and past
  WAFER_REQUEST_MAX_PIXELS the remaining tasks get an `ImageError` each, without a download.
  Our own palette PNGs are read without a decoder (`backend.encoding.palette_png_codes`, under
  1 ns a pixel against 15-30 ns for Pillow) and are not counted.

Why counts and not a clock: every cost driver found (pixels, scans, parts walked in Python) is
read from the bytes in microseconds, so a refusal is certain, immediate and the same on every
machine, and the common path needs no helper process. A decoder bug with a cost driver not
listed here would not be stopped; a pool of decoder processes with a hard timeout is the next
step if pictures from outside the fab ever reach the backend.

Every failure, whatever a decoder raises, is an `ImageError` naming the picture and the reason,
never the token, the answer's bytes or size, or a URL's query string (a presigned signature) on
other hosts. Its message shows control characters escaped (`escape_controls`): a picture value
is task data, and a line break in it must not forge a log line.

With a client from `backend.image_client.image_client` the address check happens at connection
time on the address actually connected to (no DNS rebinding) and the deadline cuts a read in
the middle; with any other `httpx.Client` this module checks each hop's addresses itself (one
resolution before the request) and the deadline is checked between reads.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import re
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial

import httpx
import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from backend.addresses import AddressRefusedError, check_addresses, host_listed
from backend.encoding import (
    PALETTE,
    codes_from_picture,
    palette_png,
    palette_png_codes,
    sample_positions,
)
from backend.image_client import (
    REFUSED,
    ImageClient,
    Resolver,
    download_deadline,
    redact_url_logging,
    shared_image_client,
    system_resolver,
)
from backend.picture_structure import (
    STRUCTURE_LIMITS,
    StructureLimits,
    StructureRefusedError,
    picture_structure,
)
from backend.settings import Settings

#: Redirects followed before giving up.
MAX_REDIRECTS = 5
#: How much of a URL an error message quotes.
URL_QUOTE_CHARS = 200
#: Picture formats decoded (Pillow names): those a browser shows, so Label Studio can too.
ACCEPTED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")
#: The die palette as a PNG PLTE chunk holds it (RGB triples).
_PALETTE_BYTES = PALETTE.tobytes()
#: Paths on the Label Studio origin that serve pictures (below LABEL_STUDIO_URL's own path).
LABEL_STUDIO_PICTURE_PATHS = re.compile(
    r"/data/upload/.+|/data/local-files/?|/storage-data/uploaded/?"
    r"|/(?:tasks|projects)/\d+/(?:resolve|presign)/?"
)
#: Percent-decodings of a Label Studio path checked for dot segments; more is refused.
PATH_DECODINGS = 4


def escape_controls(text: str) -> str:
    """``text`` with every character that is not printable (line breaks, escape sequences,
    bidirectional overrides, ...) written as a Python escape (``\\n``, ``\\x1b``,
    ``\\u202e``): fit for one log line, whatever a task's data held."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


class ImageError(ValueError):
    """A task's picture cannot be fetched or decoded; the message says which and why, with
    control characters escaped (`escape_controls`), so it is safe to log or store."""

    def __init__(self, message: str) -> None:
        super().__init__(escape_controls(message))


@dataclass(frozen=True)
class ImageRules:
    """Where pictures may come from and how much one may cost (the WAFER_IMAGE_* settings and
    WAFER_REQUEST_MAX_PIXELS).

    The defaults leave a wide margin over Label Studio wafer pictures (at most 384 x 384 pixels,
    a few kilobytes): 1024 x 1024 costs ~25 ms and ~4 MB to decode with Pillow.
    ``request_max_pixels`` applies inside `request_pixel_budget` only; ``structure`` bounds
    what a picture's container may hold (`backend.picture_structure`).
    """

    allowed_hosts: tuple[str, ...] = ()
    max_pixels: int = Settings.image_max_pixels
    max_bytes: int = Settings.image_max_bytes
    timeout_s: float = Settings.image_timeout_s
    request_max_pixels: int = Settings.request_max_pixels
    structure: StructureLimits = STRUCTURE_LIMITS

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageRules:
        return cls(
            allowed_hosts=settings.image_hosts,
            max_pixels=settings.image_max_pixels,
            max_bytes=settings.image_max_bytes,
            timeout_s=settings.image_timeout_s,
            request_max_pixels=settings.request_max_pixels,
        )


@dataclass
class PixelBudget:
    """The pixels handed to a general decoder for one request so far (`request_pixel_budget`);
    once a picture would pass the limit, it and every later one are refused. One request's
    tasks are read one after the other, in one thread."""

    spent: int = 0
    exhausted: bool = False

    def refusal(self, limit: int) -> ImageError:
        return ImageError(
            f"not decoded: the pictures of this request reached the {limit:,}-pixel budget "
            "for decoding (WAFER_REQUEST_MAX_PIXELS); ask for this task's prediction again in "
            "a smaller request"
        )

    def check(self, limit: int) -> None:
        """Refuse at once (no download) when the budget is spent."""
        if self.exhausted:
            raise self.refusal(limit)

    def spend(self, pixels: int, limit: int) -> None:
        """Count a picture of ``pixels`` about to be decoded, or refuse it."""
        if self.exhausted or self.spent + pixels > limit:
            self.exhausted = True
            raise self.refusal(limit)
        self.spent += pixels


_REQUEST_BUDGET: ContextVar[PixelBudget | None] = ContextVar("picture_budget", default=None)


@contextlib.contextmanager
def request_pixel_budget() -> Iterator[PixelBudget]:
    """Within the block, `model_input` charges every picture it hands to a general decoder to
    one new `PixelBudget`, limited by its rules' ``request_max_pixels``. Outside any such block
    (the worker's jobs, the CLI) no request budget applies."""
    budget = PixelBudget()
    token = _REQUEST_BUDGET.set(budget)
    try:
        yield budget
    finally:
        _REQUEST_BUDGET.reset(token)


def png_bytes(picture: npt.NDArray[np.uint8]) -> bytes:
    """A picture -> lossless PNG bytes.

    ``picture`` is either (h, w) palette indices as `backend.encoding.render_picture` draws
    them, written by `backend.encoding.palette_png` as a 2-bit palette PNG with the die palette
    (the annotator sees the same colours as in `picture_colours`; drawing and encoding took
    12-14x less time than RGB in `python -m backend bench`, and `model_input` samples its rows
    without a general decoder), or (h, w, 3) uint8 RGB, written as an RGB PNG.
    """
    if picture.dtype == np.uint8 and picture.ndim == 2:
        return palette_png(picture)
    if picture.ndim != 3 or picture.shape[2] != 3 or picture.dtype != np.uint8:
        raise ValueError(
            "expected (h, w) uint8 palette indices or a (h, w, 3) uint8 RGB picture, got "
            f"{picture.shape} {picture.dtype}"
        )
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(picture), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(png: bytes) -> str:
    """PNG bytes -> ``data:image/png;base64,...`` (what a task's image field may hold)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _ours(image: Image.Image) -> bool:
    """Whether a loaded picture is a palette PNG without transparency whose palette starts
    with `PALETTE`: then its indices below len(PALETTE) are die codes."""
    palette = image.palette
    return (
        image.format == "PNG"
        and image.mode == "P"
        and "transparency" not in image.info
        and palette is not None
        and palette.mode == "RGB"
        and bytes(palette.palette[: len(_PALETTE_BYTES)]) == _PALETTE_BYTES
    )


def _decode(
    data: bytes,
    *,
    max_pixels: int,
    formats: Sequence[str] | None,
    die_codes: bool,
    limits: StructureLimits,
    spend: Callable[[int], None] | None,
) -> npt.NDArray[np.uint8]:
    """Image bytes -> (h, w, 3) uint8 RGB or, with ``die_codes`` and a picture `_ours` whose
    every index is a die code, its (h, w) indices (no RGB conversion). See `read_picture`."""
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    what = "the picture"
    try:
        structure = picture_structure(data, limits)
    except StructureRefusedError as exc:
        raise ImageError(f"{exc}: refused before decoding") from None
    if structure is not None:
        what = f"the {structure.format} picture"
        if structure.pixels > max_pixels:  # from the header, before a decoder opens it
            raise ImageError(
                f"{what} has more than {max_pixels:,} pixels (the WAFER_IMAGE_MAX_PIXELS "
                "limit): refused before decoding"
            )
    try:
        with Image.open(
            io.BytesIO(data), formats=None if formats is None else tuple(formats)
        ) as image:
            what = f"the {image.format} picture" if image.format else what
            width, height = image.size
            if width < 1 or height < 1:
                raise ImageError(f"{what} has no pixels")
            if width * height > max_pixels:
                raise ImageError(
                    f"{what} has more than {max_pixels:,} pixels (the "
                    "WAFER_IMAGE_MAX_PIXELS limit): refused before decoding"
                )
            if spend is not None:
                spend(width * height)
            pixels: npt.NDArray[np.uint8] | None = None
            if die_codes and image.format == "PNG" and image.mode == "P":
                image.load()
                if _ours(image):
                    indices = np.asarray(image, dtype=np.uint8)
                    if indices.ndim == 2 and int(indices.max()) < len(PALETTE):
                        pixels = indices
            if pixels is None:
                pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(
            f"{what} is far over the {max_pixels:,}-pixel limit: refused before decoding"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(
            f"the answer is not a picture in an accepted format ({', '.join(formats or ['any'])})"
        ) from exc
    # Pillow's decoders, on corrupt input, raise OSError, ValueError, SyntaxError, EOFError,
    # struct.error, NotImplementedError, IndexError, MemoryError, ... whatever the bytes are,
    # that is this picture's fault, never a reason to fail the batch it is in. The decoder's
    # own message is left out: it may quote bytes of the answer.
    except Exception as exc:  # decoder failures of every kind (see above)
        raise ImageError(f"{what} cannot be decoded ({type(exc).__name__})") from exc
    shape_ok = pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)
    if not shape_ok or pixels.shape[0] * pixels.shape[1] > max_pixels or pixels.size == 0:
        raise ImageError(f"{what} decoded to an unexpected shape {pixels.shape}")
    return pixels


def read_picture(
    data: bytes,
    *,
    max_pixels: int = ImageRules.max_pixels,
    formats: Sequence[str] | None = ACCEPTED_FORMATS,
    limits: StructureLimits = STRUCTURE_LIMITS,
) -> npt.NDArray[np.uint8]:
    """Image bytes -> (h, w, 3) uint8 RGB; anything else is an `ImageError`.

    Before a pixel is decoded, the picture's structure is checked against ``limits``
    (`backend.picture_structure.picture_structure`: a progressive JPEG of 20,000 scans, an
    animation, a flood of chunks are refused), then its size from the header (Pillow's
    ``Image.open`` decodes nothing yet) against ``max_pixels``, so a 10 kB PNG of 9459 x 9459
    pixels costs nothing. ``formats``: Pillow format names tried (None: every format Pillow
    knows; the structure of those beyond PNG, JPEG, GIF, WebP and BMP is not checked).
    Transparency is dropped, palette and grey pictures are expanded.
    """
    return _decode(
        data, max_pixels=max_pixels, formats=formats, die_codes=False, limits=limits, spend=None
    )


def picture_codes(
    data: bytes,
    size: int,
    *,
    max_pixels: int = ImageRules.max_pixels,
    formats: Sequence[str] | None = ACCEPTED_FORMATS,
    limits: StructureLimits = STRUCTURE_LIMITS,
    spend: Callable[[int], None] | None = None,
) -> npt.NDArray[np.uint8]:
    """Image bytes -> (size, size) uint8 die codes: the picture sampled at the model's grid
    (`backend.encoding.sample_positions`), each sample given its die code.

    Three ways, the first that applies:

    1. a PNG exactly as `png_bytes` writes a palette picture: its rows are inflated and the
       sampled indices read (`backend.encoding.palette_png_codes`), no image decoder at all;
    2. another palette PNG whose palette starts with the die palette and whose every index is
       a die code (e.g. ours re-saved by an image tool): Pillow decodes the indices, with no
       RGB conversion and no colour matching;
    3. any other picture (the RGB PNGs drawn before, a JPEG, a palette of other colours):
       converted to RGB as `read_picture` does, and the sampled pixels matched to the nearest
       palette colour, as always.

    All three give the same codes for the same wafer. The limits hold for each way: way 1
    takes only PNGs within ``max_pixels`` (anything else goes on to Pillow, which refuses it
    or raises an `ImageError` as `read_picture` does). ``spend`` is called with the pixel count
    of a picture that ways 2 and 3 are about to decode, after every other check; it raises an
    `ImageError` to refuse it (`PixelBudget.spend`).
    """
    if formats is None or "PNG" in formats:
        codes = palette_png_codes(data, size, max_pixels)
        if codes is not None:
            return codes
    pixels = _decode(
        data, max_pixels=max_pixels, formats=formats, die_codes=True, limits=limits, spend=spend
    )
    rows = sample_positions(pixels.shape[0], size)
    cols = sample_positions(pixels.shape[1], size)
    sampled = pixels[rows[:, None], cols[None, :]]
    if pixels.ndim == 2:
        return sampled
    return codes_from_picture(sampled)


def _quote(url: str | httpx.URL, *, keep_query: bool = True) -> str:
    """A URL fit for an error message: no user:password part, at most URL_QUOTE_CHARS long,
    control characters escaped.

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
    return escape_controls(text)


def _decode_data_url(value: str, max_bytes: int) -> bytes:
    header, comma, payload = value.partition(",")
    if not comma:
        raise ImageError("the data: URL has no ',' before its payload")
    if len(payload) > 3 * max_bytes + 16:  # even percent-encoded, it cannot fit
        raise ImageError(f"the data: URL holds more than the {max_bytes:,}-byte limit")
    params = [p.strip().lower() for p in header[len("data:") :].split(";")]
    if "base64" in params:
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageError(f"the data: URL holds invalid base64: {exc}") from exc
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise ImageError(f"the data: URL holds more than the {max_bytes:,}-byte limit")
    return data


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


def _path_refusal(url: httpx.URL) -> str | None:
    """Why the path of ``url`` may not be sent to Label Studio, or None.

    The check reads the raw path, as it goes on the wire, and each percent-decoding of it (a
    server, a proxy or a framework may decode once or more before it resolves the path): a dot
    segment (``..``, ``%2e%2e``, ``%252e%252e``, ``..%2f``), a backslash (a separator to some
    servers) or a control character at any stage is refused, as is a path still changing after
    PATH_DECODINGS decodings. The query is not looked at (``?d=`` of local files is resolved by
    Label Studio itself, inside its document root)."""
    text = url.raw_path.partition(b"?")[0].decode("ascii", "replace")
    for _ in range(PATH_DECODINGS):
        if "\\" in text:
            return "a backslash"
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
            return "a control character"
        if any(segment in (".", "..") for segment in text.split("/")):
            return "a dot segment ('.' or '..')"
        decoded = urllib.parse.unquote(text)
        if decoded == text:
            return None
        text = decoded
    return f"a path still encoded after {PATH_DECODINGS} decodings"


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


@dataclass(frozen=True)
class _Source:
    """What one download may reach: Label Studio, the listed hosts, how to resolve others."""

    label_studio: httpx.URL | None
    api_key: str | None
    rules: ImageRules
    resolver: Resolver
    checked_by_client: bool

    def on_label_studio(self, url: httpx.URL) -> bool:
        return self.label_studio is not None and _origin(url) == _origin(self.label_studio)

    def check(self, url: httpx.URL, shown: str, redirected_from: str | None) -> None:
        """Refuse ``url`` unless it is a picture path on Label Studio, on a listed host, or
        (after a redirect) on a host with only public addresses."""
        if url.scheme not in ("http", "https"):
            raise ImageError(
                f"could not fetch image {redirected_from}: redirected to a non-http(s) URL"
            )
        label_studio = self.label_studio
        if label_studio is not None and _origin(url) == _origin(label_studio):
            refused = _path_refusal(url)
            if refused is not None:
                where = (
                    shown
                    if redirected_from is None
                    else f"{shown} (redirected from {redirected_from})"
                )
                raise ImageError(
                    f"the image {where} is on Label Studio with {refused} in its path, "
                    "percent-encoded or not: refused before any request (the backend reads "
                    "pictures, never the API)"
                )
            base = label_studio.path.rstrip("/")
            path = url.path
            inside = path.startswith(base + "/") if base else True
            if not (inside and LABEL_STUDIO_PICTURE_PATHS.fullmatch(path[len(base) :])):
                if redirected_from is None:
                    raise ImageError(
                        f"the image {shown} is on Label Studio but not a picture path "
                        "(/data/upload/, /data/local-files/, /storage-data/uploaded/, "
                        "/tasks/<id>/resolve/): the backend reads pictures, never the API"
                    )
                raise ImageError(
                    f"Label Studio redirected {redirected_from} to {url.path}, not a picture "
                    "(a login page? check LABEL_STUDIO_API_KEY)"
                )
            return
        if host_listed(url.host, self.rules.allowed_hosts):
            return
        if redirected_from is None:
            raise ImageError(
                f"the image {shown} is neither on Label Studio (LABEL_STUDIO_URL) nor on a host "
                "listed in WAFER_IMAGE_HOSTS"
            )
        if self.checked_by_client:
            return
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            check_addresses(url.host, self.resolver(url.host, port))
        except OSError as exc:
            raise ImageError(f"could not fetch image {shown}: cannot resolve {url.host}") from exc
        except AddressRefusedError as exc:
            raise ImageError(f"a redirect from {redirected_from} was refused: {exc}") from exc


def _download(url: httpx.URL, client: httpx.Client, source: _Source) -> bytes:
    rules = source.rules
    deadline = time.monotonic() + rules.timeout_s
    first = shown = _quote(url, keep_query=source.on_label_studio(url))
    redirected_from: str | None = None
    with download_deadline(deadline):
        for _ in range(MAX_REDIRECTS + 1):
            on_label_studio = source.on_label_studio(url)
            shown = _quote(url, keep_query=on_label_studio)
            source.check(url, shown, redirected_from)
            # No compression: the byte limit then counts what the decoder gets, and a small
            # gzip answer cannot expand into gigabytes (raw bytes are read, never inflated).
            headers: dict[str, str] = {"Accept-Encoding": "identity"}
            if on_label_studio and source.api_key:
                headers["Authorization"] = f"Token {source.api_key}"
            late = ImageError(
                f"could not fetch image {shown}: no complete answer within "
                f"{rules.timeout_s:g} s (WAFER_IMAGE_TIMEOUT)"
            )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise late
            try:
                with client.stream(
                    "GET", url, headers=headers, follow_redirects=False, timeout=remaining
                ) as response:
                    if response.is_redirect and "Location" in response.headers:
                        redirected_from = shown
                        url = response.url.join(response.headers["Location"])
                        continue
                    if response.status_code >= 400 or response.is_redirect:
                        raise ImageError(
                            f"could not fetch image {shown}: HTTP {response.status_code} "
                            f"{response.reason_phrase}"
                            f"{_hint(response.status_code, on_label_studio, url)}"
                        )
                    too_big = ImageError(
                        f"the image {shown} is over the {rules.max_bytes:,}-byte limit "
                        "(WAFER_IMAGE_MAX_MB)"
                    )
                    declared = response.headers.get("Content-Length", "")
                    if declared.isdigit() and int(declared) > rules.max_bytes:
                        raise too_big
                    chunks: list[bytes] = []
                    size = 0
                    # An answer already in memory (httpx.MockTransport) is not streamed again.
                    raw = [response.content] if response.is_stream_consumed else response.iter_raw()
                    for chunk in raw:
                        size += len(chunk)
                        if size > rules.max_bytes:
                            raise too_big
                        if time.monotonic() > deadline:
                            raise late
                        chunks.append(chunk)
                    return b"".join(chunks)
            except httpx.InvalidURL as exc:
                raise ImageError(f"a redirect from {shown} points at an invalid URL") from exc
            except httpx.TimeoutException as exc:
                raise late from exc
            except httpx.HTTPError as exc:
                # Refusals by the client's address check say why; other failures say nothing
                # of the connection (refused, reset, ...): no port scanning through pictures.
                reason = str(exc) if str(exc).startswith(REFUSED) else "the connection failed"
                hint = " (is Label Studio running at LABEL_STUDIO_URL?)" if on_label_studio else ""
                raise ImageError(f"could not fetch image {shown}: {reason}{hint}") from exc
    raise ImageError(f"more than {MAX_REDIRECTS} redirects fetching image {first}")


def fetch_image(
    value: str,
    client: httpx.Client,
    *,
    label_studio_url: str | None,
    api_key: str | None,
    rules: ImageRules = ImageRules(),
    resolver: Resolver = system_resolver,
) -> bytes:
    """The raw bytes of the picture a task's image value points at (see the module docstring).

    ``label_studio_url`` is the Label Studio base URL (e.g. ``http://127.0.0.1:8080``); without
    it, relative URLs are an `ImageError` asking to set LABEL_STUDIO_URL. ``resolver`` resolves
    redirect targets when ``client`` is not an `ImageClient` (which checks on its own).
    """
    if not isinstance(value, str) or not value.strip():
        raise ImageError(f"the task's image value must be a non-empty string, got {value!r:.80}")
    value = value.strip()
    if value[:5].lower() == "data:":
        return _decode_data_url(value, rules.max_bytes)
    label_studio: httpx.URL | None = None
    if label_studio_url:
        try:
            label_studio = httpx.URL(label_studio_url)
        except httpx.InvalidURL as exc:
            raise ImageError(f"LABEL_STUDIO_URL {label_studio_url!r} is not a valid URL") from exc
        if label_studio.scheme not in ("http", "https") or not label_studio.host:
            raise ImageError(f"LABEL_STUDIO_URL {label_studio_url!r} is not an http(s) URL")
    url = _resolve(value, label_studio_url)
    checked = isinstance(client, ImageClient)
    if not checked:
        redact_url_logging()
    return _download(url, client, _Source(label_studio, api_key, rules, resolver, checked))


def model_input(
    value: str,
    client: httpx.Client,
    *,
    label_studio_url: str | None,
    api_key: str | None,
    size: int,
    rules: ImageRules = ImageRules(),
    resolver: Resolver = system_resolver,
) -> npt.NDArray[np.uint8]:
    """A task's image value -> (size, size) uint8 die codes, the classifier's input.

    For a picture drawn by `backend.encoding.render_picture` (a palette PNG now, an RGB PNG
    before) this equals ``resize_nearest(die_map, size)`` of the die map it was drawn from. The
    bytes are read by `picture_codes`: a palette PNG of ours without an image decoder, anything
    else with only the size x size sampled pixels matched to the palette. Inside
    `request_pixel_budget`, a picture for a general decoder is charged to the request's budget
    (``rules.request_max_pixels``), and once that is spent the value is refused undownloaded.
    """
    budget = _REQUEST_BUDGET.get()
    spend: Callable[[int], None] | None = None
    if budget is not None:
        budget.check(rules.request_max_pixels)
        spend = partial(budget.spend, limit=rules.request_max_pixels)
    data = fetch_image(
        value,
        client,
        label_studio_url=label_studio_url,
        api_key=api_key,
        rules=rules,
        resolver=resolver,
    )
    return picture_codes(
        data, size, max_pixels=rules.max_pixels, limits=rules.structure, spend=spend
    )


def picture_reader(
    settings: Settings, size: int, client: httpx.Client | None = None
) -> partial[npt.NDArray[np.uint8]]:
    """A task's image value -> (size, size) die codes (`model_input`), within the WAFER_IMAGE_*
    limits, with the Label Studio token sent only to LABEL_STUDIO_URL. The one picture reader of
    the backend's /predict and the worker's jobs: pictures are downloaded with the process's
    `shared_image_client` (connections checked and pinned, a deadline per download) unless
    `client` already is such a guarded client."""
    http = (
        client
        if isinstance(client, ImageClient)
        else shared_image_client(settings.label_studio_url, settings.image_hosts)
    )
    return partial(
        model_input,
        client=http,
        label_studio_url=settings.label_studio_url,
        api_key=settings.label_studio_api_key or None,
        size=size,
        rules=ImageRules.from_settings(settings),
    )
