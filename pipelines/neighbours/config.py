"""Config of the neighbour pass (``reco precompute-neighbours``): ``neighbours.*``."""
from __future__ import annotations

from dataclasses import dataclass

from reco import options as o


# the cosine similarity range of a dedup threshold (above 1: nothing is a duplicate)
SIMILARITY = o.Range(-1, 2)


@dataclass(frozen=True)
class NeighboursConfig:
    k: int = 16                        # k_max stored; training/inference may use fewer
    dedup_threshold: float = 0.97      # memory items this similar to the query are excluded
    eval_dedup_threshold: float = 0.97 # memory items this similar to an eval image are removed
    batch_size: int = 4096
    shard_size: int = 10000
    # which cross/uni-modal neighbour tensors to materialise for the trainer
    fields: tuple[str, ...] = ("v_img_txt", "t_txt_img")
    # Modalities in which a memory item is compared with the training PAIR to decide that it is a
    # near-duplicate of it (excluded from every search of that pair): "img" = the pair's image vs
    # the memory image (a copy of the picture would hand the trainer its own caption), "txt" = the
    # pair's caption vs the memory caption (opt-in: templated captions are shared by design).
    dedup_on: tuple[str, ...] = ("img",)
    search_margin: int = 4             # extra hits searched so that k remain after exclusion
                                       # (rows still short are searched again, wider)
    runner: str = "DirectRunner"
    direct_running_mode: str = "in_memory"   # or multi_processing (never multi_threading)
    direct_num_workers: int = 1

    SECTION = "neighbours"
    RULES = dict(k=o.Range(1, o.MAX_K), dedup_threshold=SIMILARITY, eval_dedup_threshold=SIMILARITY,
                 batch_size=o.Range(1, 1 << 16), shard_size=o.Range(1, o.MAX_ROWS),
                 fields=o.Items(o.NON_EMPTY, min_items=1),      # names checked by reco.formats
                 dedup_on=o.Items(o.Choice(("img", "txt"))), search_margin=o.Range(0, o.MAX_K),
                 runner=o.NON_EMPTY, direct_running_mode=o.NON_EMPTY,
                 direct_num_workers=o.Range(0, o.MAX_THREADS))

    def __post_init__(self):
        o.check(self)
