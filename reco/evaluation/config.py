"""Config of evaluation, of the neighbour gallery and of the ablations."""
from __future__ import annotations

from dataclasses import dataclass

from reco import options as o

INFERENCE_MODES = ("off", "image", "text", "both")
# a zero-shot prompt: one class-name slot, "{}" or clip_benchmark's "{c}", and no other braces
TEMPLATE = o.Pattern(r"[^{}]*(\{\}|\{c\})[^{}]*", "'a photo of a {}.'")


@dataclass(frozen=True)
class EvalConfig:
    """``modes``: inference modes evaluated (off = frozen CLIP, image = v-bar only, text = t-bar
    only, both). ``k``: neighbours retrieved at inference (None: as trained). ``templates``:
    zero-shot prompts, ``{}`` (or clip_benchmark's ``{c}``) is replaced by the class name."""

    modes: tuple[str, ...] = INFERENCE_MODES
    k: int | None = None               # neighbours at inference (None: as trained)
    templates: tuple[str, ...] = ("a photo of a {}.",)
    batch_size: int = 256
    retrieval_ks: tuple[int, ...] = (1, 5, 10)
    gallery_queries: int = 6           # test images (and as many class names) in gallery.html
    gallery_k: int = 8
    # ablations (reco ablations): variant names of reco.evaluation.ablations.VARIANTS, () = all
    ablations: tuple[str, ...] = ()
    ablation_steps: int | None = None  # train steps of each variant (None: train.steps)
    small_memory_fraction: float = 0.1 # memory kept for the "small memory at training" variant
    ablation_train_k: tuple[int, ...] = (1, 5)   # extra k at training (besides train.k)
    ablation_eval_k: tuple[int, ...] = (1, 5, 10, 16)
    # model selection of the trained variants on held-out validation species (0: none; see
    # reco.evaluation.validation): this fraction of the seen species leaves the training set,
    # and the best of step 0 and ablation_val_checkpoints evenly spaced checkpoints is kept
    ablation_val_fraction: float = 0.25
    ablation_val_checkpoints: int = 10

    SECTION = "eval"
    RULES = dict(modes=o.Items(o.Choice(INFERENCE_MODES), min_items=1), k=o.Range(1, o.MAX_K),
                 templates=o.Items(TEMPLATE, min_items=1), batch_size=o.Range(1, 1 << 16),
                 retrieval_ks=o.Items(o.Range(1, 1 << 20)), gallery_queries=o.Range(0, 10000),
                 gallery_k=o.Range(1, o.MAX_K), ablations=o.Items(o.Pattern(r"[a-z0-9_]+", "reco, mlp, k5")),
                 ablation_steps=o.Range(1, o.MAX_ROWS), small_memory_fraction=o.Range(0, 1, lo_open=True),
                 ablation_train_k=o.Items(o.Range(1, o.MAX_K)), ablation_eval_k=o.Items(o.Range(1, o.MAX_K)),
                 ablation_val_fraction=o.Range(0, 0.9), ablation_val_checkpoints=o.Range(1, 1000))

    def __post_init__(self):
        o.check(self)


# tiny: 4000 training pairs of 56 seen species (42 once the validation species are held out).
# Heads that train long on few species memorise them and drift the embeddings of the others;
# how fast depends on the world seed, so the validation species pick the step (see
# reco.evaluation.validation and seed_sweep's report).
PRESETS = {"tiny": EvalConfig(ablation_steps=100), "demo": EvalConfig(),
           # longtail: tiny's budget per head (100 steps, model selection on 5 checkpoints);
           # k at training 1, 5 and 10 (train.k) vs k' at inference up to 16 for Fig. 3
           "longtail": EvalConfig(ablation_steps=100, ablation_train_k=(1, 5),
                                  ablation_eval_k=(1, 2, 5, 10, 16), ablation_val_checkpoints=5)}
