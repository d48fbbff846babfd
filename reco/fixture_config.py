"""Config of the generated fine-grained world (a test fixture) and of the base CLIP trained on it.

Kept outside the ``reco.world`` package so that composing a run configuration
(:mod:`reco.config`) never imports the world: the stages run on foreign data without it.
``reco.world.config`` re-exports these names.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from reco import options as o

RATE = o.Range(0, 1)
COUNT = o.Range(1, 10 ** 7)


@dataclass(frozen=True)
class WorldConfig:
    """Sizes, noise and serving address of the generated world (deterministic from ``seed``)."""

    seed: int = 0
    n_species: int = 100
    image_size: int = 32
    n_pretrain: int = 20000          # pairs for the base CLIP; captions rarely name the species
    n_memory: int = 10000            # memory corpus; captions often name the species
    n_train: int = 6000              # RECO training set (the CC12M stand-in)
    n_test_per_species: int = 20     # held-out test images per species
    unseen_fraction: float = 0.3     # species absent from the RECO training set
    pretrain_name_rate: float = 0.005
    memory_name_rate: float = 0.8
    train_name_rate: float = 0.8
    noise: float = 0.1               # wrong names / generic captions in the memory (noise knob)
    dead_link_rate: float = 0.05     # memory URLs that 404
    # long tail (0 / 0: the balanced world): training-split species drawn with Zipf frequencies
    # p(rank r) ~ 1 / r**train_zipf over the non-unseen species (many then never drawn), and
    # test images for only test_group_size species from each of head (most frequent), tail
    # (1..tail_max training pairs) and unseen (none) instead of for every species
    train_zipf: float = 0.0
    test_group_size: int = 0
    tail_max: int = 5
    host: str = "127.0.0.1"
    port: int = 0                    # 0: a port free when the world is built, kept in world.json
                                     # (moved to another free one if taken when `reco world` runs)

    SECTION = "world"
    RULES = dict(seed=o.SEED, n_species=o.Range(2, 100000), image_size=o.Range(8, 1024),
                 n_pretrain=COUNT, n_memory=COUNT, n_train=COUNT, n_test_per_species=COUNT,
                 unseen_fraction=o.Range(0, 0.9), pretrain_name_rate=RATE, memory_name_rate=RATE,
                 train_name_rate=RATE, noise=RATE, dead_link_rate=RATE, host=o.NON_EMPTY,
                 port=o.Range(0, 65535), train_zipf=o.Range(0, 10), test_group_size=o.Range(0, 100000),
                 tail_max=o.Range(1, o.MAX_ROWS))

    def __post_init__(self):
        o.check(self)


@dataclass(frozen=True)
class BaseClipConfig:
    """Training of the small base CLIP from scratch on the pretraining split (then frozen)."""

    model: str = "reco-tiny"
    steps: int = 800
    batch_size: int = 256
    lr: float = 2e-3
    warmup: int = 60
    weight_decay: float = 0.1
    threads: int = 2

    SECTION = "base_clip"
    RULES = dict(model=o.NON_EMPTY, steps=o.Range(1, o.MAX_ROWS), batch_size=o.Range(2, 1 << 16),
                 lr=o.Range(0, 10, lo_open=True), warmup=o.Range(0, o.MAX_ROWS), weight_decay=o.Range(0, 10),
                 threads=o.Range(1, o.MAX_THREADS))

    def __post_init__(self):
        o.check(self)


# tiny (tests/CI): 80 species (24 unseen), 18.8k images. 80 rather than 40: with 40 the RECO
# training set held only 21 species once the validation species were out, and on some world seeds
# the heads memorised them instead of learning to read the memory (seed sweep in
# experiments.seed_sweep; the README's Status). demo: 100 species, 38k images, 800 steps.
_TINY = WorldConfig(n_species=80, n_pretrain=8000, n_memory=6000, n_train=4000, n_test_per_species=10)
# longtail: 2,000 species; the 12k training pairs follow a Zipf law (exponent 1) over 1,800 of
# them, so ~1,400 species appear (most 1-5 times, the head hundreds of times) and ~600 never do;
# the 16k memory pairs cover every species; 60 test species each from head, tail and unseen.
# Images stay 32 px and the base CLIP model as small as the tiny world's (issue 20).
_LONGTAIL = WorldConfig(n_species=2000, n_pretrain=8000, n_memory=16000, n_train=12000,
                        n_test_per_species=10, unseen_fraction=0.1, train_zipf=1.0,
                        test_group_size=60, tail_max=5)
# longtail_small: the same Zipf law at tiny's scale (400 species, ~340 in training of which ~220
# 1-5 times, ~60 never; 24 test species per group), where the tiny base CLIP can tell species
# apart: what the 2-core sweep of issue 20 measured (README, Status)
_LONGTAIL_SMALL = dataclasses.replace(_LONGTAIL, n_species=400, n_memory=4800, n_train=4000,
                                      test_group_size=24)
# the worlds of the presets (reco.config.PRESETS)
WORLD_PRESETS = {"tiny": _TINY, "demo": WorldConfig(), "longtail": _LONGTAIL, "longtail_small": _LONGTAIL_SMALL}
BASE_CLIP_PRESETS = {"tiny": BaseClipConfig(steps=300, warmup=30),
                     "demo": BaseClipConfig(steps=800, warmup=60),
                     # 2,000 look-alike species: 300 steps left the base CLIP at 10.6% attribute
                     # zero-shot top-1 among them (world seed 0), near-blind to shape
                     "longtail": BaseClipConfig(steps=900, warmup=60),
                     "longtail_small": BaseClipConfig(steps=300, warmup=30)}
