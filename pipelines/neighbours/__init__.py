"""The neighbour pass (``reco precompute-neighbours``): kNN of every training pair in the memory,
cached as trainer tensors. The whole stage lives here:

* :mod:`.job` - the Beam job (shard specs -> one DoFn call per output shard: read -> search ->
  fetch -> write), its record, CLI (``add_arguments`` / ``main`` / ``summary``) and
  :func:`precompute_neighbours`;
* :mod:`.search` - faiss search excluding near-duplicates of the pair, and the fetch of the hits'
  embeddings (numpy, no Beam);
* :mod:`.shards` - its output format (ids and tensors shards, manifests, ``plan.json``):
  planning, Arrow tables, atomic writes, resume, and the readers of what it wrote;
* :mod:`.config` - :class:`~.config.NeighboursConfig` (``neighbours.*``).

The job's names are available from the package (``reco.pipelines.neighbours.precompute_neighbours``,
the CLI's module); they are imported on first use, so that the config (imported by
``reco.config``) does not pull Beam in.
"""
from __future__ import annotations

import importlib

_JOB = ("precompute_neighbours", "add_arguments", "main", "summary")


def __getattr__(name: str):
    if name in _JOB:
        return getattr(importlib.import_module(f"{__name__}.job"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
