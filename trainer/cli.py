"""``reco train``: train the fusion heads on the cached neighbour tensors.

    reco train --preset tiny --workdir runs/tiny [--resume] [--out DIR] [--set train.steps=100]

Multi-GPU: ``torchrun --nproc_per_node N -m reco.cli train --device cuda ...`` (DDP; the
global batch ``train.batch_size`` is split across processes).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from reco.options import value_flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("train")
    g.add_argument("--resume", action="store_true",
                   help="continue exactly from the latest checkpoint in the output folder")
    value_flags(g, ("--out", "PATH", "output folder (default: WORKDIR/heads); an fsspec URL (gs://, s3://) "
                                     "trains in WORKDIR/heads and publishes the folder there"),
                ("--neighbours", "PATH", "neighbours folder, precompute-neighbours' output, any fsspec path "
                                         "(mirrored into WORKDIR/neighbours; default: that folder)"))
    g.add_argument("--force", action="store_true",
                   help="train again although the output folder holds heads (also when they were "
                   "trained with other options or tensors, which is refused otherwise)")


def main(cfg, args) -> int:
    from reco.console import print_summary
    from reco.remote import is_url, staged
    from reco.trainer.train import train

    remote_out = args.out if is_url(args.out) else None
    out = Path(args.out) if args.out and not remote_out else None
    with staged({cfg.paths.neighbours: ("neighbours", args.neighbours)},
                {cfg.paths.heads: ("out", remote_out)}):
        info = train(cfg, out_dir=out, resume=bool(args.resume), force=bool(getattr(args, "force", False)))
    if int(os.environ.get("RANK", "0")) == 0:          # under torchrun, one summary
        print_summary("train", summary(info), data=info)
    return 0


def summary(info: dict) -> dict:
    """The stage summary (reco.console.print_summary)."""
    if info.get("skipped"):
        return {"status": "up to date (same options and tensors), skipped (--force trains again)",
                "output": info["out_dir"]}
    steps = f"{info['steps']}" + (f" (resumed at step {info['start_step']})" if info.get("start_step") else "")
    first, final = info.get("first_loss"), info.get("final_loss")
    rate = info.get("samples_per_s")
    return {"steps": steps + (f", {rate:.0f} samples/s" if rate else "")
                     + (f" on {info['world_size']} processes" if info.get("world_size", 1) > 1 else ""),
            "loss": f"{first:.4f} -> {final:.4f}" if first is not None and final is not None else None,
            "heads": ", ".join(f"{side} {n:,} parameters" for side, n in info["head_params_per_side"].items()),
            "output": info["out_dir"]}
