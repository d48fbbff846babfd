"""Inputs of evaluation: embedded shards, class names, seen/unseen split, image folders."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reco.errors import FormatError, MismatchError
from reco.formats import (STATUS_OK, VECTOR_COLUMNS, Manifest, block_type, check_columns,
                          decode_vectors, embedded_dim)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
COLUMNS = ["id", "url", "caption", "label", "status", "image_emb", "text_emb"]
REQUIRED = ("id", "status", *VECTOR_COLUMNS)


@dataclass
class EmbeddedSplit:
    """The successfully embedded rows of a split (embeddings L2-normalised, float32)."""

    ids: np.ndarray
    image_emb: np.ndarray
    text_emb: np.ndarray
    labels: np.ndarray                     # -1 where unlabelled
    captions: list[str]
    urls: list[str]
    model_id: str = ""
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


def load_embedded(folder: str | Path, model_id: str | None = None) -> EmbeddedSplit:
    """Read the embedded shards listed in ``folder/manifest.json`` (successful rows only).

    Args:
        folder: an embedded split folder (``cfg.paths.embedded("test")``).
        model_id: when given, the manifest's model must be this one (MismatchError otherwise).
    """
    manifest = Manifest.read(folder, kind="embedded")
    got = str(manifest.info.get("model_id", ""))
    if model_id is not None and got and got != model_id:
        raise MismatchError(f"{folder}: embedded with {got!r}, but the model is {model_id!r}")
    paths = manifest.shard_paths(folder)
    if not paths:
        raise FormatError(f"{folder}: manifest lists no shards")
    from reco.embedded import check_against_record, read_table, shard_schema

    check_against_record(str(folder), manifest)          # digests, shard list, rows
    tables, dim = [], None
    for path in paths:
        names = shard_schema(path).names                # url/caption/label are optional here
        table = read_table(path, columns=[c for c in COLUMNS if c in names or c in REQUIRED])
        dim = dim or embedded_dim(table.schema, path)
        check_columns(table.schema, pa.schema([pa.field(c, block_type(dim)) for c in VECTOR_COLUMNS]),
                      f"{path} (dimension {dim} from {paths[0]})")
        tables.append(table)
    table = pa.concat_tables(tables, promote_options="default")
    table = table.filter(pc.equal(table["status"], STATUS_OK))
    if table.num_rows == 0:
        raise FormatError(f"{folder}: no successfully embedded rows")
    labels = (table["label"].to_numpy(zero_copy_only=False) if "label" in table.column_names
              else np.full(table.num_rows, -1))
    labels = np.where(pd_isnull(labels), -1, labels).astype(np.int64)
    vectors = {c: decode_vectors(table[c], dim, where=f"{folder}: {c}") for c in VECTOR_COLUMNS}
    return EmbeddedSplit(
        ids=table["id"].to_numpy().astype(np.int64),
        image_emb=vectors["image_emb"],
        text_emb=vectors["text_emb"],
        labels=labels,
        captions=_strings(table, "caption"),
        urls=_strings(table, "url"),
        model_id=got, info=dict(manifest.info))


def _strings(table: pa.Table, name: str) -> list[str]:
    if name not in table.column_names:
        return [""] * table.num_rows
    return [s or "" for s in table[name].to_pylist()]


def pd_isnull(values: np.ndarray) -> np.ndarray:
    if values.dtype == object:
        return np.array([v is None or v != v for v in values], dtype=bool)
    if np.issubdtype(values.dtype, np.floating):
        return np.isnan(values)
    return np.zeros(values.shape, dtype=bool)


def read_classnames(path: str | Path) -> list[str]:
    """Class names, one per line (line i = class i; local or fsspec file); blank trailing lines
    ignored."""
    import fsspec

    try:
        with fsspec.open(str(path), "r", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: cannot read class names ({exc})") from exc
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise FormatError(f"{path}: no class names")
    empty = [i for i, s in enumerate(lines) if not s.strip()]
    if empty:
        raise FormatError(f"{path}: line {empty[0] + 1} is empty")
    return [s.strip() for s in lines]


def read_groups(world_dir: str | Path) -> dict[str, np.ndarray]:
    """Label groups for the metrics: ``{"seen": ids, "unseen": ids}`` from ``species.json``
    (empty when the file is absent). A long-tail world's ``test_groups`` (``head``, ``tail``,
    ``unseen``: the test species of each) are added, its ``unseen`` replacing the full list."""
    path = Path(world_dir) / "species.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not JSON ({exc})") from exc
    groups = {}
    for name in ("seen", "unseen"):
        if name in data:
            groups[name] = np.asarray([int(i) for i in data[name]], dtype=np.int64)
    for name, ids in (data.get("test_groups") or {}).items():
        groups[name] = np.asarray([int(i) for i in ids], dtype=np.int64)
    return groups


def image_folder_classes(folder: str | Path) -> list[tuple[str, Path]]:
    """Sorted class sub-folders of an ImageFolder-layout folder (``folder/<class>/*.png``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FormatError(f"{folder}: not a folder")
    classes = sorted((p.name, p) for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise FormatError(f"{folder}: no class sub-folders (expected {folder}/<class>/*.png)")
    return classes


def image_folder_labels(folder: str | Path, classnames: list[str] | None
                        ) -> tuple[list[Path], np.ndarray, list[str]]:
    """Image files, their labels and the class names of an ImageFolder-layout folder.

    Sub-folders named by integers are class ids (line of ``classnames``); otherwise the sorted
    sub-folders are classes 0..C-1 and ``classnames`` (if given) lists their names in that order;
    without ``classnames`` the folder names are the names (``_`` read as a space).
    """
    classes = image_folder_classes(folder)
    numeric = all(name.isdigit() for name, _ in classes)
    if numeric:
        if classnames is None:
            raise FormatError(f"{folder}: class folders are numbers; give the class-name file")
        label_of = {name: int(name) for name, _ in classes}
        bad = [n for n, i in label_of.items() if i >= len(classnames)]
        if bad:
            raise FormatError(f"{folder}/{bad[0]}: class id beyond the {len(classnames)} class names")
        names = list(classnames)
    else:
        label_of = {name: i for i, (name, _) in enumerate(classes)}
        if classnames is not None and len(classnames) != len(classes):
            raise FormatError(f"{folder}: {len(classes)} class folders but {len(classnames)} "
                              f"class names")
        names = list(classnames) if classnames is not None else [n.replace("_", " ") for n, _ in classes]
    files, labels = [], []
    for name, path in classes:
        for f in sorted(path.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(label_of[name])
    if not files:
        raise FormatError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders")
    return files, np.asarray(labels, dtype=np.int64), names
