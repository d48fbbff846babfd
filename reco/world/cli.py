"""``reco world``: generate the world and train its frozen base CLIP (idempotent)."""
from __future__ import annotations

import argparse

from reco.console import print_summary, seconds
from reco.world.build import run_world


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options of its own (``--json`` prints the full info: a common option)."""


def main(cfg, args) -> int:
    info = run_world(cfg)
    print_summary("world", summary(info), data=info)
    return 0


def summary(info: dict) -> dict:
    """The stage summary (reco.console.print_summary): sizes, times, base-CLIP zero-shot top-1."""
    w, b = info["world"], info["base_clip"]
    zs = b.get("zero_shot", {})
    return {
        "generated": f"{w['action']} in {seconds(w['seconds'])}: {w['n_species']} species "
                 f"({w['n_unseen']} unseen in train), served at {w['base_url']}",
        "rows": {s: w["counts"][s] for s in ("pretrain", "memory", "train", "test")},
        "memory": f"{w['dead_links']} dead links, {len(w['eval_duplicates_in_memory'])} test "
                  f"images copied in",
        "base CLIP": f"{b['action']}" + (f" in {seconds(b.get('train_seconds'))}, final loss "
                                         f"{b.get('final_loss')}" if b["action"] == "trained" else ""),
        "zero-shot": f"top-1 {_pct(zs.get('attribute_top1'))} with attribute prompts, "
                     f"{_pct(zs.get('name_top1'))} with species names (unseen "
                     f"{_pct(zs.get('name_top1_unseen'))})",
    }


def _pct(fraction) -> str:
    return "–" if fraction is None else f"{100 * fraction:.1f}%"
