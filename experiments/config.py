"""Options of the ablation study (``reco ablations``, :mod:`experiments.ablations`).

They are the study's, not the run's: they live outside :class:`reco.config.RecoConfig` (a run's
``config.yaml`` never holds them) and come from the run's preset (:data:`PRESETS`), changed by
the command's own flags (:func:`add_arguments`, :func:`from_args`), e.g.
``reco ablations --steps 50 --ablation-eval-k 1,5,16``. Each option is checked like a run
option (:mod:`reco.options`).
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass

from reco import options as o
from reco.errors import ConfigError


@dataclass(frozen=True)
class AblationConfig:
    """``ablations``: variant names of :data:`experiments.ablations.VARIANTS` (() = all).
    Model selection of the trained variants on held-out validation species (0: none; see
    :mod:`experiments.validation`): ``ablation_val_fraction`` of the seen species leaves the
    training set, and the best of step 0 and ``ablation_val_checkpoints`` evenly spaced
    checkpoints is kept."""

    ablations: tuple[str, ...] = ()
    ablation_steps: int | None = None  # train steps of each variant (None: train.steps)
    small_memory_fraction: float = 0.1  # memory kept for the "small memory at training" variant
    ablation_train_k: tuple[int, ...] = (1, 5)   # extra k at training (besides train.k)
    ablation_eval_k: tuple[int, ...] = (1, 5, 10, 16)
    ablation_val_fraction: float = 0.25
    ablation_val_checkpoints: int = 10

    SECTION = "ablation"
    RULES = dict(ablations=o.Items(o.Pattern(r"[a-z0-9_]+", "reco, mlp, k5")),
                 ablation_steps=o.Range(1, o.MAX_ROWS), small_memory_fraction=o.Range(0, 1, lo_open=True),
                 ablation_train_k=o.Items(o.Range(1, o.MAX_K)), ablation_eval_k=o.Items(o.Range(1, o.MAX_K)),
                 ablation_val_fraction=o.Range(0, 0.9), ablation_val_checkpoints=o.Range(1, 1000))

    def __post_init__(self):
        o.check(self)


# tiny: 4000 training pairs of 56 seen species (42 once the validation species are held out).
# Heads that train long on few species memorise them and drift the embeddings of the others;
# how fast depends on the world seed, so the validation species pick the step (see
# experiments.validation and seed_sweep's report).
_LONGTAIL = AblationConfig(ablation_steps=100, ablation_train_k=(1, 5), ablation_eval_k=(1, 2, 5, 10, 16),
                           ablation_val_checkpoints=5)
PRESETS = {"tiny": AblationConfig(ablation_steps=100), "demo": AblationConfig(),
           # longtail: tiny's budget per head (100 steps, model selection on 5 checkpoints);
           # k at training 1, 5 and 10 (train.k) vs k' at inference up to 16 for Fig. 3
           "longtail": _LONGTAIL, "longtail_small": _LONGTAIL}
# the flags of the options that had one before they were options (``reco ablations --steps``)
FLAGS = {"ablations": "--variants", "ablation_steps": "--steps"}


def for_run(cfg, **changes) -> AblationConfig:
    """The ablation options of a run's preset (``cfg.preset``), with ``changes``."""
    base = PRESETS.get(cfg.preset, AblationConfig())
    return dataclasses.replace(base, **changes) if changes else base


def flag(name: str) -> str:
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def add_arguments(group) -> None:
    """One flag per option (default: the preset's value)."""
    for f in dataclasses.fields(AblationConfig):
        kind = "comma-separated" if typing.get_origin(o.optional(o.hints(AblationConfig)[f.name])[0]) \
            is tuple else "value"
        group.add_argument(flag(f.name), dest=f"ablation_{f.name}", default=None, metavar=f.name.upper(),
                           help=f"{f.name} ({kind}; {o.rule_text(AblationConfig, f.name)}; default: "
                                f"the preset's, {f.default!r} for demo)")


def from_args(cfg, args: argparse.Namespace) -> AblationConfig:
    """The run's preset's options with the flags given (a ConfigError names the flag)."""
    changes = {}
    for name, hint in o.hints(AblationConfig).items():
        text = getattr(args, f"ablation_{name}", None)
        if text is not None:
            changes[name] = parse(name, hint, text)
    try:
        return for_run(cfg, **changes)
    except o.OptionError as exc:
        raise ConfigError(f"reco ablations: {exc}") from None


def parse(name: str, hint, text: str):
    """A flag's text as the option's type: lists at commas, ``none`` for an optional one."""
    base, nullable = o.optional(hint)
    if nullable and text.strip().lower() in ("none", "null"):
        return None
    kind = typing.get_args(base)[0] if typing.get_origin(base) is tuple else base
    items = [x.strip() for x in text.split(",") if x.strip()] if kind is not base else [text.strip()]
    try:
        values = [kind(x) for x in items]
    except ValueError:
        raise ConfigError(f"{flag(name)} {text}: not a valid {kind.__name__}") from None
    return tuple(values) if kind is not base else values[0]
