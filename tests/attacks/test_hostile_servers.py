"""Hostile servers against the download path (the guarded fetch and img2dataset's Downloader).

Every server is a :class:`reco.world.server.WorldServer` on 127.0.0.1 (its ``/_hostile/``
endpoints: trickled headers or body, an endless body, a body shorter than its Content-Length,
pixel bombs, bytes-per-pixel bombs, redirects); connections anywhere else fail the test. Each
endpoint misbehaves for a bounded time (``s=``) and deadlines are short (1-2 s).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from reco.pipelines import safe_http
from reco.pipelines.config import LOOPBACK, EmbedConfig
from reco.pipelines.deadline import DeadlineExceeded
from reco.pipelines.download import fetch_shard
from reco.pipelines.safe_http import NetPolicy, Refused, ShortBody, fetch
from reco.world.bombs import bpp_bomb, pixel_bomb, valid_png
from reco.world.server import WorldServer

REPO = Path(__file__).resolve().parents[2]
POLICY = NetPolicy(allow_networks=LOOPBACK)
TIMEOUT = 1.0
LINGER = 8                      # how long each trickling endpoint keeps a request alive


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_servers")
    (root / "ok.png").write_bytes(valid_png())
    bpp_bomb(), pixel_bomb()                    # built once, before any request waits for them
    with WorldServer(root) as srv:
        yield srv


@pytest.fixture
def connections(monkeypatch):
    seen = []
    real = safe_http._connect

    def connect(address, *args, **kwargs):
        seen.append(address[0])
        assert address[0] == "127.0.0.1", f"tried to connect to {address}"
        return real(address, *args, **kwargs)

    monkeypatch.setattr(safe_http, "_connect", connect)
    return seen


def _rows(urls):
    return [{"id": i, "url": u, "caption": "c", "label": None, "status": None, "error_message": None}
            for i, u in enumerate(urls)]


@pytest.mark.parametrize("endpoint", ["trickle-headers/x.png", "trickle-body/x.png", "endless/x.png",
                                      "slow/x.png"])
def test_one_deadline_per_url_whatever_the_server_trickles(server, endpoint):
    """Each read is fast, the whole request is not: it ends at the URL's deadline, as a timeout."""
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="timed out"):
        fetch(f"{server.base_url}_hostile/{endpoint}?s={LINGER}", POLICY, timeout=TIMEOUT)
    assert time.monotonic() - start < TIMEOUT + 1.5          # not LINGER seconds


def test_a_body_shorter_than_its_content_length_is_a_download_failure(server):
    with pytest.raises(ShortBody, match="Content-Length"):
        fetch(f"{server.base_url}_hostile/short/x.png", POLICY, timeout=2)
    out = fetch_shard(_rows([f"{server.base_url}_hostile/short/x.png", f"{server.base_url}ok.png"]),
                      32, EmbedConfig(timeout=2, threads=2, allow_networks=LOOPBACK))
    assert [r["status"] for r in out] == ["failed_to_download", "success"]
    assert "Content-Length" in out[0]["error_message"]


def test_trickling_rows_are_timeouts_in_img2dataset(server):
    """img2dataset's Downloader path: every trickling row is a ``failed_to_download`` timeout
    and the shard ends within a few deadlines, not LINGER seconds per row."""
    urls = [f"{server.base_url}_hostile/{e}/h{i}.png?s={LINGER}" for i in range(2)
            for e in ("trickle-headers", "trickle-body", "endless")] + [f"{server.base_url}ok.png"]
    start = time.monotonic()
    out = fetch_shard(_rows(urls), 32, EmbedConfig(timeout=TIMEOUT, threads=8, allow_networks=LOOPBACK))
    assert time.monotonic() - start < LINGER
    assert [r["status"] for r in out] == ["failed_to_download"] * 6 + ["success"]
    assert all("timed out" in r["error_message"] for r in out[:6])


@pytest.mark.parametrize("target", [
    "http://10.0.0.1/x.png", "http://169.254.169.254/latest/meta-data/", "http://100.100.100.200/",
    "http://100.64.0.1/", "http://192.0.0.170/", "http://[2002:a9fe:a9fe::]/", "http://[::ffff:10.0.0.1]/",
    "http://[64:ff9b::a9fe:a9fe]/", "http://[fd00:ec2::254]/", "http://127.0.0.2:{port}/ok.png",
])
def test_redirect_chains_to_refused_addresses(server, connections, target):
    """server -> server -> server -> target: refused at the last hop, before connecting to it."""
    policy = NetPolicy(allow_networks=("127.0.0.1/32",))
    url = target.format(port=server.port)
    for _ in range(3):
        url = f"{server.base_url}_hostile/redirect/x?to={quote(url, safe='')}"
    with pytest.raises(Refused, match="non-global"):
        fetch(url, policy, timeout=2)
    assert connections == ["127.0.0.1"] * 3


@pytest.mark.parametrize("endpoint,message", [("bomb", "CV_IO_MAX_IMAGE_PIXELS"),
                                              ("bpp-bomb", "needs about")])
def test_bombs_are_refused_per_row_from_their_header(server, endpoint, message):
    out = fetch_shard(_rows([f"{server.base_url}_hostile/{endpoint}/x.png", f"{server.base_url}ok.png"]),
                      32, EmbedConfig(timeout=5, threads=2, allow_networks=LOOPBACK))
    assert [r["status"] for r in out] == ["failed_to_resize", "success"]
    assert "decoding refused" in out[0]["error_message"] and message in out[0]["error_message"]


def test_peak_memory_stays_flat_on_a_list_of_bombs(server):
    """6 bytes-per-pixel bombs (498 KB each, 512 MB decoded, >5 GB in img2dataset's alpha
    blend) and 6 pixel bombs after 8 good images, 8 download threads: the worker's peak RSS
    stays where the good images put it (a watchdog ends it 600 MB above)."""
    good = [f"{server.base_url}ok.png?i={i}" for i in range(8)]
    bombs = [f"{server.base_url}_hostile/{kind}/b{i}.png" for i in range(6) for kind in ("bpp-bomb", "bomb")]
    cmd = [sys.executable, "-m", "tests.attacks.rss_probe", "--limit-mb", "600", "--threads", "8",
           "--timeout", "10", "--warm", str(len(good)), *good, *bombs]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines and proc.returncode == 0, (proc.returncode, lines, proc.stderr[-2000:])
    got = lines[-1]
    assert [s for s, _ in got["rows"]] == ["failed_to_resize"] * len(bombs)
    assert got["peak_mb"] - got["warm_mb"] < 300, got


@pytest.mark.slow
def test_embed_memory_peak_rss_on_a_hostile_list_is_under_2_gb():
    """The whole CLI (Beam, img2dataset, open_clip) on 200 good rows and 16 rows of each hostile
    kind (RELIABILITY.md records the figure of ``python -m tests.attacks.hostile_embed_rss``)."""
    from tests.attacks.hostile_embed_rss import measure

    got = measure(n_good=200, each=16, threads=16)
    assert got["peak_rss_mb"] < 2048, got
    assert got["counts"]["success"] == 200, got
