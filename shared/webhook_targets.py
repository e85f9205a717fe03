"""Where a webhook may be sent: the operator's allowlist and the address rules, standard library only.

A callback URL is accepted when

1. it is ``http`` or ``https``, names a host and carries no credentials;
2. its host (and port) match an entry of ``WEBHOOK_ALLOWED_HOSTS``: a host name or IP literal,
   optionally with a port (``hooks.example.com``, ``10.0.0.7:8443``, ``[fd00::1]``), or a
   wildcard (``*.example.com`` for its subdomains, ``*`` for any host);
3. the addresses its host resolves to are all global (not private, loopback, link-local,
   shared, reserved, multicast..., IPv4 addresses embedded in IPv6 ones included), unless the
   host is listed by name or literal, not only through a wildcard: an operator who lists
   ``10.0.0.7`` means it.

``check_target`` does all three and returns the one address to connect to. The gateway calls it
at submit time and the I/O workers before every attempt, connecting to exactly the address it
returned (services/worker/webhooks.py), so a DNS answer that changes in between (rebinding)
cannot send the request anywhere the check did not see.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# host, port -> the addresses it resolves to (as text).
Resolver = Callable[[str, int], list[str]]

SCHEMES = {"http": 80, "https": 443}
# Underscores are not DNS but container and service names carry them.
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
# 64:ff9b::/96, the NAT64 well-known prefix: a gateway translates it to the IPv4 address it holds.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class TargetRefused(ValueError):
    """The URL may not be called; the message says why and what to do, for a person to read."""


@dataclass(frozen=True)
class AllowedHost:
    """One WEBHOOK_ALLOWED_HOSTS entry. ``host`` is a lower-case name without a trailing dot, an
    IP address in its canonical text, ``*`` or ``*.<domain>``; ``port`` None matches any port."""

    host: str
    port: int | None = None

    @property
    def is_wildcard(self) -> bool:
        return self.host.startswith("*")

    def matches(self, host: str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.host == "*":
            return True
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and not _is_ip(host)
        return host == self.host


@dataclass(frozen=True)
class Target:
    """A checked callback: where the request goes and the one address it may connect to."""

    url: str
    scheme: str
    host: str
    port: int
    address: str
    # Named by an exact allowlist entry (so a non-global address was allowed), not a wildcard.
    listed: bool


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def normalise_host(host: str) -> str:
    """A URL's host as allowlist entries are matched: lower case, no trailing dot, IDNA-encoded,
    IPv6 without brackets and in canonical form. Raises ValueError for something that is
    neither an IP literal nor a DNS name."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if "%" in host:
            raise ValueError("an IPv6 zone (%…) names a local interface; give a global address")
        return str(ipaddress.IPv6Address(host))
    if _is_ip(host):
        if ":" in host:
            raise ValueError("put an IPv6 address in brackets: http://[2001:db8::1]:8080/")
        return str(ipaddress.IPv4Address(host))
    host = host.removesuffix(".")
    if not host:
        raise ValueError("the URL names no host")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(f"{host!r} is not a valid international host name") from exc
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"{host!r} is not a valid host name (letters, digits, '-' and '_' between dots)")
    if labels[-1].isdigit() or re.fullmatch(r"0x[0-9a-f]*", labels[-1]):
        # 2130706433, 127.1 or 0x7f.1: IPv4 in a shorthand that resolvers accept and that would
        # slip past an allowlist of dotted addresses.
        raise ValueError(f"{host!r} looks like an IPv4 address in shorthand; write it as a.b.c.d")
    return host


def parse_allowed_host(entry: str) -> AllowedHost:
    """``host``, ``host:port``, ``a.b.c.d[:port]``, ``[v6][:port]``, ``*.domain[:port]`` or ``*``."""
    text = entry.strip()
    if not text:
        raise ValueError("empty entry")
    port: int | None = None
    if ":" in text and _is_ip(text):  # a bare IPv6 address, without a port
        return AllowedHost(str(ipaddress.IPv6Address(text.lower())))
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{entry!r}: an IPv6 address needs its closing ']'")
        host_part, rest = text[: end + 1], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{entry!r}: write [address]:port")
            port = _port(rest[1:], entry)
    elif text.count(":") == 1:
        host_part, raw_port = text.split(":")
        port = _port(raw_port, entry)
    elif ":" in text:
        raise ValueError(f"{entry!r}: put an IPv6 address in brackets, e.g. [fd00::1]:8443")
    else:
        host_part = text
    if host_part == "*":
        return AllowedHost("*", port)
    wildcard = host_part.startswith("*.")
    try:
        host = normalise_host(host_part[2:] if wildcard else host_part)
    except ValueError as exc:
        raise ValueError(f"{entry!r}: {exc}") from None
    if wildcard and _is_ip(host):
        raise ValueError(f"{entry!r}: a wildcard covers host names, not addresses")
    return AllowedHost(f"*.{host}" if wildcard else host, port)


