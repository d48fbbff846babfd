"""A cache of generated worlds and their trained base CLIPs across runs and work trees.

``<root>/world/<key>/{world,base_clip}``, keyed by the world and base-CLIP configs plus a hash of
the world package's source and the model configs, so a warm run restores in seconds what costs
minutes to build. The root is ``$RECO_TEST_CACHE`` (default ``<repo>/.cache``); the test fixtures
and ``python -m experiments.longtail`` share it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORLD_MODULES = ("base_clip", "build", "captions", "config", "render", "species")   # not the server


def cache_root() -> Path:
    """``$RECO_TEST_CACHE/world`` (default ``<repo>/.cache/world``)."""
    return Path(os.environ.get("RECO_TEST_CACHE", REPO / ".cache")) / "world"


def cache_key(cfg) -> str:
    """World + base-CLIP keys plus a hash of the code and model config that produce them."""
    import reco.world
    from reco.clip import CONFIG_DIR
    from reco.world.base_clip import base_clip_key
    from reco.world.build import world_key

    digest = hashlib.sha256()
    package = Path(reco.world.__file__).parent          # the modules that make the world's bytes
    sources = [package / f"{m}.py" for m in WORLD_MODULES] + sorted(CONFIG_DIR.glob("*.json"))
    for path in sources:
        digest.update(path.name.encode() + path.read_bytes())
    wkey = world_key(cfg.world)
    return f"{wkey}-{base_clip_key(cfg.base_clip, wkey, cfg.seed)}-{digest.hexdigest()[:12]}"


def _restore(cfg, folder: Path) -> bool:
    if not (folder / "world" / "world.json").is_file() or not (folder / "base_clip" / "info.json").is_file():
        return False
    for name in ("world", "base_clip"):
        shutil.copytree(folder / name, getattr(cfg.paths, name), dirs_exist_ok=True)
    return True


def _store(cfg, folder: Path) -> None:
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        for name in ("world", "base_clip"):
            shutil.copytree(getattr(cfg.paths, name), tmp / name)
        tmp.rename(folder)
    except OSError:
        pass                       # another session stored it first, or a read-only checkout
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_world(cfg, use_cache: bool = True, root: str | Path | None = None) -> dict:
    """``run_world(cfg)`` (world + base CLIP of a RecoConfig), restoring from / saving to the
    cache under ``root`` (default :func:`cache_root`)."""
    from reco.world.build import run_world

    folder = Path(root or cache_root()) / cache_key(cfg)
    hit = use_cache and _restore(cfg, folder)
    info = run_world(cfg)
    if use_cache and not hit:
        _store(cfg, folder)
    return info
