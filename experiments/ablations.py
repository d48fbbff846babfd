"""``reco ablations`` (or ``python -m experiments.ablations``): the RECO paper's ablations, re-run
on the generated world.

Every variant trains fusion heads with :func:`reco.trainer.train.train` on the cached neighbour
tensors (which hold all 8 context fields) and is evaluated like ``reco evaluate``:

* Table 3: uni-/cross-modal search x uni-/cross-modal fusion (``train.image_context`` /
  ``train.text_context``), transformer vs mean fusion;
* Table 4: fusing the image side, the text side or both (and the inference modes of each);
* Fig. 3: an MLP head of equal capacity without retrieval; a memory at inference larger than at
  training (heads trained on neighbours of a subsampled memory, evaluated with it and with the
  full one); k at training vs k at inference.

Model selection (``ablation_val_fraction`` > 0, the default): a quarter of the seen species
leave every variant's training set and serve as validation species; each trained variant keeps
its checkpoint (step 0 = frozen CLIP included) that is best on them, by the one-standard-error
rule (:mod:`experiments.validation`). The unseen test species never take part in a choice.

``--noise 0.1,0.5`` instead runs transformer vs mean fusion on worlds that differ only by the
share of noisy memory captions (:func:`run_noise_study`; the paper finds mean fusion hurts on
noisy web data, while in a clean world it can do well).

Results: ``eval/ablations/results.json`` and ``report.md`` (one Markdown table per study). The
study's options (:class:`experiments.config.AblationConfig`) come from the run's preset and the
command's flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments import config as ablation_config
from experiments.ablation_report import markdown_report, noise_table, write_report
from experiments.chain import chain_config, prepare
from experiments.config import AblationConfig
from experiments.small_memory import prepare_small_memory
from experiments.validation import RULE, prepare_validation, select_checkpoint, validation_inputs
from reco.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One trained variant: TrainConfig overrides, the memory its neighbours come from, and
    which extra evaluations it gets (k sweep, small/full memory)."""

    label: str
    train: dict[str, Any] = field(default_factory=dict)
    memory: str = "full"              # "full" | "small" (neighbours of a subsampled memory)
    k_sweep: bool = False
    memory_sweep: bool = False
    steps: int | None = None          # fixed steps (parameter-free heads need none)
    # keep the checkpoint best on the validation species (step 0 = frozen CLIP a candidate);
    # False: the last step, for variants whose question is about the trained heads themselves
    select: bool = True


VARIANTS: dict[str, Variant] = {
    "reco": Variant("uni-modal search, cross-modal fusion (RECO)", {}, k_sweep=True, memory_sweep=True),
    "uni_search_uni_fusion": Variant("uni-modal search, uni-modal fusion",
                                     {"image_context": "v_img_img", "text_context": "t_txt_txt"}),
    "cross_search_cross_fusion": Variant("cross-modal search, cross-modal fusion",
                                         {"image_context": "v_txt_txt", "text_context": "t_img_img"}),
    "cross_search_uni_fusion": Variant("cross-modal search, uni-modal fusion",
                                       {"image_context": "v_txt_img", "text_context": "t_img_txt"}),
    "mean": Variant("mean fusion (no parameters)", {"fusion": "mean"}, steps=1, k_sweep=True),
    "image_only": Variant("image fusion only (v̄)", {"fuse_text": False}),
    "text_only": Variant("text fusion only (t̄)", {"fuse_image": False}),
    "mlp": Variant("MLP of equal capacity, no retrieval", {"fusion": "mlp"}),
    # issue 20: heads that test the paper's mechanism (omit / enhance retrieved items)
    "attention": Variant("attention-only head (no feed-forward)", {"fusion": "attention"}),
    "token_dropout": Variant("transformer, retrieved-token dropout in training",
                             {"fusion": "token_dropout"}),
    "noisy_memory": Variant("transformer, trained against a noisy memory", {"fusion": "noisy_memory"}),
    "weighted": Variant("learned per-item weighting (reweights only)", {"fusion": "weighted"}),
    # the question is whether heads TRAINED with a small memory gain from the full one, so no
    # selection: validated with the small memory, step 0 (no heads, where memory size cannot
    # matter) wins and makes the comparison vacuous
    "small_memory": Variant("trained with a small memory", {}, memory="small", memory_sweep=True,
                            select=False),
}


