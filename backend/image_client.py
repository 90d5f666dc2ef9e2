"""The HTTP client that downloads task pictures: every connection checked and pinned. Layer L1.

`image_client` makes an `httpx.Client` whose connections go through `GuardedNetwork`, an httpcore
network backend that, for every new connection:

- lets Label Studio's own origin (host and port of LABEL_STUDIO_URL) and the hosts listed in
  WAFER_IMAGE_HOSTS connect wherever they resolve (Label Studio usually runs on loopback or a
  private network);
- resolves any other host ONCE with the injected resolver, refuses it unless every address is
  public (`backend.addresses.refusal`), and connects to the address it checked, so a DNS answer
  that changes between the check and the connection (DNS rebinding) cannot reach an internal
  address;
- clamps every connect, read and write to the deadline of the running download
  (`download_deadline`), so a server that dribbles a byte every few seconds is cut at the
  deadline, not after one timeout per read.

Proxy environment variables are ignored (a proxy would hide the address actually reached);
SSL_CERT_FILE / SSL_CERT_DIR are honoured. Known limit: the system resolver (getaddrinfo) has no
timeout of its own, so a hanging DNS server can hold a download past its deadline.

`redact_url_logging` keeps query strings (presigned signatures) and user:password parts of URLs
out of the log lines of httpx and httpcore, at every level; `image_client` installs it.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import re
import socket
import ssl
import time
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar

import httpcore
import httpx

from backend.addresses import AddressRefusedError, IPAddress, check_addresses, host_listed

#: (host, port) -> the addresses it resolves to. Tests inject a stub; the default asks the system.
Resolver = Callable[[str, int], Sequence[IPAddress]]

#: Start of the message of a connection refused by the address check (kept in error messages).
REFUSED = "refused"

_DEADLINE: ContextVar[float | None] = ContextVar("image_download_deadline", default=None)

#: Loggers that print request URLs or connection details (httpx: "HTTP Request: GET <url>").
HTTP_LOGGERS = (
    "httpx",
    "httpcore",
    "httpcore.connection",
    "httpcore.connection_pool",
    "httpcore.http11",
    "httpcore.http2",
    "httpcore.proxy",
    "httpcore.socks",
)


def system_resolver(host: str, port: int) -> list[IPAddress]:
    """The addresses ``getaddrinfo`` gives for ``host`` (no timeout of its own), in its order."""
    found: list[IPAddress] = []
    for *_, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        address = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
        if address not in found:
            found.append(address)
    return found


@contextlib.contextmanager
def download_deadline(deadline: float) -> Iterator[None]:
    """Within the block, every socket operation of a `GuardedNetwork` ends by ``deadline``
    (a `time.monotonic` value)."""
    token = _DEADLINE.set(deadline)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def _clamp(timeout: float | None, expired: type[Exception]) -> float | None:
    deadline = _DEADLINE.get()
    if deadline is None:
        return timeout
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise expired("the download deadline has passed")
    return remaining if timeout is None else min(timeout, remaining)


class _DeadlineStream(httpcore.NetworkStream):
    """A network stream whose every operation is clamped to the current download deadline."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _clamp(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _clamp(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(
            ssl_context, server_hostname, _clamp(timeout, httpcore.ConnectTimeout)
        )
        return _DeadlineStream(inner)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class GuardedNetwork(httpcore.NetworkBackend):
    """httpcore's network backend with the address check and deadline of the module docstring.

    ``trusted_origins`` are (host, port) pairs connected to without a check (Label Studio);
    ``trusted_hosts`` are host patterns (`backend.addresses.host_listed`) trusted on any port.
    """

    def __init__(
        self,
        trusted_origins: Iterable[tuple[str, int]],
        trusted_hosts: Sequence[str],
        resolver: Resolver = system_resolver,
    ) -> None:
        self._origins = {(host.lower(), port) for host, port in trusted_origins}
        self._hosts = tuple(trusted_hosts)
        self._resolver = resolver
        self._inner = httpcore.SyncBackend()

    def trusted(self, host: str, port: int) -> bool:
        return (host.lower(), port) in self._origins or host_listed(host, self._hosts)

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        if self.trusted(host, port):
            targets = [host]
        else:
            try:
                addresses = self._resolver(host, port)
            except OSError as exc:
                raise httpcore.ConnectError(f"cannot resolve {host}") from exc
            try:
                targets = [str(a) for a in check_addresses(host, addresses)]
            except AddressRefusedError as exc:
                raise httpcore.ConnectError(f"{REFUSED}: {exc}") from exc
        failure: Exception = httpcore.ConnectError(f"cannot connect to {host}")
        for target in targets:
            try:
                stream = self._inner.connect_tcp(
                    target,
                    port,
                    _clamp(timeout, httpcore.ConnectTimeout),
                    local_address,
                    socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
                continue
            return _DeadlineStream(stream)
        raise failure

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("pictures are not fetched over unix sockets")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class ImageClient(httpx.Client):
    """An `httpx.Client` built by `image_client`: its connections are checked and pinned, so
    callers need not resolve and check hosts themselves."""


class _GuardedTransport(httpx.HTTPTransport):
    def __init__(self, network: GuardedNetwork) -> None:
        super().__init__(trust_env=False)
        # httpx builds its pool without a way to pass a network backend; this one adds ours.
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=True),
            max_connections=20,
            max_keepalive_connections=10,
            keepalive_expiry=5.0,
            network_backend=network,
        )


def image_client(
    label_studio_url: str | None,
    allowed_hosts: Sequence[str] = (),
    *,
    resolver: Resolver = system_resolver,
    timeout: float = 30.0,
) -> ImageClient:
    """A client for task pictures (see the module docstring); installs `redact_url_logging`.

    ``timeout`` bounds each connect/read; the whole download is bounded by the deadline that
    `backend.images` sets around it.
    """
    origins: list[tuple[str, int]] = []
    if label_studio_url:
        url = httpx.URL(label_studio_url)
        port = url.port or {"http": 80, "https": 443}.get(url.scheme, 0)
        origins.append((url.host, port))
    network = GuardedNetwork(origins, allowed_hosts, resolver)
    redact_url_logging()
    return ImageClient(transport=_GuardedTransport(network), timeout=timeout, trust_env=False)


@functools.lru_cache(maxsize=8)
def shared_image_client(
    label_studio_url: str | None, allowed_hosts: tuple[str, ...]
) -> ImageClient:
    """One `image_client` per (Label Studio URL, allowed hosts) for the life of the process,
    shared by threads (httpx clients are thread-safe): the backend's and worker's client."""
    return image_client(label_studio_url, allowed_hosts)


_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@'\"<>]*@")
_QUERY = re.compile(r"(?P<keep>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#'\"<>]*)\?[^\s'\"<>#]*")


def redact_urls(text: str) -> str:
    """``text`` with every URL's query string replaced by ``?...`` and user:password dropped."""
    return _QUERY.sub(r"\g<keep>?...", _USERINFO.sub(r"\g<scheme>", text))


class RedactUrls(logging.Filter):
    """A logging filter that rewrites a record's message with `redact_urls` (never drops it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed call: logging reports it itself
            return True
        redacted = redact_urls(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


_REDACT = RedactUrls()


def redact_url_logging() -> None:
    """Add the `RedactUrls` filter to the httpx and httpcore loggers (once; idempotent).

    A filter on a logger sees only the records logged on that very logger, hence the list of
    httpcore's child loggers.
    """
    for name in HTTP_LOGGERS:
        logger = logging.getLogger(name)
        if _REDACT not in logger.filters:
            logger.addFilter(_REDACT)
