"""Config of the memory indices (``index.*``); the neighbour pass's is
``reco.pipelines.neighbours.config``."""
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
    allow_low_recall: bool = False     # keep an index whose tuned recall stays below target
                                       # (a warning); False: build-index fails, naming it
    recall_k: int = 10
    recall_sample: int = 1000
    use_gpu: bool = False              # faiss-gpu: GPU k-means + GPU-searchable keys (keys.py)
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


