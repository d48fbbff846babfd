"""Tables and the k-saturation figure over world seeds, from ``run_ablations`` results.

A result is ``experiments.ablations.run_ablations``'s dict plus ``seed``; figures are
zero-shot top-1 (%), aggregated as mean ± one standard error (sample standard deviation over
seeds / sqrt(seeds)).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

GROUPS = ("head", "tail", "unseen")
ROWS = ("clip", "mean", "reco", "attention", "token_dropout", "noisy_memory", "weighted", "mlp")
LABELS = {"clip": "frozen CLIP", "mean": "mean fusion (no parameters)",
          "reco": "transformer (paper's head)", "attention": "attention only (no feed-forward)",
          "token_dropout": "transformer + retrieved-token dropout",
          "noisy_memory": "transformer + noisy memory in training",
          "weighted": "learned per-item weighting", "mlp": "MLP of equal capacity, no retrieval"}


def _zs(evals: dict, mode: str, key: str) -> float | None:
    value = evals.get(mode, {}).get("zeroshot", {}).get(key, {}).get("top1")
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _key(group: str, among: str) -> str:
    return f"{group}_among_{group}" if among == "own" else group


def score(result: dict[str, Any], row: str, group: str, among: str = "own") -> float | None:
    """Top-1 of ``row`` (a variant name, or ``clip``: the frozen CLIP) on ``group``."""
    variants = result["variants"]
    if row == "clip":
        evals = next((v["eval"] for v in variants.values() if "off" in v["eval"]), {})
        return _zs(evals, "off", _key(group, among))
    if row not in variants:
        return None
    evals = variants[row]["eval"]
    mode = "both" if "both" in evals else list(evals)[-1]
    return _zs(evals, mode, _key(group, among))


def mean_se(values_or_results: Sequence, row: str | None = None, group: str | None = None,
            among: str = "own") -> tuple[float, float] | None:
    """(mean, standard error) of numbers, or of :func:`score` over results; None if empty."""
    values = values_or_results if row is None else [score(r, row, group, among) for r in values_or_results]
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, float("nan")
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
    return m, math.sqrt(var / len(values))


def fmt(ms: tuple[float, float] | None, sign: bool = False) -> str:
    if ms is None:
        return "–"
    m, se = ms
    head = f"{m:+.1f}" if sign else f"{m:.1f}"
    return head if math.isnan(se) else f"{head} ± {se:.1f}"


def _table(head: Sequence[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def score_table(per_seed: list[dict], among: str = "own") -> str:
    """One row per model, one column per group: mean ± SE over seeds."""
    rows = [[LABELS[row], *(fmt(mean_se(per_seed, row, g, among)) for g in GROUPS)]
            for row in ROWS if any(score(r, row, GROUPS[0], among) is not None for r in per_seed)]
    return _table(["model", *GROUPS], rows)


def delta(per_seed: list[dict], row: str, group: str, base: str = "mean",
          among: str = "own") -> tuple[float, float] | None:
    """Paired difference ``row - base`` over seeds (mean, SE)."""
    diffs = []
    for r in per_seed:
        a, b = score(r, row, group, among), score(r, base, group, among)
        if a is not None and b is not None:
            diffs.append(a - b)
    return mean_se(diffs)


def delta_table(per_seed: list[dict], base: str = "mean") -> str:
    rows = [[f"{LABELS[row]} − mean", *(fmt(delta(per_seed, row, g, base), sign=True) for g in GROUPS)]
            for row in ROWS if row != base and any(score(r, row, "head") is not None for r in per_seed)]
    return _table(["model", *GROUPS], rows)


def _curve_name(variant: dict) -> str | None:
    """The k-sweep curve a variant draws: the transformer per k at training, mean fusion (no
    training, so one curve); None for the others."""
    if variant.get("fusion") == "transformer":
        return f"k={int(variant['k'])}"
    return "mean fusion" if variant.get("fusion") == "mean" else None


def _sweeps(result: dict) -> dict[str, dict]:
    """{curve: {k at inference: evals}} of the variants with a k sweep (:func:`_curve_name`)."""
    out = {}
    for v in result["variants"].values():
        name = _curve_name(v) if "k_sweep" in v else None
        if name is not None:
            out[name] = {int(k): e for k, e in v["k_sweep"].items()}
    return out


def _curve_order(name: str) -> tuple[int, int]:
    return (1, 0) if not name.startswith("k=") else (0, int(name[2:]))


def k_curves(per_seed: list[dict], group: str) -> dict[str, dict[int, tuple[float, float]]]:
    """{curve ("k=K" trained with K, "mean fusion"): {k at inference: (mean, SE) over seeds}}
    on ``group`` among itself."""
    names = sorted({n for r in per_seed for n in _sweeps(r)}, key=_curve_order)
    out: dict[str, dict[int, tuple[float, float]]] = {}
    for name in names:
        eval_ks = sorted({k for r in per_seed for k in _sweeps(r).get(name, {})})
        out[name] = {}
        for ek in eval_ks:
            vals = []
            for r in per_seed:
                evals = _sweeps(r).get(name, {}).get(ek)
                if evals:
                    vals.append(_zs(evals, next(iter(evals)), _key(group, "own")))
            ms = mean_se(vals)
            if ms:
                out[name][ek] = ms
    return out


def k_sweep(per_seed: list[dict], group: str) -> str:
    curves = k_curves(per_seed, group)
    eval_ks = sorted({k for c in curves.values() for k in c})
    rows = [[name if name.startswith("k=") else f"{name} (no training)",
             *(fmt(c.get(ek)) for ek in eval_ks)] for name, c in curves.items()]
    return _table(["trained with", *(f"k'={k}" for k in eval_ks)], rows)


def figure(per_seed: list[dict], path: str | Path) -> Path:
    """The paper's Fig. 3 (right): one panel per group, one line per k at training, x = k' at
    inference, mean ± SE over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(GROUPS), figsize=(4 * len(GROUPS), 3.4), sharey=False)
    for ax, group in zip(axes, GROUPS):
        for name, curve in k_curves(per_seed, group).items():
            ks = sorted(curve)
            ax.errorbar(ks, [curve[k][0] for k in ks], yerr=[_nan0(curve[k][1]) for k in ks],
                        marker="o" if name.startswith("k=") else "s", capsize=3,
                        ls="-" if name.startswith("k=") else ":",
                        label=f"transformer, {name} at training" if name.startswith("k=") else name)
        clip = mean_se(per_seed, "clip", group)
        if clip:
            ax.axhline(clip[0], color="grey", ls="--", lw=1, label="frozen CLIP")
        ax.set(xscale="log", xlabel="k' at inference", title=f"{group} species (among themselves)")
        ax.set_xticks(sorted({k for c in k_curves(per_seed, group).values() for k in c}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("zero-shot top-1 (%)")
    axes[-1].legend(fontsize=8)
    fig.suptitle(f"Long-tail world: k at training vs k' at inference ({len(per_seed)} world seeds)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _nan0(x: float) -> float:
    return 0.0 if math.isnan(x) else x


def selection_notes(per_seed: list[dict]) -> list[str]:
    """Which step each trained variant kept per seed, and every selection warning."""
    rows, warnings = [], []
    names = [n for n in per_seed[0]["variants"] if "selection" in per_seed[0]["variants"][n]["train_info"]]
    for name in names:
        steps = []
        for r in per_seed:
            sel = r["variants"].get(name, {}).get("train_info", {}).get("selection") or {}
            steps.append(str(sel.get("step", "–")))
            if sel.get("warning"):
                warnings.append(f"* seed {r['seed']}, {name}: {sel['warning']}")
        rows.append([name, ", ".join(steps)])
    val = per_seed[0].get("validation") or {}
    out = [f"Model selection: {len(val.get('species', []))} held-out seen species "
           f"({val.get('images', '?')} images, seed {per_seed[0]['seed']}); kept step per seed:\n",
           _table(["variant", "kept step (per seed)"], rows), ""]
    if warnings:
        out += ["Selection warnings:\n", *warnings, ""]
    return out
