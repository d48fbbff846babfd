"""Released embeddings in clip-retrieval's layout (how LAION-400M/5B ship theirs), inspected.

    DIR/img_emb/img_emb_{N}.npy      (rows, dim) float16/float32, row i = sample i of part N
    DIR/text_emb/text_emb_{N}.npy    (rows, dim), the same rows
    DIR/metadata/metadata_{N}.parquet  the same rows: url, caption (and more, carried if named)

:func:`inspect_release` reads only headers and footers (numpy's ``.npy`` header parser, Parquet
footers) and checks, before anything is written: the parts of the three folders match by ``N``;
each part's row counts agree across them; every ``.npy`` is 2-D, C-ordered, float16/float32 (no
pickled objects) of one dimension per side; image and text dimensions agree with each other and
with the model's ``embed_dim``; the metadata has the url and caption columns. Every failure is one
:class:`~reco.errors.RecoError` naming the file. An image-only folder (no ``text_emb/``) is refused
unless the captions are to be embedded with the model; a text-only folder is refused (the image
side needs the images: embed its metadata as a URL list).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow.parquet as pq

from reco.errors import FormatError, MismatchError

SIDES = {"image": ("img_emb", "img_emb", ".npy"), "text": ("text_emb", "text_emb", ".npy"),
         "metadata": ("metadata", "metadata", ".parquet")}
DTYPES = (np.dtype("<f2"), np.dtype("<f4"))
READ_ERRORS = (OSError, EOFError, ValueError)


@dataclass(frozen=True)
class Part:
    number: int
    rows: int
    image: str
    metadata: str
    text: str | None            # None: the text side is made from the captions
    offset: int                 # id of the part's first row


@dataclass(frozen=True)
class Release:
    root: str
    parts: tuple[Part, ...]
    dim: int
    dtypes: dict                # side -> numpy dtype name of its .npy files
    url_col: str
    caption_col: str

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    @property
    def has_text(self) -> bool:
        return all(p.text for p in self.parts)


def _join(root: str, *names: str) -> str:
    return "/".join([root.rstrip("/"), *names])


def _list_side(root: str, side: str) -> dict[int, str] | None:
    """part number -> path of one side's files; None when its folder does not exist."""
    folder, prefix, suffix = SIDES[side]
    fs, path = fsspec.core.url_to_fs(_join(root, folder))
    if not fs.isdir(path):
        return None
    pattern = re.compile(rf"^{prefix}_(\d+){re.escape(suffix)}$")
    found: dict[int, str] = {}
    for name in sorted(fs.ls(path, detail=False)):
        base = name.rsplit("/", 1)[-1]
        m = pattern.match(base)
        if not m:
            continue
        number = int(m.group(1))
        full = _join(root, folder, base)
        if number in found:
            raise FormatError(f"{full}: part {number} twice in {folder}/ (also {found[number]})")
        found[number] = full
    return found


