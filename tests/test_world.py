"""The generated world: determinism, split invariants, loopback serving, hostile endpoints and
the base CLIP (aligned on attributes, weak on species names)."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reco import config as config_lib
from reco.errors import ConfigError
from reco.formats import read_parquet
from reco.world import captions as cap
from reco.world.build import SPLITS, build_world, ensure_world, world_key
from reco.world.config import WorldConfig
from reco.world.render import render_png, sample_pose
from reco.world.server import WorldServer, free_port
from reco.world.species import make_species, split_seen_unseen

MICRO = WorldConfig(n_species=8, n_pretrain=40, n_memory=60, n_train=30, n_test_per_species=2,
                    unseen_fraction=0.25, dead_link_rate=0.1, port=8123)
# measured on the tiny preset (80 species), world seeds 0-3: attribute top-1 0.64-0.78, names 0.12-0.20
MIN_ATTRIBUTE_TOP1 = 0.6
MIN_GAP = 0.25


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


# ---------------------------------------------------------------------------------------------
# species, rendering, captions
# ---------------------------------------------------------------------------------------------

def test_species_are_distinct_and_names_do_not_leak_the_look():
    species = make_species(100, seed=3)
    assert len({s.attributes for s in species}) == 100
    assert len({s.name for s in species}) == 100
    words = [w for s in species for w in s.name.split()]
    assert len(words) == len(set(words)) == 200
    for s in species:
        assert not {s.shape, s.body, s.pattern, s.pattern_colour} & set(s.name.split())
    assert make_species(100, seed=3) == species and make_species(100, seed=4) != species
    seen, unseen = split_seen_unseen(40, 0.3, seed=0)
    assert len(unseen) == 12 and sorted(seen + unseen) == list(range(40))
    with pytest.raises(ConfigError, match="n_species"):
        make_species(0, seed=0)


def test_render_is_deterministic_and_sized():
    sp = make_species(4, seed=0)[1]
    pose = sample_pose(np.random.default_rng(5))
    a, b = render_png(sp, pose, 32), render_png(sp, sample_pose(np.random.default_rng(5)), 32)
    assert a == b
    assert render_png(sp, sample_pose(np.random.default_rng(6)), 32) != a
    img = Image.open(io.BytesIO(render_png(sp, pose, 48)))
    assert img.size == (48, 48) and img.mode == "RGB"


def test_captions_kinds():
    species = make_species(5, seed=0)
    sp, rng = species[0], np.random.default_rng(0)
    assert cap.name_prompt(sp) == f"a photo of a {sp.name}."
    assert sp.shape in cap.attribute_prompt(sp) and sp.body in cap.attribute_prompt(sp)
    assert sp.name in cap.caption("name", sp, "dark", rng, species)
    mixed = cap.caption("mixed", sp, "dark", rng, species)
    assert sp.name in mixed and sp.shape in mixed
    attr = cap.caption("attribute", sp, "dark", rng, species)
    assert sp.shape in attr and sp.name not in attr
    wrong = cap.caption("wrong_name", sp, "dark", rng, species)
    assert sp.name not in wrong and any(o.name in wrong for o in species[1:])
    assert all(s.name not in cap.caption("generic", sp, "grey", rng, species) for s in species)
    kinds = [cap.choose_kind(rng, 0.8, 0.0) for _ in range(2000)]
    assert 0.75 < np.mean([k in ("name", "mixed") for k in kinds]) < 0.85


# ---------------------------------------------------------------------------------------------
# build: determinism and invariants (micro world, built here)
# ---------------------------------------------------------------------------------------------

def test_build_is_deterministic(tmp_path):
    a = build_world(MICRO, tmp_path / "a")
    b = build_world(MICRO, tmp_path / "b")
    assert _tree_hashes(tmp_path / "a") == _tree_hashes(tmp_path / "b")
    assert a["content_hash"] == b["content_hash"]
    c = build_world(dataclasses.replace(MICRO, seed=1), tmp_path / "c")
    assert c["images_hash"] != a["images_hash"] and c["content_hash"] != a["content_hash"]
    assert world_key(MICRO) == world_key(dataclasses.replace(MICRO, port=1)) != world_key(
        dataclasses.replace(MICRO, noise=0.5))


def test_build_reuses_and_readdresses(tmp_path):
    first = ensure_world(MICRO, tmp_path)
    assert first["action"] == "built"
    assert ensure_world(MICRO, tmp_path)["action"] == "kept"
    moved = ensure_world(dataclasses.replace(MICRO, port=9999), tmp_path)
    assert moved["action"] == "readdressed" and moved["images_hash"] == first["images_hash"]
    urls = read_parquet(tmp_path / "urls" / "memory.parquet").column("url").to_pylist()
    assert all(u.startswith("http://127.0.0.1:9999/images/memory/") for u in urls)
    fresh = build_world(dataclasses.replace(MICRO, port=9999), tmp_path / "fresh")
    assert fresh["content_hash"] == moved["content_hash"]


def test_bad_world_config_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="world.noise"):
        build_world(dataclasses.replace(MICRO, noise=1.5), tmp_path)
    with pytest.raises(ConfigError, match="world.n_memory"):
        build_world(dataclasses.replace(MICRO, n_memory=0), tmp_path)


def _check_invariants(world: Path, cfg: WorldConfig) -> None:
    info = json.loads((world / "world.json").read_text())
    spec = json.loads((world / "species.json").read_text())
    names = (world / "classnames.txt").read_text().splitlines()
    n = cfg.n_species
    assert names == [s["name"] for s in spec["species"]] and len(names) == n
    assert sorted(spec["seen"] + spec["unseen"]) == list(range(n))
    tables = {s: read_parquet(world / "urls" / f"{s}.parquet", required=["url", "caption", "label"])
              for s in SPLITS}
    for split, table in tables.items():
        assert str(table.schema.field("label").type) == "int64"
        assert table.num_rows == info["counts"][split]
        assert set(table.column("label").to_pylist()) <= set(range(n))
    train_labels = set(tables["train"].column("label").to_pylist())
    assert not train_labels & set(spec["unseen"]) and train_labels == set(spec["seen"])
    assert set(tables["memory"].column("label").to_pylist()) == set(range(n))
    test_labels = tables["test"].column("label").to_pylist()
    assert sorted(test_labels) == sorted(list(range(n)) * cfg.n_test_per_species)
    for caption, label in zip(tables["test"].column("caption").to_pylist(), test_labels):
        assert caption == f"a photo of a {names[label]}."
    # dead links have no file; every other URL does
    meta = read_parquet(world / "meta" / "memory.parquet").to_pydict()
    base = info["base_url"]
    for url, dead in zip(tables["memory"].column("url").to_pylist(), meta["dead"]):
        assert (world / url[len(base):]).is_file() != dead
    assert sum(meta["dead"]) == info["dead_links"] == round(cfg.dead_link_rate * cfg.n_memory)
    # exact copies of test images in the memory, recorded with their rows
    dups = info["eval_duplicates_in_memory"]
    assert len(dups) == min(5, cfg.n_memory, n * cfg.n_test_per_species)
    mem_urls, test_urls = tables["memory"].column("url").to_pylist(), tables["test"].column("url").to_pylist()
    for d in dups:
        mem = (world / mem_urls[d["memory_row"]][len(base):]).read_bytes()
        assert mem == (world / test_urls[d["test_row"]][len(base):]).read_bytes()
        assert tables["memory"].column("label")[d["memory_row"]].as_py() == d["label"] == test_labels[d["test_row"]]


def test_micro_world_invariants(tmp_path):
    build_world(MICRO, tmp_path)
    _check_invariants(tmp_path, MICRO)


# ---------------------------------------------------------------------------------------------
# the tiny world of the session fixture
# ---------------------------------------------------------------------------------------------

def test_tiny_world_invariants_and_caption_rates(tiny_world):
    cfg = tiny_world
    _check_invariants(cfg.paths.world, cfg.world)
    info = json.loads((cfg.paths.world / "world.json").read_text())
    kinds = info["caption_kinds"]
    named = lambda split: (kinds[split].get("name", 0) + kinds[split].get("mixed", 0)) / info["counts"][split]  # noqa: E731
    assert named("pretrain") < 0.1 and named("memory") > 0.5 and named("train") > 0.5
    noisy = (kinds["memory"].get("generic", 0) + kinds["memory"].get("wrong_name", 0)) / info["counts"]["memory"]
    assert abs(noisy - cfg.world.noise) < 0.05


def test_server_serves_the_url_lists(tiny_world):
    world = tiny_world.paths.world
    base = f"http://{tiny_world.world.host}:{tiny_world.world.port}/"
    rng = np.random.default_rng(0)
    meta = read_parquet(world / "meta" / "memory.parquet").to_pydict()
    for split in SPLITS:
        urls = read_parquet(world / "urls" / f"{split}.parquet").column("url").to_pylist()
        assert all(u.startswith(base) for u in urls)
        for i in rng.choice(len(urls), size=min(15, len(urls)), replace=False):
            status, body = _get(urls[i])
            dead = split == "memory" and meta["dead"][i]
            assert status == (404 if dead else 200), urls[i]
            if not dead:
                assert body == (world / urls[i][len(base):]).read_bytes()
                assert Image.open(io.BytesIO(body)).size == (32, 32)
    dead_rows = [i for i, d in enumerate(meta["dead"]) if d][:5]
    urls = read_parquet(world / "urls" / "memory.parquet").column("url").to_pylist()
    assert dead_rows and all(_get(urls[i])[0] == 404 for i in dead_rows)


def test_cli_world_is_idempotent_and_prints_accuracies(tiny_world, capsys):
    from reco.cli import main

    cfg = tiny_world
    rc = main(["world", "--preset", "tiny", "--workdir", cfg.workdir,
               "--set", f"world.port={cfg.world.port}"])
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert rc == 0 and "kept" in lines["generated"] and "kept" in lines["base"] and "attribute prompts" in out


# ---------------------------------------------------------------------------------------------
# server
# ---------------------------------------------------------------------------------------------

def test_server_hostile_endpoints(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    with WorldServer(tmp_path) as server:
        url = server.base_url + "_hostile/"
        assert _get(server.base_url + "a.png") == (200, b"x")
        assert _get(server.base_url + "missing.png")[0] == 404
        assert _get(url + "404/x")[0] == 404
        assert _get(url + "500/x")[0] == 500
        for kind, error in (("garbage", Image.UnidentifiedImageError), ("truncated", OSError),
                            ("bomb", Image.DecompressionBombError)):
            status, body = _get(url + f"{kind}/x.png")
            assert status == 200 and len(body) < 200_000
            with pytest.raises(error):
                Image.open(io.BytesIO(body)).load()
        start = time.monotonic()
        with pytest.raises((TimeoutError, socket.timeout, urllib.error.URLError)):
            urllib.request.urlopen(url + "slow/x.png?s=5", timeout=0.3)
        assert time.monotonic() - start < 4
        status, body = _get(url + "slow/x.png?s=0.05")
        assert status == 200 and Image.open(io.BytesIO(body)).size == (32, 32)
        with pytest.raises(urllib.error.HTTPError, match="redirect"):
            urllib.request.urlopen(url + "redirect-loop/x", timeout=5)
        port = server.port
    with pytest.raises(urllib.error.URLError):           # stopped: nothing listens any more
        urllib.request.urlopen(f"http://127.0.0.1:{port}/a.png", timeout=2)


def test_server_refuses_non_loopback_and_busy_ports(tmp_path):
    for host in ("0.0.0.0", "8.8.8.8"):
        with pytest.raises(ConfigError, match="loopback"):
            WorldServer(tmp_path, host=host)
    port = free_port()
    with WorldServer(tmp_path, port=port) as server:
        assert server.port == port and server.base_url == f"http://127.0.0.1:{port}/"
        with pytest.raises(ConfigError, match="cannot bind"):
            WorldServer(tmp_path, port=port).start()
    with WorldServer(tmp_path, port=port):               # port released on stop
        pass


# ---------------------------------------------------------------------------------------------
# the base CLIP
# ---------------------------------------------------------------------------------------------

def test_base_clip_is_aligned_on_attributes_and_weak_on_names(tiny_world):
    from reco.clip import load_clip, resolve_model_spec
    from reco.world.base_clip import read_info, zero_shot

    cfg = tiny_world
    model, pretrained = resolve_model_spec(cfg.clip.model, cfg.clip.pretrained, cfg.paths.base_clip)
    assert model == f"local-dir:{cfg.paths.base_clip}"
    clip = load_clip(model, pretrained)
    assert clip.embed_dim == 64 and clip.image_size == cfg.world.image_size
    acc = zero_shot(clip, cfg.paths.world)
    print(f"\nbase CLIP zero-shot on the tiny test split: {acc}; "
          f"training info: {json.dumps({k: read_info(cfg.paths.base_clip)[k] for k in ('train_seconds', 'final_loss')})}")
    assert acc["n_images"] == cfg.world.n_species * cfg.world.n_test_per_species
    assert acc["attribute_top1"] >= MIN_ATTRIBUTE_TOP1
    assert acc["name_top1"] <= acc["attribute_top1"] - MIN_GAP
    assert acc == read_info(cfg.paths.base_clip)["zero_shot"]           # saved weights = trained


def test_preset_sizes():
    tiny, demo = config_lib.preset("tiny"), config_lib.preset("demo")
    assert tiny.world.n_species < demo.world.n_species
    assert tiny.base_clip.steps <= demo.base_clip.steps


def test_serve_world_command_serves_until_stopped(tmp_path):
    import threading

    from reco.world.serve_cli import serve

    build_world(MICRO, tmp_path)
    port, stop = free_port(), threading.Event()
    thread = threading.Thread(target=serve, args=(tmp_path, "127.0.0.1", port, stop), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}/images/test/000000.png"
    for _ in range(100):
        try:
            status, body = _get(url, timeout=1)
            break
        except urllib.error.URLError:
            time.sleep(0.05)
    assert status == 200 and body == (tmp_path / "images/test/000000.png").read_bytes()
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()
    with pytest.raises(ConfigError, match="run `reco world` first"):
        serve(tmp_path / "nowhere", "127.0.0.1", port)
