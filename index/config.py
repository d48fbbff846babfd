"""Config of the memory indices and of the neighbour pass."""
from __future__ import annotations

from dataclasses import dataclass


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


@dataclass(frozen=True)
class NeighboursConfig:
    k: int = 16                        # k_max stored; training/inference may use fewer
    dedup_threshold: float = 0.97      # memory items this similar to the query are excluded
    eval_dedup_threshold: float = 0.97 # memory items this similar to an eval image are removed
    batch_size: int = 4096
    shard_size: int = 10000
    # which cross/uni-modal neighbour tensors to materialise for the trainer
    fields: tuple[str, ...] = ("v_img_txt", "t_txt_img")


PRESETS = {"tiny": IndexConfig(), "demo": IndexConfig()}
NEIGHBOUR_PRESETS = {"tiny": NeighboursConfig(shard_size=1000), "demo": NeighboursConfig()}
