"""Local files must not leak through URLs: the gallery, REACT's world image source and the world
server read only the images reco stored, never a path made from a URL, and never follow a
symlink out of their folder."""
from __future__ import annotations

import base64
import http.client
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reco.errors import FormatError
from reco.evaluation.gallery import image_tag
from reco.react.images import world_file
from reco.stored_images import WorldImages
from reco.world.bombs import valid_png
from reco.world.server import WorldServer

SECRET = b"root:x:0:0:secret line that must never be embedded\n"
ESCAPES = ["http://h/ok/../../../../../../{secret}", "http://h/images/memory/../../../../{secret}",
           "http://h/%2e%2e/%2e%2e/{secret}", "http://h/images/..%2f..%2f{secret}",
           "http://h/{secret}", "file://{secret}", "http://h/images/memory/link/secret.txt"]


@pytest.fixture
def world(tmp_path):
    """A world folder with one stored image, a URL list naming it, a secret beside the folder
    and symlinks inside it that lead out."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    root = tmp_path / "run" / "world"
    (root / "images" / "memory").mkdir(parents=True)
    (root / "urls").mkdir()
    (root / "images" / "memory" / "000000.png").write_bytes(valid_png())
    os.symlink(secret, root / "images" / "memory" / "000001.png")      # a stored name, leading out
    os.symlink(tmp_path, root / "images" / "memory" / "link")
    urls = ["http://127.0.0.1:9/images/memory/000000.png", "http://127.0.0.1:9/images/memory/000001.png"]
    pq.write_table(pa.table({"url": urls}), root / "urls" / "memory.parquet")
    return root, secret, urls


def _leaks(html: str) -> bool:
    return base64.b64encode(SECRET)[:24].decode() in html or "secret" in html and "data:" in html


def test_gallery_embeds_only_the_worlds_own_images(world):
    root, secret, urls = world
    store = WorldImages(root)
    own = image_tag(urls[0], store)
    assert own.startswith("<img src='data:image/png;base64,")
    assert base64.b64encode(valid_png()).decode() in own
    rel = os.path.relpath(secret, root)
    for template in ESCAPES:
        url = template.format(secret=rel if template.startswith("http") else secret)
        tag = image_tag(url, store)
        assert "data:" not in tag and not _leaks(tag), url
    assert "data:" not in image_tag(urls[1], store)          # listed, but a symlink out of the world


def test_react_world_source_never_reads_outside_the_world(world):
    root, secret, urls = world
    assert world_file(root, urls[0]) == (root / "images/memory/000000.png").resolve()
    for template in ESCAPES:
        with pytest.raises(FormatError, match="does not name a file under the world"):
            world_file(root, template.format(secret=os.path.relpath(secret, root)))
    with pytest.raises(FormatError, match="leads out of the world folder"):
        world_file(root, urls[1])


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_world_server_does_not_follow_symlinks_out_of_its_folder(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    root = tmp_path / "served"
    (root / "inside").mkdir(parents=True)
    (root / "inside" / "ok.png").write_bytes(valid_png())
    os.symlink(secret, root / "leak.txt")
    os.symlink(tmp_path, root / "up")
    os.symlink("/etc", root / "etc")
    os.symlink(root / "inside" / "ok.png", root / "alias.png")          # inside: fine
    with WorldServer(root) as server:
        for path in ("/leak.txt", "/up/secret.txt", "/etc/passwd", "/etc/hostname", "/up/", "/"):
            status, body = _get(server.port, path)
            assert status == 404 and SECRET not in body and b"root:" not in body, path
        assert _get(server.port, "/alias.png") == (200, valid_png())
        assert _get(server.port, "/inside/ok.png") == (200, valid_png())


def test_every_url_to_path_mapping_goes_through_the_world_lists():
    """The audit, kept: no module maps a URL's path onto the file system by itself."""
    repo = Path(__file__).resolve().parents[2]
    url_path = re.compile(r"\b(urlparse|urlsplit)\([^)]*\)\.path\b|\bparts\.path\b")
    allowed = {"reco/world/server.py"}        # request routing; files via translate_path + realpath check
    suspects = [str(p.relative_to(repo)) for folder in ("reco", "pipelines", "index", "trainer")
                for p in (repo / folder).rglob("*.py")
                if url_path.search(p.read_text()) and str(p.relative_to(repo)) not in allowed]
    assert not suspects, suspects
