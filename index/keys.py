"""Which faiss index to build, chosen on purpose from the corpus size and the memory budget.

autofaiss picks an HNSW index whenever it fits the memory budget; we always hand it an explicit
key instead:

* fewer than ``IndexConfig.exact_below`` items: ``"Flat"`` with inner product (exact search);
* otherwise an IVF index with product-quantised codes whose shortlist is re-ranked exactly:
  ``"IVF{nlist},PQ{m}x4fs,RFlat"``. Measured on this machine: IVF1024,PQ32 (8-bit codes, no
  re-ranking) reached a recall@10 of only 0.52 at nprobe 64 on 200k 64-d vectors, whatever the
  nprobe, because the codes themselves confuse close neighbours; re-ranking ``k_factor * k``
  candidates with the full vectors (IndexRefineFlat) lifts it above 0.99. The codes only have to
  build a good shortlist, so 4-bit fast-scan PQ with ``m = dim / 4`` sub-quantizers is used: it
  trains in seconds (8-bit PQ with 2-d sub-vectors took minutes in faiss 1.15) and scans fast.
  When the full vectors do not fit the budget the re-ranking keeps fp16 copies
  (``Refine(SQfp16)``), then 8-bit scalar-quantised copies (``Refine(SQ8)``). Codes without a
  re-ranking stage (``IVF8192,PQ64``: recall@10 0.47 above ~3.9M items, issue 21) are never
  chosen (:func:`measured_bad`): when no re-ranked plan fits the budget the choice fails, naming
  ``index.max_index_memory_usage``.
* ``index.use_gpu`` with a GPU visible to faiss: IVF keys that faiss-gpu searches
  (``IVF{nlist},Flat``, then ``SQfp16`` and ``SQ8`` codes; fast-scan PQ and refine stages do not
  move to the GPU).

The IVF-PQ keys are built with the L2 metric on L2-normalised vectors: the ranking is the inner
product's (``|x - q|^2 = 2 - 2 <x, q>``) and :class:`reco.index.memory.Memory` converts the scores
back to inner products. (autofaiss 2.18 refuses IVF-PQ/refine keys with its inner-product factory
and its OPQ branch does not run with faiss 1.15.) ``Flat`` uses the inner product directly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from autofaiss.utils.cast import cast_memory_to_bytes

from reco.errors import ConfigError
from reco.index.config import IndexConfig


@dataclass(frozen=True)
class IndexPlan:
    key: str                 # faiss index_factory string given to autofaiss
    metric: str              # "ip" or "l2" (autofaiss metric_type)
    exact: bool              # True: no tuning needed
    nlist: int = 0
    estimated_bytes: int = 0
    reason: str = ""


def choose_nlist(n: int) -> int:
    """~4 sqrt(n) inverted lists (a power of two), with >= 39 training points per list."""
    target = 4 * math.sqrt(max(n, 1))
    nlist = 2 ** round(math.log2(target))
    while nlist > 16 and n / nlist < 39:
        nlist //= 2
    return max(nlist, 1)


def _pq_m(dim: int, dsub: int) -> int:
    m = max(dim // dsub, 1)
    while dim % m:
        m -= 1
    return m


def _ivf_bytes(n: int, dim: int, nlist: int, code_bytes: float) -> int:
    # codes + 8-byte ids in the inverted lists + coarse centroids
    return int(n * (code_bytes + 8) + nlist * dim * 4)


def candidate_plans(n: int, dim: int, gpu: bool = False) -> list[IndexPlan]:
    """IVF plans from the most accurate (and largest) to the smallest (``gpu``: keys faiss-gpu
    searches). None of them is :func:`measured_bad`."""
    nlist = choose_nlist(n)
    if gpu:
        return [IndexPlan(f"IVF{nlist},{codes}", "l2", False, nlist, _ivf_bytes(n, dim, nlist, dim * b), why)
                for codes, b, why in (("Flat", 4, "GPU: IVF lists of full fp32 vectors"),
                                      ("SQfp16", 2, "GPU: full vectors exceed the budget: fp16 codes"),
                                      ("SQ8", 1, "GPU: fp16 codes exceed the budget: 8-bit codes"))]
    m4 = _pq_m(dim, 4)
    base4 = _ivf_bytes(n, dim, nlist, m4 / 2)
    return [
        IndexPlan(f"IVF{nlist},PQ{m4}x4fs,RFlat", "l2", False, nlist, base4 + n * dim * 4,
                  "IVF-PQ shortlist re-ranked with the full fp32 vectors"),
        IndexPlan(f"IVF{nlist},PQ{m4}x4fs,Refine(SQfp16)", "l2", False, nlist, base4 + n * dim * 2,
                  "full vectors exceed the budget: shortlist re-ranked with fp16 copies"),
        IndexPlan(f"IVF{nlist},PQ{m4}x4fs,Refine(SQ8)", "l2", False, nlist, base4 + n * dim,
                  "fp16 vectors exceed the budget: shortlist re-ranked with 8-bit copies"),
    ]


def measured_bad(key: str) -> bool:
    """Product-quantised codes with no re-ranking stage (``IVF8192,PQ64``: recall@10 0.47 at
    ~3.9M items): the codes themselves confuse close neighbours, whatever the nprobe."""
    parts = key.split(",")
    return any(p.startswith("PQ") for p in parts) and not any(p.startswith(("RFlat", "Refine")) for p in parts)


def choose_index_key(n: int, dim: int, cfg: IndexConfig, gpu: bool = False) -> IndexPlan:
    """The index for ``n`` vectors of ``dim`` under ``cfg`` (see the module docstring).

    Args:
        n: number of memory items.
        dim: embedding dimension.
        cfg: ``index_key`` ("auto" or an explicit faiss key), ``exact_below``,
            ``max_index_memory_usage``.
        gpu: a GPU will search the index (``index.use_gpu`` and faiss sees one): GPU keys.
    """
    if n <= 0:
        raise ConfigError("index: the memory is empty (no successfully embedded items)")
    if cfg.index_key != "auto":
        exact = cfg.index_key == "Flat"
        return IndexPlan(cfg.index_key, "ip" if exact else "l2", exact, reason="index.index_key")
    if n < cfg.exact_below:
        return IndexPlan("Flat", "ip", True, estimated_bytes=n * dim * 4,
                         reason=f"{n} items < index.exact_below={cfg.exact_below}: exact search")
    budget = cast_memory_to_bytes(cfg.max_index_memory_usage)
    plans = candidate_plans(n, dim, gpu)
    for plan in plans:
        if plan.estimated_bytes <= budget:
            return plan
    raise ConfigError(f"index: {n} x {dim} vectors need at least {plans[-1].estimated_bytes} bytes "
                      f"({plans[-1].key}, the smallest re-ranked or exact plan); raise "
                      f"index.max_index_memory_usage (now {cfg.max_index_memory_usage})")
