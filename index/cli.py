"""``reco build-index``: one faiss index per modality over the embedded memory."""
from __future__ import annotations

import argparse

from reco.config import RecoConfig
from reco.options import value_flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="rebuild even if the index folder is up to date with its inputs")
    io = parser.add_argument_group("inputs and outputs apart from the work directory (any "
                                   "fsspec path: gs://, s3://, local; mirrored into the work "
                                   "directory, changed files only)")
    value_flags(io, ("--memory", "PATH", "embedded memory folder (embed-memory's --output; default "
                                         "WORKDIR/embeddings/memory)"),
                ("--test", "PATH", "embedded evaluation images whose near-duplicates leave the memory "
                                   "(default WORKDIR/embeddings/test when present)"),
                ("--output", "PATH", "also publish the index folder there (built in WORKDIR/index)"))


def summary(info: dict, folder) -> dict:
    """The stage summary (reco.console.print_summary)."""
    from reco.console import seconds

    out = {"status": "up to date, skipped (--force rebuilds)" if info.get("skipped")
           else f"built in {seconds(info.get('seconds'))}",
           "memory": f"{info.get('n')} items of dimension {info.get('dim')} "
                     f"({info.get('n_removed_eval_duplicates', 0)} near-duplicates of test images removed)"}
    for m, name in (("img", "image index"), ("txt", "text index")):
        idx = (info.get("indices") or {}).get(m, {})
        search = "exact search" if idx.get("nprobe") is None else f"nprobe {idx.get('nprobe')}"
        out[name] = f"{idx.get('key')}, {search}, recall@{idx.get('recall_k')} {idx.get('recall')}"
    return {**out, "output": folder}


def main(cfg: RecoConfig, args: argparse.Namespace) -> int:
    from reco.console import print_summary
    from reco.index.build import build_memory_index
    from reco.remote import published, staged

    with staged({cfg.paths.embedded("memory"): ("memory", args.memory),
                 cfg.paths.embedded("test"): ("test", args.test)},
                {cfg.paths.index: ("output", args.output)}):
        info = build_memory_index(cfg, force=bool(args.force))
    print_summary("build-index", summary(info, published(cfg.paths.index, args.output)), data=info)
    return 0
