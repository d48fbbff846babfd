"""Safety: http(s) only; private/loopback/link-local addresses refused by default, at every
redirect hop and for the address actually connected to (DNS rebinding); the img2dataset path
uses the guard; no file name from data escapes its folder; nothing is ever unpickled.

No test reaches beyond 127.0.0.1: connections go through ``safe_http._connect``, which the
``connections`` fixture records and refuses for any other address."""
from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest

from reco.errors import FormatError
from reco.formats import Manifest, safe_join, safe_name
from reco.pipelines import safe_http
from reco.pipelines.config import EmbedConfig
from reco.pipelines.download import fetch_shard
from reco.pipelines.safe_http import NetPolicy, Refused, fetch
from reco.pipelines.urls import refusal
from reco.world.server import WorldServer

REPO = Path(__file__).resolve().parents[1]
LOOPBACK_ONLY = NetPolicy(allow_networks=("127.0.0.1/32",))   # the server, nothing else private


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    (root / "ok.png").write_bytes(b"\x89PNG fake but fine for fetch()")
    with WorldServer(root) as srv:
        yield srv


@pytest.fixture
def connections(monkeypatch):
    """Every address a guarded connection is opened to; anything but 127.0.0.1 fails the test."""
    seen = []
    real = safe_http._connect

    def connect(address, *args, **kwargs):
        seen.append(address[0])
        assert address[0] == "127.0.0.1", f"tried to connect to {address}"
        return real(address, *args, **kwargs)

    monkeypatch.setattr(safe_http, "_connect", connect)
    return seen


def _redirect(server, target: str) -> str:
    return f"{server.base_url}_hostile/redirect/x?to={target}"


@pytest.mark.parametrize("target", [
    "http://169.254.169.254/latest/meta-data/",          # cloud metadata (AWS/GCP/Azure)
    "http://[fd00:ec2::254]/latest/meta-data/",          # AWS IPv6 metadata
    "http://10.1.2.3/x.png",
    "http://192.168.1.1/x.png",
    "http://127.0.0.2:{port}/ok.png",                    # loopback, but not the allowed address
    "http://[::1]:{port}/ok.png",
    "http://0.0.0.0:{port}/ok.png",
    "http://2852039166/",                                # 169.254.169.254 as one decimal number
    "http://[::ffff:169.254.169.254]/",                  # IPv4-mapped IPv6
    "http://metadata.google.internal/computeMetadata/v1/",
])
def test_redirects_to_private_addresses_are_refused_before_connecting(server, connections, target):
    names = {"metadata.google.internal": ["169.254.169.254"]}
    policy = NetPolicy(allow_networks=("127.0.0.1/32",),
                       resolver=lambda h: names[h] if h in names else safe_http.resolve(h))
    with pytest.raises(Refused, match="private/loopback/link-local"):
        fetch(_redirect(server, target.format(port=server.port)), policy, timeout=2)
    assert connections == ["127.0.0.1"]                  # only the first hop was connected


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://127.0.0.1/",
                                    "data:text/plain,hello"])
def test_redirects_to_other_schemes_are_refused(server, connections, target):
    with pytest.raises(Refused, match="scheme"):
        fetch(_redirect(server, target), LOOPBACK_ONLY, timeout=2)
    assert connections == ["127.0.0.1"]


@pytest.mark.parametrize("url", ["http://127.0.0.1:{port}/ok.png", "http://localhost:{port}/ok.png",
                                 "http://LocalHost:{port}/ok.png", "http://[::1]:{port}/ok.png"])
def test_loopback_refused_by_default_allowed_by_option(server, connections, url):
    url = url.format(port=server.port)
    before = len(server.requests)
    with pytest.raises(Refused):
        fetch(url, NetPolicy(), timeout=2)
    assert connections == [] and len(server.requests) == before   # refused before connecting
    assert refusal(url)                         # the early filter agrees
    if "::1" not in url:                                             # the server binds IPv4
        assert fetch(url, NetPolicy(allow_networks=("127.0.0.0/8",)), timeout=2).startswith(b"\x89PNG")


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/x", "gopher://x/",
                                 "data:image/png;base64,AAAA", "javascript:alert(1)", "//host/x",
                                 "", "http://[::1/x"])
def test_only_http_and_https_are_fetched(connections, url):
    with pytest.raises(Refused):
        fetch(url, NetPolicy(allow_networks=("127.0.0.0/8",)), timeout=2)
    assert connections == []


def test_dns_rebinding_is_refused_at_connect_time(server, connections):
    """The early check and the connection each resolve; a name that answers a public address to
    the first and a private one to the second is refused before connecting."""
    answers = iter([["93.184.216.34"], ["169.254.169.254"]])
    resolver = lambda host: next(answers)  # noqa: E731
    url = "http://rebind.example/latest/meta-data/"
    assert refusal(url, resolve=resolver) is None   # looked public
    with pytest.raises(Refused, match="169.254.169.254"):
        fetch(url, NetPolicy(resolver=resolver), timeout=2)
    assert connections == []


def test_every_resolved_address_is_checked(connections):
    policy = NetPolicy(resolver=lambda host: ["93.184.216.34", "10.0.0.7"])
    with pytest.raises(Refused, match="10.0.0.7"):
        fetch("http://mixed.example/x.png", policy, timeout=2)
    assert connections == []