def variants_for(cfg, ablation: AblationConfig | None = None) -> dict[str, Variant]:
    """The static variants plus one per extra k at training (``ablation_train_k``; default: the
    run's preset's, :func:`experiments.config.for_run`)."""
    out = dict(VARIANTS)
    for k in (ablation or ablation_config.for_run(cfg)).ablation_train_k:
        if k != cfg.train.k:
            out[f"train_k{k}"] = Variant(f"k={k} at training", {"k": int(k)}, k_sweep=True)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("ablations")
    g.add_argument("--out", default=None, help="output folder (default: WORKDIR/eval/ablations)")
    g.add_argument("--noise", default=None, metavar="LEVELS",
                   help="instead: mean vs transformer fusion on worlds of these caption-noise levels "
                        "(world.noise, comma-separated, e.g. 0.1,0.5), each built in OUT/noise-<level>")
    ablation_config.add_arguments(parser.add_argument_group(
        f"ablation options (variants: {','.join(VARIANTS)},train_kK)"))


def main(cfg, args: argparse.Namespace) -> int:
    ablation = ablation_config.from_args(cfg, args)
    if args.noise:
        levels = tuple(float(x) for x in args.noise.split(",") if x.strip())
        rows = run_noise_study(cfg, levels, out_dir=args.out, ablation=ablation)
        print(noise_table(rows))
        return 0
    results = run_ablations(cfg, out_dir=args.out, ablation=ablation)
    print(markdown_report(results))
    return 0


