"""Config of evaluation and of the neighbour gallery (the ablations' options: experiments.config)."""
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

    SECTION = "eval"
    RULES = dict(modes=o.Items(o.Choice(INFERENCE_MODES), min_items=1), k=o.Range(1, o.MAX_K),
                 templates=o.Items(TEMPLATE, min_items=1), batch_size=o.Range(1, 1 << 16),
                 retrieval_ks=o.Items(o.Range(1, 1 << 20)), gallery_queries=o.Range(0, 10000),
                 gallery_k=o.Range(1, o.MAX_K))

    def __post_init__(self):
        o.check(self)

