"""Evaluation of frozen CLIP vs reco in every inference mode: zero-shot classification (overall,
seen and unseen species) and image<->text retrieval on the embedded test split and/or on labelled
sets a user brings (image folder, webdataset, CLIP_benchmark data set: reco.evaluation.sources). Writes ``eval/results.json``, ``eval/report.md``,
``eval/zeroshot.png`` and ``eval/gallery.html``."""
from __future__ import annotations

import json
import logging
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from reco.console import progress
from reco.errors import ConfigError, FormatError
from reco.evaluation.config import INFERENCE_MODES
from reco.evaluation.data import EmbeddedSplit, load_embedded, read_classnames, read_groups
from reco.evaluation.retrieval import evaluate_retrieval
from reco.evaluation.sources import DataSpec, load_set, read_group_file, read_templates
from reco.evaluation.zeroshot import encode_prompts, evaluate_zeroshot
from reco.formats import atomic_write_bytes, atomic_write_text, remove_temporaries
from reco.record import FILE as RECORD_FILE
from reco.record import Record, file_digest, input_digest, locked, options_of, outputs_of

log = logging.getLogger(__name__)
RESULTS_FILE = "results.json"
MODE_LABELS = {"off": "CLIP (frozen)", "image": "reco image (v̄)", "text": "reco text (t̄)",
               "both": "reco both (v̄, t̄)"}


@dataclass
class EvalInputs:
    """What every evaluated model shares: test pairs, class names, prompt embeddings, groups;
    ``sets``: further labelled sets evaluated zero-shot beside them (results key -> inputs)."""

    test: EmbeddedSplit
    classnames: list[str]
    prompt_emb: np.ndarray
    groups: dict[str, np.ndarray]
    sets: dict[str, "EvalInputs"] = field(default_factory=dict)
    source: str = ""


# results key of each data kind evaluated beside the work directory's test split
SET_KEYS = {"image-folder": "image_folder", "webdataset": "webdataset", "clip-benchmark": "dataset"}


def load_inputs(cfg, clip, *, data: Sequence[DataSpec] = (), classnames: str | Path | None = None,
                templates: str | Path | None = None, groups: str | Path | None = None) -> EvalInputs:
    """The labelled sets to evaluate on, embedded with ``clip``; the first is the main one.

    The work directory's embedded test split comes first when it exists and has class names:
    ``classnames`` when no ``data`` is given, else ``WORKDIR/world/classnames.txt`` (what
    ``reco world`` writes) when present; without class names it is left out when ``data`` is
    given. Each :class:`DataSpec` of ``data`` follows (zero-shot only).

    Args:
        data: further labelled sets (image folder, webdataset, CLIP_benchmark data set).
        classnames: class names of the test split when no ``data`` is given (one per line).
        templates: prompt templates file (one per line, ``{c}``) for the test split and for
            data sets without their own (default ``cfg.eval.templates``).
        groups: JSON ``{"seen": [ids], "unseen": [ids]}`` for the main set's metrics per group
            (default for the test split: ``WORKDIR/world/species.json`` when present).
    """
    default_templates = read_templates(templates) if templates else tuple(cfg.eval.templates)
    found = []
    test = _test_split_inputs(cfg, clip, None if data else classnames, default_templates, groups,
                              required=not data)
    if test is not None:
        found.append(("test", test))
    for spec in data:
        labelled = load_set(spec, clip, cfg.eval.batch_size)
        group_file = spec.groups or (None if found else groups)      # --groups: the main set's
        sub_groups = read_group_file(group_file) if group_file else {}
        prompts = encode_prompts(clip, labelled.classnames, labelled.templates or default_templates,
                                 cfg.eval.batch_size)
        found.append((SET_KEYS[spec.kind], EvalInputs(labelled.split, labelled.classnames, prompts,
                                                      sub_groups, source=spec.describe())))
    main = found[0][1]
    main.sets = dict(found[1:])
    return main


