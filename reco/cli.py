"""``reco``: one command-line tool, one subcommand per pipeline stage.

Subcommands live in their own modules, registered in :data:`COMMANDS` and imported only when
used. Each module provides ``add_arguments(parser)`` and ``main(cfg, args) -> int``; ``main``
turns its own options into typed values, so nothing below it sees an argparse namespace.
Every make target calls exactly one subcommand.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from reco import config as config_lib
from reco.errors import RecoError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "world": ("reco.world.cli", "generate the fine-grained world and train its frozen base CLIP"),
    "serve-world": ("reco.world.serve_cli", "serve the world's images over loopback HTTP"),
    "embed-memory": ("reco.embed_cli", "Beam: download URL lists and embed them to Parquet"),
    "import-embeddings": ("reco.pipelines.import_embeddings",
                          "a memory from released embeddings (clip-retrieval layout)"),
    "build-index": ("reco.index.cli", "build one faiss index per modality over the memory"),
    "precompute-neighbours": ("reco.pipelines.neighbours", "kNN for every training pair, cached as tensors"),
    "train": ("reco.trainer.cli", "train the fusion heads on cached neighbour tensors"),
    "evaluate": ("reco.evaluation.cli", "zero-shot and retrieval evaluation of CLIP vs reco"),
    "ablations": ("reco.evaluation.ablations", "the paper's ablations on the generated world"),
    "query": ("reco.evaluation.query", "show the memory neighbours of an image or a text"),
    "demo": ("reco.demo", "run the whole chain on the embedded default and print the table"),
    "react-retrieve": ("reco.react.retrieve", "REACT: retrieve a customisation set for class names"),
    "react-download": ("reco.react.download", "REACT: the customisation set's images as webdataset shards"),
    "react-train": ("reco.react.train", "REACT: train gated blocks on the customisation set"),
    "compare": ("reco.evaluation.compare", "frozen CLIP vs RECO vs REACT in one table"),
    "bench": ("reco.bench.cli", "benchmarks; results written to a file"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reco", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_common(p)
        if name in sys.argv[1:2]:          # import only the module that runs
            _load(module).add_arguments(p)
    return parser


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run configuration")
    g.add_argument("--preset", default=os.environ.get("RECO_PRESET", "demo"),
                   choices=config_lib.PRESET_NAMES, help="named configuration (tiny: tests/CI)")
    g.add_argument("--workdir", default=None, help="work directory (default: runs/PRESET)")
    g.add_argument("--config", default=None, help="JSON config file (overrides the preset)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one option, e.g. --set train.steps=200 (repeatable)")
    g.add_argument("--model", default=None, help="open_clip model name, e.g. ViT-B-32")
    g.add_argument("--pretrained", default=None, help="open_clip pretrained tag or checkpoint path")
    g.add_argument("--device", default=None, help="torch device (cpu, cuda)")
    g.add_argument("-v", "--verbose", action="store_true")


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            raise SystemExit(f"reco: this command is not available yet ({module})") from exc
        raise


def config_from_args(args: argparse.Namespace) -> config_lib.RecoConfig:
    cfg = config_lib.load(args.config) if args.config else config_lib.preset(args.preset)
    workdir = args.workdir or (cfg.workdir if args.config else f"runs/{args.preset}")
    cfg = config_lib.override(cfg, [f"workdir={workdir}", *args.overrides])
    clip_sets = [f"clip.{k}={v}" for k, v in
                 (("model", args.model), ("pretrained", args.pretrained), ("device", args.device)) if v]
    return config_lib.override(cfg, clip_sets)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sys.argv = [sys.argv[0], *argv]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:        # faiss logs its AVX2 probe ("No module named ...") as INFO
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        cfg = config_from_args(args)
        return int(_load(COMMANDS[args.command][0]).main(cfg, args) or 0)
    except RecoError as exc:
        print(f"reco {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
