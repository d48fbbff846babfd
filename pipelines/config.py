"""Config of the embed-memory Beam job."""
from __future__ import annotations

from dataclasses import dataclass

from reco import options as o

RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")   # img2dataset
ENCODE_FORMATS = ("png", "jpg", "webp")


@dataclass(frozen=True)
class EmbedConfig:
    url_col: str = "url"
    caption_col: str = "caption"
    label_col: str | None = "label"   # passed through when the URL list has it (evaluation sets)
    shard_size: int = 1000            # URL-list rows per shard (unit of download, resume and output)
    batch_size: int = 256             # open_clip forward batch
    processes: int = 1                # img2dataset processes per shard (1: in the worker, no spawn)
    threads: int = 16                 # img2dataset download threads per process
    timeout: float = 10.0             # seconds per URL: one deadline for connect + headers + body
    retries: int = 0
    allow_networks: tuple[str, ...] = ()   # CIDRs allowed although not global (127.0.0.0/8 for
                                      # the loopback world); link-local/metadata never allowed
    max_image_mb: int = 256           # most memory one image may take to decode (from its header)
    decode_budget_mb: int = 512       # most memory all download threads of a process decode at once
    resize_mode: str = "center_crop"  # img2dataset resize mode (to the model's input size)
    encode_format: str = "png"        # how img2dataset re-encodes resized images (png: lossless)
    runner: str = "DirectRunner"
    direct_running_mode: str = "in_memory"   # or multi_processing (never multi_threading)
    direct_num_workers: int = 1
    torch_threads: int = 2
    decode_workers: int = 4           # threads decoding + preprocessing images one batch ahead of
                                      # the forward (and one tokenising); 0 or 1: in the worker thread
    device: str | None = None         # torch device of the workers' encoder: cpu, cuda, auto
                                      # (None: the run's clip.device); GPU workers use cuda/auto
    precision: str | None = None      # open_clip precision (fp32, fp16, amp...; None: clip.precision)
    input_format: str = "auto"        # urls | webdataset | parquet-images (reco.pipelines.inputs);
                                      # auto: from the files (.tar, image-bytes column, else urls)
    image_col: str | None = None      # parquet-images: column of image bytes (None: jpg/png/webp)

    SECTION = "embed"
    RULES = dict(url_col=o.NON_EMPTY, caption_col=o.NON_EMPTY, label_col=o.NON_EMPTY,
                 shard_size=o.Range(1, o.MAX_ROWS), batch_size=o.Range(1, 65536),
                 processes=o.Range(1, o.MAX_THREADS), threads=o.Range(1, o.MAX_THREADS),
                 timeout=o.Range(1, 3600), retries=o.Range(0, 100), allow_networks=o.Items(o.NETWORK),
                 max_image_mb=o.Range(1, 1 << 20), decode_budget_mb=o.Range(1, 1 << 20),
                 resize_mode=o.Choice(RESIZE_MODES), encode_format=o.Choice(ENCODE_FORMATS),
                 runner=o.NON_EMPTY, direct_running_mode=o.NON_EMPTY,
                 direct_num_workers=o.Range(0, o.MAX_THREADS), torch_threads=o.Range(1, o.MAX_THREADS),
                 decode_workers=o.Range(0, o.MAX_THREADS),
                 device=o.Pattern(o.DEVICE, "cpu, cuda, cuda:1, auto"), precision=o.Choice(o.CLIP_PRECISIONS),
                 input_format=o.NON_EMPTY, image_col=o.NON_EMPTY)    # input_format: reco.pipelines.inputs

    def __post_init__(self):
        o.check(self)


LOOPBACK = ("127.0.0.0/8",)           # embed.allow_networks of the loopback world server
