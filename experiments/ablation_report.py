"""Markdown tables of the ablation results (paper's Table 3, Table 4 and Fig. 3)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reco.evaluation.evaluate import fmt_percent as pct, jsonable
from reco.formats import atomic_write_text

TABLE3 = ("reco", "uni_search_uni_fusion", "cross_search_cross_fusion", "cross_search_uni_fusion", "mean")
TABLE4 = (("image_only", "image"), ("text_only", "text"), ("reco", "image"), ("reco", "text"),
          ("reco", "both"))


def zs(evals: dict, mode: str, group: str = "all", metric: str = "top1"):
    """Zero-shot metric of one evaluate_model result, or None."""
    return evals.get(mode, {}).get("zeroshot", {}).get(group, {}).get(metric)


def rt(evals: dict, mode: str, direction: str, k: int = 1):
    return evals.get(mode, {}).get("retrieval", {}).get(direction, {}).get(f"R@{k}")


def main_mode(row: dict) -> str:
    modes = list(row["eval"])
    return "both" if "both" in modes else modes[-1]


def write_report(out: str | Path, results: dict[str, Any]) -> None:
    out = Path(out)
    atomic_write_text(out / "results.json", json.dumps(jsonable(results), indent=2))
    atomic_write_text(out / "report.md", markdown_report(results))


def _metric_cells(evals: dict, mode: str) -> list[str]:
    cells = [zs(evals, mode), zs(evals, mode, "seen"), zs(evals, mode, "unseen"),
             zs(evals, mode, "unseen_among_unseen"), rt(evals, mode, "image_to_text"),
             rt(evals, mode, "text_to_image")]
    return [pct(x) for x in cells]


_METRIC_HEAD = "top-1 | seen top-1 | unseen top-1 | unseen among unseen | I→T R@1 | T→I R@1"


def _table(head: str, rows: list[list[str]]) -> str:
    n = head.count("|") + 1
    return "\n".join([f"| {head} |", "|" + "---|" * n] + [f"| {' | '.join(r)} |" for r in rows])


def _clip_row(variants: dict) -> dict | None:
    for row in variants.values():
        if "off" in row["eval"]:
            return row["eval"]
    return None


def markdown_report(results: dict[str, Any]) -> str:
    v = results["variants"]
    clip = _clip_row(v)
    parts = ["# reco ablations on the generated world\n",
             f"model `{results['model_id']}`; {results['steps']} training steps per variant; "
             f"memory sizes {results['memory_sizes']}; {results['n_test']} test images. "
             f"Zero-shot top-1 and retrieval recall in %; reco rows in mode "
             f"'both' unless stated.\n"]
    rows = [["CLIP (frozen)", "–", "–", "–", *_metric_cells(clip, "off")]] if clip else []
    for name in TABLE3:
        if name in v:
            r = v[name]
            rows.append([r["label"], r["contexts"]["image"], r["contexts"]["text"], r["fusion"],
                         *_metric_cells(r["eval"], main_mode(r))])
    if len(rows) > 1:
        parts += ["## Table 3: search and fusion modalities, fusion type\n",
                  _table(f"variant | image context | text context | fusion | {_METRIC_HEAD}", rows), ""]
    rows = [["–", "CLIP (off)", *_metric_cells(clip, "off")]] if clip else []
    for name, mode in TABLE4:
        if name in v and mode in v[name]["eval"]:
            rows.append([", ".join(v[name]["sides"]), mode, *_metric_cells(v[name]["eval"], mode)])
    if len(rows) > 1:
        parts += ["## Table 4: fused modalities (trained heads x inference mode)\n",
                  _table(f"trained heads | inference | {_METRIC_HEAD}", rows), ""]
    parts += _fig3(v, clip)
    parts += _selection(results)
    return "\n".join(parts) + "\n"


def _selection(results: dict[str, Any]) -> list[str]:
    """Model selection on validation species: the step each trained variant keeps."""
    val = results.get("validation")
    rows = []
    for name, r in results["variants"].items():
        sel = r.get("train_info", {}).get("selection")
        if sel:
            curve = {int(k): x for k, x in sel["curve"].items()}
            rows.append([r["label"], f"{sel['step']} of {max(curve)}", pct(curve.get(0)),
                         pct(sel["val_top1"]), pct(curve[max(curve)])])
    if not rows or not val:
        return []
    warnings = [f"**Warning ({r['label']})**: {r['train_info']['selection']['warning']}.\n"
                for r in results["variants"].values()
                if (r.get("train_info", {}).get("selection") or {}).get("warning")]
    return [f"## Model selection on {len(val['species'])} validation species\n", *warnings,
            f"Seen species {val['species']} were held out of the training set; each trained variant "
            f"keeps the earliest checkpoint (step 0 = frozen CLIP included) whose zero-shot top-1 of "
            f"their {val['images']} training-split images among their names is within one standard "
            f"error of the best.\n",
            _table("variant | kept step | validation top-1 at step 0 | at the kept step | at the last step",
                   rows), ""]


def _fig3(v: dict, clip: dict | None) -> list[str]:
    parts = []
    rows = [["CLIP (frozen)", *_metric_cells(clip, "off")]] if clip else []
    for name in ("mlp", "reco"):
        if name in v:
            rows.append([v[name]["label"], *_metric_cells(v[name]["eval"], main_mode(v[name]))])
    if "mlp" in v:
        parts += ["## Fig. 3a: retrieval vs an MLP of equal capacity\n",
                  _table(f"model | {_METRIC_HEAD}", rows), ""]
    rows = []
    for name in ("small_memory", "reco"):
        for mem, evals in v.get(name, {}).get("memory_sweep", {}).items():
            mode = next(iter(evals))
            rows.append([v[name]["label"], v[name]["memory"], mem, pct(zs(evals, mode)),
                         pct(zs(evals, mode, "unseen")), pct(zs(evals, mode, "unseen_among_unseen")),
                         pct(zs(evals, mode, "seen"))])
    if rows:
        parts += ["## Fig. 3b: memory at training vs at inference\n",
                  _table("model | memory at training | memory at inference | top-1 | unseen top-1 | "
                         "unseen among unseen | seen top-1", rows), ""]
    sweeps = {name: r for name, r in v.items() if "k_sweep" in r}
    if sweeps:
        ks = sorted({int(k) for r in sweeps.values() for k in r["k_sweep"]})
        rows = []
        for name, r in sorted(sweeps.items(), key=lambda kv: kv[1]["k"]):
            train_k = r["k"]
            cells = []
            for k in ks:
                evals = r["k_sweep"].get(str(k), {})
                mode = next(iter(evals), None)
                cells.append(f"{pct(zs(evals, mode, 'unseen'))} / {pct(zs(evals, mode))}" if mode else "–")
            rows.append([f"{r['label']} (k={train_k})", *cells])
        parts += ["## Fig. 3c: k at training (rows) vs k at inference (columns): unseen / all top-1\n",
                  _table("trained with | " + " | ".join(f"k={k}" for k in ks), rows), ""]
    return parts


def noise_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per world noise level, zero-shot top-1 (all / unseen among unseen) of
    the frozen CLIP, transformer fusion (reco) and mean fusion."""
    names = [n for n in ("clip", "reco", "mean") if any(n in r for r in rows)]
    label = {"clip": "CLIP (frozen)", "reco": "transformer fusion (reco)", "mean": "mean fusion"}
    head = "world.noise | " + " | ".join(f"{label[n]}: all / unseen among unseen" for n in names)
    cells = [[f"{r['noise']:g}", *(f"{pct(r.get(n, {}).get('all'))} / "
                                   f"{pct(r.get(n, {}).get('unseen_among_unseen'))}" for n in names)]
             for r in rows]
    return _table(head, cells)
