"""Issue-6 margins of the RECO ablations across world seeds (and noise levels).

For each world seed, the whole chain runs in its own work directory (world + base CLIP ->
embed -> index -> neighbours with every context field -> ablation variants), then the margins
the acceptance test asserts are printed as one row per seed::

    python -m experiments.seed_sweep --root runs/sweep --seeds 0,1,2 [--preset tiny]
        [--set train.lr=1e-3 ...] [--variants reco,mlp,...]

Every stage is idempotent, so a re-run with the same options reuses the built chain and the
trained variants. Only margins on ``unseen_among_unseen`` (zero-shot top-1 of the unseen species'
test images among the unseen species' names) are reported: the paper's metric.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from experiments.ablations import run_ablations
from experiments.chain import chain_config, prepare

METRIC = "unseen_among_unseen"
DEFAULT_VARIANTS = ("reco", "mlp", "cross_search_cross_fusion", "small_memory", "mean")
# the acceptance margins (percentage points), as asserted in tests/test_ablations_acceptance.py
MARGINS = {"reco_vs_clip": 20.0, "mlp_vs_clip": 5.0, "uni_vs_cross": 10.0}


def _zs(evals: dict, mode: str) -> float | None:
    return evals.get(mode, {}).get("zeroshot", {}).get(METRIC, {}).get("top1")


def margins(results: dict[str, Any]) -> dict[str, Any]:
    """The acceptance figures of one :func:`experiments.ablations.run_ablations` result."""
    v = results["variants"]
    row: dict[str, Any] = {}
    any_row = next(iter(v.values()))
    row["clip"] = _zs(any_row["eval"], "off")
    for name, key in (("reco", "reco"), ("mlp", "mlp"), ("cross_search_cross_fusion", "cross"),
                      ("mean", "mean")):
        if name in v:
            row[key] = _zs(v[name]["eval"], "both")
    sweep = v.get("small_memory", {}).get("memory_sweep")
    if sweep:
        row["small"] = _zs(sweep["small"], "both")
        row["full"] = _zs(sweep["full"], "both")
    checks = {}
    if row.get("reco") is not None:
        checks["reco>=clip+20"] = row["reco"] - row["clip"] >= MARGINS["reco_vs_clip"]
    if row.get("mlp") is not None:
        checks["|mlp-clip|<=5"] = abs(row["mlp"] - row["clip"]) <= MARGINS["mlp_vs_clip"]
    if row.get("cross") is not None and row.get("reco") is not None:
        checks["uni>=cross+10"] = row["reco"] - row["cross"] >= MARGINS["uni_vs_cross"]
    if row.get("small") is not None:
        checks["full>small"] = row["full"] > row["small"]
    row["checks"] = checks
    row["pass"] = all(checks.values())
    return row


def sweep_seed(base, seed: int, workdir: str | Path, *, variants: Sequence[str] = DEFAULT_VARIANTS,
               noise: float | None = None) -> dict[str, Any]:
    """Run the chain and the ablation ``variants`` for world seed ``seed`` in ``workdir``;
    returns the margins (see :func:`margins`) plus timings."""
    import torch

    cfg = chain_config(base, seed, workdir, noise=noise)
    seconds = prepare(cfg)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        results = run_ablations(cfg, variants=tuple(variants))
        seconds["ablations"] = round(time.perf_counter() - t0, 1)
    finally:
        torch.set_num_threads(old)
    return {"seed": seed, "noise": cfg.world.noise, **margins(results), "seconds": seconds}


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per seed, figures in % on unseen species among themselves."""
    def f(x):
        return "–" if x is None else f"{x:.1f}"
    head = ("| world seed | noise | CLIP | reco | MLP | cross search | small→full memory | mean | "
            "reco−CLIP | MLP−CLIP | uni−cross | pass |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        clip = r.get("clip")
        d = lambda a: f(r[a] - clip) if r.get(a) is not None and clip is not None else "–"  # noqa: E731
        uc = f(r["reco"] - r["cross"]) if r.get("reco") is not None and r.get("cross") is not None else "–"
        lines.append(f"| {r['seed']} | {r.get('noise')} | {f(clip)} | {f(r.get('reco'))} | {f(r.get('mlp'))} | "
                     f"{f(r.get('cross'))} | {f(r.get('small'))}→{f(r.get('full'))} | {f(r.get('mean'))} | "
                     f"{d('reco')} | {d('mlp')} | {uc} | {'yes' if r['pass'] else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from reco import config as config_lib

    p = argparse.ArgumentParser(prog="python -m experiments.seed_sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="one work directory per seed goes under it (seed<N>)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated world seeds")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    p.add_argument("--noise", type=float, default=None, help="world.noise (default: the preset's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    base = config_lib.override(config_lib.preset(args.preset), args.overrides)
    variants = tuple(v for v in args.variants.split(",") if v)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",") if s):
        suffix = "" if args.noise is None else f"-noise{args.noise:g}"
        row = sweep_seed(base, seed, Path(args.root) / f"seed{seed}{suffix}", variants=variants,
                         noise=args.noise)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(format_table(rows))
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