def _test_split_inputs(cfg, clip, classnames, templates, groups, *, required: bool) -> EvalInputs | None:
    """The work directory's embedded test split (None when absent or unnamed and not required)."""
    folder = Path(cfg.paths.embedded("test"))
    names_file = Path(classnames) if classnames else Path(cfg.paths.world) / "classnames.txt"
    give = "give a labelled set (--image-folder DIR, --webdataset PATH or --dataset NAME)"
    if not (folder / "manifest.json").is_file():
        if required:
            raise ConfigError(f"nothing to evaluate: {folder} has no manifest (no embedded test "
                              f"split); {give}")
        return None
    if classnames is None and not names_file.is_file():
        if required:
            raise ConfigError(f"{folder}: no class names for the test split ({names_file} is "
                              f"absent): give --classnames FILE, or {give}")
        log.info("%s: no class names (%s), test split left out", folder, names_file)
        return None
    names = read_classnames(names_file)
    test = load_embedded(folder, model_id=clip.model_id)
    if test.labels.max() >= len(names):
        raise ConfigError(f"{names_file}: {len(names)} class names but test label {test.labels.max()}")
    species = Path(cfg.paths.world) / "species.json"
    group_ids = read_group_file(groups) if groups else (read_groups(cfg.paths.world) if species.is_file() else {})
    prompts = encode_prompts(clip, names, templates, cfg.eval.batch_size)
    return EvalInputs(test, names, prompts, group_ids, source=str(folder))


def evaluate_model(model, inputs: EvalInputs, modes: Sequence[str],
                   ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[str, Any]]:
    """``{mode: {"zeroshot": ..., ["retrieval": ...], [set key: ...]}}`` for a RecoModel
    (retrieval when the main set has captions); modes the heads cannot run (e.g. text with
    image-only heads) are left out."""
    out = {}
    previous = model.mode
    try:
        for mode in progress(modes, desc="evaluate", unit="mode"):
            if mode not in model.available_modes():
                log.info("mode %s skipped: heads lack a side", mode)
                continue
            model.mode = mode
            t = inputs.test
            row = {"zeroshot": evaluate_zeroshot(model, t.image_emb, t.labels, inputs.prompt_emb,
                                                 inputs.groups)}
            if t.text_emb is not None:
                row["retrieval"] = evaluate_retrieval(model, t.image_emb, t.text_emb, t.captions, ks)
            for key, sub in inputs.sets.items():
                row[key] = evaluate_zeroshot(model, sub.test.image_emb, sub.test.labels,
                                             sub.prompt_emb, sub.groups)
            out[mode] = row
    finally:
        model.mode = previous
    return out


def evaluate(cfg, *, heads_dir: str | Path | None = None, memory_dir: str | Path | None = None,
             modes: Sequence[str] | None = None, k: int | None = None,
             data: Sequence[DataSpec] = (), image_folder: str | Path | None = None,
             classnames: str | Path | None = None, templates: str | Path | None = None,
             groups: str | Path | None = None, gallery: bool = True) -> dict[str, Any]:
    """Evaluate plain CLIP and reco in each inference mode; write results.json, report.md, a
    bar chart and the neighbour gallery to ``cfg.paths.eval``.

    Args:
        heads_dir: trained heads (default ``cfg.paths.heads``).
        memory_dir: memory index used at inference (default ``cfg.paths.index``).
        modes: inference modes (default ``cfg.eval.modes``); k: neighbours at inference
            (default ``cfg.eval.k``, None = as trained).
        data: labelled sets (:class:`reco.evaluation.sources.DataSpec`); with no embedded test
            split in the work directory the first one is the main set (see :func:`load_inputs`).
        image_folder / classnames: shorthand for ``data=[DataSpec("image-folder", image_folder,
            classnames=classnames)]`` (ImageFolder layout ``folder/<class>/*.png``; class names
            default to the folder names); without a folder, ``classnames`` names the test split.
        templates / groups: see :func:`load_inputs`.
        gallery: write ``gallery.html``.
    Returns the results; an evaluation already in ``cfg.paths.eval`` of the same heads, memory,
    test split and options (its run record, ``record.json``) is not run again: ``"skipped"``.
    """
    modes = tuple(modes or cfg.eval.modes)
    bad = [m for m in modes if m not in INFERENCE_MODES]
    if bad:
        raise ConfigError(f"--modes {bad[0]!r}: choose among {', '.join(INFERENCE_MODES)}")
    k = cfg.eval.k if k is None else k
    if image_folder is not None:
        data = [*data, DataSpec("image-folder", str(image_folder), classnames=_opt(classnames),
                                templates=_opt(templates))]
        classnames = None
    with locked(cfg.paths.eval, "evaluate"):
        planned = eval_record(cfg, heads_dir, memory_dir, modes, k, gallery, classnames, groups) \
            if _recordable(cfg, data, templates) else None
        if planned is not None and _up_to_date(cfg.paths.eval, Record.read(cfg.paths.eval, "evaluate"), planned):
            log.info("evaluation in %s is up to date (same heads, memory, test split and "
                     "options); skipping", cfg.paths.eval)
            return {**json.loads((Path(cfg.paths.eval) / RESULTS_FILE).read_text()), "skipped": True}
        results = _evaluate(cfg, heads_dir, memory_dir, modes, k, gallery, image_folder,
                            data=data, classnames=classnames, templates=templates, groups=groups)
        if planned is not None:
            planned.model_id = str(results["model_id"])
            names = [n for n in ("report.md", "zeroshot.png", "gallery.html", RESULTS_FILE)
                     if (Path(cfg.paths.eval) / n).is_file() and (n != "gallery.html" or gallery)]
            planned.outputs, planned.complete = outputs_of(cfg.paths.eval, names), True
            planned.write(cfg.paths.eval)
        return results


