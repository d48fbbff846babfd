"""HTML neighbour gallery: what the memory returns for some test images and class names.

For each test image: the image, its caption, what frozen CLIP and reco predict (each marked right
✓ or wrong ✗), and its k memory neighbours (searched in the index its context field names) with
their captions. For each class name: the prompt's neighbours (text index by default) with their images. Images reco stored (the
world's own files, found by looking a URL up in the world's URL lists, never by turning it into
a path) are embedded as base64 data URIs; other http(s) images link to their URL.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

import numpy as np

from reco.formats import atomic_write_text, parse_field
from reco.stored_images import WorldImages


def image_tag(url: str | None, store: WorldImages, size: int = 64) -> str:
    """The image of ``url``: embedded when reco stored it (the world's own file for that URL,
    :class:`reco.stored_images.WorldImages`), else a link to an http(s) URL, else a placeholder.
    No path is ever derived from a URL."""
    path = store.path(url)
    if path is not None:
        src = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    elif url and urlsplit(url).scheme.lower() in ("http", "https"):
        src = html.escape(url, quote=True)
    else:
        return "<div class='missing'>?</div>"
    return f"<img src='{src}' width='{size}' height='{size}' style='image-rendering:pixelated'>"


def pick_queries(labels: np.ndarray, groups: dict[str, np.ndarray], n: int) -> list[int]:
    """Indices of ``n`` test rows spread over classes, unseen classes first."""
    order = []
    unseen = set(groups.get("unseen", np.array([], dtype=np.int64)).tolist())
    classes = sorted(set(labels.tolist()) - {-1}, key=lambda c: (c not in unseen, c))
    for c in classes[:n]:
        order.append(int(np.flatnonzero(labels == c)[0]))
    return order


def write_gallery(cfg, model, inputs, path: str | Path, *, n: int | None = None,
                  k: int | None = None) -> dict[str, Any]:
    """Write the gallery of ``model`` (a RecoModel; its memory, contexts and current mode) on
    evaluation ``inputs`` (reco.evaluation.evaluate.EvalInputs) to ``path``. Returns info."""
    from reco.evaluation.query import memory_metadata
    from reco.evaluation.zeroshot import class_embeddings

    n = n or cfg.eval.gallery_queries
    k = k or cfg.eval.gallery_k
    store = WorldImages(cfg.paths.world)
    meta = memory_metadata(cfg.paths.embedded("memory"))
    test, names = inputs.test, inputs.classnames
    rows = pick_queries(test.labels, inputs.groups, n)
    img_q = test.image_emb[rows]
    clip_pred = (img_q @ class_embeddings(inputs.prompt_emb).T).argmax(1)
    reco_cls = class_embeddings(inputs.prompt_emb, refine=lambda x: model.refine("text", x))
    reco_pred = (np.asarray(model.refine("image", img_q)) @ reco_cls.T).argmax(1)
    img_index = parse_field(model.contexts["image"])[1]
    txt_index = parse_field(model.contexts["text"])[1]
    parts = [_HEAD, f"<h1>reco neighbour gallery</h1><p>model <code>{html.escape(model.model_id)}"
             f"</code>, memory of {len(model.memory.ids)} items, mode {model.mode}, k={k}</p>",
             f"<h2>Test images &rarr; memory ({img_index} index)</h2>"]
    scores, pos = model.memory.search(np.ascontiguousarray(img_q, np.float32), img_index, k)
    for j, r in enumerate(rows):
        label = int(test.labels[r])
        title = (f"{image_tag(test.urls[r], store)}<div>{html.escape(test.captions[r])}<br>"
                 f"true: <b>{html.escape(names[label])}</b>{_unseen(label, inputs.groups)}<br>"
                 f"CLIP: {verdict(int(clip_pred[j]), label, names)}<br>"
                 f"reco: {verdict(int(reco_pred[j]), label, names)}</div>")
        parts.append(_row(title, model.memory, scores[j], pos[j], meta, store))
    parts.append(f"<h2>Class names &rarr; memory ({txt_index} index)</h2>")
    classes = [int(test.labels[r]) for r in rows]
    prompts = np.ascontiguousarray(inputs.prompt_emb[classes, 0], np.float32)
    scores, pos = model.memory.search(prompts, txt_index, k)
    for j, c in enumerate(classes):
        title = f"<div><b>{html.escape(names[c])}</b>{_unseen(c, inputs.groups)}</div>"
        parts.append(_row(title, model.memory, scores[j], pos[j], meta, store))
    parts.append("</body></html>")
    atomic_write_text(path, "\n".join(parts))
    right = {"clip_right": int(sum(int(p) == int(test.labels[r]) for p, r in zip(clip_pred, rows))),
             "reco_right": int(sum(int(p) == int(test.labels[r]) for p, r in zip(reco_pred, rows)))}
    return {"path": str(path), "queries": len(rows), "k": k, **right}


def verdict(pred: int, label: int, names: Sequence[str]) -> str:
    """A prediction marked right (green check) or wrong (red cross), for the gallery."""
    right = pred == label
    mark, colour, word = ("&#10003;", "#1a7f37", "right") if right else ("&#10007;", "#cf222e", "wrong")
    return (f"<span class='{word}' title='{word}' style='color:{colour}'>{mark} "
            f"{html.escape(names[pred])}</span>")


def _unseen(label: int, groups: dict[str, np.ndarray]) -> str:
    return " <i>(unseen)</i>" if "unseen" in groups and label in set(groups["unseen"].tolist()) else ""


def _row(title: str, memory, scores, positions, meta, store) -> str:
    cells = [f"<td class='q'>{title}</td>"]
    for s, p in zip(scores, positions):
        if p < 0:
            continue
        item = meta.get(int(memory.ids[p]), {})
        cap = html.escape(item.get("caption") or "")
        cells.append(f"<td>{image_tag(item.get('url'), store)}<div>{cap}<br><small>{s:.3f}"
                     f"</small></div></td>")
    return "<table><tr>" + "".join(cells) + "</tr></table>"


_HEAD = """<!doctype html><html><head><meta charset='utf-8'><title>reco gallery</title><style>
body{font-family:sans-serif;font-size:12px} table{border-collapse:collapse;margin:6px 0}
td{vertical-align:top;width:96px;padding:3px;border:1px solid #ddd} td.q{width:170px;background:#f4f4f8}
.missing{width:64px;height:64px;background:#eee;text-align:center;line-height:64px}
</style></head><body>"""