def npy_header(path: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from a ``.npy`` header (no data read); FormatError naming the file for
    anything but a C-ordered float16/float32 2-D array."""
    try:
        with fsspec.open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read(f)
    except READ_ERRORS as exc:
        raise FormatError(f"{path}: not a readable .npy file ({exc})") from exc
    if len(shape) != 2 or fortran or dtype.newbyteorder("<") not in DTYPES or dtype.byteorder == ">":
        raise FormatError(f"{path}: expected a C-ordered 2-D little-endian float16/float32 array, "
                          f"got shape {shape}, dtype {dtype}{', Fortran order' if fortran else ''}")
    return tuple(int(s) for s in shape), dtype


def _metadata(path: str, url_col: str, caption_col: str) -> int:
    try:
        with fsspec.open(path, "rb") as f:
            meta = pq.ParquetFile(f)
            names, rows = meta.schema_arrow.names, meta.metadata.num_rows
    except READ_ERRORS as exc:
        raise FormatError(f"{path}: not a readable Parquet file ({exc})") from exc
    missing = [c for c in (url_col, caption_col) if c not in names]
    if missing:
        raise FormatError(f"{path}: missing column(s) {missing} (has {names}); set "
                          f"embed.url_col / embed.caption_col")
    return rows


def _sides(root: str, text_from_captions: bool) -> dict[str, dict[int, str]]:
    found = {side: _list_side(root, side) for side in SIDES}
    if not found["image"] and not found["text"]:
        raise FormatError(f"{root}: no img_emb/img_emb_N.npy or text_emb/text_emb_N.npy; not an "
                          f"embedding release in clip-retrieval's layout")
    if not found["metadata"]:
        raise FormatError(f"{root}: no metadata/metadata_N.parquet (url, caption per row): a memory "
                          f"needs its captions and urls")
    if not found["image"]:
        raise FormatError(f"{root}: text_emb/ but no img_emb/: RECO's memory needs the image side, "
                          f"which cannot be made without the images; download and embed them "
                          f"with `reco embed-memory --input {_join(root, 'metadata')} --output ...` "
                          f"(the metadata is a URL list)")
    if not found["text"] and not text_from_captions:
        raise FormatError(f"{root}: img_emb/ but no text_emb/: RECO's memory needs the text side; "
                          f"pass --text-from-captions to embed the metadata captions with the model")
    if text_from_captions:
        found["text"] = {}
    return found


def _check_parts(found: dict[str, dict[int, str]], root: str) -> list[int]:
    """Part numbers in the order of their image file names (embedding-reader's and autofaiss's
    order, so ids are the row numbers those tools give: img_emb_10 before img_emb_2)."""
    numbers = sorted(found["image"], key=lambda n: found["image"][n])
    for side in ("metadata", "text"):
        if side == "text" and not found["text"]:
            continue
        extra = sorted(set(found[side]) ^ set(numbers))
        if extra:
            n = extra[0]
            have = found["image"].get(n) or found[side].get(n)
            missing = SIDES["image" if n not in found["image"] else side]
            raise FormatError(f"{have}: part {n} has no {missing[0]}/{missing[1]}_{n}{missing[2]} "
                              f"in {root}")
    return numbers


def inspect_release(root: str, *, model_dim: int, model: str, url_col: str = "url",
                    caption_col: str = "caption", text_from_captions: bool = False) -> Release:
    """Check a release folder against the model (module docstring); the :class:`Release`."""
    found = _sides(root, text_from_captions)
    parts, offset, dims, dtypes = [], 0, {}, {}
    for n in _check_parts(found, root):
        rows = _metadata(found["metadata"][n], url_col, caption_col)
        for side in ("image", "text"):
            path = found[side].get(n)
            if path is None:
                continue
            (count, dim), dtype = npy_header(path)
            if count != rows:
                raise FormatError(f"{path}: {count} rows, but {found['metadata'][n]} has {rows}; "
                                  f"the parts of a release must hold the same rows")
            if dims.setdefault(side, (dim, path))[0] != dim:
                raise FormatError(f"{path}: dimension {dim}, but {dims[side][1]} has {dims[side][0]}")
            dtypes.setdefault(side, dtype.name)
        parts.append(Part(n, rows, found["image"][n], found["metadata"][n], found["text"].get(n), offset))
        offset += rows
    for side, (dim, path) in dims.items():
        if dim != model_dim:
            raise MismatchError(f"{path}: embeddings of dimension {dim}, but model {model} embeds "
                                f"in {model_dim} dimensions{_models_of(dim)}; name the model that "
                                f"produced them (--model/--pretrained)")
    return Release(root, tuple(parts), model_dim, dtypes, url_col, caption_col)


def _models_of(dim: int) -> str:
    """' (open_clip models of dimension dim: ...)' as a hint, or ''."""
    try:
        import open_clip

        from reco.clip import register_project_configs

        register_project_configs()
        names = [m for m in open_clip.list_models()
                 if (open_clip.get_model_config(m) or {}).get("embed_dim") == dim]
    except Exception:  # noqa: BLE001 - only a hint
        return ""
    return f" (open_clip models of dimension {dim}: {', '.join(names[:6])}...)" if names else ""
