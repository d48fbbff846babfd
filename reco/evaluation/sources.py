"""Labelled image sets to evaluate on, from what a user already has (no generated world needed).

A :class:`DataSpec` names one set; :data:`SOURCES` maps its kind to a reader returning a
:class:`LabelledSet` (plain CLIP image embeddings, labels, class names and, when the set has
them, its own prompt templates and captions):

* ``image-folder``: torchvision's ImageFolder layout, ``DIR/<class>/*.jpg`` (sorted sub-folders
  are classes 0..C-1; folders named by integers are class ids);
* ``webdataset``: tar shards of ``{key}.jpg|png|webp`` + ``{key}.cls`` (class id), optional
  ``{key}.txt`` (caption); a folder, a ``.tar`` file, a glob or a brace pattern, local or any
  fsspec URL. CLIP_benchmark's own wds layout (``ROOT/<split>/*.tar`` beside
  ``classnames.txt`` and ``zeroshot_classification_templates.txt``) is read as is;
* ``clip-benchmark``: a CLIP_benchmark data set by name, read offline from a local root with its
  own ``build_dataset(name, root=..., download=False)`` (class names and templates included).

Class names come from ``classnames`` (one per line, line i = class i) or from the set itself;
templates from ``templates`` (one per line, ``{c}`` replaced by the class name), the set's own,
or ``cfg.eval.templates``.
"""
from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from reco.errors import ConfigError, FormatError
from reco.evaluation.data import EmbeddedSplit, image_folder_labels, read_classnames

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# torchvision loaders of these sets unpickle their files; reco never unpickles (use wds/<name>)
PICKLED_SETS = {"cifar10": "wds/cifar10", "cifar100": "wds/cifar100"}


@dataclass(frozen=True)
class DataSpec:
    """One labelled set. ``kind``: a key of :data:`SOURCES`; ``path``: its folder / shards /
    root; ``name``: CLIP_benchmark data set name (kind ``clip-benchmark``); ``split``: split of a
    CLIP_benchmark set (or of a wds layout); ``classnames`` / ``templates`` / ``groups``: files
    (class names one per line; templates one per line with ``{c}``; JSON ``{"group": [ids]}``)."""

    kind: str
    path: str
    name: str = ""
    split: str = "test"
    classnames: str | None = None
    templates: str | None = None
    groups: str | None = None

    def describe(self) -> str:
        return f"{self.name} ({self.path})" if self.name else self.path


@dataclass
class LabelledSet:
    split: EmbeddedSplit                  # image_emb, labels, captions (text_emb when captioned)
    classnames: list[str]
    templates: tuple[str, ...] | None     # the set's own templates, if it has any


def read_templates(path: str | Path) -> tuple[str, ...]:
    """Prompt templates, one per line, each with ``{c}`` (or ``{}``) for the class name."""
    lines = [s.strip() for s in _read_text(path, "templates").splitlines() if s.strip()]
    if not lines:
        raise FormatError(f"{path}: no templates (one per line, e.g. 'a photo of a {{c}}.')")
    bad = [i for i, s in enumerate(lines) if "{c}" not in s and "{}" not in s]
    if bad:
        raise FormatError(f"{path}: line {bad[0] + 1} ({lines[bad[0]]!r}) has no {{c}} for the "
                          f"class name")
    return tuple(lines)


def read_group_file(path: str | Path) -> dict[str, np.ndarray]:
    """``{"seen": [ids], "unseen": [ids], ...}`` from a JSON file (other keys ignored)."""
    try:
        data = json.loads(_read_text(path, "groups"))
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not JSON ({exc})") from exc
    out = {}
    for name, ids in (data.items() if isinstance(data, dict) else ()):
        if isinstance(ids, list) and all(isinstance(i, int) for i in ids):
            out[str(name)] = np.asarray(ids, dtype=np.int64)
    return out


