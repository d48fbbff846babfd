"""``reco query``: the k memory neighbours of an image file or of a text, with their captions.

An image searches the memory's image index and a text its text index (RECO's uni-modal search);
``--index`` picks the other one. Captions, URLs and labels are looked up in the embedded memory
shards the index was built from.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from reco.errors import ConfigError, FormatError
from reco.formats import Manifest
from reco.options import MAX_K, flag_range


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("query")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", default=None, help="image file to query with")
    src.add_argument("--text", default=None, help="text to query with")
    g.add_argument("--k", type=flag_range(1, MAX_K), default=10, help="neighbours to show")
    g.add_argument("--index", choices=("img", "txt"), default=None,
                   help="memory index searched (default: img for --image, txt for --text)")
    g.add_argument("--memory", default=None, help="memory index folder (default: WORKDIR/index); "
                   "any fsspec path (a URL is mirrored into WORKDIR/cache/)")


def main(cfg, args: argparse.Namespace) -> int:
    from reco.remote import local_input

    rows, info = run_query(cfg, image=args.image, text=args.text, k=args.k, index=args.index,
                           memory_dir=local_input(cfg.workdir, args.memory, "memory"))
    if args.json:
        print(json.dumps({"info": info, "neighbours": rows}, indent=2))      # --json: a common option
    else:
        print(format_rows(rows, info))
    return 0


def memory_metadata(folder: str | Path) -> dict[int, dict[str, Any]]:
    """``{memory id: {"caption", "url", "label"}}`` from embedded shards (id/url/caption/label
    columns only)."""
    from reco.embedded import read_table, shard_schema

    manifest = Manifest.read(folder, kind="embedded")
    out: dict[int, dict[str, Any]] = {}
    for path in manifest.shard_paths(folder):
        names = shard_schema(path).names
        cols = ["id"] + [c for c in ("url", "caption", "label") if c in names]
        for row in read_table(path, columns=cols).to_pylist():
            out[int(row.pop("id"))] = row
    return out


def run_query(cfg, *, image: str | Path | None = None, text: str | None = None, k: int = 10,
              index: str | None = None, memory_dir: str | Path | None = None,
              metadata_dir: str | Path | None = None) -> tuple[list[dict], dict]:
    """Neighbours of one image file or text in the memory.

    Args:
        image / text: the query (exactly one).
        k: neighbours returned; index: "img" or "txt" (default: the query's own modality).
        memory_dir: memory index folder (default ``cfg.paths.index``).
        metadata_dir: embedded memory shards for captions (default ``cfg.paths.embedded("memory")``).
    Returns (rows: rank, id, score, caption, url, label), info.
    """
    from reco.clip import load_clip, resolve_model_spec
    from reco.index.memory import Memory

    if (image is None) == (text is None):
        raise ConfigError("give exactly one of --image and --text")
    if k < 1:
        raise ConfigError(f"--k {k}: must be >= 1")
    if image is not None and not Path(image).is_file():
        raise ConfigError(f"--image {image}: no such file")
    index = index or ("img" if image is not None else "txt")
    memory = Memory.load(Path(memory_dir or cfg.paths.index))
    model, pretrained = resolve_model_spec(cfg.clip.model, cfg.clip.pretrained, cfg.paths.base_clip)
    clip = load_clip(model, pretrained, device=cfg.clip.device)
    query = embed_query(clip, image=image, text=text)
    scores, positions = memory.search(query, index, k)
    meta = memory_metadata(metadata_dir or cfg.paths.embedded("memory"))
    rows = neighbour_rows(memory, scores[0], positions[0], meta)
    info = {"query": str(image) if image is not None else text, "modality": "image" if image else "text",
            "index": index, "k": k, "memory_size": int(len(memory.ids)), "model_id": clip.model_id}
    return rows, info


def embed_query(clip, *, image=None, text=None) -> np.ndarray:
    """(1, d) float32 normalised CLIP embedding of an image file or a text."""
    import torch
    from PIL import Image, UnidentifiedImageError

    from reco.clip import encode_images, encode_texts

    if text is not None:
        return encode_texts(clip, [text]).numpy().astype(np.float32)
    try:
        with Image.open(image) as im:
            pixels = clip.preprocess(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        raise FormatError(f"{image}: not a readable image ({exc})") from exc
    return encode_images(clip, torch.stack([pixels])).numpy().astype(np.float32)


def neighbour_rows(memory, scores: np.ndarray, positions: np.ndarray,
                   meta: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for rank, (score, pos) in enumerate(zip(scores, positions), start=1):
        if pos < 0:
            continue
        mid = int(memory.ids[pos])
        extra = meta.get(mid, {})
        rows.append({"rank": rank, "id": mid, "score": round(float(score), 4),
                     "caption": extra.get("caption"), "url": extra.get("url"),
                     "label": extra.get("label")})
    return rows


def format_rows(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    lines = [f"{info['modality']} query {info['query']!r} -> {info['index']} index "
             f"({info['memory_size']} items), top {len(rows)}:",
             f"{'rank':>4}  {'id':>7}  {'score':>6}  {'label':>5}  caption  [url]"]
    for r in rows:
        label = "" if r["label"] is None else r["label"]
        lines.append(f"{r['rank']:>4}  {r['id']:>7}  {r['score']:>6.3f}  {label!s:>5}  "
                     f"{r['caption']}  [{r['url']}]")
    return "\n".join(lines)