def test_the_connected_peer_is_checked_again(server, monkeypatch):
    """A name that resolves to a public address but whose connection lands on loopback (a NAT,
    a transparent proxy) is refused once the peer address is seen, and the socket closed."""
    real = safe_http.socket.create_connection
    monkeypatch.setattr(safe_http, "_connect",
                        lambda address, *a, **k: real(("127.0.0.1", server.port), *a, **k))
    before = len(server.requests)
    with pytest.raises(Refused, match="connected peer 127.0.0.1"):
        fetch("http://public.example/ok.png", NetPolicy(resolver=lambda h: ["93.184.216.34"]), timeout=2)
    assert len(server.requests) == before                # no request was sent


def test_responses_over_the_size_cap_are_refused(server):
    with pytest.raises(Refused, match="larger than"):
        fetch(f"{server.base_url}_hostile/huge/x.png?mb=2", NetPolicy(allow_networks=("127.0.0.0/8",), max_bytes=1 << 20))


def test_environment_proxies_are_not_used(server, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://10.9.9.9:3128")
    monkeypatch.setenv("HTTP_PROXY", "http://10.9.9.9:3128")
    assert fetch(f"{server.base_url}ok.png", LOOPBACK_ONLY, timeout=2).startswith(b"\x89PNG")


def test_img2dataset_downloads_go_through_the_guard(server, connections):
    """fetch_shard (img2dataset Reader + Downloader in process): loopback refused by default,
    redirects to private addresses or other schemes refused even with loopback allowed."""
    rows = [{"id": i, "url": u, "caption": "c", "label": None, "status": None, "error_message": None}
            for i, u in enumerate([f"{server.base_url}ok.png",
                                   _redirect(server, "file:///etc/passwd"),
                                   _redirect(server, "ftp://127.0.0.1/x")])]
    before = len(server.requests)
    strict = fetch_shard(rows[:1], 32, EmbedConfig(timeout=2, threads=2))
    assert strict[0]["status"] == "refused" and "private" in strict[0]["error_message"]
    assert len(server.requests) == before and connections == []
    loose = fetch_shard(rows[1:], 32, EmbedConfig(timeout=2, threads=2, allow_networks=("127.0.0.0/8",)))
    assert [r["status"] for r in loose] == ["refused", "refused"]
    assert all("scheme" in r["error_message"] for r in loose)
    import img2dataset.downloader as i2d                 # nothing patched process-wide
    assert i2d.download_image_with_retry.__module__ == "img2dataset.downloader"
    assert urllib.request.urlopen.__module__ == "urllib.request"


def test_world_server_does_not_serve_outside_its_folder(server):
    import http.client

    for path in ("/../../../../etc/passwd", "/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/..%2f..%2fetc/passwd"):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        conn.close()
        assert response.status == 404 and b"root:" not in body, path


@pytest.mark.parametrize("name", ["../x.parquet", "../../etc/passwd", "/etc/passwd", "a/b.parquet",
                                  "..", ".", "", "a\\..\\b", "x\x00.parquet", None, 3])
def test_file_names_from_data_cannot_escape_their_folder(tmp_path, name):
    with pytest.raises(FormatError, match="plain file name"):
        safe_join(tmp_path, name)
    manifest = {"kind": "embedded", "shards": [name], "counts": {}, "info": {}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError):
        Manifest.read(tmp_path)


def test_plain_names_are_accepted(tmp_path):
    assert safe_name("part-00000.parquet", "x") == "part-00000.parquet"
    assert safe_join(tmp_path, "..hidden") == str(tmp_path / "..hidden")


# ---------------------------------------------------------------------------------------------
# never unpickle
# ---------------------------------------------------------------------------------------------
SOURCES = [p for d in ("reco", "pipelines", "trainer", "index") for p in (REPO / d).rglob("*.py")]
FORBIDDEN = [
    (re.compile(r"\b(c?pickle|dill|joblib|cloudpickle|shelve|marshal)\.(load|loads|Unpickler|open)\b"),
     "unpickling"),
    (re.compile(r"\bnp\.load\([^)]*allow_pickle\s*=\s*True"), "np.load with allow_pickle=True"),
    (re.compile(r"\bpd\.read_pickle\b|\.read_pickle\("), "read_pickle"),
]


def _calls(text: str, name: str) -> list[str]:
    """Full argument text of each ``name(...)`` call (balanced parentheses, across lines)."""
    out = []
    for m in re.finditer(re.escape(name) + r"\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        out.append(text[m.start():i])
    return out


def test_sources_are_found():
    assert len(SOURCES) > 20


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_unpickling_anywhere(path):
    text = path.read_text()
    for pattern, what in FORBIDDEN:
        assert not pattern.search(text), f"{path}: {what}"
    for call in _calls(text, "torch.load"):
        assert re.search(r"weights_only\s*=\s*True", call), f"{path}: {call} without weights_only=True"
    for call in _calls(text, "np.load") + _calls(text, "numpy.load"):
        assert not re.search(r"allow_pickle\s*=\s*True", call), f"{path}: {call}"
