"""``reco build-index``: one faiss index per modality over the embedded memory."""
from __future__ import annotations

import argparse
import json

from reco.config import RecoConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="rebuild even if the index folder is up to date with its inputs")
    io = parser.add_argument_group("inputs and outputs apart from the work directory (any "
                                   "fsspec path: gs://, s3://, local; mirrored into the work "
                                   "directory, changed files only)")
    io.add_argument("--memory", default=None, metavar="PATH",
                    help="embedded memory folder (embed-memory's --output; default "
                         "WORKDIR/embeddings/memory)")
    io.add_argument("--test", default=None, metavar="PATH",
                    help="embedded evaluation images whose near-duplicates leave the memory "
                         "(default WORKDIR/embeddings/test when present)")
    io.add_argument("--output", default=None, metavar="PATH",
                    help="also publish the index folder there (built in WORKDIR/index)")


def main(cfg: RecoConfig, args: argparse.Namespace) -> int:
    from reco.index.build import build_memory_index
    from reco.remote import staged

    with staged({cfg.paths.embedded("memory"): ("memory", args.memory),
                 cfg.paths.embedded("test"): ("test", args.test)},
                {cfg.paths.index: ("output", args.output)}):
        info = build_memory_index(cfg, force=bool(args.force))
    summary = {k: info.get(k) for k in ("n", "dim", "model_id", "keys", "nprobe", "recall",
                                        "n_removed_eval_duplicates", "skipped")}
    print(json.dumps(summary, indent=2))
    print(f"index written to {cfg.paths.index}" + (f" and {args.output}" if args.output else ""))
    return 0
