"""``reco train``: train the fusion heads on the cached neighbour tensors.

    reco train --preset tiny --workdir runs/tiny [--resume] [--out DIR] [--set train.steps=100]

Multi-GPU: ``torchrun --nproc_per_node N -m reco.cli train --device cuda ...`` (DDP; the
global batch ``train.batch_size`` is split across processes).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("train")
    g.add_argument("--resume", action="store_true",
                   help="continue exactly from the latest checkpoint in the output folder")
    g.add_argument("--out", default=None,
                   help="output folder (default: WORKDIR/heads); an fsspec URL (gs://, s3://) "
                        "trains in WORKDIR/heads and publishes the folder there")
    g.add_argument("--neighbours", default=None, metavar="PATH",
                   help="neighbours folder, precompute-neighbours' output, any fsspec path "
                        "(mirrored into WORKDIR/neighbours; default: that folder)")


def main(cfg, args) -> int:
    from reco.remote import is_url, staged
    from reco.trainer.train import train

    remote_out = args.out if is_url(args.out) else None
    out = Path(args.out) if args.out and not remote_out else None
    with staged({cfg.paths.neighbours: ("neighbours", args.neighbours)},
                {cfg.paths.heads: ("out", remote_out)}):
        info = train(cfg, out_dir=out, resume=bool(args.resume))
    summary = {k: info[k] for k in ("out_dir", "steps", "start_step", "first_loss", "final_loss",
                                    "samples_per_s", "head_params_per_side", "logit_scale", "world_size")}
    if int(os.environ.get("RANK", "0")) == 0:          # under torchrun, one summary
        print(json.dumps(summary, indent=2))
    return 0