def _recordable(cfg, data, templates) -> bool:
    """Only an evaluation of the run's own test split is recorded (and skipped when up to date;
    its class-name and group files are recorded inputs); other labelled sets are evaluated every
    time."""
    return not data and templates is None and \
        (Path(cfg.paths.embedded("test")) / "manifest.json").is_file()


def _up_to_date(folder, previous: Record | None, planned: Record) -> bool:
    """The recorded evaluation is of the same inputs (all recorded) and options, and its files
    are as written (changed files: evaluated again)."""
    if previous is None or not previous.complete or "none" in (planned.inputs["heads"],
                                                                planned.inputs["index"]):
        return False
    if (previous.options, previous.inputs) != (planned.options, planned.inputs):
        return False
    try:
        previous.verify(folder, command="evaluate")
    except FormatError as exc:
        log.warning("%s; evaluating again", exc)
        return False
    return True


def eval_record(cfg, heads_dir, memory_dir, modes, k, gallery: bool, classnames=None, groups=None) -> Record:
    """What an evaluation depends on: its options, the heads', memory's and test split's records
    (each checked against its files) and the class names and groups."""
    from reco.embedded import open_split

    world = Path(cfg.paths.world)
    inputs = {"heads": input_digest(Path(heads_dir or cfg.paths.heads), "train", command="train"),
              "index": input_digest(Path(memory_dir or cfg.paths.index), "index", command="build-index"),
              "test": open_split(cfg.paths.embedded("test")).digest}
    for name in ("classnames.txt", "species.json"):
        inputs[name] = file_digest(world / name) if (world / name).is_file() else None
    if classnames is not None:
        inputs["--classnames"] = file_digest(Path(classnames))
    if groups is not None:
        inputs["--groups"] = file_digest(Path(groups))
    options = {**options_of("eval", cfg.eval), "modes": list(modes), "k": k, "gallery": gallery,
               "clip.precision": cfg.clip.precision}
    return Record(stage="evaluate", options=options, inputs={n: d or "none" for n, d in inputs.items()})


def _evaluate(cfg, heads_dir, memory_dir, modes, k, gallery, image_folder, *, data, classnames,
              templates, groups) -> dict[str, Any]:
    from reco.model import RecoModel

    # write_outputs replaces the files only once everything is computed: a failed evaluation
    # leaves the previous one's files whole
    remove_temporaries(cfg.paths.eval)                  # left by a killed run
    model = RecoModel.from_config(cfg, heads_dir=heads_dir, memory_dir=memory_dir, mode="off", k=k)
    inputs = load_inputs(cfg, model.loaded_clip, data=data, classnames=classnames,
                         templates=templates, groups=groups)
    results = {
        "model_id": model.model_id, "heads": str(heads_dir or cfg.paths.heads),
        "memory": str(memory_dir or cfg.paths.index), "memory_size": int(len(model.memory.ids)),
        "k": model.k, "train_k": model.train_k, "fusion": model.fusion,
        "contexts": dict(model.contexts),
        "templates": list(read_templates(templates) if templates else cfg.eval.templates),
        "data": inputs.source, "n_test": len(inputs.test), "n_classes": len(inputs.classnames),
        "sets": {key: {"data": sub.source, "n": len(sub.test), "n_classes": len(sub.classnames)}
                 for key, sub in inputs.sets.items()},
        "image_folder": str(image_folder) if image_folder else None,
        "modes": evaluate_model(model, inputs, modes, cfg.eval.retrieval_ks),
    }
    staged = {}
    if gallery:
        from reco.evaluation.gallery import write_gallery

        model.mode = "both" if "both" in model.available_modes() else model.available_modes()[-1]
        staged["gallery.html"] = Path(cfg.paths.eval) / f".gallery.html.tmp-{uuid.uuid4().hex[:8]}"
    try:
        if gallery:
            write_gallery(cfg, model, inputs, staged["gallery.html"])
        write_outputs(cfg.paths.eval, results, staged=staged)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    return results


