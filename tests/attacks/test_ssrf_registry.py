"""SSRF addresses generated from the IANA special-purpose address registries.

``data/iana-ipv{4,6}-special-registry.csv`` hold the registries' rows (prefix, name, "Globally
Reachable"); a new row is a new line there. For every block, addresses are sampled (first, last,
middle, one pseudo-random) and, for IPv4 blocks, wrapped in every IPv6 form that carries an IPv4
address (IPv4-mapped, IPv4-compatible, 6to4, Teredo server and client, NAT64 well-known and
local-use). The expected verdict comes from the registry alone (:func:`expected`), except for
:data:`reco.pipelines.addresses.STRICTER` (globally reachable blocks refused on purpose). Each
sample goes through the early per-row filter (``refusal(url)``: resolve + check) and the
address check of connections; nothing connects anywhere.
"""
from __future__ import annotations

import csv
import ipaddress
import random
from pathlib import Path

import pytest

from reco.pipelines import addresses
from reco.pipelines.safe_http import NetPolicy, Refused, check_url
from reco.pipelines.urls import refusal

DATA = Path(__file__).parent / "data"
EVERYTHING = ("0.0.0.0/0", "::/0")
GLOBAL_SAMPLES = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "151.101.1.69", "2606:4700::1111",
                  "2a00:1450:4001:82b::200e", "2002:808:808::1", "64:ff9b::808:808"]


