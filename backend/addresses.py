"""Which hosts and network addresses the backend may fetch task pictures from. Layer L0.

Pure functions (the standard library's `ipaddress` only, no DNS, no sockets): the HTTP side
(`backend.image_client`, `backend.images`) resolves a host name and asks `refusal` about every
address it got, so tests can prove every range is refused without ever connecting to one.

A picture may come from Label Studio (LABEL_STUDIO_URL, whatever its address: it usually runs on
the same host or network), from a host the operator lists in WAFER_IMAGE_HOSTS (any address), or,
following a redirect from one of those (a presigned cloud-storage URL), from a host whose every
address is publicly routed. Loopback, private, link-local, carrier-grade NAT, multicast, reserved
and other non-global addresses are refused, also when hidden inside an IPv6 address
(IPv4-mapped ``::ffff:a.b.c.d``, 6to4 ``2002::/16``, NAT64 ``64:ff9b::/96``).

Python's `ipaddress` flags are the first check, not the whole one: its lists lag the IANA
special-purpose registries, and ``is_global`` is True for ranges that are not globally
reachable. `NOT_GLOBAL` names those it misses (Python 3.11 misses all of them; newer versions
know some): the deprecated site-local ``fec0::/10`` (RFC 3879: still routed inside sites that
used it), the IPv6 documentation range ``3fff::/20`` (RFC 9637), SRv6 segment identifiers
``5f00::/16`` (RFC 9602), local-use NAT64 ``64:ff9b:1::/48`` (RFC 8215: translates into the
operator's own IPv4 space), the dummy prefix ``100:0:0:1::/64`` (RFC 9780) and the deprecated
6to4 relay anycast ``192.88.99.0/24`` (RFC 7526).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix (RFC 6052)

#: Ranges that are not globally reachable but that `ipaddress` does not flag (see the module
#: docstring), with the reason a refusal gives.
NOT_GLOBAL: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.ip_network(network), reason)
    for network, reason in (
        ("fec0::/10", "site-local"),
        ("3fff::/20", "documentation"),
        ("5f00::/16", "SRv6 segment identifier"),
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("100:0:0:1::/64", "dummy prefix"),
        ("192.88.99.0/24", "deprecated 6to4 relay anycast"),
    )
)
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


class AddressRefusedError(ValueError):
    """A host resolves to an address pictures may not be fetched from; the message says why."""


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def refusal(address: IPAddress) -> str | None:
    """Why connecting to ``address`` is refused ("loopback", "private", ...), None when public.

    An IPv6 address carrying an IPv4 address (mapped, 6to4, NAT64) is judged by the IPv4 one,
    since that is where the packets end up.
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            reason = refusal(embedded)
            return None if reason is None else f"{reason} (inside an IPv6 address)"
    for network, reason in NOT_GLOBAL:
        if address.version == network.version and address in network:
            return reason
    checks = (
        (address.is_unspecified, "unspecified"),
        (address.is_loopback, "loopback"),
        (address.is_link_local, "link-local"),
        (address.is_multicast, "multicast"),
        (address.is_private, "private"),
        (isinstance(address, ipaddress.IPv4Address) and address in _SHARED, "carrier-grade NAT"),
        (address.is_reserved, "reserved"),
        (not address.is_global, "not publicly routed"),
    )
    for refused, reason in checks:
        if refused:
            return reason
    return None


def check_addresses(host: str, addresses: Sequence[IPAddress]) -> list[IPAddress]:
    """The addresses ``host`` resolved to, if every one is public; else `AddressRefusedError`.

    All must pass: a name that resolves to one public and one internal address could be
    connected to the internal one.
    """
    if not addresses:
        raise AddressRefusedError(f"{host} resolves to no address")
    for address in addresses:
        reason = refusal(address)
        if reason is not None:
            raise AddressRefusedError(
                f"{host} resolves to a {reason} address; pictures come from there only when "
                "the host is Label Studio or listed in WAFER_IMAGE_HOSTS"
            )
    return list(addresses)


def normalise_host(host: str) -> str:
    """Lower case, no trailing dot, no IPv6 brackets, IP addresses in their canonical form."""
    host = host.strip().lower().rstrip(".").removeprefix("[").removesuffix("]")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def host_listed(host: str, patterns: Iterable[str]) -> bool:
    """Whether ``host`` is one of ``patterns`` (exact names or IPs, or ``*.domain`` for any
    name below that domain, not the domain itself)."""
    name = normalise_host(host)
    for pattern in patterns:
        if pattern.startswith("*."):
            if name.endswith(pattern[1:]):
                return True
        elif name == pattern:
            return True
    return False


def parse_hosts(text: str, variable: str = "WAFER_IMAGE_HOSTS") -> tuple[str, ...]:
    """A comma-separated host list (``images.fab.local, *.cdn.fab.local, 10.1.2.3``) ->
    normalised patterns; a ValueError names the first entry that is not a host name or IP
    address (no scheme, port or path: every port of a listed host is allowed)."""
    hosts: list[str] = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        wildcard = entry.startswith("*.")
        name = normalise_host(entry[2:] if wildcard else entry)
        try:
            ipaddress.ip_address(name)
            is_ip = True
        except ValueError:
            is_ip = False
        if is_ip and wildcard:
            raise ValueError(f"{variable}: {entry!r}: '*.' goes only before a domain name")
        if not is_ip and not all(_LABEL.fullmatch(label) for label in name.split(".")):
            raise ValueError(
                f"{variable}: {entry!r} is not a host name or IP address (list bare hosts, "
                "e.g. images.fab.local,*.cdn.fab.local,10.1.2.3; no scheme, port or path)"
            )
        hosts.append(("*." if wildcard else "") + name)
    return tuple(dict.fromkeys(hosts))
