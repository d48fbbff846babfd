"""Build the generated world on disk (images, URL lists, species) and its base CLIP.

Layout under the world folder (``cfg.paths.world``)::

    images/<split>/<index:06d>.png     one file per row (dead memory links have none)
    urls/<split>.parquet               url, caption, label (int64 species id)
    meta/<split>.parquet               row, species, caption kind, background, dead (analysis/tests)
    classnames.txt                     line i = name of species i
    species.json                       attributes, names, "seen" / "unseen" ids
    world.json                         config, key, counts, hashes, eval duplicates in memory

Everything is a pure function of :class:`WorldConfig`: same config, same bytes. URLs contain
``host:port``; images do not, so a world built for another port is re-addressed (URL lists
rewritten) instead of rebuilt.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from reco.console import progress
from reco.errors import ConfigError
from reco.formats import atomic_write_table, atomic_write_text, read_parquet
from reco.world import captions as cap
from reco.world.config import WorldConfig
from reco.world.render import render_png, sample_pose
from reco.world.species import Species, make_species, species_json, split_seen_unseen

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("pretrain", "memory", "train", "test")
_SPLIT_CODE = {s: i for i, s in enumerate(SPLITS)}
N_EVAL_DUPLICATES = 5
_ADDRESS_FIELDS = ("host", "port")


# options added after worlds were cached: left out of the key at their default (same world)
_LATE_DEFAULTS = {"train_zipf": 0.0, "test_group_size": 0, "tail_max": 5}


def world_key(cfg: WorldConfig) -> str:
    """Hash of everything that changes the images and captions (not host/port)."""
    data = {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in _ADDRESS_FIELDS and _LATE_DEFAULTS.get(k, object()) != v}
    data["format_version"] = FORMAT_VERSION
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def base_url(cfg: WorldConfig) -> str:
    return f"http://{cfg.host}:{cfg.port}/"


def _check(cfg: WorldConfig) -> None:
    for name in ("n_species", "n_pretrain", "n_memory", "n_train", "n_test_per_species", "image_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"world.{name}={getattr(cfg, name)}: must be >= 1")
    for name in ("pretrain_name_rate", "memory_name_rate", "train_name_rate", "noise", "dead_link_rate"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ConfigError(f"world.{name}={getattr(cfg, name)}: must be in [0, 1]")
    for name in ("train_zipf", "test_group_size", "tail_max"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"world.{name}={getattr(cfg, name)}: must be >= 0")


# ---------------------------------------------------------------------------------------------
# planning: which species, which caption, which pose, for every row
# ---------------------------------------------------------------------------------------------

def _balanced(n_rows: int, choices: list[int], rng: np.random.Generator) -> np.ndarray:
    """Species ids for n_rows, every choice used (n_rows >= len(choices)), shuffled."""
    ids = np.asarray(choices, dtype=np.int64)[np.arange(n_rows) % len(choices)]
    return ids[rng.permutation(n_rows)]


def _zipf(n_rows: int, choices: list[int], exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Species ids for n_rows drawn with p(rank r) ~ 1 / r**exponent, ranks a random order of
    ``choices`` (low-ranked species may never be drawn)."""
    ranked = np.asarray(choices, dtype=np.int64)[rng.permutation(len(choices))]
    p = 1.0 / np.arange(1, len(ranked) + 1, dtype=np.float64) ** exponent
    return rng.choice(ranked, size=n_rows, p=p / p.sum())