def _opt(path) -> str | None:
    return None if path is None else str(path)


def write_outputs(folder: str | Path, results: dict[str, Any], *,
                  staged: dict[str, Path] | None = None) -> None:
    """Replace the evaluation's files: ``staged`` ({name: temporary file already written in
    ``folder``}, e.g. the gallery), report.md, zeroshot.png, then results.json (last: it marks a
    complete evaluation).

    Everything is computed before this is called, so a failed evaluation never touches the
    previous one's files; the previous results.json is withdrawn only here, just before its
    files are replaced, so that a run killed half-way never leaves it beside newer files.
    """
    folder = Path(folder)
    report, chart = markdown_report(results), bar_chart(results)
    for name in (RECORD_FILE, RESULTS_FILE):      # the run record goes with the results
        (folder / name).unlink(missing_ok=True)
    for name, tmp in (staged or {}).items():
        os.replace(tmp, folder / name)
    atomic_write_text(folder / "report.md", report)
    atomic_write_bytes(chart, folder / "zeroshot.png")
    atomic_write_text(folder / RESULTS_FILE, json.dumps(jsonable(results), indent=2))


def markdown_report(results: dict[str, Any]) -> str:
    """Markdown: one row per mode (zero-shot all/seen/unseen, retrieval R@1)."""
    lines = ["# reco evaluation\n",
             f"model `{results['model_id']}`, memory `{results['memory']}` "
             f"({results['memory_size']} items), k={results['k']} (trained with "
             f"{results['train_k']}), fusion {results['fusion']}, {results['n_test']} images of "
             f"{results['n_classes']} classes ({results.get('data') or 'test split'})\n", "## Zero-shot classification and retrieval (%)\n",
             markdown_table(results["modes"])]
    for key, info in results.get("sets", {}).items():
        rows = {m: {"zeroshot": r[key]} for m, r in results["modes"].items() if key in r}
        lines += [f"\n## Zero-shot on {info['data']} (%, {info['n']} images, "
                  f"{info['n_classes']} classes)\n", markdown_table(rows)]
    return "\n".join(lines) + "\n"


def markdown_table(modes: dict[str, dict[str, Any]], label: str = "mode") -> str:
    cols = [("top-1", ("zeroshot", "all", "top1")), ("top-5", ("zeroshot", "all", "top5")),
            ("mean/class", ("zeroshot", "all", "mean_per_class_recall")),
            ("seen top-1", ("zeroshot", "seen", "top1")), ("unseen top-1", ("zeroshot", "unseen", "top1")),
            ("unseen among unseen", ("zeroshot", "unseen_among_unseen", "top1")),
            ("I→T R@1", ("retrieval", "image_to_text", "R@1")),
            ("T→I R@1", ("retrieval", "text_to_image", "R@1"))]
    cols = [(n, p) for n, p in cols if any(_get(r, p) is not None for r in modes.values())]
    head = f"| {label} | " + " | ".join(n for n, _ in cols) + " |"
    sep = "|---|" + "---:|" * len(cols)
    rows = [f"| {MODE_LABELS.get(m, m)} | " + " | ".join(fmt_percent(_get(r, p)) for _, p in cols) + " |"
            for m, r in modes.items()]
    return "\n".join([head, sep, *rows])


def bar_chart(results: dict[str, Any]) -> bytes:
    """PNG: zero-shot top-1 per mode, overall / seen / unseen."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(results["modes"])
    groups = [g for g in ("all", "seen", "unseen")
              if any(g in results["modes"][m]["zeroshot"] for m in modes)]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(modes), 3.2))
    width = 0.8 / max(1, len(groups))
    for i, g in enumerate(groups):
        vals = [results["modes"][m]["zeroshot"].get(g, {}).get("top1", 0.0) for m in modes]
        ax.bar(np.arange(len(modes)) + (i - (len(groups) - 1) / 2) * width, vals, width, label=g)
    ax.set_xticks(np.arange(len(modes)), [MODE_LABELS.get(m, m) for m in modes], fontsize=8)
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _get(row: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(row, dict) or key not in row:
            return None
        row = row[key]
    return row


def fmt_percent(value) -> str:
    """A percentage with one decimal, or "–" for a missing or NaN value (report tables)."""
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def jsonable(obj):
    """``obj`` with numpy scalars as Python numbers and NaN as None (for json.dumps)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
