"""``reco evaluate``: zero-shot and retrieval evaluation of frozen CLIP vs reco."""
from __future__ import annotations

import argparse

from reco.evaluation.config import INFERENCE_MODES
from reco.options import MAX_K, flag_range


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("evaluate")
    g.add_argument("--heads", default=None, help="heads folder (default: WORKDIR/heads)")
    g.add_argument("--memory", default=None, help="memory index folder used at inference "
                                                 "(default: WORKDIR/index)")
    g.add_argument("--modes", default=None,
                   help=f"comma-separated inference modes among {','.join(INFERENCE_MODES)} "
                        "(default: eval.modes)")
    g.add_argument("--k", type=flag_range(1, MAX_K), default=None,
                   help="neighbours at inference (default: as trained)")
    g.add_argument("--image-folder", default=None,
                   help="also evaluate zero-shot on FOLDER/<class>/*.png")
    g.add_argument("--classnames", default=None,
                   help="class names of --image-folder, one per line (default: the folder names, "
                        "or WORKDIR/world/classnames.txt when the folders are class ids)")
    g.add_argument("--no-gallery", action="store_true", help="do not write gallery.html")


def main(cfg, args: argparse.Namespace) -> int:
    from reco.console import json_summaries, print_summary
    from reco.evaluation.evaluate import evaluate, markdown_table

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip()) if args.modes else None
    results = evaluate(cfg, heads_dir=args.heads, memory_dir=args.memory, modes=modes, k=args.k,
                       image_folder=args.image_folder, classnames=args.classnames,
                       gallery=not args.no_gallery)
    print_summary("evaluate", summary(results, cfg.paths.eval), data=results)
    if not json_summaries():
        print(markdown_table(results["modes"]))
    return 0


def summary(results: dict, folder) -> dict:
    """The stage summary (reco.console.print_summary); the table follows it."""
    return {"test": f"{results.get('n_test')} pairs, {results.get('n_classes')} classes; memory of "
                    f"{results.get('memory_size')} items, k {results.get('k')}",
            "output": folder}
