"""``reco-clip-benchmark``: LAION's CLIP_benchmark command line with a ``reco`` model type.

CLIP_benchmark chooses the loader of ``--model_type`` in ``clip_benchmark.models.TYPE2FUNC``
(its ``--model_type`` choices are the list ``MODEL_TYPES``). :func:`register` adds ``reco``
there, and :func:`main` runs CLIP_benchmark's own ``main`` unchanged, so every one of its options
and outputs works::

    reco-clip-benchmark eval --model_type reco --model runs/demo --pretrained both \\
        --dataset wds/mydata --dataset_root data/mydata --output result.json

``--model`` is a reco work directory (or heads folder, see :meth:`reco.model.RecoModel.load`);
``--pretrained`` is the inference mode (``off``, ``image``, ``text``, ``both``), optionally with
the neighbours at inference after a colon (``both:5``); ``--pretrained_model runs/demo,both``
works too.
"""
from __future__ import annotations

import sys

from reco.errors import ConfigError, RecoError

MODEL_TYPE = "reco"


def parse_pretrained(value: str | None) -> tuple[str, int | None]:
    """``"both"`` -> ("both", None); ``"text:5"`` -> ("text", 5)."""
    from reco.evaluation.config import INFERENCE_MODES

    mode, _, k = (value or "both").partition(":")
    if mode not in INFERENCE_MODES or (k and not k.isdigit()):
        raise ConfigError(f"--pretrained {value!r}: for --model_type reco give the inference mode "
                          f"({', '.join(INFERENCE_MODES)}), optionally ':K' neighbours, e.g. both:10")
    return mode, (int(k) if k else None)


def load_reco(model_name: str, pretrained: str | None = None, cache_dir: str | None = None,
              device="cpu"):
    """CLIP_benchmark loader contract: ``(model, transform, tokenizer)`` of a reco run."""
    from reco.model import RecoModel

    mode, k = parse_pretrained(pretrained)
    model = RecoModel.load(model_name, mode=mode, k=k, device=str(device))
    return model, model.preprocess, model.tokenizer


def register() -> None:
    """Add the ``reco`` model type to CLIP_benchmark (idempotent)."""
    from clip_benchmark import models

    models.TYPE2FUNC[MODEL_TYPE] = load_reco
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)       # the list its CLI's choices refer to


def main(argv: list[str] | None = None) -> int:
    """CLIP_benchmark's ``main`` with ``reco`` registered (argv: its arguments)."""
    try:
        from clip_benchmark import cli
    except ModuleNotFoundError as exc:
        print(f"reco-clip-benchmark: CLIP_benchmark is not installed ({exc.name}); "
              f"pip install 'reco-clip[benchmark]'", file=sys.stderr)
        return 2
    register()
    if argv is not None:
        sys.argv = ["reco-clip-benchmark", *argv]
    try:
        cli.main()
    except RecoError as exc:
        print(f"reco-clip-benchmark: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