def _rows(version: int) -> list[dict]:
    with open(DATA / f"iana-ipv{version}-special-registry.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["net"] = ipaddress.ip_network(row["prefix"])
    return rows


ROWS = _rows(4) + _rows(6)
STRICTER = [ipaddress.ip_network(n) for n in addresses.STRICTER]
NAT64 = ipaddress.ip_network("64:ff9b::/96")
SIXTOFOUR = ipaddress.ip_network("2002::/16")


def expected(addr) -> bool:
    """Allowed by the registries: the most specific row's "Globally Reachable" is True (N/A:
    refused), or no row holds it and it is plain unicast; 6to4 and NAT64 by the IPv4 they carry."""
    if addr.version == 6 and addr in NAT64:
        return expected(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    if addr.version == 6 and addr in SIXTOFOUR:
        return expected(addr.sixtofour)
    if any(addr.version == n.version and addr in n for n in STRICTER):
        return False
    rows = [r for r in ROWS if r["net"].version == addr.version and addr in r["net"]]
    if rows:
        return max(rows, key=lambda r: r["net"].prefixlen)["globally_reachable"] == "True"
    return not addr.is_multicast and not addr.is_reserved


def samples(net, rng: random.Random) -> list:
    n = net.num_addresses
    picks = {0, n - 1, n // 2, rng.randrange(n)}
    return [net[i] for i in sorted(picks)]


def wrapped(v4: ipaddress.IPv4Address) -> list[ipaddress.IPv6Address]:
    """``v4`` in every IPv6 form that carries an IPv4 address."""
    x = int(v4)
    forms = [(0xFFFF << 32) | x,                                        # IPv4-mapped
             (0x2002 << 112) | (x << 80) | 1,                           # 6to4
             (0x0064FF9B << 96) | x,                                    # NAT64 well-known
             (0x20010000 << 96) | (x << 64) | 0xFFFF_FFFF_FFFF,         # Teredo server = v4
             (0x20010000 << 96) | (0x08080808 << 64) | (0xFFFF << 32) | (x ^ 0xFFFFFFFF),  # client
             (0x0064FF9B0001 << 80) | ((x >> 16) << 64) | ((x & 0xFFFF) << 40)]      # NAT64 /48
    if x > 1:
        forms.append(x)                                                 # IPv4-compatible
    return [ipaddress.IPv6Address(f) for f in forms]


def _url(addr) -> str:
    return f"http://[{addr}]/x.png" if addr.version == 6 else f"http://{addr}/x.png"


def _cases():
    rng = random.Random(0)
    for row in ROWS:
        for addr in samples(row["net"], rng):
            yield f"{row['prefix']} {row['name']}", addr
            if addr.version == 4:
                for form in wrapped(addr):
                    yield f"{row['prefix']} wrapped", form


CASES = list(_cases())


def test_the_registries_are_read():
    assert len(_rows(4)) >= 25 and len(_rows(6)) >= 25
    assert sum(r["globally_reachable"] == "False" for r in ROWS) >= 30
    assert len(CASES) > 500


def test_every_non_globally_reachable_block_is_refused():
    wrong = []
    for what, addr in CASES:
        want = expected(addr)
        got = addresses.refusal(addr) is None
        early = refusal(_url(addr)) is None
        if got != want or early != want:
            wrong.append((what, str(addr), want, got, early))
    assert not wrong, f"{len(wrong)} wrong verdicts, e.g. {wrong[:8]}"
    refused = [a for _, a in CASES if not expected(a)]
    assert len(refused) > 400


@pytest.mark.parametrize("ip", GLOBAL_SAMPLES)
def test_global_addresses_pass(ip):
    assert addresses.refusal(ip) is None
    check_url(_url(ipaddress.ip_address(ip)), NetPolicy())          # no Refused


@pytest.mark.parametrize("ip", ["100.100.100.200", "100.64.0.1", "100.127.255.254", "192.0.0.1",
                                "192.0.0.100", "2002:a9fe:a9fe::", "2002:a00:1::", "2002:7f00:1::",
                                "64:ff9b::a9fe:a9fe", "::ffff:8.8.8.8", "224.0.0.251", "ff02::1"])
def test_gaps_found_by_the_attack_are_closed(ip):
    with pytest.raises(Refused, match="non-global"):
        check_url(_url(ipaddress.ip_address(ip)), NetPolicy())


@pytest.mark.parametrize("ip", ["169.254.169.254", "169.254.0.1", "fe80::1", "fe80::a9fe:a9fe",
                                "100.100.100.200", "fd00:ec2::254", "::ffff:169.254.169.254",
                                "2002:a9fe:a9fe::1", "64:ff9b::a9fe:a9fe"])
def test_link_local_and_metadata_are_refused_whatever_is_allowed(ip):
    why = addresses.refusal(ip, EVERYTHING)
    assert why and "never allowed" in why
    assert refusal(_url(ipaddress.ip_address(ip)), EVERYTHING)


def test_allow_networks_opens_only_the_chosen_networks():
    loopback = ("127.0.0.0/8",)
    assert addresses.refusal("127.0.0.1", loopback) is None
    assert addresses.refusal("127.8.9.10", loopback) is None
    for ip in ("10.0.0.1", "192.168.1.1", "::1", "100.64.0.1", "169.254.169.254"):
        assert addresses.refusal(ip, loopback), ip
    assert refusal("http://127.0.0.1:9/x.png", loopback) is None
    assert refusal("http://10.0.0.1/x.png", loopback)


def test_bad_networks_are_named():
    with pytest.raises(ValueError, match="embed.allow_networks: 'nonsense'"):
        addresses.check_networks(["127.0.0.0/8", "nonsense"])


def test_bad_net_options_are_config_errors_before_any_work(tmp_path):
    import dataclasses

    from reco.errors import ConfigError
    from reco.pipelines.config import EmbedConfig
    from reco.pipelines.embed_memory import check_net_options

    check_net_options(EmbedConfig(allow_networks=("127.0.0.0/8", "::1/128")))
    for bad, match in ((dict(allow_networks=("10.0.0.0/33",)), "allow_networks"),
                       (dict(max_image_mb=0), "max_image_mb"),
                       (dict(max_image_mb=1024, decode_budget_mb=512), "larger than")):
        with pytest.raises(ConfigError, match=match):
            check_net_options(dataclasses.replace(EmbedConfig(), **bad))
