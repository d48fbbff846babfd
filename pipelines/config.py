"""Config of the embed-memory Beam job."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EmbedConfig:
    url_col: str = "url"
    caption_col: str = "caption"
    label_col: str | None = "label"   # passed through when the URL list has it (evaluation sets)
    shard_size: int = 1000            # URL-list rows per shard (unit of download, resume and output)
    batch_size: int = 256             # open_clip forward batch
    processes: int = 1                # img2dataset processes per shard (1: in the worker, no spawn)
    threads: int = 16                 # img2dataset download threads per process
    timeout: int = 10                 # seconds per URL: one deadline for connect + headers + body
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
    device: str | None = None         # torch device of the workers' encoder: cpu, cuda, auto
                                      # (None: the run's clip.device); GPU workers use cuda/auto
    precision: str | None = None      # open_clip precision (fp32, fp16, amp...; None: clip.precision)
    input_format: str = "auto"        # urls | webdataset | parquet-images (reco.pipelines.inputs);
                                      # auto: from the files (.tar, image-bytes column, else urls)
    image_col: str | None = None      # parquet-images: column of image bytes (None: jpg/png/webp)


PRESETS = {"tiny": EmbedConfig(shard_size=500), "demo": EmbedConfig()}
LOOPBACK = ("127.0.0.0/8",)           # embed.allow_networks of the loopback world server
