"""``reco embed-memory``: Beam job from URL lists (or img2dataset outputs) to embedded Parquet shards.

    ReadUrls -> SafetyFilter -> Download (img2dataset) -> Embed (open_clip) -> Write (Parquet)

The input kind is chosen by what the input is (:mod:`reco.pipelines.inputs`: URL lists,
img2dataset webdataset tars, img2dataset parquet with image bytes; ``--input-format`` forces
one); img2dataset outputs are streamed and embedded without any network access.

Everything that can be checked is checked before the pipeline starts (URL list columns, model
name, writable output, model and shard format of an existing output). Resume: shards whose file
already exists (complete, by atomic rename) are skipped, so a rerun after a kill adds only the
missing shards. The output's run record (``record.json``, :mod:`reco.record`) holds the model's
identity, the digest of every input list, the options that shape the rows and each shard's
digest, so a rerun never mixes two versions of a list, two models or two option sets: any
difference is refused (naming it) until rerun with ``--force``, which deletes the output's
shards, manifest and record and embeds everything again (also needed over shards of the old
format ``embedded/1``). One writer per output folder (:func:`reco.record.locked`).
Beam flags pass through (``--runner``, ``--direct_num_workers``...); default DirectRunner.

    reco embed-memory --preset tiny --workdir runs/tiny                 # world splits
    reco embed-memory --input urls.parquet --output out/ --model ViT-B-32 --pretrained openai \
        -- --direct_running_mode=multi_processing --direct_num_workers=2
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
import uuid
from dataclasses import dataclass

import apache_beam as beam
import fsspec
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from reco.console import print_summary, seconds, tracked
from reco.errors import ConfigError, FormatError
from reco.formats import EMBEDDED_FORMAT, Manifest
from reco.pipelines import inputs as input_kinds, runners
from reco.pipelines.config import LOOPBACK, EmbedConfig
from reco.pipelines.foreign import KEY_COLUMN
from reco.pipelines.write import (WriteShards, check_model, check_record, clear_output,
                                  complete_shards, finish_record, write_manifest)
from reco.record import Record, file_digest, json_digest, locked, options_of

log = logging.getLogger(__name__)
WORLD_SPLITS = ("memory", "train", "test")
RUNNING_MODES = runners.RUNNING_MODES


@dataclass(frozen=True)
class EmbedJob:
    """Everything the pipeline needs, resolved and checked on the driver."""

    files: tuple              # UrlFile (urls) or ShardFile (foreign kinds), inspected
    output_dir: str
    model: str
    pretrained: str | None
    model_id: str
    image_size: int
    dim: int
    shards: int
    skip: tuple[int, ...]
    cfg: EmbedConfig
    kind: str = "urls"        # input kind (reco.pipelines.inputs.KINDS)


class EmbedMemory(beam.PTransform):
    """PBegin -> (shard, counts by status) for every shard written by this run."""

    def __init__(self, job: EmbedJob):
        super().__init__()
        self.job = job

    def expand(self, pbegin):
        job = self.job
        # the kind's steps are applied here, so their labels stay EmbedMemory/ReadUrls, ...
        shards = input_kinds.source(job.kind, job).expand(pbegin)
        extra = () if job.kind == "urls" else (KEY_COLUMN,)
        # shard metadata names what the model is (reco.clip.model_identity), not its path
        return shards | "Write" >> WriteShards(job.output_dir, job.dim, *job.model_id.split("|", 1),
                                               extra=extra, shards=job.shards)


# ---------------------------------------------------------------------------------------------
# driver: checks, options, run
# ---------------------------------------------------------------------------------------------

def check_writable(output_dir: str) -> None:
    """Create ``output_dir`` and write/remove a probe file; ConfigError naming it otherwise."""
    try:
        fs, path = fsspec.core.url_to_fs(str(output_dir))
        fs.makedirs(path, exist_ok=True)
        probe = f"{path.rstrip('/')}/.write-probe-{uuid.uuid4().hex[:8]}"
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"output {output_dir}: not writable ({exc})") from exc


def check_net_options(cfg: EmbedConfig) -> None:
    """ConfigError for a bad ``embed.allow_networks`` or memory bound, before any work."""
    from reco.pipelines.addresses import check_networks

    try:
        check_networks(cfg.allow_networks)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    for name in ("max_image_mb", "decode_budget_mb"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"embed.{name}={getattr(cfg, name)!r}: must be > 0")
    if cfg.max_image_mb > cfg.decode_budget_mb:
        raise ConfigError(f"embed.max_image_mb={cfg.max_image_mb} is larger than "
                          f"embed.decode_budget_mb={cfg.decode_budget_mb}")


# options that do not change what is written (how fast, where it runs); every other option of
# EmbedConfig shapes the output and is recorded (a new option is recorded unless listed here)
NOT_SHAPING = ("batch_size", "processes", "threads", "runner", "direct_running_mode",
               "direct_num_workers", "torch_threads", "decode_workers", "device")


def embed_options(embed_cfg: EmbedConfig, kind: str = "urls") -> dict:
    """The options an embedded folder's record holds (those that change its rows), with the
    input kind (reco.pipelines.inputs) when it is not a URL list."""
    options = options_of("embed", embed_cfg, NOT_SHAPING)
    options["embed.precision"] = embed_cfg.precision or "fp32"      # None: clip.precision's default
    return {**options, "format": EMBEDDED_FORMAT, **({} if kind == "urls" else {"input_format": kind})}


def input_digests(files, digests: dict[str, str] | None = None) -> dict[str, str]:
    """``{"<i>:<file name>": digest}`` of the URL lists (their bytes unless ``digests`` gives
    one by path): named by position and file name, never by the folder they were read from."""
    given = {_key(k): v for k, v in (digests or {}).items()}
    out = {}
    for i, f in enumerate(files):
        name = f"{i}:{f.path.rsplit('/', 1)[-1]}"
        out[name] = given.get(_key(f.path)) or (file_digest(f.path) if "://" not in f.path else
                                                f"rows:{f.rows}")
    return out


def _key(path: str) -> str:
    """A path as list_url_files names it (local paths absolute)."""
    return path if "://" in path else os.path.abspath(path)


def plan_job(inputs, output_dir: str, *, model: str, pretrained: str | None,
             embed_cfg: EmbedConfig, force: bool = False,
             digests: dict[str, str] | None = None) -> EmbedJob:
    """Check inputs, model and output; find the shards still to do (``force``: none done, the
    output's shards deleted once inputs and model are known to be good). An output recorded
    with other options, inputs or model is refused (StaleError naming them, ``--force``)."""
    from reco.clip import load_clip

    if embed_cfg.shard_size < 1 or embed_cfg.batch_size < 1:
        raise ConfigError("embed.shard_size and embed.batch_size must be >= 1")
    check_net_options(embed_cfg)
    kind, files = input_kinds.resolve_inputs(inputs, embed_cfg)
    check_writable(output_dir)
    if "://" not in output_dir:           # the driver, before any writer: drop a killed run's temporaries
        from reco.formats import remove_temporaries

        remove_temporaries(output_dir)
    clip = load_clip(model, pretrained)             # unknown model: ConfigError, before any work
    if force:
        removed = clear_output(output_dir)
        log.info("--force: deleted %d shard(s) of %s", len(removed), output_dir)
    check_model(output_dir, clip.model_id)          # and the format of existing shards
    shards = input_kinds.num_shards(kind, files, embed_cfg.shard_size)
    options = embed_options(embed_cfg, kind)
    check_record(output_dir, Record(stage="embed", options=options,
                                     inputs=input_digests(files, digests), model_id=clip.model_id,
                                     counts={"shards_expected": shards}))
    skip = tuple(s for s in complete_shards(output_dir) if s < shards)
    return EmbedJob(tuple(files), str(output_dir), clip.name, clip.pretrained or None, clip.model_id,
                    clip.image_size, clip.embed_dim, shards, skip, embed_cfg, kind)


def pipeline_options(cfg: EmbedConfig, beam_options=None) -> PipelineOptions:
    """Defaults from the config, then the caller's Beam flags (list of args or PipelineOptions);
    runner aliases and each engine's required options: :mod:`reco.pipelines.runners`."""
    return runners.pipeline_options(beam_options, runner=cfg.runner,
                                    direct_running_mode=cfg.direct_running_mode,
                                    direct_num_workers=cfg.direct_num_workers)


def run_job(job: EmbedJob, options: PipelineOptions) -> dict[str, int]:
    """Wire the transform, run it, return the Beam counters."""
    pipeline = beam.Pipeline(options=options)
    _ = pipeline | "EmbedMemory" >> EmbedMemory(job)
    result = pipeline.run()
    result.wait_until_finish()
    return counters(result)


def counters(result) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        found = result.metrics().query(MetricsFilter().with_namespace("reco.embed"))["counters"]
    except NotImplementedError:                   # e.g. a Dataflow --dry_run result
        return out
    for c in found:
        value = c.committed if c.committed is not None else c.attempted
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(value or 0)
    return out


def embed_urls(inputs, output_dir: str, *, model: str, pretrained: str | None = None,
               embed_cfg: EmbedConfig = EmbedConfig(), beam_options=None,
               force: bool = False, digests: dict[str, str] | None = None) -> tuple[Manifest, dict]:
    """Download, embed and write URL lists to ``output_dir`` (resuming what is there).

    Args:
        inputs: a URL list, img2dataset webdataset tar or img2dataset parquet with image bytes
            (path/URL), a folder or glob of them, or a list of those (sorted); the kind from
            ``embed_cfg.input_format`` (auto: from the files, :mod:`reco.pipelines.inputs`).
        output_dir: folder (local or fsspec URL) for ``part-*.parquet`` + ``manifest.json``.
        model, pretrained: open_clip model spec (see :func:`reco.clip.load_clip`).
        embed_cfg: columns, shard size, download and embedding settings.
        beam_options: Beam flags (list of ``--flag=value``) or PipelineOptions.
        force: embed every shard again (the output's shards, manifest and record deleted
            first) instead of resuming; needed over shards of the old format ``embedded/1`` and
            over an output recorded with other options, inputs or model.
        digests: digest of an input by path (default: the file's sha256), e.g. the world's
            lists without their server address (:func:`world_list_digest`).
    Returns:
        (manifest, info) with counts by status, shards run/skipped and Beam counters.
    """
    with locked(output_dir, "embed-memory"):
        return _embed_urls(inputs, output_dir, model=model, pretrained=pretrained,
                           embed_cfg=embed_cfg, beam_options=beam_options, force=force,
                           digests=digests)


def _embed_urls(inputs, output_dir: str, *, model: str, pretrained: str | None,
                embed_cfg: EmbedConfig, beam_options, force: bool,
                digests: dict[str, str] | None) -> tuple[Manifest, dict]:
    start = time.time()
    options = pipeline_options(embed_cfg, beam_options)
    job = plan_job(inputs, output_dir, model=model, pretrained=pretrained, embed_cfg=embed_cfg,
                   force=force, digests=digests)
    todo = job.shards - len(job.skip)
    rows = sum(f.rows for f in job.files)
    log.info("embed %s: %d rows, %d shards (%d already complete)", _short(output_dir), rows,
             job.shards, len(job.skip))
    log.debug("embed %s -> %s with model %s", [f.path for f in job.files], output_dir, job.model_id)
    rows_todo = rows - sum(min(embed_cfg.shard_size, rows - s * embed_cfg.shard_size) for s in job.skip)
    with tracked(str(output_dir), total=rows_todo, desc=f"embed {_short(output_dir)}", unit="row"):
        metrics = run_job(job, options) if todo else {}
    manifest = write_manifest(output_dir, job.model_id, job.dim, {
        "inputs": [f.path for f in job.files], "input_format": job.kind,
        "shard_size": embed_cfg.shard_size,
        "input_rows": rows, "shards_expected": job.shards, "image_size": job.image_size})
    finish_record(str(output_dir), manifest, job.shards)
    info = {"output_dir": str(output_dir), "rows": rows, "shards": job.shards,
            "shards_run": todo, "shards_skipped": len(job.skip), "counts": manifest.counts,
            "complete": len(manifest.shards) == job.shards, "model_id": job.model_id,
            "dim": job.dim, "metrics": metrics, "seconds": round(time.time() - start, 2)}
    log.debug("embed %s: %s", output_dir, {k: info[k] for k in ("counts", "metrics", "seconds")})
    return manifest, info


# ---------------------------------------------------------------------------------------------
# the world's splits (served by the caller)
# ---------------------------------------------------------------------------------------------

def world_list_digest(path: str, embed_cfg: EmbedConfig) -> str:
    """Digest of a world URL list without its server's address (``scheme://host:port``), which
    changes with the port the world is served on, not what is embedded."""
    import pyarrow.parquet as pq

    cols = [embed_cfg.url_col, embed_cfg.caption_col] + ([embed_cfg.label_col] if embed_cfg.label_col else [])
    cols = [c for c in cols if c in pq.read_schema(path).names]
    table = pq.read_table(path, columns=cols)
    urls = [u.split("/", 3)[-1] if u and "://" in u else u for u in table.column(cols[0]).to_pylist()]
    return json_digest([urls] + [table.column(c).to_pylist() for c in cols[1:]])


def run_embed_config(cfg) -> EmbedConfig:
    """The run's embed options, with the encoder's device/precision defaulting to ``cfg.clip``'s
    (``reco embed-memory --device cuda`` embeds on a GPU; ``auto`` picks one per worker)."""
    e = cfg.embed
    return dataclasses.replace(e, device=e.device or cfg.clip.device,
                               precision=e.precision or cfg.clip.precision)


def embed_splits(cfg, splits=WORLD_SPLITS, *, beam_options=None, force: bool = False) -> dict:
    """Embed the world's URL lists (``cfg.paths.urls(split)``) into ``cfg.paths.embedded(split)``
    with the pipeline's model (:func:`reco.clip.resolve_model_spec`), loopback allowed. The
    caller serves the world (``reco.world.serving.serve_world``: the CLI and demo layers).
    Returns info per split."""
    from reco.clip import resolve_model_spec

    missing = [str(cfg.paths.urls(s)) for s in splits if not cfg.paths.urls(s).is_file()]
    if missing:
        raise FormatError(f"no URL list {missing}; run `reco world` first")
    model, pretrained = resolve_model_spec(cfg.clip.model, cfg.clip.pretrained, cfg.paths.base_clip)
    embed_cfg = dataclasses.replace(run_embed_config(cfg), allow_networks=LOOPBACK)   # world on 127.0.0.1
    info = {}
    for split in splits:
        path = str(cfg.paths.urls(split))
        _, info[split] = embed_urls(path, str(cfg.paths.embedded(split)),
                                    model=model, pretrained=pretrained, embed_cfg=embed_cfg,
                                    beam_options=beam_options, force=force,
                                    digests={path: world_list_digest(path, embed_cfg)})
    return info


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", action="append", default=[],
                        help="URL list (Parquet/CSV/TSV), img2dataset webdataset tars or img2dataset "
                        "parquet with image bytes (path/URL/folder/glob; repeatable)")
    parser.add_argument("--input-format", dest="input_format", default=None,
                        choices=input_kinds.FORMAT_CHOICES,
                        help="what --input is (default: embed.input_format, auto = from the files)")
    parser.add_argument("--output", default=None, help="output folder (with --input)")
    parser.add_argument("--split", action="append", default=[], choices=WORLD_SPLITS,
                        help="world split to embed (repeatable; default: all three)")
    parser.add_argument("--force", action="store_true",
                        help="embed every shard again (delete the output's shards first) instead of "
                        "resuming; needed over shards of the old format embedded/1")
    parser.add_argument("--beam-option", dest="beam_option", action="append", default=[],
                        metavar="FLAG", help="Beam flag, repeatable, e.g. --beam-option=--runner=dataflow "
                        "(engines and their required flags: reco.pipelines.runners)")
    parser.add_argument("beam_args", nargs=argparse.REMAINDER,
                        help="Beam flags after --, e.g. -- --direct_num_workers=2")