def species_ids(split: str, cfg: WorldConfig, n_species: int, seen: list[int],
                test_species: list[int] | None = None) -> np.ndarray:
    """The species of every row of a split (test: ``test_species``, default all)."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 7, _SPLIT_CODE[split]]))
    if split == "test":
        chosen = np.arange(n_species) if test_species is None else np.asarray(test_species)
        return np.repeat(chosen.astype(np.int64), cfg.n_test_per_species)
    if split == "train" and cfg.train_zipf > 0:
        return _zipf(cfg.n_train, seen, cfg.train_zipf, rng)
    n, choices = {"pretrain": (cfg.n_pretrain, list(range(n_species))),
                  "memory": (cfg.n_memory, list(range(n_species))), "train": (cfg.n_train, seen)}[split]
    return _balanced(n, choices, rng)


def pick_test_groups(cfg: WorldConfig, train_ids: np.ndarray, n_species: int) -> dict[str, list[int]]:
    """Long-tail test species (``cfg.test_group_size`` > 0): ``head`` = the most frequent
    training species, ``tail`` = species with 1..tail_max training pairs, ``unseen`` = species
    with none (random picks, sorted); {} for the balanced world (every species is tested)."""
    size = cfg.test_group_size
    if size == 0:
        return {}
    counts = np.bincount(train_ids, minlength=n_species)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 17]))
    head = np.argsort(-counts, kind="stable")[:size]
    tail = np.flatnonzero((counts >= 1) & (counts <= cfg.tail_max))
    unseen = np.flatnonzero(counts == 0)
    groups = {"head": head, "tail": tail, "unseen": unseen}
    short = [f"{g} ({len(ids)})" for g, ids in groups.items() if len(ids) < size]
    if short or counts[head].min() <= cfg.tail_max:
        raise ConfigError(f"world.test_group_size={size}: too few species in {short or ['head']}; "
                          f"change n_species, n_train or train_zipf")
    return {"head": sorted(int(i) for i in head),
            **{g: sorted(int(i) for i in rng.choice(ids, size=size, replace=False))
               for g, ids in (("tail", tail), ("unseen", unseen))}}


def plan_split(split: str, cfg: WorldConfig, species: list[Species], seen: list[int],
               test_species: list[int] | None = None) -> list[dict]:
    """Rows of a split: species, caption, caption kind and pose, from per-row seeds."""
    ids = species_ids(split, cfg, len(species), seen, test_species)
    rate, noise = {"pretrain": (cfg.pretrain_name_rate, 0.0), "memory": (cfg.memory_name_rate, cfg.noise),
                   "train": (cfg.train_name_rate, 0.0), "test": (1.0, 0.0)}[split]
    rows = []
    for i, sid in enumerate(ids):
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 11, _SPLIT_CODE[split], i]))
        pose = sample_pose(rng)
        sp = species[int(sid)]
        if split == "test":
            kind, text = "test", cap.name_prompt(sp)
        else:
            kind = cap.choose_kind(rng, rate, noise)
            text = cap.caption(kind, sp, pose.background, rng, species)
        rows.append({"row": i, "species": int(sid), "kind": kind, "caption": text, "pose": pose,
                     "dead": False, "copy_of_test": -1})
    return rows


def _mark_memory(memory: list[dict], test: list[dict], species: list[Species], cfg: WorldConfig) -> list[dict]:
    """Dead links and exact copies of test images in the memory (for the cleaning step)."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 13]))
    order = rng.permutation(len(memory))
    n_dead = int(round(cfg.dead_link_rate * len(memory)))
    n_dup = min(N_EVAL_DUPLICATES, len(memory) - n_dead, len(test))
    for j in order[:n_dead]:
        memory[int(j)]["dead"] = True
    duplicates = []
    test_rows = rng.choice(len(test), size=n_dup, replace=False) if n_dup else []
    for j, t in zip(order[n_dead:n_dead + n_dup], test_rows):
        row, src = memory[int(j)], test[int(t)]
        row.update(species=src["species"], kind="name", copy_of_test=int(t),
                   caption=cap.name_caption(species[src["species"]], src["pose"].background, rng))
        duplicates.append({"memory_row": int(j), "test_row": int(t), "label": int(src["species"])})
    return sorted(duplicates, key=lambda d: d["memory_row"])


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------

def _image_rel(split: str, row: int) -> str:
    return f"images/{split}/{row:06d}.png"


def _write_images(out: Path, split: str, rows: list[dict], species: list[Species],
                  cfg: WorldConfig, test_png: dict[int, bytes], digest, bar) -> int:
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    written = 0
    for r in rows:
        bar.update(1)
        if r["dead"]:
            continue
        if r["copy_of_test"] >= 0:
            data = test_png[r["copy_of_test"]]
        else:
            data = render_png(species[r["species"]], r["pose"], cfg.image_size)
        if split == "test":
            test_png[r["row"]] = data
        rel = _image_rel(split, r["row"])
        _write_file(out / rel, data)
        digest.update(f"{rel} {hashlib.sha256(data).hexdigest()}\n".encode())
        written += 1
    return written


