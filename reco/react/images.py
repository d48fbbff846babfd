"""Where REACT gets image pixels: a small registry of image sources.

REACT trains vision blocks, so unlike RECO it needs the images of the customisation set (and of
the evaluation set). They are never downloaded a second time:

* ``world``: the generated world's own files: a URL is looked up in the world's URL lists and
  its file is named from the split and row it is listed at (:class:`reco.stored_images.WorldImages`;
  a path is never derived from a URL).
* ``embedded``: an ``image`` (bytes) column in the embedded shards of a split, for an embed job
  that stores the resized images it downloaded.

Each source is ``fn(cfg, rows) -> list[bytes]`` where ``rows`` is a table with ``url`` (and
``memory_id``/``id`` for ``embedded``); :func:`load_pixels` decodes and preprocesses them once.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from reco.config import RecoConfig
from reco.errors import ConfigError, FormatError
from reco.stored_images import WorldImages

ImageSource = Callable[[RecoConfig, pa.Table], list[bytes]]


def world_file(world_root: str | Path, url: str) -> Path:
    """The world's file for ``url`` (by the row that lists it in the world's URL lists)."""
    return WorldImages(world_root).expected_path(url)


def world_images(cfg: RecoConfig, rows: pa.Table) -> list[bytes]:
    out = []
    store = WorldImages(cfg.paths.world)
    for i, url in enumerate(rows.column("url").to_pylist()):
        path = store.expected_path(url)
        try:
            out.append(path.read_bytes())
        except OSError as exc:
            raise FormatError(f"row {i}: url {url!r} -> {path}: cannot read the image ({exc})") from exc
    return out


def embedded_images(cfg: RecoConfig, rows: pa.Table, split: str = "memory") -> list[bytes]:
    from reco.embedded import read_table, shard_schema
    from reco.formats import Manifest

    folder = cfg.paths.embedded(split)
    id_col = "memory_id" if "memory_id" in rows.column_names else "id"
    wanted = rows.column(id_col).to_numpy()
    found: dict[int, bytes] = {}
    for shard in Manifest.read(folder).shard_paths(folder):
        names = shard_schema(shard).names
        if "image" not in names:
            raise FormatError(f"{shard}: no 'image' column; the embed job did not store images. "
                              f"Use --image-source world (images of the generated world) instead")
        table = read_table(shard, columns=["id", "image"])
        ids = table.column("id").to_numpy()
        keep = np.isin(ids, wanted)
        for i, img in zip(ids[keep], table.column("image").filter(pa.array(keep)).to_pylist()):
            found[int(i)] = img
    missing = [int(i) for i in wanted if int(i) not in found or found[int(i)] is None]
    if missing:
        raise FormatError(f"{folder}: no stored image for id(s) {missing[:5]} "
                          f"({len(missing)} missing)")
    return [found[int(i)] for i in wanted]


def webdataset_images(cfg: RecoConfig, rows: pa.Table) -> list[bytes]:
    """Images of ``rows`` found by URL in the webdataset download ``cfg.react.eval_shards``."""
    from reco.react.shards import images_by_url

    if not cfg.react.eval_shards:
        raise ConfigError("image source 'webdataset' needs react.eval_shards (a webdataset "
                          "download holding the images, matched by URL)")
    return images_by_url(cfg.react.eval_shards, rows.column("url").to_pylist(), cfg.embed)


SOURCES: dict[str, ImageSource] = {"world": world_images, "embedded": embedded_images,
                                   "webdataset": webdataset_images}


def get_source(name: str) -> ImageSource:
    if name not in SOURCES:
        raise ConfigError(f"image source {name!r}: choose one of {', '.join(sorted(SOURCES))}")
    return SOURCES[name]


def load_pixels(cfg: RecoConfig, rows: pa.Table, preprocess: Callable, *,
                source: str) -> torch.Tensor:
    """Decode and preprocess every image of ``rows`` once -> (n, 3, H, W) float32 tensor."""
    from PIL import Image

    fetch = get_source(source)
    if rows.num_rows == 0:
        raise FormatError("no rows to load images for")
    tensors = []
    for i, data in enumerate(fetch(cfg, rows)):
        try:
            with Image.open(io.BytesIO(data)) as img:
                tensors.append(preprocess(img.convert("RGB")))
        except OSError as exc:
            raise FormatError(f"row {i} ({rows.column('url')[i].as_py()}): not a decodable "
                              f"image ({exc})") from exc
    return torch.stack(tensors).float()
