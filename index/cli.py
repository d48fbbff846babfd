"""``reco build-index``: one faiss index per modality over the embedded memory."""
from __future__ import annotations

import argparse
import json

from reco.config import RecoConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="rebuild even if the index folder is up to date with its inputs")


def main(cfg: RecoConfig, args: argparse.Namespace) -> int:
    from reco.index.build import build_memory_index

    info = build_memory_index(cfg, force=bool(args.force))
    summary = {k: info.get(k) for k in ("n", "dim", "model_id", "keys", "nprobe", "recall",
                                        "n_removed_eval_duplicates", "skipped")}
    print(json.dumps(summary, indent=2))
    print(f"index written to {cfg.paths.index}")
    return 0
