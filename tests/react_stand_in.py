"""A small synthetic stand-in world for the REACT tests (no world/embed/index stage needed).

Each class is a coloured pattern; memory captions name the class ("a photo of a red finch.") or
are generic. The memory is embedded by the given CLIP, written as embedded shards (formats
contract) with ids that are NOT row positions, and served by an in-test exact-search memory with
the ``reco.index.memory.Memory`` interface.
"""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import torch

from reco import config as config_lib
from reco.clip import encode_images, encode_texts
from reco.formats import Manifest, atomic_write_table, embedded_schema, encode_vectors

CLASSNAMES = ["red finch", "blue jay", "green parrot", "yellow warbler"]
COLOURS = [(220, 40, 40), (40, 60, 220), (40, 200, 60), (230, 210, 30)]


class ArrayMemory:
    """Exact-search memory with the interface of reco.index.memory.Memory."""

    def __init__(self, image_emb, text_emb, model_id, ids):
        import faiss

        self.image_emb = np.asarray(image_emb, np.float16)
        self.text_emb = np.asarray(text_emb, np.float16)
        self.ids = np.asarray(ids, np.int64)
        self.model_id, self.dim = model_id, self.image_emb.shape[1]
        self.info = {"model_id": model_id, "dim": self.dim}
        self._index = {}
        for name, emb in (("img", self.image_emb), ("txt", self.text_emb)):
            self._index[name] = faiss.IndexFlatIP(self.dim)
            self._index[name].add(emb.astype(np.float32))

    def search(self, queries, index, k):
        scores, pos = self._index[index].search(np.ascontiguousarray(queries, np.float32), k)
        return scores.astype(np.float32), pos.astype(np.int64)


def render(label: int, rng: np.random.Generator, size: int = 32) -> bytes:
    """A PNG of class ``label``: its colour in a random-position square on a noisy grey field."""
    from PIL import Image

    img = rng.integers(90, 140, size=(size, size, 3)).astype(np.uint8)
    x, y = rng.integers(0, size // 2, size=2)
    img[y:y + size // 2, x:x + size // 2] = COLOURS[label]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def make_world(tmp_path, clip, *, per_class_memory: int = 12, generic: int = 8,
               per_class_test: int = 10, seed: int = 0):
    """-> (cfg, memory, rows) with world files, embedded memory shards and test URL list."""
    cfg = config_lib.preset("tiny", workdir=str(tmp_path / "work"))
    rng = np.random.default_rng(seed)
    world = cfg.paths.world
    base = "http://127.0.0.1:9/"
    rows = []
    for label in range(len(CLASSNAMES)):
        for j in range(per_class_memory):
            caption = f"a photo of a {CLASSNAMES[label]}." if j % 3 else f"my {CLASSNAMES[label]} today"
            rows.append((label, caption))
    rows += [(int(rng.integers(len(CLASSNAMES))), "a bird on a branch") for _ in range(generic)]
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    ids = 1000 + 7 * np.arange(len(rows))                       # ids are not positions
    urls = []
    for i, (label, _) in zip(ids, rows):
        rel = f"images/memory/{i:06d}.png"
        (world / rel).parent.mkdir(parents=True, exist_ok=True)
        (world / rel).write_bytes(render(label, rng))
        urls.append(base + rel)
    pixels = torch.stack([_pixels(clip, world / u[len(base):]) for u in urls])
    img_emb = encode_images(clip, pixels).numpy()
    txt_emb = encode_texts(clip, [c for _, c in rows]).numpy()
    _write_embedded(cfg, clip, ids, urls, rows, img_emb, txt_emb)
    # the world's memory URL list, as `reco world` lays it out: row r is images/memory/<r>.png
    # (rows that are not memory ids have no file, like dead links)
    listed = [f"{base}images/memory/{r:06d}.png" for r in range(int(ids.max()) + 1)]
    atomic_write_table(pa.table({"url": listed, "caption": [""] * len(listed),
                                 "label": pa.array([-1] * len(listed), pa.int64())}), cfg.paths.urls("memory"))
    _write_test_split(cfg, rng, base, per_class_test)
    (world / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    memory = ArrayMemory(img_emb, txt_emb, clip.model_id, ids)
    return cfg, memory, [{"id": int(i), "url": u, "caption": c, "label": l}
                         for i, u, (l, c) in zip(ids, urls, rows)]


def _pixels(clip, path):
    from PIL import Image

    with Image.open(path) as im:
        return clip.preprocess(im.convert("RGB"))


def _write_embedded(cfg, clip, ids, urls, rows, img_emb, txt_emb):
    dim = img_emb.shape[1]
    table = pa.Table.from_pydict({
        "id": pa.array(ids, pa.int64()), "url": urls, "caption": [c for _, c in rows],
        "label": pa.array([l for l, _ in rows], pa.int64()),
        "status": ["success"] * len(ids), "error_message": [None] * len(ids),
        "image_emb": encode_vectors(img_emb, dim), "text_emb": encode_vectors(txt_emb, dim),
    }, schema=embedded_schema(dim))
    folder = cfg.paths.embedded("memory")
    half = len(ids) // 2                                       # two shards
    atomic_write_table(table.slice(0, half), folder / "part-00000.parquet")
    atomic_write_table(table.slice(half), folder / "part-00001.parquet")
    Manifest("embedded", ["part-00000.parquet", "part-00001.parquet"], {"rows": len(ids)},
             {"model_id": clip.model_id}).write(folder)


def _write_test_split(cfg, rng, base, per_class):
    urls, labels = [], []
    for label in range(len(CLASSNAMES)):
        for j in range(per_class):
            rel = f"images/test/{label * per_class + j:06d}.png"
            (cfg.paths.world / rel).parent.mkdir(parents=True, exist_ok=True)
            (cfg.paths.world / rel).write_bytes(render(label, rng))
            urls.append(base + rel)
            labels.append(label)
    table = pa.Table.from_pydict({"url": urls, "caption": [""] * len(urls),
                                  "label": pa.array(labels, pa.int64())})
    atomic_write_table(table, cfg.paths.urls("test"))
