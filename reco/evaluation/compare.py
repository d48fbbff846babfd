"""``reco compare``: frozen CLIP, RECO and REACT side by side on the same test split.

Reads what the two systems already wrote (nothing is recomputed):

* RECO: ``eval/results.json`` of ``reco evaluate`` (zero-shot per inference mode);
* REACT: ``react/model/eval.json`` of ``reco react-train`` (frozen CLIP vs the customised model).

Both use :func:`reco.evaluation.zeroshot.zeroshot_metrics` with the same prompt templates, class
names and species groups, so the columns mean the same thing for every row: zero-shot top-1 over
all species, over the seen and the unseen species (classified among all species: the generalised
protocol) and over the unseen species classified among themselves (the paper's protocol of a
fine-grained data set of its own). Writes ``eval/compare.md`` and ``eval/compare.json``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from reco.errors import FormatError
from reco.formats import atomic_write_text
from reco.options import value_flags

COLUMNS = (("all species", "all"), ("seen", "seen"), ("unseen", "unseen"),
           ("unseen among unseen", "unseen_among_unseen"))
RECO_MODES = (("RECO v̄ (image side)", "image"), ("RECO t̄ (text side)", "text"),
              ("RECO v̄&t̄", "both"))


def _read_json(path: Path, producer: str) -> dict[str, Any]:
    if not path.is_file():
        raise FormatError(f"{path}: missing; run `reco {producer}` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from exc


def _row(zeroshot: dict[str, dict]) -> dict[str, float | None]:
    return {key: (zeroshot[key]["top1"] if key in zeroshot else None) for _, key in COLUMNS}


def compare_results(reco: dict[str, Any], react: dict[str, Any]) -> dict[str, dict]:
    """``{row name: {column key: top-1 %}}`` from RECO's results.json and REACT's eval.json."""
    modes = reco.get("modes", {})
    if "off" not in modes:
        raise FormatError("RECO results have no 'off' (frozen CLIP) mode; evaluate with mode off")
    rows = {"frozen CLIP (RECO's evaluation)": _row(modes["off"]["zeroshot"]),
            "frozen CLIP (REACT's evaluation)": _row(react["frozen"])}
    for name, mode in RECO_MODES:
        if mode in modes:
            rows[name] = _row(modes[mode]["zeroshot"])
    rows["REACT (customised for the test species)"] = _row(react["react"])
    return rows


def markdown(rows: dict[str, dict]) -> str:
    head = "| zero-shot top-1 (%) | " + " | ".join(c for c, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, values in rows.items():
        cells = ["–" if values[k] is None else f"{values[k]:.1f}" for _, k in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare(cfg, *, reco_results: str | Path | None = None,
            react_eval: str | Path | None = None, write: bool = True) -> tuple[str, dict]:
    """Side-by-side table of frozen CLIP, RECO (per mode) and REACT.

    Args:
        reco_results: RECO's ``results.json`` (default ``cfg.paths.eval / results.json``).
        react_eval: REACT's ``eval.json`` (default ``cfg.paths.react / model / eval.json``).
        write: also write ``compare.md`` / ``compare.json`` next to RECO's results.
    Returns ``(markdown table, {"rows": ..., "sources": ...})``.
    """
    reco_path = Path(reco_results or Path(cfg.paths.eval) / "results.json")
    react_path = Path(react_eval or Path(cfg.paths.react) / "model" / "eval.json")
    rows = compare_results(_read_json(reco_path, "evaluate"), _read_json(react_path, "react-train"))
    table = markdown(rows)
    info = {"rows": rows, "sources": {"reco": str(reco_path), "react": str(react_path)}}
    if write:
        out = Path(cfg.paths.eval)
        atomic_write_text(out / "compare.md", "# Frozen CLIP vs RECO vs REACT\n\n" + table)
        atomic_write_text(out / "compare.json", json.dumps(info, indent=2))
    return table, info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("compare")
    value_flags(g, ("--reco-results", "FILE", "default: WORKDIR/eval/results.json"),
                ("--react-eval", "FILE", "default: WORKDIR/react/model/eval.json"))


def main(cfg, args: argparse.Namespace) -> int:
    table, _ = compare(cfg, reco_results=args.reco_results, react_eval=args.react_eval)
    print(table)
    print(f"written to {cfg.paths.eval}/compare.md")
    return 0