def _write_file(path: Path, data: bytes) -> None:
    """Atomic local write (temporary name + rename), without fsspec's per-call overhead."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _url_table(split: str, rows: list[dict], base: str) -> pa.Table:
    return pa.table({
        "url": pa.array([base + _image_rel(split, r["row"]) for r in rows], pa.string()),
        "caption": pa.array([r["caption"] for r in rows], pa.string()),
        "label": pa.array([r["species"] for r in rows], pa.int64()),
    })


def _meta_table(rows: list[dict]) -> pa.Table:
    return pa.table({
        "row": pa.array([r["row"] for r in rows], pa.int64()),
        "species": pa.array([r["species"] for r in rows], pa.int64()),
        "kind": pa.array([r["kind"] for r in rows], pa.string()),
        "background": pa.array([r["pose"].background for r in rows], pa.string()),
        "dead": pa.array([r["dead"] for r in rows], pa.bool_()),
        "copy_of_test": pa.array([r["copy_of_test"] for r in rows], pa.int64()),
    })


def _small_files_hash(out: Path) -> str:
    digest = hashlib.sha256()
    names = ["classnames.txt", "species.json"] + [f"{d}/{s}.parquet" for d in ("urls", "meta") for s in SPLITS]
    for name in names:
        digest.update(f"{name} {hashlib.sha256((out / name).read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()


def _content_hash(images_hash: str, out: Path) -> str:
    return hashlib.sha256(f"{images_hash} {_small_files_hash(out)}".encode()).hexdigest()


def build_world(cfg: WorldConfig, out_dir: str | Path) -> dict[str, Any]:
    """Generate the world into ``out_dir`` (overwriting its files). Returns world.json's content.

    Args:
        cfg: sizes, rates, noise, seed and serving address of the world.
        out_dir: the world folder (``cfg.paths.world`` in a run).
    """
    _check(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "world.json").unlink(missing_ok=True)        # written last: marks a complete world
    for sub in ("images", "urls", "meta"):
        shutil.rmtree(out / sub, ignore_errors=True)
    species = make_species(cfg.n_species, cfg.seed)
    seen, unseen = split_seen_unseen(cfg.n_species, cfg.unseen_fraction, cfg.seed)
    train_ids = species_ids("train", cfg, len(species), seen)
    groups = pick_test_groups(cfg, train_ids, len(species))
    test_species = sorted(i for ids in groups.values() for i in ids) if groups else None
    plans = {s: plan_split(s, cfg, species, seen, test_species) for s in SPLITS}
    seen = sorted(int(i) for i in np.unique(train_ids))          # species the training split holds
    unseen = sorted(set(range(len(species))) - set(seen))
    duplicates = _mark_memory(plans["memory"], plans["test"], species, cfg)
    digest, test_png, written = hashlib.sha256(), {}, {}
    with progress(total=sum(len(p) for p in plans.values()), desc="world: rendering", unit="img") as bar:
        for split in ("test", "pretrain", "memory", "train"):      # test first: memory copies it
            written[split] = _write_images(out, split, plans[split], species, cfg, test_png, digest, bar)
            atomic_write_table(_url_table(split, plans[split], base_url(cfg)), out / "urls" / f"{split}.parquet")
            atomic_write_table(_meta_table(plans[split]), out / "meta" / f"{split}.parquet")
    atomic_write_text(out / "classnames.txt", "".join(f"{s.name}\n" for s in species))
    atomic_write_text(out / "species.json", species_json(species, seen, unseen, groups))
    info = {
        "format_version": FORMAT_VERSION,
        "key": world_key(cfg),
        "config": dataclasses.asdict(cfg),
        "base_url": base_url(cfg),
        "counts": {s: len(plans[s]) for s in SPLITS},
        "images": {s: written[s] for s in SPLITS},
        "n_species": len(species), "n_seen": len(seen), "n_unseen": len(unseen),
        **({"test_groups": {g: len(ids) for g, ids in groups.items()}} if groups else {}),
        "dead_links": sum(r["dead"] for r in plans["memory"]),
        "caption_kinds": {s: _kind_counts(plans[s]) for s in SPLITS},
        "eval_duplicates_in_memory": duplicates,
        "images_hash": digest.hexdigest(),
    }
    info["content_hash"] = _content_hash(info["images_hash"], out)
    atomic_write_text(out / "world.json", json.dumps(info, indent=2, sort_keys=True))
    return info


def _kind_counts(rows: list[dict]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    return dict(sorted(kinds.items()))


def read_world_info(world_dir: str | Path) -> dict[str, Any] | None:
    path = Path(world_dir) / "world.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def readdress_world(cfg: WorldConfig, world_dir: str | Path) -> dict[str, Any]:
    """Point the URL lists of an existing world at ``cfg.host:cfg.port`` (images untouched)."""
    out = Path(world_dir)
    info = read_world_info(out)
    old, new = info["base_url"], base_url(cfg)
    for split in SPLITS:
        path = out / "urls" / f"{split}.parquet"
        table = read_parquet(path, required=["url", "caption", "label"])
        urls = [new + u[len(old):] for u in table.column("url").to_pylist()]
        table = table.set_column(table.schema.get_field_index("url"), "url", pa.array(urls, pa.string()))
        atomic_write_table(table, path)
    info.update(base_url=new, config=dataclasses.asdict(cfg))
    info["content_hash"] = _content_hash(info["images_hash"], out)
    atomic_write_text(out / "world.json", json.dumps(info, indent=2, sort_keys=True))
    return info


def choose_port(cfg: WorldConfig, info: dict | None, world_dir: str | Path) -> WorldConfig:
    """``cfg`` with its serving port decided: ``port=0`` keeps the world's recorded port while
    it is free (or served by this world's own ``reco serve-world``) and picks a free one
    otherwise, so no two worlds (or users) share a fixed port."""
    if cfg.port:
        return cfg
    from reco.world.server import free_port, port_is_free
    from reco.world.serving import served_by_own_server, world_address

    if info is not None:
        with contextlib.suppress(ConfigError):
            host, port = world_address(world_dir)
            if host == cfg.host and (port_is_free(host, port) or served_by_own_server(world_dir, host, port)):
                return dataclasses.replace(cfg, port=port)
    return dataclasses.replace(cfg, port=free_port(cfg.host))


def ensure_world(cfg: WorldConfig, world_dir: str | Path) -> dict[str, Any]:
    """Build the world unless ``world_dir`` already holds it (same key); re-address if only the
    host/port changed (``port=0``: see :func:`choose_port`). Returns world.json's content plus
    ``action`` and ``seconds``."""
    start, cpu_start = time.perf_counter(), time.process_time()
    info = read_world_info(world_dir)
    cfg = choose_port(cfg, info, world_dir)
    if info is not None and info.get("key") == world_key(cfg):
        if info.get("base_url") == base_url(cfg):
            action = "kept"
        else:
            info, action = readdress_world(cfg, world_dir), "readdressed"
    else:
        log.info("building world %s into %s", world_key(cfg), world_dir)
        info, action = build_world(cfg, world_dir), "built"
    return {**info, "action": action, "seconds": round(time.perf_counter() - start, 2),
            "cpu_seconds": round(time.process_time() - cpu_start, 2)}


def run_world(cfg) -> dict[str, Any]:
    """World + base CLIP of a run (``cfg``: RecoConfig), each skipped when already present with
    the same configuration. Returns {"world": ..., "base_clip": ...} infos."""
    from reco.world.base_clip import ensure_base_clip

    world = ensure_world(cfg.world, cfg.paths.world)
    base = ensure_base_clip(cfg.base_clip, cfg.paths.world, cfg.paths.base_clip, seed=cfg.seed,
                            world_key=world["key"])
    return {"world": world, "base_clip": base}
