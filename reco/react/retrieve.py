"""``reco react-retrieve``: REACT's retrieval of a customisation set for a list of class names.

For every class name and prompt template the text is embedded with the frozen CLIP and the memory
indices are queried: text -> memory images (cross-modal search, ``Memory.search(q, "img", k)``)
and/or text -> memory captions (``Memory.search(q, "txt", k)``; the default, see
``DEFAULT_SEARCHES``). Per class, the best ``per_class`` distinct memory items are kept (best raw
inner product over templates and searches); an item retrieved for several classes is kept once,
for the class it scores best on, and memory images that duplicate evaluation images are left out.
The set is joined back to the embedded memory shards (url, caption; any memory, an imported
clip-retrieval release included) and written as a Parquet URL list (url, caption, key, class)
for ``react-download``:
``cfg.paths.react / customisation.parquet`` (+ ``retrieval.json`` with per-class counts).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from reco.config import RecoConfig
from reco.errors import ConfigError, FormatError, MismatchError
from reco.formats import Manifest, atomic_write_table, atomic_write_text
from reco.options import value_flags

log = logging.getLogger(__name__)

SET_FILE = "customisation.parquet"
INFO_FILE = "retrieval.json"
SEARCHES = ("img", "txt")
# Default: text -> captions only. On the tiny world its hits name the right species 65% of the
# time against 14% for text -> images (weak base CLIP), and REACT trained on it scores higher.
DEFAULT_SEARCHES = ("txt",)
DEFAULT_PER_CLASS = 25
CANDIDATE_FACTOR = 2

CUSTOMISATION_SCHEMA = pa.schema([
    pa.field("url", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("key", pa.string()),              # webdataset sample key of react-download's tars
    pa.field("memory_id", pa.int64(), nullable=False),
    pa.field("class_id", pa.int64(), nullable=False),
    pa.field("classname", pa.string()),
    pa.field("score", pa.float32()),
    pa.field("search", pa.string()),         # index that found it at its best score: img | txt
    pa.field("memory_label", pa.int64()),     # the memory row's own label (analysis), null if none
], metadata={b"reco.format": b"react-customisation/1"})


def key_of(memory_id: int) -> str:
    """The webdataset key of a memory row in the customisation set (its id, zero-padded)."""
    return f"{memory_id:09d}"


def load_frozen_clip(cfg: RecoConfig):
    """The frozen base CLIP every stage uses (``cfg.clip`` resolved against ``base_clip/``)."""
    from reco.clip import load_clip, resolve_model_spec

    model, pretrained = resolve_model_spec(cfg.clip.model, cfg.clip.pretrained, cfg.paths.base_clip)
    clip = load_clip(model, pretrained, device=cfg.clip.device, precision=cfg.clip.precision)
    clip.model.requires_grad_(False)
    return clip


def load_memory(cfg: RecoConfig):
    """The memory indices built by build-index (``cfg.paths.index``)."""
    from reco.index.memory import Memory

    return Memory.load(cfg.paths.index, mmap=cfg.index.mmap)


def candidates(memory, queries: np.ndarray, prompt_class: np.ndarray, n_classes: int, k: int,
               searches: Sequence[str] = SEARCHES) -> dict[int, dict[int, tuple[float, str]]]:
    """class -> {memory position: (best score, search)} over all prompts of the class."""
    best: dict[int, dict[int, tuple[float, str]]] = {c: {} for c in range(n_classes)}
    for search in searches:
        scores, positions = memory.search(np.ascontiguousarray(queries, np.float32), search, k)
        for row, cls in enumerate(prompt_class):
            found = best[int(cls)]
            for score, pos in zip(scores[row], positions[row]):
                if pos < 0:
                    continue
                old = found.get(int(pos))
                if old is None or score > old[0]:
                    found[int(pos)] = (float(score), search)
    return best


def eval_duplicates(memory, eval_image_emb: np.ndarray | None, threshold: float, k: int = 16) -> set[int]:
    """Memory positions whose image is a near-duplicate (inner product >= ``threshold``) of an
    evaluation image: kept out of the customisation set, as RECO keeps them out of retrieval."""
    if eval_image_emb is None or len(eval_image_emb) == 0:
        return set()
    scores, positions = memory.search(np.ascontiguousarray(eval_image_emb, np.float32), "img",
                                      min(k, len(memory.ids)))
    return {int(p) for p in positions[(scores >= threshold) & (positions >= 0)]}


def select(best: dict[int, dict[int, tuple[float, str]]], per_class: int,
           blocked: set[int] = frozenset()) -> list[tuple[int, int, float, str]]:
    """Top ``per_class`` per class, each memory position once (for its best-scoring class).
    Returns (class, position, score, search) rows, by class then score."""
    owner: dict[int, tuple[float, int]] = {}
    best = {cls: {p: v for p, v in found.items() if p not in blocked} for cls, found in best.items()}
    for cls, found in best.items():
        for pos, (score, _) in found.items():
            if pos not in owner or score > owner[pos][0]:
                owner[pos] = (score, cls)
    rows = []
    for cls, found in best.items():
        mine = [(s, pos, how) for pos, (s, how) in found.items() if owner[pos][1] == cls]
        mine.sort(key=lambda r: (-r[0], r[1]))
        rows += [(cls, pos, s, how) for s, pos, how in mine[:per_class]]
    return rows


def read_memory_rows(folder: str | Path, ids: np.ndarray) -> dict[int, dict[str, Any]]:
    """id -> {url, caption, label} of the embedded memory shards (only the ``ids`` asked for)."""
    from reco.embedded import read_table, shard_schema

    manifest = Manifest.read(folder)
    wanted = set(int(i) for i in ids)
    rows: dict[int, dict[str, Any]] = {}
    for shard in manifest.shard_paths(folder):
        names = shard_schema(shard).names
        missing = [c for c in ("id", "url", "caption") if c not in names]
        if missing:
            raise FormatError(f"{shard}: missing column(s) {missing}")
        cols = ["id", "url", "caption"] + (["label"] if "label" in names else [])
        for row in read_table(shard, columns=cols).to_pylist():
            if row["id"] in wanted:
                rows[int(row["id"])] = row
    lost = sorted(wanted - set(rows))
    if lost:
        raise FormatError(f"{folder}: memory id(s) {lost[:5]} of the index are not in the embedded "
                          f"shards ({len(lost)} missing); index and embeddings do not match")
    return rows


def retrieve_customisation_set(cfg: RecoConfig, classnames: Sequence[str],
                               templates: Sequence[str] | None = None, *,
                               per_class: int = DEFAULT_PER_CLASS,
                               searches: Sequence[str] = DEFAULT_SEARCHES, memory=None, clip=None,
                               eval_image_emb: np.ndarray | str | Path | None = "auto",
                               out: str | Path | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """Retrieve and write the REACT customisation set of ``classnames``.

    Args:
        classnames: the target concepts (line i of the class-name file = class i).
        templates: prompt templates (``"a photo of a {}."``); default ``cfg.eval.templates``.
        per_class: items kept per class (after de-duplication across classes).
        searches: memory indices queried with the text embedding: ``img`` (cross-modal) and/or
            ``txt`` (text -> captions); default ``txt`` (see DEFAULT_SEARCHES).
        memory: a loaded :class:`reco.index.memory.Memory` (default: ``cfg.paths.index``).
        clip: a loaded frozen CLIP (default: :func:`load_frozen_clip`).
        eval_image_emb: image embeddings (n, d) of the evaluation set, or an embedded split
            folder; memory items with an image this close (>= ``cfg.neighbours.
            eval_dedup_threshold``) are left out. ``"auto"``: the embedded test split when it
            exists; None: no de-duplication against evaluation images.
        out: Parquet file written (default ``cfg.paths.react / customisation.parquet``).
    Returns (table with CUSTOMISATION_SCHEMA, info with per-class counts).
    """
    from reco.evaluation.zeroshot import encode_prompts

    templates = tuple(templates or cfg.eval.templates)
    if per_class < 1:
        raise ConfigError(f"--per-class {per_class}: must be >= 1")
    if not classnames:
        raise ConfigError("no class names to retrieve for")
    bad = [s for s in searches if s not in SEARCHES]
    if bad or not searches:
        raise ConfigError(f"react searches {list(searches)}: choose from {', '.join(SEARCHES)}")
    clip = clip or load_frozen_clip(cfg)
    memory = memory if memory is not None else load_memory(cfg)
    if getattr(memory, "model_id", None) and memory.model_id != clip.model_id:
        raise MismatchError(f"{cfg.paths.index}: memory embedded with {memory.model_id!r}, but the "
                            f"model is {clip.model_id!r}")
    queries = encode_prompts(clip, list(classnames), templates)          # (C, T, d)
    prompt_class = np.repeat(np.arange(len(classnames)), len(templates))
    k = min(len(memory.ids), CANDIDATE_FACTOR * per_class)   # spare hits for de-duplication
    best = candidates(memory, queries.reshape(-1, queries.shape[-1]), prompt_class,
                      len(classnames), k, searches)
    blocked = eval_duplicates(memory, _eval_embeddings(cfg, eval_image_emb, clip.model_id),
                              cfg.neighbours.eval_dedup_threshold)
    chosen = select(best, per_class, blocked)
    table = _to_table(cfg, memory, chosen, classnames)
    out = Path(out) if out else cfg.paths.react / SET_FILE
    atomic_write_table(table, out)
    info = _info(table, classnames, templates, per_class, searches, clip.model_id, out)
    info["eval_duplicates_excluded"] = len(blocked)
    atomic_write_text(out.with_name(INFO_FILE) if out.name == SET_FILE else
                      out.with_suffix(".json"), json.dumps(info, indent=2))
    log.info("react-retrieve: %d pairs for %d classes -> %s", table.num_rows, len(classnames), out)
    return table, info


def _eval_embeddings(cfg: RecoConfig, value, model_id: str) -> np.ndarray | None:
    if value is None or isinstance(value, np.ndarray):
        return value
    from reco.evaluation.data import load_embedded

    folder = cfg.paths.embedded("test") if isinstance(value, str) and value == "auto" else Path(value)
    if isinstance(value, str) and value == "auto" and not (folder / Manifest.FILE).is_file():
        return None
    return load_embedded(folder, model_id=model_id).image_emb


def _to_table(cfg: RecoConfig, memory, chosen, classnames) -> pa.Table:
    positions = np.asarray([pos for _, pos, _, _ in chosen], dtype=np.int64)
    ids = np.asarray(memory.ids)[positions] if len(positions) else np.zeros(0, np.int64)
    rows = read_memory_rows(cfg.paths.embedded("memory"), ids)
    data = {
        "url": [rows[int(i)]["url"] for i in ids],
        "caption": [rows[int(i)]["caption"] for i in ids],
        "key": [key_of(int(i)) for i in ids],
        "memory_id": ids.astype(np.int64),
        "class_id": np.asarray([c for c, _, _, _ in chosen], dtype=np.int64),
        "classname": [classnames[c] for c, _, _, _ in chosen],
        "score": np.asarray([s for _, _, s, _ in chosen], dtype=np.float32),
        "search": [h for _, _, _, h in chosen],
        "memory_label": [rows[int(i)].get("label") for i in ids],
    }
    return pa.Table.from_pydict(data, schema=CUSTOMISATION_SCHEMA)


def _info(table: pa.Table, classnames, templates, per_class, searches, model_id, out) -> dict:
    cls = table.column("class_id").to_numpy()
    counts = np.bincount(cls, minlength=len(classnames)) if len(cls) else np.zeros(len(classnames), int)
    labels = np.asarray([-1 if v is None else v for v in table.column("memory_label").to_pylist()])
    has_label = labels >= 0
    precision = float((labels[has_label] == cls[has_label]).mean()) if has_label.any() else None
    return {"out": str(out), "n_pairs": int(table.num_rows), "n_classes": len(classnames),
            "per_class": int(per_class), "templates": list(templates), "searches": list(searches),
            "model_id": model_id,
            "per_class_counts": {name: int(n) for name, n in zip(classnames, counts)},
            "min_count": int(counts.min()), "max_count": int(counts.max()),
            "label_precision": precision}


def read_customisation_set(path: str | Path) -> pa.Table:
    from reco.formats import read_parquet

    table = read_parquet(path, required=["url", "caption", "memory_id", "class_id"])
    if table.num_rows == 0:
        raise FormatError(f"{path}: empty customisation set")
    return table


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    value_flags(parser, ("--classnames", "FILE", "class-name file, one per line (default: WORLD/classnames.txt)"))
    parser.add_argument("--per-class", type=int, default=DEFAULT_PER_CLASS,
                        help="pairs kept per class")
    parser.add_argument("--template", dest="templates", action="append", default=None,
                        help="prompt template with {} (repeatable; default: eval.templates)")
    parser.add_argument("--search", dest="searches", action="append", choices=SEARCHES,
                        default=None, help="memory index queried by the class prompts: img "
                        "(cross-modal) or txt (captions); repeatable; default: txt")
    value_flags(parser, ("--out", "PATH", f"output Parquet (default: WORKDIR/react/{SET_FILE})"))


def main(cfg: RecoConfig, args: argparse.Namespace) -> int:
    from reco.evaluation.data import read_classnames

    names = read_classnames(args.classnames or cfg.paths.world / "classnames.txt")
    _, info = retrieve_customisation_set(
        cfg, names, tuple(args.templates) if args.templates else None, per_class=args.per_class,
        searches=tuple(args.searches or DEFAULT_SEARCHES), out=args.out)
    from reco.console import print_summary

    print_summary("react-retrieve", {
        "pairs": f"{info['n_pairs']} for {info['n_classes']} classes",
        "output": info.get("out")}, data={k: v for k, v in info.items() if k != "per_class_counts"})
    return 0