def run_ablations(cfg, *, variants: tuple[str, ...] | None = None, steps: int | None = None,
                  out_dir: str | Path | None = None, ablation: AblationConfig | None = None
                  ) -> dict[str, Any]:
    """Train and evaluate the ablation variants; write results.json and report.md.

    Args:
        variants: names among :func:`variants_for` (default ``ablation.ablations`` or all).
        steps: training steps per variant (default ``ablation.ablation_steps`` or ``train.steps``).
        ablation: the study's options (default: the run's preset's, :func:`experiments.config.for_run`).
        out_dir: output folder (default ``cfg.paths.eval / "ablations"``); each variant's heads
            go to ``out_dir/<variant>/heads`` and are reused when their config is unchanged.
    """
    from reco.clip import load_clip, resolve_model_spec
    from reco.evaluation.evaluate import load_inputs
    from reco.index.memory import Memory

    a = ablation or ablation_config.for_run(cfg)
    table = variants_for(cfg, a)
    names = tuple(variants or a.ablations or table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ConfigError(f"ablation variant {unknown[0]!r}: choose among {', '.join(table)}")
    out = Path(out_dir or Path(cfg.paths.eval) / "ablations")
    steps = steps or a.ablation_steps or cfg.train.steps
    _check_fields(cfg, [table[n] for n in names if table[n].memory == "full"])

    model, pretrained = resolve_model_spec(cfg.clip.model, cfg.clip.pretrained, cfg.paths.base_clip)
    clip = load_clip(model, pretrained, device=cfg.clip.device)
    memories = {"full": Memory.load(Path(cfg.paths.index), mmap=cfg.index.mmap)}
    inputs = load_inputs(cfg, clip)
    bases = {"full": cfg}
    if any(table[n].memory == "small" or table[n].memory_sweep for n in names):
        bases["small"], _ = prepare_small_memory(cfg, a.small_memory_fraction, out / "_small_memory")
        memories["small"] = Memory.load(Path(bases["small"].paths.index))
    val_inputs, val_info = None, None
    if a.ablation_val_fraction > 0:
        for mem in [m for m in bases if any(table[n].memory == m for n in names)]:
            bases[mem], val_info = prepare_validation(bases[mem], a.ablation_val_fraction,
                                                      out / f"_validation_{mem}")
        if val_info is not None:
            val_inputs = validation_inputs(cfg, clip, val_info["val_species"])
    results: dict[str, Any] = {
        "model_id": clip.model_id, "steps": steps, "train_k": cfg.train.k,
        "memory_sizes": {k: int(len(m.ids)) for k, m in memories.items()},
        "small_memory_fraction": a.small_memory_fraction, "n_test": len(inputs.test),
        "validation": val_info and {"fraction": a.ablation_val_fraction,
                                    "species": val_info["val_species"], "images": val_info["val_images"],
                                    "checkpoints": a.ablation_val_checkpoints},
        "variants": {}}
    for name in names:
        variant = table[name]
        results["variants"][name] = run_variant(bases[variant.memory], name, variant, out / name, clip=clip,
                                                memories=memories, inputs=inputs, steps=steps,
                                                val_inputs=val_inputs, ablation=a)
        write_report(out, results)             # partial results survive an interruption
    return results


def run_noise_study(cfg, levels: tuple[float, ...], *, out_dir: str | Path | None = None,
                    steps: int | None = None, variants: tuple[str, ...] = ("reco", "mean"),
                    ablation: AblationConfig | None = None) -> list[dict[str, Any]]:
    """Transformer (``reco``) vs mean fusion on worlds that differ only by ``world.noise`` (the
    share of memory captions that name a wrong species or say nothing): for each level the whole
    chain (world, base CLIP, embed, index, neighbours) and the ``variants`` run in
    ``out_dir/noise-<level>``. Returns one row per level: zero-shot top-1 (all species, unseen
    species among themselves) of the frozen CLIP and of each variant, and the results path.
    """
    out = Path(out_dir or Path(cfg.paths.eval) / "ablations")
    rows = []
    for level in levels:
        if not 0.0 <= level <= 1.0:
            raise ConfigError(f"--noise {level}: world.noise must be in [0, 1]")
        side = chain_config(cfg, cfg.world.seed, out / f"noise-{level:g}", noise=level)
        prepare(side)
        results = run_ablations(side, variants=variants, steps=steps, ablation=ablation)
        row = {"noise": level, "results": str(Path(side.paths.eval) / "ablations" / "results.json")}
        for name, r in results["variants"].items():
            for mode in ("off", "both"):
                z = r["eval"].get(mode, {}).get("zeroshot", {})
                key = "clip" if mode == "off" else name
                row[key] = {"all": z.get("all", {}).get("top1"),
                            "unseen_among_unseen": z.get("unseen_among_unseen", {}).get("top1")}
        rows.append(row)
    return rows


def run_variant(cfg, name: str, variant: Variant, out: Path, *, clip, memories, inputs,
                steps: int, val_inputs=None, ablation: AblationConfig | None = None) -> dict[str, Any]:
    """Train one variant (unless already trained with the same config) and evaluate it.

    With ``val_inputs`` (:func:`experiments.validation.validation_inputs`), trained variants
    keep the checkpoint that is best on the validation species (``cfg`` then holds the
    training tensors without them). ``ablation``: the study's options (default: the preset's)."""
    a = ablation or ablation_config.for_run(cfg)
    from reco.evaluation.evaluate import evaluate_model
    from reco.model import RecoModel
    from reco.trainer.checkpoint import load_heads

    select = val_inputs is not None and variant.steps is None and variant.select
    tc = dataclasses.replace(cfg.train, **variant.train, steps=variant.steps or steps)
    every = (validation_every(tc.steps, a.ablation_val_checkpoints) if select
             else min(tc.checkpoint_every, tc.steps))
    tc = dataclasses.replace(tc, checkpoint_every=every,
                             warmup_steps=min(tc.warmup_steps, max(1, tc.steps // 5)))
    heads_dir = out / "heads"
    memory = memories[variant.memory]
    t0 = time.perf_counter()
    trained = _already_trained(heads_dir, tc, val_inputs if select else None)
    if not trained and not variant.train and variant.memory == "full" and not select:
        trained = _already_trained(Path(cfg.paths.heads), tc)     # the run's own heads
        heads_dir = Path(cfg.paths.heads) if trained else heads_dir
    if not trained:
        from reco.trainer.train import train

        log.info("ablation %s: training %d steps (%s)", name, tc.steps, variant.train or "defaults")
        info = train(dataclasses.replace(cfg, train=tc), out_dir=heads_dir, force=True)
        train_info = {"final_loss": info.get("final_loss"), "head_params": info.get("head_params")}
        if select:
            train_info["selection"] = select_checkpoint(heads_dir, clip, memory, val_inputs)
    else:
        train_info = {"final_loss": trained.get("final_loss"), "reused": True}
        if "selection" in trained:
            train_info["selection"] = trained["selection"]
    train_info["seconds"] = round(time.perf_counter() - t0, 1)
    heads, meta = load_heads(heads_dir)
    model = RecoModel(clip, memory, heads, meta, mode="off")
    row: dict[str, Any] = {"label": variant.label, "heads": str(heads_dir), "train": dict(variant.train),
                           "memory": variant.memory,
                           "fusion": model.fusion, "contexts": dict(model.contexts), "k": model.train_k,
                           "sides": sorted(heads), "train_info": train_info,
                           "eval": evaluate_model(model, inputs, cfg.eval.modes, cfg.eval.retrieval_ks)}
    if variant.k_sweep:
        row["k_sweep"] = {}
        for k in a.ablation_eval_k:
            model.k = k
            row["k_sweep"][str(k)] = evaluate_model(model, inputs, _main_mode(model))
        model.k = None
    if variant.memory_sweep:
        row["memory_sweep"] = {}
        for mem_name, mem in memories.items():
            model.memory = mem
            row["memory_sweep"][mem_name] = evaluate_model(model, inputs, _main_mode(model))
        model.memory = memory
    return row


def _main_mode(model) -> tuple[str, ...]:
    return ("both",) if "both" in model.available_modes() else (model.available_modes()[-1],)


def validation_every(steps: int, checkpoints: int) -> int:
    """Checkpoint interval giving about ``checkpoints`` validation points over ``steps``."""
    return max(1, steps // max(1, checkpoints))


def _already_trained(heads_dir: Path, tc, val_inputs=None) -> dict | None:
    """The heads' meta when ``heads_dir`` holds heads trained with exactly ``tc`` (and, with
    ``val_inputs``, selected on the same validation species)."""
    path = heads_dir / "heads.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    same = meta.get("train") == json.loads(json.dumps(dataclasses.asdict(tc)))
    if val_inputs is not None:
        chosen = meta.get("selection") or {}
        same = same and chosen.get("val_species") == val_inputs.groups["val"].tolist() \
            and chosen.get("val_images") == len(val_inputs.test) and chosen.get("rule") == RULE
    elif "selection" in meta:
        same = False
    return meta if same else None


def _check_fields(cfg, variants: list[Variant]) -> None:
    """Every context field the variants train on must be in the neighbour tensors."""
    from reco.trainer.data import read_tensors_info

    needed = set()
    for v in variants:
        tc = dataclasses.replace(cfg.train, **v.train)
        if tc.fuse_image:
            needed.add(tc.image_context)
        if tc.fuse_text:
            needed.add(tc.text_context)
    folder = Path(cfg.paths.neighbours) / "tensors"
    have = set(read_tensors_info(folder).fields)
    missing = sorted(needed - have)
    if missing:
        raise ConfigError(f"{folder}: neighbour tensors lack context field(s) {missing} needed by "
                          f"the ablations; re-run precompute-neighbours with "
                          f"--set neighbours.fields={','.join(sorted(needed | have))}")


if __name__ == "__main__":
    import sys

    from reco.cli import main as reco_main

    sys.exit(reco_main(["ablations", *sys.argv[1:]]))
