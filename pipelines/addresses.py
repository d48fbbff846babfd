"""Which IP addresses reco may connect to: globally reachable ones only.

The rule is derived from an address's global-ness, not from a list of private ranges: an
address is fetched only if it is globally reachable (IANA special-purpose registries, IPv4 and
IPv6: Python's ``is_global`` plus :data:`NON_GLOBAL`, which repeats the registries' "not globally
reachable" blocks because older Pythons, 3.11.7 included, miss some of them), is not multicast,
and is not in :data:`STRICTER` (globally reachable blocks that no image host uses: anycast of
protocol relays, deprecated 6to4 relays, ORCHID). Addresses that wrap an IPv4 address are
unwrapped and every form must pass: IPv4-mapped (``::ffff:a.b.c.d``: never global), NAT64
(``64:ff9b::/96``: judged by its IPv4 only), IPv4-compatible (``::a.b.c.d``), 6to4 (``2002::/16``), Teredo (``2001::/32``, server and
client), local-use NAT64 (``64:ff9b:1::/48``).

``allow_networks`` (CIDRs; ``embed.allow_networks``, e.g. ``127.0.0.0/8`` for the loopback world
server) allows chosen non-global networks, except :data:`ALWAYS_REFUSED` (link-local and cloud
metadata addresses), which no option opens.
"""
from __future__ import annotations

import functools
import ipaddress
from typing import Iterable

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# The "Globally Reachable: False" blocks of the IANA IPv4 / IPv6 special-purpose address
# registries (iana-ipv4-special-registry, iana-ipv6-special-registry, 2025), with their names.
NON_GLOBAL: dict[str, str] = {
    "0.0.0.0/8": "this network", "10.0.0.0/8": "private-use", "100.64.0.0/10": "shared address space",
    "127.0.0.0/8": "loopback", "169.254.0.0/16": "link-local", "172.16.0.0/12": "private-use",
    "192.0.0.0/24": "IETF protocol assignments", "192.0.2.0/24": "documentation (TEST-NET-1)",
    "192.88.99.2/32": "6a44-relay anycast", "192.168.0.0/16": "private-use",
    "198.18.0.0/15": "benchmarking", "198.51.100.0/24": "documentation (TEST-NET-2)",
    "203.0.113.0/24": "documentation (TEST-NET-3)", "240.0.0.0/4": "reserved",
    "255.255.255.255/32": "limited broadcast",
    "::/128": "unspecified", "::1/128": "loopback", "::ffff:0:0/96": "IPv4-mapped",
    "64:ff9b:1::/48": "local-use IPv4/IPv6 translation", "100::/64": "discard-only",
    "100:0:0:1::/64": "dummy IPv6 prefix", "2001::/23": "IETF protocol assignments",
    "2001:2::/48": "benchmarking", "2001:db8::/32": "documentation", "3fff::/20": "documentation",
    "5f00::/16": "segment routing SIDs", "fc00::/7": "unique-local", "fe80::/10": "link-local",
}
# Globally reachable in the registries, refused all the same (no image is served from them):
# the whole of 192.0.0.0/24 and 2001::/23 (PCP/TURN/DNS-SD anycast, AMT, AS112, ORCHIDv2, DETs,
# Teredo) and the deprecated 6to4 relay anycast block.
STRICTER: dict[str, str] = {
    "192.0.0.0/24": "IETF protocol assignments", "2001::/23": "IETF protocol assignments",
    "192.88.99.0/24": "deprecated 6to4 relay anycast", "::/96": "IPv4-compatible (deprecated)",
}
# Never allowed, whatever embed.allow_networks says: link-local and cloud metadata services.
ALWAYS_REFUSED: dict[str, str] = {
    "169.254.0.0/16": "link-local / cloud metadata", "fe80::/10": "link-local",
    "100.100.100.200/32": "cloud metadata (Alibaba)", "fd00:ec2::254/128": "cloud metadata (AWS IPv6)",
}
NAT64 = ipaddress.ip_network("64:ff9b::/96")
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


@functools.lru_cache(maxsize=None)
def _networks(table: tuple[tuple[str, str], ...]) -> tuple[tuple[Network, str], ...]:
    return tuple((ipaddress.ip_network(n), name) for n, name in table)


def _find(addr: Address, table: dict[str, str]) -> str | None:
    for net, name in _networks(tuple(table.items())):
        if addr.version == net.version and addr in net:
            return name
    return None


def parse(ip: str | Address) -> Address:
    """An address from text (an IPv6 zone ``%eth0`` dropped); ValueError if it is none."""
    if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return ip
    return ipaddress.ip_address(str(ip).strip("[]").split("%", 1)[0])


def forms(addr: Address) -> list[Address]:
    """``addr`` and the IPv4 addresses it wraps (well-known NAT64: the IPv4 only)."""
    if addr.version == 4:
        return [addr]
    if addr.ipv4_mapped is not None:       # refused as such; the IPv4 named in the message
        return [addr.ipv4_mapped, addr]
    low32 = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr in NAT64:                      # well-known NAT64 prefix: the IPv4 host is the peer
        return [low32]
    out: list[Address] = [addr]
    if addr.sixtofour is not None:
        out.append(addr.sixtofour)
    if addr.teredo is not None:
        out.extend(addr.teredo)
    if addr in IPV4_COMPATIBLE and int(addr) > 1:
        out.append(low32)
    if addr in NAT64_LOCAL:                # RFC 6052 /48: bits 48-63 and 72-87 (skipping "u")
        v = int(addr)
        out.append(ipaddress.IPv4Address((((v >> 64) & 0xFFFF) << 16) | ((v >> 40) & 0xFFFF)))
    return out


def _non_global(addr: Address) -> str | None:
    """Why ``addr`` is not a globally reachable unicast address, or None."""
    name = _find(addr, NON_GLOBAL) or _find(addr, STRICTER)
    if name:
        return name
    if addr.is_multicast:
        return "multicast"
    if not addr.is_global or addr.is_reserved or addr.is_unspecified:
        return "not globally reachable"
    return None


def _allowed(addr: Address, allow_networks: Iterable[str]) -> bool:
    return any(addr in net for net in _allow(tuple(allow_networks)) if net.version == addr.version)


@functools.lru_cache(maxsize=64)
def _allow(allow_networks: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in allow_networks)


def refusal(ip: str | Address, allow_networks: Iterable[str] = ()) -> str | None:
    """Why ``ip`` must not be connected to (a short text naming the block), or None.

    Args:
        ip: an IPv4/IPv6 address (text or ipaddress object).
        allow_networks: CIDRs allowed although not global (never :data:`ALWAYS_REFUSED`).
    """
    try:
        addr = parse(ip)
    except ValueError:
        return f"{ip!r} is not an IP address"
    wrapped = forms(addr)
    for form in wrapped:
        inside = "" if form == addr else f" inside {addr}"
        name = _find(form, ALWAYS_REFUSED)
        if name:
            return f"{form}{inside} is {name} (never allowed)"
        name = _non_global(form)
        if name and not _allowed(form, allow_networks):
            return f"{form}{inside} is {name}"
    return None


def check_networks(allow_networks: Iterable[str], option: str = "embed.allow_networks") -> tuple[str, ...]:
    """``allow_networks`` as a tuple of valid CIDR strings; ValueError naming the bad one."""
    out = []
    for n in allow_networks:
        try:
            out.append(str(ipaddress.ip_network(str(n).strip(), strict=False)))
        except ValueError as exc:
            raise ValueError(f"{option}: {n!r} is not a network (CIDR such as 127.0.0.0/8): {exc}") from exc
    return tuple(out)