def _port(raw: str, entry: str) -> int:
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ValueError(f"{entry!r}: the port must be a number from 1 to 65535")
    return int(raw)


def parse_allowed_hosts(entries: Iterable[str]) -> tuple[AllowedHost, ...]:
    return tuple(parse_allowed_host(entry) for entry in entries if entry.strip())


def address_problem(address: str | IPAddress) -> str | None:
    """Why an address is not a public one a webhook may reach unlisted, or None.

    IPv4 addresses inside IPv6 ones (mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::a.b.c.d``,
    6to4 ``2002:…`` and Teredo) are judged by the IPv4 address they lead to.
    """
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            problem = address_problem(ip.ipv4_mapped)
            return f"{problem} (IPv4-mapped {ip.ipv4_mapped})" if problem else None
        embedded = None
        if ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        elif ip.sixtofour is not None:
            embedded = ip.sixtofour
        elif ip.teredo is not None:
            embedded = ip.teredo[1]
        if embedded is not None:
            problem = address_problem(embedded)
            if problem:
                return f"{problem} (embedded IPv4 {embedded})"
        if ip.scope_id:
            return "scoped to a local interface"
    checks = (
        (ip.is_unspecified, "unspecified"),
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link-local"),
        (ip.is_multicast, "multicast"),
        (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local, "site-local"),
        (ip.is_private, "private"),
        (ip.is_reserved, "reserved"),
        (not ip.is_global, "not globally routable"),
    )
    return next((reason for failed, reason in checks if failed), None)


def system_resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, in the resolver's order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def check_url(url: str) -> tuple[str, str, int]:
    """(scheme, normalised host, port) of a callback URL, or TargetRefused."""
    if any(ord(ch) < 33 or ord(ch) == 127 for ch in url):
        raise TargetRefused("the URL holds spaces or control characters; percent-encode them")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise TargetRefused(f"not a valid URL ({exc}); give e.g. https://hooks.example.com/llm") from None
    scheme = parts.scheme.lower()
    if port == 0:
        raise TargetRefused("port 0 is not a port a receiver can listen on")
    if scheme not in SCHEMES:
        raise TargetRefused(f"the scheme must be http or https, not {parts.scheme or 'none'!r}")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise TargetRefused(
            "credentials in the URL are not sent: remove 'user:password@'; deliveries are "
            "signed (webhook-signature), so the receiver can verify them instead"
        )
    if not parts.hostname:
        raise TargetRefused("the URL names no host; give e.g. https://hooks.example.com/llm")
    # The host as written (urlsplit's hostname drops an IPv6 zone and brackets).
    netloc = parts.netloc
    if netloc.startswith("["):
        raw_host = netloc[: netloc.index("]") + 1]
    else:
        raw_host = netloc.rsplit(":", 1)[0] if ":" in netloc else netloc
    try:
        host = normalise_host(raw_host)
    except ValueError as exc:
        raise TargetRefused(str(exc)) from None
    return scheme, host, port or SCHEMES[scheme]


def check_target(url: str, allowed: Iterable[AllowedHost], *, resolve: Resolver = system_resolve) -> Target:
    """Check ``url`` against the allowlist and the address rules, resolving its host once;
    return where to connect. Raises TargetRefused with a message naming the fix."""
    scheme, host, port = check_url(url)
    entries = list(allowed)
    if not entries:
        raise TargetRefused(
            "webhooks are off on this service: an operator must list the receiver's host in "
            "WEBHOOK_ALLOWED_HOSTS"
        )
    matching = [entry for entry in entries if entry.matches(host, port)]
    if not matching:
        shown = f"[{host}]" if ":" in host else host
        raise TargetRefused(
            f"{shown}:{port} is not on the operator's allowlist (WEBHOOK_ALLOWED_HOSTS); "
            "ask an operator to add it, or use a listed host"
        )
    listed = any(not entry.is_wildcard for entry in matching)
    if _is_ip(host):
        addresses = [host]
    else:
        try:
            addresses = resolve(host, port)
        except (OSError, UnicodeError) as exc:
            raise TargetRefused(f"{host} does not resolve ({exc}); check the host name") from None
        if not addresses:
            raise TargetRefused(f"{host} resolves to no address; check the host name")
    for address in addresses:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            raise TargetRefused(f"{host} resolves to {address!r}, which is not an IP address") from None
        if ip.is_unspecified or ip.is_multicast:
            raise TargetRefused(f"{host} resolves to {ip}, which no request can be sent to")
        problem = None if listed else address_problem(ip)
        if problem:
            raise TargetRefused(
                f"{host} resolves to {ip}, a {problem} address; only hosts listed by name or "
                "address in WEBHOOK_ALLOWED_HOSTS (not through a wildcard) may be non-public"
            )
    return Target(url=url, scheme=scheme, host=host, port=port, address=addresses[0], listed=listed)