def _read_text(path: str | Path, what: str) -> str:
    import fsspec

    try:
        with fsspec.open(str(path), "r", encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: cannot read the {what} file ({exc})") from exc


def load_set(spec: DataSpec, clip, batch_size: int = 256) -> LabelledSet:
    """Embed the images of ``spec`` with ``clip`` (a :class:`reco.clip.LoadedClip`)."""
    if spec.kind not in SOURCES:
        raise ConfigError(f"data kind {spec.kind!r}: choose one of {', '.join(SOURCES)}")
    names = read_classnames(spec.classnames) if spec.classnames else None
    labelled = SOURCES[spec.kind](spec, clip, names, batch_size)
    if spec.templates:
        labelled.templates = read_templates(spec.templates)
    top = int(labelled.split.labels.max())
    if top >= len(labelled.classnames):
        raise FormatError(f"{spec.describe()}: label {top} but {len(labelled.classnames)} class names")
    return labelled


def _split(image_emb: np.ndarray, labels, captions: list[str], urls: list[str], clip,
           batch_size: int) -> EmbeddedSplit:
    """An EmbeddedSplit of freshly embedded images (captions embedded when all are present)."""
    from reco.clip import encode_texts

    n = len(image_emb)
    text_emb = None
    if n and all(captions):
        text_emb = np.concatenate([encode_texts(clip, captions[i:i + batch_size]).numpy()
                                   for i in range(0, n, batch_size)]).astype(np.float32)
    return EmbeddedSplit(ids=np.arange(n, dtype=np.int64), image_emb=image_emb, text_emb=text_emb,
                         labels=np.asarray(labels, dtype=np.int64), captions=captions, urls=urls,
                         model_id=clip.model_id)


# ---------------------------------------------------------------------------------------------
# image folder
# ---------------------------------------------------------------------------------------------

def _image_folder(spec: DataSpec, clip, names, batch_size: int) -> LabelledSet:
    from reco.evaluation.zeroshot import encode_image_files

    files, labels, names = image_folder_labels(spec.path, names)
    emb = encode_image_files(clip, files, batch_size)
    return LabelledSet(_split(emb, labels, [""] * len(files), [str(f) for f in files], clip,
                              batch_size), names, None)


# ---------------------------------------------------------------------------------------------
# webdataset
# ---------------------------------------------------------------------------------------------

def wds_layout(path: str, split: str) -> tuple[list[str], str | None, str | None]:
    """(tar shards, classnames file, templates file) of a webdataset path: CLIP_benchmark's
    layout (``path/<split>/*.tar`` + ``path/classnames.txt``), a folder of tars, a tar, a glob
    or a brace pattern (any fsspec URL)."""
    import fsspec
    from braceexpand import braceexpand

    fs, root = fsspec.core.url_to_fs(path)
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    unstrip = (lambda p: p) if proto in ("file", "local") else (lambda p: f"{proto}://{p}")
    found_names = found_templates = None
    if fs.isdir(root):
        if fs.isdir(f"{root}/{split}"):
            names_file, tmpl_file = f"{root}/classnames.txt", f"{root}/zeroshot_classification_templates.txt"
            found_names = unstrip(names_file) if fs.exists(names_file) else None
            found_templates = unstrip(tmpl_file) if fs.exists(tmpl_file) else None
            root = f"{root}/{split}"
        shards = fs.glob(f"{root}/*.tar")
    else:
        shards = [p for pattern in braceexpand(root) for p in fs.glob(pattern)]
    shards = sorted(set(shards), key=_natural)
    if not shards:
        raise FormatError(f"{path}: no webdataset .tar shards")
    return [unstrip(s) for s in shards], found_names, found_templates


def _natural(name: str):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def iter_wds(shards: list[str]) -> Iterator[dict]:
    """Samples ``{"__key__", "__url__", ext: bytes}`` of tar shards (webdataset's grouping)."""
    import fsspec
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def streams():
        for url in shards:
            with fsspec.open(url, "rb") as f:
                yield {"url": url, "stream": f}

    def fail(exc: Exception) -> bool:
        raise FormatError(f"{exc.args[-1] if exc.args else '?'}: not a readable tar shard "
                          f"({exc.args[0] if exc.args else exc})") from exc

    yield from group_by_keys(tar_file_expander(streams(), handler=fail))


def _webdataset(spec: DataSpec, clip, names, batch_size: int) -> LabelledSet:
    from reco.clip import encode_images

    shards, names_file, templates_file = wds_layout(spec.path, spec.split)
    if names is None:
        if names_file is None:
            raise ConfigError(f"{spec.path}: give the class names (--classnames FILE, one per line)")
        names = read_classnames(names_file)
    templates = read_templates(templates_file) if templates_file and not spec.templates else None
    embs, labels, captions, urls, pixels = [], [], [], [], []
    for sample in iter_wds(shards):
        where = f"{sample['__url__']}: sample {sample['__key__']!r}"
        pixels.append(clip.preprocess(_decode_image(sample, where)))
        labels.append(_label(sample, where))
        captions.append(_caption(sample))
        urls.append(f"{sample['__url__']}#{sample['__key__']}")
        if len(pixels) == batch_size:
            embs.append(encode_images(clip, torch.stack(pixels)).numpy())
            pixels = []
    if pixels:
        embs.append(encode_images(clip, torch.stack(pixels)).numpy())
    if not embs:
        raise FormatError(f"{spec.path}: no samples in {len(shards)} shard(s)")
    emb = np.concatenate(embs).astype(np.float32)
    return LabelledSet(_split(emb, labels, captions, urls, clip, batch_size), names, templates)


def _decode_image(sample: dict, where: str):
    from PIL import Image

    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise FormatError(f"{where}: no image ({', '.join('.' + e for e in IMAGE_EXTS)})")
    try:
        with Image.open(io.BytesIO(sample[ext])) as im:
            return im.convert("RGB")
    except Exception as exc:                      # PIL raises many types on corrupt bytes
        raise FormatError(f"{where}: corrupt image .{ext} ({exc})") from exc


def _label(sample: dict, where: str) -> int:
    if "cls" not in sample:
        raise FormatError(f"{where}: no .cls member (the class id)")
    try:
        value = int(sample["cls"].decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{where}: .cls is not an integer class id") from exc
    if value < 0:
        raise FormatError(f"{where}: negative class id {value}")
    return value


def _caption(sample: dict) -> str:
    raw = sample.get("txt")
    return raw.decode("utf-8", errors="replace").strip() if raw else ""


# ---------------------------------------------------------------------------------------------
# CLIP_benchmark data sets by name
# ---------------------------------------------------------------------------------------------

def _clip_benchmark(spec: DataSpec, clip, names, batch_size: int) -> LabelledSet:
    from reco.clip import encode_images

    name = spec.name
    if not name:
        raise ConfigError("--dataset: give a CLIP_benchmark data set name, e.g. wds/cifar10")
    if name in PICKLED_SETS:
        raise ConfigError(f"--dataset {name}: torchvision reads it by unpickling its files, which "
                          f"reco never does; use its webdataset version {PICKLED_SETS[name]}")
    if name.startswith("wds/"):                   # its wds layout: read here, local or fsspec
        return _webdataset(DataSpec("webdataset", spec.path, split=spec.split,
                                    templates=spec.templates), clip, names, batch_size)
    dataset = _build_cb_dataset(spec, clip.preprocess)
    if not getattr(dataset, "classes", None):
        raise ConfigError(f"--dataset {name}: not a classification data set (no classes); "
                          f"evaluate retrieval sets with reco-clip-benchmark")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    embs, labels = [], []
    for images, targets in loader:
        embs.append(encode_images(clip, images).numpy())
        labels.append(np.asarray(targets, dtype=np.int64).reshape(-1))
    emb = np.concatenate(embs).astype(np.float32)
    names = names or list(dataset.classes)
    templates = tuple(dataset.templates) if isinstance(getattr(dataset, "templates", None), list) else None
    n = len(emb)
    return LabelledSet(_split(emb, np.concatenate(labels), [""] * n, [f"{name}#{i}" for i in range(n)],
                              clip, batch_size), names, templates)


def _build_cb_dataset(spec: DataSpec, transform: Callable):
    from clip_benchmark.datasets.builder import build_dataset

    if not os.path.isdir(spec.path):
        raise FormatError(f"--dataset-root {spec.path}: not a folder (CLIP_benchmark data sets are "
                          f"read offline from a local root)")
    try:
        return build_dataset(spec.name, root=spec.path, transform=transform, split=spec.split,
                             download=False, task="zeroshot_classification")
    except (RuntimeError, FileNotFoundError, OSError, ValueError, AssertionError) as exc:
        raise FormatError(f"--dataset {spec.name} --dataset-root {spec.path}: CLIP_benchmark "
                          f"cannot read it offline ({exc})") from exc


SOURCES: dict[str, Callable[[DataSpec, object, list[str] | None, int], LabelledSet]] = {
    "image-folder": _image_folder,
    "webdataset": _webdataset,
    "clip-benchmark": _clip_benchmark,
}
