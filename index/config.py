"""Config of the memory indices and of the neighbour pass."""
from __future__ import annotations

from dataclasses import dataclass

from reco import options as o


@dataclass(frozen=True)
class IndexConfig:
    index_key: str = "auto"            # "auto": Flat below exact_below items, else IVF-PQ + refine
    exact_below: int = 20000
    max_index_memory_usage: str = "4G"
    current_memory_available: str = "16G"
    target_recall: float = 0.95        # nprobe is tuned until recall@recall_k reaches this
    recall_k: int = 10
    recall_sample: int = 1000
    use_gpu: bool = False
    mmap: bool = False
    refine_k_factor: int = 8           # shortlist = k_factor * k codes re-ranked exactly (doubled
                                       # during tuning when nprobe alone cannot reach the target)
    min_nprobe: int = 8                # tuning starts here: the neighbour pass asks for k + margin
                                       # (20) hits, more than the ~sqrt(n)/4 items of one list
    max_nprobe: int = 512              # tuning stops here (or at nlist)
    nb_cores: int = 0                  # faiss/autofaiss threads; 0 = all cores
    seed: int = 0

    SECTION = "index"
    RULES = dict(index_key=o.NON_EMPTY, exact_below=o.Range(0, o.MAX_ROWS), max_index_memory_usage=o.SIZE,
                 current_memory_available=o.SIZE, target_recall=o.Range(0, 1, lo_open=True),
                 recall_k=o.Range(1, o.MAX_K), recall_sample=o.Range(1, o.MAX_ROWS),
                 refine_k_factor=o.Range(1, 1024), min_nprobe=o.Range(1, 1 << 20),
                 max_nprobe=o.Range(1, 1 << 20), nb_cores=o.Range(0, o.MAX_THREADS), seed=o.SEED)

    def __post_init__(self):
        o.check(self)


# every {query}_{search}_{fuse} context field (reco.formats.parse_field), and the cosine
# similarity range of a dedup threshold (above 1: nothing is a duplicate)
CONTEXT_FIELDS = tuple(f"{q}_{s}_{f}" for q in "vt" for s in ("img", "txt") for f in ("img", "txt"))
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
