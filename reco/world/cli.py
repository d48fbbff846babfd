"""``reco world``: generate the world and train its frozen base CLIP (idempotent)."""
from __future__ import annotations

import argparse
import json

from reco.world.build import run_world


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the full info as JSON")


def main(cfg, args) -> int:
    as_json = bool(args.json)
    info = run_world(cfg)
    if as_json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(summary(info))
    return 0


def summary(info: dict) -> str:
    """Human-readable lines: sizes, times, zero-shot accuracies of the base CLIP."""
    w, b = info["world"], info["base_clip"]
    counts = ", ".join(f"{s} {w['counts'][s]}" for s in ("pretrain", "memory", "train", "test"))
    zs = b.get("zero_shot", {})
    lines = [
        f"world    {w['action']} in {w['seconds']} s ({w.get('cpu_seconds')} s CPU): {w['n_species']} species "
        f"({w['n_unseen']} unseen in train); rows: {counts}; dead memory links {w['dead_links']}; "
        f"test images copied into memory {len(w['eval_duplicates_in_memory'])}",
        f"         served as {w['base_url']}images/...  (reco serve-world)",
        f"base CLIP {b['action']}: {b['spec']}  train {b.get('train_seconds')} s "
        f"({b.get('train_cpu_seconds')} s CPU, {b.get('threads')} threads), "
        f"final loss {b.get('final_loss')}",
        f"zero-shot top-1 on test: attribute prompts {zs.get('attribute_top1')}, "
        f"species-name prompts {zs.get('name_top1')} (unseen {zs.get('name_top1_unseen')})",
    ]
    return "\n".join(lines)
