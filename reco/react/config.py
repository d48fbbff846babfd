"""Options of REACT (``--set react.*``): one dataclass, the ``react`` section of the run config.

Names follow :class:`reco.trainer.config.TrainConfig` where they mean the same thing. The data
options say where the customisation set's images come from: ``image_source=shards`` streams the
webdataset tars written by ``react-download`` (``shards``; default ``WORKDIR/react/shards``);
``world`` / ``embedded`` decode the whole set into memory (test fixtures, small sets).
"""
from __future__ import annotations

from dataclasses import dataclass

from reco import options as o


@dataclass(frozen=True)
class ReactConfig:
    # model and optimisation
    k_blocks: int = 2                 # gated blocks before each of the last k vision blocks
    init: str = "copy"                # copy | random (weights of the gated blocks; gates start at 0)
    steps: int = 600                  # tiny world (80 species): 100 steps +0, 300 +10, 600 +20 pts
    batch_size: int = 64              # global batch (split across DDP ranks)
    lr: float = 2e-3
    gate_lr_scale: float = 20.0       # the tanh gates (alpha) learn this much faster
    weight_decay: float = 0.05
    warmup_steps: int = 20
    init_temperature: float | None = None   # None: the frozen CLIP's own temperature
    shift: int = 2                    # random-translation augmentation, pixels (0: none)
    checkpoint_every: int = 100
    resume: bool = False              # continue from the last checkpoint in the output folder
    seed: int = 0
    log_every: int = 20
    # data
    image_source: str = "shards"      # shards (streamed) | world | embedded (in memory)
    shards: str | None = None         # webdataset folder/glob (default WORKDIR/react/shards)
    workers: int = 0                  # DataLoader workers per rank (shards are split over them)
    shuffle_buffer: int = 512         # samples held by the shuffle buffer (webdataset .shuffle)
    eval_shards: str | None = None    # webdataset holding the labelled split's images (by URL)
    # download (react-download)
    reuse: str | None = None          # an existing img2dataset webdataset download to take from
    shard_size: int = 1000            # samples per written tar

    SECTION = "react"
    RULES = dict(k_blocks=o.Range(1, 64), init=o.Choice(("copy", "random")), steps=o.Range(1, o.MAX_ROWS),
                 batch_size=o.Range(1, 1 << 16), lr=o.Range(0, 10, lo_open=True),
                 gate_lr_scale=o.Range(0, 1e4, lo_open=True), weight_decay=o.Range(0, 10),
                 warmup_steps=o.Range(0, o.MAX_ROWS), init_temperature=o.Range(0, 10, lo_open=True),
                 shift=o.Range(0, 1024), checkpoint_every=o.Range(1, o.MAX_ROWS), image_source=o.NON_EMPTY,
                 seed=o.SEED, log_every=o.Range(1, o.MAX_ROWS), shards=o.NON_EMPTY,
                 workers=o.Range(0, o.MAX_THREADS), shuffle_buffer=o.Range(1, o.MAX_ROWS),
                 eval_shards=o.NON_EMPTY, reuse=o.NON_EMPTY, shard_size=o.Range(1, o.MAX_ROWS))

    def __post_init__(self):
        o.check(self)
