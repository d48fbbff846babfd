"""Synthetic embedded splits (clustered unit vectors) for the index tests and benchmarks.

They are written with the real format (``reco.formats.embedded_schema`` + manifest), so the
readers under test are the real ones.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from reco import formats


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered_pairs(n: int, dim: int, n_clusters: int, seed: int = 0, spread: float = 0.6,
                    text_noise: float = 0.5, centers: tuple[np.ndarray, np.ndarray] | None = None):
    """(image, text, labels): n pairs around ``n_clusters`` centres per modality.

    Image i = unit(center_img[c] + spread * noise); its text = unit(center_txt[c] + text_noise *
    noise). Pass ``centers`` (from a previous call's ``.centers``) to draw another split of the
    same world.
    """
    rng = np.random.default_rng(seed)
    if centers is None:
        centers = (unit(rng.standard_normal((n_clusters, dim))), unit(rng.standard_normal((n_clusters, dim))))
    labels = rng.integers(0, len(centers[0]), n)
    noise = rng.standard_normal((2, n, dim)).astype(np.float32) / np.sqrt(dim)
    image = unit(centers[0][labels] + spread * noise[0])
    text = unit(centers[1][labels] + text_noise * noise[1])
    return image, text, labels, centers


def write_embedded(folder: str | Path, image: np.ndarray, text: np.ndarray, *,
                   ids: np.ndarray | None = None, labels: np.ndarray | None = None,
                   status: list[str] | None = None, model: str = "synthetic", pretrained: str = "",
                   shard_size: int = 1000) -> formats.Manifest:
    """Write embedded shards + manifest (kind "embedded"); rows whose status is not success get
    zero embeddings, as the embed stage writes them (``reco.formats.embedded_schema``)."""
    folder = Path(folder)
    n, dim = image.shape
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    status = status or [formats.STATUS_OK] * n
    schema = formats.embedded_schema(dim, model, pretrained)
    manifest = formats.Manifest(kind="embedded", info={"model_id": f"{model}|{pretrained}", "dim": dim,
                                                                "format": formats.EMBEDDED_FORMAT})
    for shard, start in enumerate(range(0, n, shard_size)):
        sl = slice(start, min(start + shard_size, n))
        ok = np.array([s == formats.STATUS_OK for s in status[sl]])
        columns = {
            "id": pa.array(ids[sl]), "url": pa.array([f"http://x/{i}.jpg" for i in ids[sl]]),
            "caption": pa.array([f"caption {i}" for i in ids[sl]]),
            "label": (pa.array(labels[sl], type=pa.int64()) if labels is not None
                      else pa.nulls(len(ok), pa.int64())),
            "status": pa.array(status[sl]), "error_message": pa.nulls(len(ok), pa.string()),
        }
        for name, vec in (("image_emb", image[sl]), ("text_emb", text[sl])):
            columns[name] = formats.encode_vectors(np.where(ok[:, None], vec, 0.0), dim)
        table = pa.Table.from_pydict(columns, schema=schema)
        name = f"part-{shard:05d}.parquet"
        formats.atomic_write_table(table, folder / name)
        manifest.shards.append(name)
        manifest.counts[name] = int(sl.stop - sl.start)
    manifest.counts["success"] = int(sum(s == formats.STATUS_OK for s in status))
    manifest.write(folder)
    return manifest
