"""Where does the learned fusion head earn its place? (issue 20)

On a long-tail world (``reco`` preset ``longtail_small``: 400 species, Zipf training
frequencies, every species in the memory; ``--preset longtail``: the same law over 2,000
species), for each world seed: build the chain, train every head variant
with the same budget and model selection on held-out seen species, and evaluate zero-shot top-1
on the test species of the head (most frequent in training), the tail (1-5 training pairs) and
the never-seen species. Then one Markdown table over the seeds (mean +- one standard error) and
the paper's Fig. 3 (right), k at training vs k' at inference, as a PNG::

    python -m experiments.longtail --seeds 0,1,2 --out runs/longtail      (make experiment-longtail)

Writes ``OUT/longtail.md``, ``OUT/k_saturation.png`` and ``OUT/results.json``; each seed's chain
and ablation results stay in ``OUT/seed<N>`` and are reused by a re-run. Seeds may run as
separate processes (``--seeds 1``, ``--seeds 2`` ...) and be aggregated with ``--report-only``. The world and its base
CLIP are cached under ``$RECO_TEST_CACHE`` (:mod:`reco.world.cache`).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from experiments.ablations import run_ablations, variants_for
from experiments.chain import prepare, seed_config
from experiments.stats import (GROUPS, ROWS, delta_table, figure, k_sweep, mean_se, score_table,
                               selection_notes)

# trained with the same budget; "reco" is the paper's transformer, train_kK its k at training
VARIANTS = ("mean", "mlp", "reco", "weighted", "attention", "token_dropout", "noisy_memory")


def run_seed(preset: str, seed: int, out: Path, *, variants: Sequence[str], overrides: Sequence[str],
             steps: int | None = None, use_cache: bool = True) -> dict[str, Any]:
    """Chain + ablations of one world seed; returns the ablation results plus timings."""
    import torch

    cfg = seed_config(preset, seed, out / f"seed{seed}", list(overrides))
    seconds = prepare(cfg, use_cache=use_cache)
    names = tuple(variants) + tuple(n for n in variants_for(cfg) if n.startswith("train_k"))
    old = torch.get_num_threads()
    torch.set_num_threads(1)             # small heads: one thread beats two busy cores
    try:
        t0 = time.perf_counter()
        results = run_ablations(cfg, variants=names, steps=steps)
        seconds["ablations"] = round(time.perf_counter() - t0, 1)
    finally:
        torch.set_num_threads(old)
    results["seconds"] = seconds
    results["seed"] = seed
    results["n_per_group"] = cfg.world.test_group_size
    results["n_classes"] = cfg.world.n_species
    return results


def load_seed(preset: str, seed: int, out: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The saved ablation results of a seed :func:`run_seed` already ran (no recomputation),
    with the variants of any ``eval/ablations_*`` sibling run merged in."""
    cfg = seed_config(preset, seed, out / f"seed{seed}", list(overrides))
    path = Path(cfg.paths.eval) / "ablations" / "results.json"
    if not path.is_file():
        raise SystemExit(f"{path}: no results; run without --report-only first")
    results = json.loads(path.read_text())
    # variants run on their own into sibling folders (run_ablations(out_dir=eval/ablations_X))
    for extra in sorted(Path(cfg.paths.eval).glob("ablations_*/results.json")):
        results["variants"].update(json.loads(extra.read_text())["variants"])
    results.update(seed=seed, n_per_group=cfg.world.test_group_size, n_classes=cfg.world.n_species,
                   seconds={})
    return results


def report(per_seed: list[dict[str, Any]], png_name: str = "k_saturation.png") -> str:
    """The Markdown report of :func:`run_seed` results (one per world seed)."""
    seeds = [r["seed"] for r in per_seed]
    first = per_seed[0]
    parts = [f"# Long-tail world: learned fusion heads vs mean fusion ({len(seeds)} world seeds "
             f"{', '.join(map(str, seeds))})\n",
             f"Zero-shot top-1 (%) of each group's test images among the group's own species "
             f"({first.get('n_per_group', '?')} each), mean ± one standard error over world seeds; every head trained "
             f"{first['steps']} steps, the checkpoint kept by the one-standard-error rule on "
             f"held-out seen species (`experiments.validation`). Memory: "
             f"{first['memory_sizes']['full']} pairs.\n",
             score_table(per_seed, among="own"), "",
             f"Each group's test images among all {first.get('n_classes', '?')} species names:\n",
             score_table(per_seed, among="all"), "",
             "Difference to mean fusion, paired by world seed (mean ± one standard error; "
             "positive: the row beats averaging):\n",
             delta_table(per_seed), "",
             f"![k at training vs k at inference]({png_name})\n",
             "k at training (rows) vs k' at inference (columns), unseen species among "
             "themselves:\n", k_sweep(per_seed, "unseen"), ""]
    parts += selection_notes(per_seed)
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.longtail", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated world seeds")
    p.add_argument("--out", default="runs/longtail", help="output folder (one seed<N> per seed)")
    p.add_argument("--preset", default="longtail_small",
                   help="longtail_small (400 species) or longtail (2,000 species, a 900-step "
                        "base CLIP); the README reports both")
    p.add_argument("--steps", type=int, default=None, help="training steps of every head")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-cache", action="store_true", help="build the world and base CLIP anew")
    p.add_argument("--report-only", action="store_true",
                   help="only aggregate the seeds' saved results (e.g. seeds run in parallel)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = tuple(v for v in args.variants.split(",") if v)
    per_seed = []
    for seed in (int(s) for s in args.seeds.split(",") if s.strip()):
        if args.report_only:
            res = load_seed(args.preset, seed, out, args.overrides)
        else:
            res = run_seed(args.preset, seed, out, variants=variants, overrides=args.overrides,
                           steps=args.steps, use_cache=not args.no_cache)
        per_seed.append(res)
        print(f"seed {seed}: {json.dumps(res['seconds'])}", flush=True)
    figure(per_seed, out / "k_saturation.png")
    text = report(per_seed)
    (out / "longtail.md").write_text(text)
    summary = {"seeds": [r["seed"] for r in per_seed],
               "scores": {row: {g: mean_se(per_seed, row, g) for g in GROUPS} for row in ROWS},
               "seconds": {r["seed"]: r["seconds"] for r in per_seed}}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
