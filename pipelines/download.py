"""Download + resize one shard with img2dataset on the worker.

:func:`fetch_shard` writes the shard's fetchable rows to a temporary URL list, runs img2dataset
into a temporary folder with ``output_format="parquet"`` (one file: status, error_message and the
resized image bytes per row) and joins the result back by id. With ``processes <= 1`` it drives
img2dataset's own Reader/Resizer/Downloader in this process (threads only): no ``spawn``ed
processes, no SIGINT handler, so it runs in any Beam worker thread. ``img2dataset.download`` always
spawns a pool and a logger process (even with ``processes_count=1``) and installs a signal
handler, which only works in the main thread; it is used when ``processes > 1``.

Statuses (reco.formats.STATUSES): success, failed_to_download (HTTP error, timeout, refused
connection: img2dataset's message), failed_to_resize (decode error); rows already marked (refused)
pass through untouched.
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq

from reco.formats import STATUS_OK
from reco.pipelines.config import EmbedConfig

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
    """img2dataset Resizer to the model input size, as the pipeline uses it."""
    from img2dataset.resizer import Resizer

    return Resizer(image_size=image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=False,
                   upscale_interpolation="lanczos", downscale_interpolation="area",
                   encode_quality=_quality(cfg.encode_format), encode_format=cfg.encode_format,
                   skip_reencode=False, disable_all_reencoding=False, min_image_size=0,
                   max_image_area=float("inf"), max_aspect_ratio=float("inf"), blurrer=None)


def _run_in_process(url_list: str, out: str, n: int, image_size: int, cfg: EmbedConfig) -> None:
    from img2dataset.downloader import Downloader
    from img2dataset.reader import Reader
    from img2dataset.writer import ParquetSampleWriter

    os.makedirs(out + "/_tmp", exist_ok=True)
    reader = Reader(url_list, "parquet", "url", "caption", None, None, [ID_COL], n, set(), out + "/_tmp")
    downloader = Downloader(
        sample_writer_class=ParquetSampleWriter, resizer=resizer(image_size, cfg),
        thread_count=cfg.threads, save_caption=True, extract_exif=False, output_folder=out,
        column_list=reader.column_list, timeout=cfg.timeout, number_sample_per_shard=n,
        oom_shard_count=5, compute_hash=None, verify_hash_type=None,
        encode_format=cfg.encode_format, retries=cfg.retries, user_agent_token=None,
        disallowed_header_directives=None)
    for shard in reader:
        downloader.download_shard(shard)


def _run_img2dataset(url_list: str, out: str, n: int, image_size: int, cfg: EmbedConfig) -> None:
    import img2dataset

    img2dataset.download(
        url_list=url_list, output_folder=out, input_format="parquet", output_format="parquet",
        url_col="url", caption_col="caption", save_additional_columns=[ID_COL],
        image_size=image_size, resize_mode=cfg.resize_mode, encode_format=cfg.encode_format,
        encode_quality=_quality(cfg.encode_format), processes_count=cfg.processes,
        thread_count=cfg.threads, timeout=cfg.timeout, retries=cfg.retries,
        number_sample_per_shard=-(-n // cfg.processes), extract_exif=False, compute_hash=None,
        disallowed_header_directives=[])


def fetch_shard(rows: list[dict], image_size: int, cfg: EmbedConfig) -> list[dict]:
    """Download and resize the rows whose status is unset; every row comes back with a status
    (and ``image`` bytes when it is ``success``)."""
    todo = [r for r in rows if not r["status"]]
    if not todo:
        return list(rows)
    n = max(len(todo), 10)
    use_pool = cfg.processes > 1 and threading.current_thread() is threading.main_thread()
    with tempfile.TemporaryDirectory(prefix="reco-dl-") as tmp:
        url_list, out = os.path.join(tmp, "urls.parquet"), os.path.join(tmp, "out")
        pq.write_table(pa.table({"url": [r["url"] for r in todo],
                                 "caption": [r["caption"] or "" for r in todo],
                                 ID_COL: pa.array([r["id"] for r in todo], pa.int64())}), url_list)
        (_run_img2dataset if use_pool else _run_in_process)(url_list, out, n, image_size, cfg)
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
    return {**row, "status": res["status"] or "failed_to_download",
            "error_message": res["error_message"] or "unknown error"}


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
        log.info("shard %05d: downloaded %d/%d (%d failed)", shard, ok, len(out), failed)
        yield shard, out


class DownloadShards(beam.PTransform):
    """(shard, rows) -> (shard, rows with status and, on success, resized image bytes)."""

    def __init__(self, image_size: int, cfg: EmbedConfig):
        super().__init__()
        self.image_size = image_size
        self.cfg = cfg

    def expand(self, shards):
        return shards | "Img2dataset" >> beam.ParDo(_DownloadShardFn(self.image_size, self.cfg))
