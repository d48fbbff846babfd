"""``reco import-embeddings``: a memory from released embeddings (clip-retrieval's layout).

    reco import-embeddings --input laion400m-embeddings/ --output runs/laion/embeddings/memory \\
        --model ViT-B-32 --pretrained openai

LAION-400M and LAION-5B ship their ViT-B/32 and ViT-L/14 embeddings as ``img_emb/img_emb_N.npy``,
``text_emb/text_emb_N.npy`` and ``metadata/metadata_N.parquet`` (url, caption): the RECO paper's
own memory. The folder is checked on the driver first (:mod:`reco.pipelines.release`: parts, row
counts, dimensions against the named model's ``embed_dim``), then streamed with
``embedding-reader`` (its ``parquet_npy`` reader for the image side with the metadata, its
``npy`` reader for the text side, in lockstep), one output shard of ``embed.shard_size`` rows at
a time: peak memory is one shard (plus one metadata part, which embedding-reader reads whole),
whatever the size of the release. The output is an embedded folder like ``embed-memory``'s
(format ``embedded/2``, ``manifest.json``, ``job.json``; resumable, ``--force`` redoes it).

Vectors are checked per row: a zero or non-finite vector makes its row ``failed_to_embed`` with
the file and row named; vectors whose norm is not 1 (within 1e-2) are normalised and counted
(manifest ``info.normalised``). ``--text-from-captions`` embeds the captions of an image-only
release with the model (its weights are needed then; otherwise only its config is read).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from reco.errors import ConfigError
from reco.formats import EMBEDDED_FORMAT, STATUS_OK, Manifest, atomic_write_table, embedded_schema, encode_vectors
from reco.options import value_flags
from reco.pipelines.release import Release, inspect_release
from reco.pipelines.write import (check_model, check_record, clear_output, complete_shards,
                                  finish_record, shard_path, write_manifest)
from reco.record import Record, file_digest

log = logging.getLogger(__name__)
INPUT_FORMAT = "clip-retrieval"
NORM_TOL = 1e-2
FAILED = "failed_to_embed"


def model_embed_dim(model: str) -> int:
    """The embedding dimension of an open_clip model from its config (no weights loaded)."""
    import open_clip

    from reco.clip import CONFIG_FILE, LOCAL_DIR, _check_model_name, register_project_configs

    register_project_configs()
    _check_model_name(model)                      # unknown model: ConfigError naming it
    if model.startswith(LOCAL_DIR):
        path = Path(model[len(LOCAL_DIR):]) / CONFIG_FILE
        try:
            cfg = json.loads(path.read_text()).get("model_cfg", {})
        except (OSError, ValueError, AttributeError) as exc:
            raise ConfigError(f"--model {model}: cannot read {path} ({exc})") from exc
    else:
        cfg = open_clip.get_model_config(model) or {}
    dim = cfg.get("embed_dim")
    if not isinstance(dim, int) or dim < 1:
        raise ConfigError(f"--model {model}: no embed_dim in its open_clip config")
    return dim


def _readers(release: Release):
    """embedding-reader over the image side (+ metadata) and the text side."""
    from embedding_reader import EmbeddingReader

    columns = [release.url_col, release.caption_col]
    image = EmbeddingReader(f"{release.root.rstrip('/')}/img_emb", file_format="parquet_npy",
                            meta_columns=columns, metadata_folder=f"{release.root.rstrip('/')}/metadata")
    by_name = {p.image.rsplit("/", 1)[-1]: p for p in release.parts}
    headers = image.reader.headers
    names = [f.rsplit("/", 1)[-1] for f in headers["filename"]]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ConfigError(f"{release.root}/img_emb: {unknown[0]} is not an img_emb_N.npy part; "
                          f"move other .npy files out of the folder")
    if names != [p.image.rsplit("/", 1)[-1] for p in release.parts if p.rows]:
        raise ConfigError(f"{release.root}/img_emb: embedding-reader orders the parts {names}, "
                          f"not as inspected")
    # pair each image part with its own metadata part (embedding-reader pairs by sort order)
    headers["metadata_path"] = [_reader_path(by_name[n].metadata, f) for n, f in
                                zip(names, headers["filename"])]
    text = (EmbeddingReader(f"{release.root.rstrip('/')}/text_emb", file_format="npy")
            if release.has_text else None)
    return image, text


def _reader_path(path: str, like: str) -> str:
    """``path`` in the form embedding-reader uses (absolute when local)."""
    return str(Path(path).resolve()) if "://" not in path and "://" not in like else path


def _runs(todo: list[int]) -> list[tuple[int, int]]:
    """[3, 4, 5, 8] -> [(3, 6), (8, 9)]: contiguous runs of shard indices."""
    runs: list[tuple[int, int]] = []
    for s in todo:
        if runs and runs[-1][1] == s:
            runs[-1] = (runs[-1][0], s + 1)
        else:
            runs.append((s, s + 1))
    return runs


def _batches(release: Release, readers, size: int, start: int, end: int):
    """(ids, image vectors, text vectors or None, metadata frame) per shard of [start, end)."""
    image, text = readers
    kw = dict(batch_size=size, start=start, end=end, show_progress=False, parallel_pieces=2,
              max_piece_size=max(1, min(size, 50_000)))
    texts = text(**kw) if text is not None else None
    for vectors, meta in image(**kw):
        text_vectors = next(texts)[0] if texts is not None else None
        yield meta["i"].to_numpy(np.int64), vectors, text_vectors, meta


class _Checks:
    """Per-row vector checks and the normalisation tally of one import."""

    def __init__(self, release: Release):
        self.release = release
        self.normalised = {"image": 0, "text": 0}
        self.norm_range = {"image": [np.inf, 0.0], "text": [np.inf, 0.0]}

    def where(self, side: str, row: int) -> str:
        part = next(p for p in self.release.parts if p.offset <= row < p.offset + p.rows)
        path = part.image if side == "image" else (part.text or "captions")
        return f"{path} row {row - part.offset}"

    def apply(self, side: str, vectors: np.ndarray, ids: np.ndarray, errors: list) -> np.ndarray:
        vectors = np.asarray(vectors, np.float32)
        norms = np.linalg.norm(vectors, axis=1)
        bad = ~np.isfinite(norms) | (norms == 0)
        for i in np.flatnonzero(bad):
            errors[i] = errors[i] or f"{self.where(side, int(ids[i]))}: zero or non-finite {side} embedding"
        good = norms[~bad]
        if len(good):
            rng = self.norm_range[side]
            rng[0], rng[1] = min(rng[0], float(good.min())), max(rng[1], float(good.max()))
        off = ~bad & (np.abs(norms - 1) > NORM_TOL)
        self.normalised[side] += int(off.sum())
        out = np.where(bad[:, None], 0.0, vectors / np.where(bad, 1.0, norms)[:, None])
        return out.astype(np.float32)

    def info(self) -> dict:
        return {"normalised": self.normalised,
                "norm_range": {k: [round(v[0], 4), round(v[1], 4)] if np.isfinite(v[0]) else None
                               for k, v in self.norm_range.items()}}


def _shard_table(ids, image, text, meta, release: Release, checks: _Checks, dim: int,
                 model: str, pretrained: str) -> pa.Table:
    errors: list = [None] * len(ids)
    image = checks.apply("image", image, ids, errors)
    text = checks.apply("text", text, ids, errors)
    failed = np.array([e is not None for e in errors])
    image[failed], text[failed] = 0, 0
    schema = embedded_schema(dim, model, pretrained)
    columns = {"id": pa.array(ids, pa.int64()),
               "url": _strings(meta[release.url_col]), "caption": _strings(meta[release.caption_col]),
               "label": pa.nulls(len(ids), pa.int64()),
               "status": pa.array([FAILED if e else STATUS_OK for e in errors], pa.string()),
               "error_message": pa.array(errors, pa.string()),
               "image_emb": encode_vectors(image, dim), "text_emb": encode_vectors(text, dim)}
    return pa.Table.from_pydict(columns, schema=schema)


def _strings(values) -> pa.Array:
    return pa.array([None if v is None or (isinstance(v, float) and np.isnan(v)) else
                     v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                     for v in values], pa.string())


def _caption_encoder(model: str, pretrained: str | None, batch_size: int, device: str):
    from reco.clip import encode_texts, load_clip

    clip = load_clip(model, pretrained, device=device)

    def encode(captions) -> np.ndarray:
        texts = ["" if c is None else str(c) for c in captions]
        return np.concatenate([encode_texts(clip, texts[i:i + batch_size]).numpy()
                               for i in range(0, len(texts), batch_size)] or [np.zeros((0, clip.embed_dim))])
    return encode


def import_embeddings(input_dir: str, output_dir: str, *, model: str, pretrained: str | None = None,
                      shard_size: int = 100_000, url_col: str = "url", caption_col: str = "caption",
                      text_from_captions: bool = False, batch_size: int = 256, device: str = "cpu",
                      force: bool = False) -> tuple[Manifest, dict]:
    """Import a clip-retrieval embedding release into an embedded folder (module docstring).

    Args:
        input_dir: the release folder (local or fsspec URL) holding img_emb/, text_emb/, metadata/.
        output_dir: embedded folder to write (``part-*.parquet`` + ``manifest.json``).
        model, pretrained: the open_clip model that produced the embeddings (only its config
            is read, unless ``text_from_captions``).
        shard_size: rows per output shard (the unit of streaming, writing and resume).
        url_col, caption_col: metadata columns.
        text_from_captions: embed the captions with the model when there is no text_emb/.
        batch_size, device: for ``text_from_captions``.
        force: delete the output's shards first instead of resuming.
    Returns:
        (manifest, info): rows, shards run/skipped, counts by status, normalisation tally.
    """
    from reco.clip import LOCAL_DIR, model_identity

    if shard_size < 1:
        raise ConfigError("embed.shard_size must be >= 1")
    start = time.time()
    pretrained = None if model.startswith(LOCAL_DIR) else (pretrained or None)
    dim = model_embed_dim(model)
    release = inspect_release(str(input_dir), model_dim=dim, model=model, url_col=url_col,
                              caption_col=caption_col, text_from_captions=text_from_captions)
    model_id = model_identity(model, pretrained)      # what the model is, not its path
    shards = -(-release.rows // shard_size)
    if force:
        clear_output(output_dir)
    check_model(output_dir, model_id)
    check_record(output_dir, Record(
        stage="embed", model_id=model_id, counts={"shards_expected": shards},
        options={"embed.shard_size": shard_size, "format": EMBEDDED_FORMAT,
                 "input_format": INPUT_FORMAT, "text_from_captions": text_from_captions},
        inputs={f"{i}:{Path(f).name}": file_digest(f) if "://" not in f else f"rows:{p.rows}"
                for i, (p, f) in enumerate((p, f) for p in release.parts
                                            for f in (p.image, p.text, p.metadata) if f)}),
        command="import-embeddings")
    done = complete_shards(output_dir)
    todo = [s for s in range(shards) if s not in done]
    checks = _Checks(release)
    encode = _caption_encoder(model, pretrained, batch_size, device) if text_from_captions and todo else None
    readers = _readers(release) if todo else None
    for first, last in _runs(todo):
        end = min(last * shard_size, release.rows)
        batches = _batches(release, readers, shard_size, first * shard_size, end)
        for shard, (ids, image, text, meta) in enumerate(batches, start=first):
            if text is None:
                text = encode(meta[release.caption_col].tolist())
            table = _shard_table(ids, image, text, meta, release, checks, dim, *model_id.split("|", 1))
            atomic_write_table(table, shard_path(output_dir, shard))
            log.info("shard %05d: %d rows imported", shard, len(ids))
    manifest = write_manifest(output_dir, model_id, dim, {
        "inputs": [str(input_dir)], "input_format": INPUT_FORMAT, "shard_size": shard_size,
        "input_rows": release.rows, "shards_expected": shards, "source_dtypes": release.dtypes,
        "text_from_captions": text_from_captions, **checks.info()})
    finish_record(str(output_dir), manifest, shards)
    info = {"output_dir": str(output_dir), "rows": release.rows, "shards": shards,
            "shards_run": len(todo), "shards_skipped": shards - len(todo), "counts": manifest.counts,
            "complete": len(manifest.shards) == shards, "model_id": model_id, "dim": dim,
            **checks.info(), "seconds": round(time.time() - start, 2)}
    return manifest, info


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True,
                        help="release folder with img_emb/, text_emb/, metadata/ (path or fsspec URL)")
    value_flags(parser, ("--output", "PATH", "embedded folder to write (default: WORKDIR/embeddings/memory)"))
    parser.add_argument("--text-from-captions", dest="text_from_captions", action="store_true",
                        help="no text_emb/: embed the metadata captions with the model")
    parser.add_argument("--force", action="store_true",
                        help="import every shard again (delete the output's shards first)")


def main(cfg, args) -> int:
    from reco.clip import resolve_model_spec

    model, pretrained = resolve_model_spec(cfg.clip.model, cfg.clip.pretrained, cfg.paths.base_clip)
    output = args.output or str(cfg.paths.embedded("memory"))
    _, info = import_embeddings(args.input, output, model=model, pretrained=pretrained,
                                shard_size=cfg.embed.shard_size, url_col=cfg.embed.url_col,
                                caption_col=cfg.embed.caption_col,
                                text_from_captions=bool(args.text_from_captions),
                                batch_size=cfg.embed.batch_size, device=cfg.clip.device,
                                force=bool(args.force))
    from reco.console import print_summary
    from reco.pipelines.embed_memory import summary

    print_summary("import-embeddings", {**summary({"imported": info}), "normalised": info["normalised"],
                                        "output": info["output_dir"]}, data=info)
    return 0
