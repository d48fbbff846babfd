"""Download + resize one shard with img2dataset on the worker.

:func:`fetch_shard` writes the shard's fetchable rows to a temporary URL list, runs img2dataset's
Reader + Downloader into a temporary folder with ``output_format="parquet"`` (one file: status,
error_message and the resized image bytes per row) and joins the result back by id. The
Downloader is :class:`~reco.pipelines.download_guard.GuardedDownloader`: img2dataset's own code
with every request going through :mod:`reco.pipelines.safe_http` (http/https only, every
redirect hop and every resolved address checked, no proxies, bounded size). With
``processes <= 1`` it runs in this process (threads only), so it works in any Beam worker
thread; with ``processes > 1`` the Reader's sub-shards go to a ``spawn`` pool of the same
downloader (img2dataset's multiprocessing distributor, without its signal handler and logger).

Statuses (reco.formats.STATUSES): success, failed_to_download (HTTP error, timeout (one
deadline per URL), body shorter than its Content-Length, redirect loop, refused connection),
failed_to_resize (decode error, decompression bomb, an image whose decoded size is over the
memory bound: :mod:`reco.pipelines.image_bounds`), refused (the policy refused the URL, a redirect or an address: message ``refused: ...``);
rows already marked (refused by :class:`~reco.pipelines.urls.FilterUnsafeUrls`) pass through.
"""
from __future__ import annotations

import logging
import os
import tempfile

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq

from reco.console import captured_output
from reco.formats import STATUS_OK
from reco.pipelines.config import EmbedConfig
from reco.pipelines.safe_http import MAX_BYTES, REFUSED_PREFIX, NetPolicy

log = logging.getLogger(__name__)
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")   # else albumentations phones home at import
# Decompression bombs: OpenCV (img2dataset's decoder) refuses images above this many pixels
# (read once per process, before the first decode) instead of allocating gigabytes.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(64_000_000))
ID_COL = "reco_id"
IMAGE_KEY = "image"          # row key holding the resized, re-encoded image bytes


def _quality(encode_format: str) -> int:
    return 1 if encode_format == "png" else 95     # png: zlib level; jpg/webp: quality


def resizer(image_size: int, cfg: EmbedConfig):
    """img2dataset Resizer to the model input size, as the pipeline uses it, bounded in memory
    per image and per process (:mod:`reco.pipelines.image_bounds`)."""
    from reco.pipelines.image_bounds import MB, BoundedResizer

    return BoundedResizer(max_image_bytes=cfg.max_image_mb * MB, budget_bytes=cfg.decode_budget_mb * MB,
                          image_size=image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=False,
                          upscale_interpolation="lanczos", downscale_interpolation="area",
                          encode_quality=_quality(cfg.encode_format), encode_format=cfg.encode_format,
                          skip_reencode=False, disable_all_reencoding=False, min_image_size=0,
                          max_image_area=float("inf"), max_aspect_ratio=float("inf"), blurrer=None)


def policy(cfg: EmbedConfig) -> NetPolicy:
    """The network policy of the download step (see :mod:`reco.pipelines.safe_http`)."""
    return NetPolicy(allow_networks=tuple(cfg.allow_networks), max_bytes=MAX_BYTES)


def _downloader(reader, out: str, n: int, image_size: int, cfg: EmbedConfig):
    from reco.pipelines.download_guard import GuardedDownloader

    return GuardedDownloader(
        policy(cfg), sample_writer_class=_parquet_writer(), resizer=resizer(image_size, cfg),
        thread_count=cfg.threads, save_caption=True, extract_exif=False, output_folder=out,
        column_list=reader.column_list, timeout=cfg.timeout, number_sample_per_shard=n,
        oom_shard_count=5, compute_hash=None, verify_hash_type=None,
        encode_format=cfg.encode_format, retries=cfg.retries, user_agent_token=None,
        disallowed_header_directives=None)


def _parquet_writer():
    from img2dataset.writer import ParquetSampleWriter

    return ParquetSampleWriter