def _short(path) -> str:
    """The last folder name of an output path (the split's name for the world's outputs)."""
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def summary(infos: dict[str, dict]) -> dict:
    """The stage summary (reco.console.print_summary): one line per output folder."""
    out = {}
    for name, info in infos.items():
        counts = ", ".join(f"{n} {s}" for s, n in info["counts"].items() if n)
        done = (f"{info['shards_run']} shard(s) run" if info["shards_run"] else "nothing to do") + \
            (f", {info['shards_skipped']} already complete" if info["shards_skipped"] else "")
        out[name] = f"{info['rows']} rows: {counts or 'none'}; {done}; {seconds(info['seconds'])}"
    return out


def _print_info(info: dict, name: str) -> None:
    print_summary("embed-memory", {**summary({name: info}), "output": info["output_dir"]}, data=info)


def main(cfg, args) -> int:
    beam_args = list(getattr(args, "beam_option", None) or []) + \
        [a for a in (args.beam_args or []) if a != "--"]
    if args.input:
        if not args.output:
            raise ConfigError("--input needs --output")
        from reco.clip import resolve_model_spec
        from reco.remote import check_paths

        check_paths(input=args.input, output=args.output)

        model, pretrained = resolve_model_spec(cfg.clip.model, cfg.clip.pretrained, cfg.paths.base_clip)
        embed_cfg = run_embed_config(cfg)
        if getattr(args, "input_format", None):
            embed_cfg = dataclasses.replace(embed_cfg, input_format=args.input_format)
        _, info = embed_urls(args.input, args.output, model=model, pretrained=pretrained,
                             embed_cfg=embed_cfg, beam_options=beam_args,
                             force=bool(getattr(args, "force", False)))
        _print_info(info, "embedded")
        return 0
    infos = embed_splits(cfg, tuple(args.split) or WORLD_SPLITS, beam_options=beam_args,
                         force=bool(getattr(args, "force", False)))
    print_summary("embed-memory", {**summary(infos), "output": cfg.paths.embeddings}, data=infos)
    return 0