def _run(url_list: str, out: str, n: int, image_size: int, cfg: EmbedConfig) -> None:
    """img2dataset Reader -> GuardedDownloader, in this process or in a spawn pool."""
    from img2dataset.reader import Reader

    processes = max(1, int(cfg.processes))
    per_shard = n if processes == 1 else -(-n // processes)
    os.makedirs(out + "/_tmp", exist_ok=True)
    reader = Reader(url_list, "parquet", "url", "caption", None, None, [ID_COL], per_shard, set(),
                    out + "/_tmp")
    downloader = _downloader(reader, out, per_shard, image_size, cfg)
    if processes == 1:
        for shard in reader:
            downloader.download_shard(shard)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        for ok, shard in pool.imap_unordered(downloader, reader):
            if not ok:
                log.warning("img2dataset sub-shard %s failed; its rows get no result", shard[0])


def fetch_shard(rows: list[dict], image_size: int, cfg: EmbedConfig) -> list[dict]:
    """Download and resize the rows whose status is unset; every row comes back with a status
    (and ``image`` bytes when it is ``success``)."""
    todo = [r for r in rows if not r["status"]]
    if not todo:
        return list(rows)
    n = max(len(todo), 10)
    with tempfile.TemporaryDirectory(prefix="reco-dl-") as tmp:
        url_list, out = os.path.join(tmp, "urls.parquet"), os.path.join(tmp, "out")
        pq.write_table(pa.table({"url": [r["url"] for r in todo],
                                 "caption": [r["caption"] or "" for r in todo],
                                 ID_COL: pa.array([r["id"] for r in todo], pa.int64())}), url_list)
        with captured_output(log):        # img2dataset's banners: to the log at DEBUG
            _run(url_list, out, n, image_size, cfg)
        results = _read_results(out, cfg.encode_format)
    return [_merge_result(r, results) for r in rows]


def _read_results(out: str, encode_format: str) -> dict[int, dict]:
    found = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".parquet"):
            cols = [ID_COL, "status", "error_message", encode_format]
            table = pq.read_table(os.path.join(out, name), columns=cols)
            for rec in table.rename_columns(cols[:3] + [IMAGE_KEY]).to_pylist():
                found[rec[ID_COL]] = rec
    return found


def _merge_result(row: dict, results: dict[int, dict]) -> dict:
    if row["status"]:
        return row
    res = results.get(row["id"])
    if res is None:
        return {**row, "status": "failed_to_download", "error_message": "no result from img2dataset"}
    if res["status"] == STATUS_OK and res[IMAGE_KEY]:
        return {**row, "status": STATUS_OK, "error_message": None, IMAGE_KEY: res[IMAGE_KEY]}
    message = res["error_message"] or "unknown error"
    status = "refused" if message.startswith(REFUSED_PREFIX) else res["status"] or "failed_to_download"
    return {**row, "status": status, "error_message": message}


class _DownloadShardFn(beam.DoFn):
    def __init__(self, image_size: int, cfg: EmbedConfig):
        self.image_size = image_size
        self.cfg = cfg
        self.downloaded = beam.metrics.Metrics.counter("reco.embed", "downloaded")
        self.failed = beam.metrics.Metrics.counter("reco.embed", "failed")

    def setup(self):
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

    def process(self, element):
        shard, rows = element
        out = fetch_shard(rows, self.image_size, self.cfg)
        ok = sum(r["status"] == STATUS_OK for r in out)
        failed = sum(r["status"] not in (STATUS_OK, "refused") for r in out)
        self.downloaded.inc(ok)
        self.failed.inc(failed)
        log.debug("shard %05d: downloaded %d/%d (%d failed)", shard, ok, len(out), failed)
        yield shard, out


class DownloadShards(beam.PTransform):
    """(shard, rows) -> (shard, rows with status and, on success, resized image bytes)."""

    def __init__(self, image_size: int, cfg: EmbedConfig):
        super().__init__()
        self.image_size = image_size
        self.cfg = cfg

    def expand(self, shards):
        return shards | "Img2dataset" >> beam.ParDo(_DownloadShardFn(self.image_size, self.cfg))
