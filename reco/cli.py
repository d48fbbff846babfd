"""``reco``: one command-line tool, one subcommand per pipeline stage.

Subcommands live in their own modules, registered in :data:`COMMANDS` and imported only when
used (:func:`build_parser` is told which one runs). Each module provides
``add_arguments(parser)`` and ``main(cfg, args) -> int``; ``main``
turns its own options into typed values, so nothing below it sees an argparse namespace.
Every make target calls exactly one subcommand.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import os
import re
import sys
from typing import NamedTuple

from reco import config as config_lib
from reco import console
from reco.demo import STAGES
from reco.errors import ConfigError, RecoError


class Command(NamedTuple):
    module: str           # imported only when the command runs
    help: str             # one line, in `reco --help` and atop the command's own
    example: str          # shown at the end of the command's --help


# each subcommand: its module, help line and example
COMMANDS: dict[str, Command] = {
    "world": Command("reco.world.cli", "generate the fine-grained world and train its frozen base CLIP",
                     "reco world --preset tiny --workdir runs/tiny"),
    "serve-world": Command("reco.world.serve_cli", "serve the world's images over loopback HTTP",
                           "reco serve-world --workdir runs/tiny --port 8000"),
    "embed-memory": Command("reco.embed_cli", "Beam: download URL lists and embed them to Parquet",
                            "reco embed-memory --workdir runs/tiny --set embed.threads=8"),
    "import-embeddings": Command("reco.pipelines.import_embeddings",
                                 "a memory from released embeddings (clip-retrieval layout)",
                                 "reco import-embeddings --workdir runs/laion --input laion400m-embeddings"),
    "build-index": Command("reco.index.cli", "build one faiss index per modality over the memory",
                           "reco build-index --workdir runs/tiny"),
    "precompute-neighbours": Command("reco.pipelines.neighbours",
                                     "kNN for every training pair, cached as tensors",
                                     "reco precompute-neighbours --workdir runs/tiny --set neighbours.k=16"),
    "train": Command("reco.trainer.cli", "train the fusion heads on cached neighbour tensors",
                     "reco train --workdir runs/tiny --set train.steps=200"),
    "evaluate": Command("reco.evaluation.cli", "zero-shot and retrieval evaluation of CLIP vs reco",
                        "reco evaluate --workdir runs/tiny --modes off,both"),
    # an experiment (experiments/, outside the library): the CLI names it, reco never imports it
    "ablations": Command("experiments.ablations", "the paper's ablations on the generated world",
                         "reco ablations --workdir runs/tiny --noise 0.1,0.5"),
    "query": Command("reco.evaluation.query", "show the memory neighbours of an image or a text",
                     "reco query --workdir runs/tiny --text 'a photo of a azure thornwick.' --k 5"),
    "demo": Command("reco.demo", "run the whole chain on the embedded default and print the table",
                    "reco demo --preset tiny"),
    "react-retrieve": Command("reco.react.retrieve", "REACT: retrieve a customisation set for class names",
                              "reco react-retrieve --workdir runs/tiny --per-class 20"),
    "react-download": Command("reco.react.download",
                              "REACT: the customisation set's images as webdataset shards",
                              "reco react-download --workdir runs/tiny --set react.shard_size=500"),
    "react-train": Command("reco.react.train", "REACT: train gated blocks on the customisation set",
                           "reco react-train --workdir runs/tiny --set react.workers=2"),
    "compare": Command("reco.evaluation.compare", "frozen CLIP vs RECO vs REACT in one table",
                       "reco compare --workdir runs/tiny"),
    "bench": Command("reco.bench.cli", "benchmarks; results written to a file", "reco bench --only index"),
    "config": Command("reco.config_cli", "show a run's config (show) or every option with its range (keys)",
                      "reco config show --workdir runs/tiny      (or: reco config keys)"),
}

# commands that run a stage of the run (the chain's, reco.demo.STAGES, and the others): they
# record its config (WORKDIR/config.yaml)
RECORDS_CONFIG = frozenset({s.name for s in STAGES} | {
    "import-embeddings", "ablations", "demo", "react-retrieve", "react-download", "react-train"})
# commands that run the CLIP on this machine (clip.device is checked before any work)
LOCAL_DEVICE = frozenset(RECORDS_CONFIG - {"embed-memory", "import-embeddings"} | {"query"})
CLIP_FLAGS = (("model", "--model"), ("pretrained", "--pretrained"), ("device", "--device"))


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default (unless None/False/empty) and keeps the example's layout."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" not in text and action.default not in (None, False, [], argparse.SUPPRESS)
                and action.option_strings):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse with "did you mean" for unknown options and choices."""

    def error(self, message):
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            close = difflib.get_close_matches(choice[1], re.findall(r"'([^']*)'", choice[2]), n=1)
            message += f" (did you mean {close[0]}?)" if close else ""
        elif message.startswith("unrecognized arguments"):
            flags = [s for s in self._option_string_actions if s.startswith("--")]
            unknown = next((w for w in message.split()[2:] if w.startswith("--") and w not in flags), None)
            hint = unknown and _flag_hint(unknown.split("=")[0], flags, self.prog.split()[-1])
            message += f" (did you mean {hint}?)" if hint else ""
        super().error(message)


# the config section a command's bare option name most likely means (``reco train --steps``)
SECTION_OF = {"train": "train", "embed-memory": "embed", "import-embeddings": "embed",
              "build-index": "index", "world": "world",
              "precompute-neighbours": "neighbours", "evaluate": "eval", "ablations": "eval",
              "react-download": "react", "react-train": "react"}


def _flag_hint(flag: str, flags: list[str], command: str) -> str | None:
    """A close flag of the command, else the config option the flag names (``--steps`` ->
    ``--set train.steps=...``)."""
    close = difflib.get_close_matches(flag, flags, n=1, cutoff=0.75)
    if close:
        return close[0]
    from reco.config_tree import option_keys

    name = flag.lstrip("-").replace("-", "_")
    section = SECTION_OF.get(command, "") + "."
    leaves: dict[str, str] = {}
    for key in sorted(option_keys(), key=lambda k: not k.startswith(section)):
        leaves.setdefault(key.rsplit(".", 1)[-1], key)
    match = leaves.get(name) or next(iter(difflib.get_close_matches(name, list(leaves), n=1)), None)
    if match:
        return f"--set {leaves[match] if match in leaves else match}=..."
    close = difflib.get_close_matches(flag, flags, n=1)
    return close[0] if close else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``reco`` parser; only ``command``'s module (the one that runs) is imported, for its
    own options."""
    parser = _Parser(prog="reco", description=__doc__.splitlines()[0], formatter_class=_Formatter,
                     epilog="Each command's options: reco COMMAND --help. Every config option: "
                            "reco config keys. A run's config: reco config show --workdir W.")
    parser.add_argument("--version", action="version", version=f"reco {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    for name, c in COMMANDS.items():
        p = sub.add_parser(name, help=c.help, description=c.help, formatter_class=_Formatter,
                           epilog=f"example:\n  {c.example}")
        p.set_defaults(_parser=p)
        _add_common(p)
        if name == command:
            _load(c.module).add_arguments(p)
            p.epilog += _section_keys(name)
    return parser


def _section_keys(command: str) -> str:
    """The options of the command's config section with their demo-preset values (help)."""
    section = SECTION_OF.get(command)
    if not section:
        return ""
    from reco.config_cli import keys_table

    lines = [ln for ln in keys_table(config_lib.preset("demo")).splitlines() if ln.startswith(section + ".")]
    return (f"\n\n{section} options (--set KEY=VALUE; demo-preset values; all: reco config keys):\n  "
            + "\n  ".join(lines))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("reco-clip")
    except PackageNotFoundError:
        return "unknown"


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run configuration (see `reco config keys`)")
    g.add_argument("--preset", default=None, choices=config_lib.PRESET_NAMES,
                   help="named configuration of a NEW run: tiny (tests/CI) or demo; default "
                        "$RECO_PRESET, else demo. An existing run keeps the preset in WORKDIR/config.yaml")
    g.add_argument("--workdir", default=None, help="run folder (default: runs/PRESET)")
    g.add_argument("--config", dest="config_files", action="append", default=[], metavar="FILE",
                   help="JSON or YAML file of options merged onto the run's config (or the preset), "
                        "e.g. {\"train\": {\"steps\": 50}}; repeatable")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one option, e.g. --set train.steps=200 (repeatable); "
                        "`reco config keys` lists every KEY")
    g.add_argument("--model", default=None, help="open_clip model name, e.g. ViT-B-32 (= --set clip.model=...)")
    g.add_argument("--pretrained", default=None,
                   help="open_clip pretrained tag or checkpoint path (= --set clip.pretrained=...)")
    g.add_argument("--device", default=None, help="torch device: cpu, cuda, cuda:1 (= --set clip.device=...)")
    g.add_argument("-v", "--verbose", action="count", default=0,
                   help="more log lines: -v reco's debug lines and libraries' info, -vv everything")
    g.add_argument("-q", "--quiet", action="store_true",
                   help="for scripts: no progress bars, only errors and the final summary/table")
    g.add_argument("--json", action="store_true",
                   help="print each stage's summary as one JSON line (its full info)")


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            raise SystemExit(f"reco: this command is not available yet ({module})") from exc
        raise


def config_from_args(args: argparse.Namespace) -> config_lib.RecoConfig:
    """The command's config: the run's recorded config (or the preset), then --config files,
    then --set and the CLIP flags (reco.config_tree.resolve); validated before any work."""
    from reco import config_tree

    cfg, _ = config_tree.resolve(workdir=args.workdir, preset_name=args.preset,
                                 files=args.config_files, sets=args.overrides)
    for key, flag in CLIP_FLAGS:
        value = getattr(args, key, None)
        if value:
            cfg = config_tree.merge(cfg, {"clip": {key: value}}, f"{flag} {value}")
    return cfg


def check_before_work(cfg: config_lib.RecoConfig, command: str) -> None:
    """What the config alone cannot tell: is clip.device there, is clip.pretrained a known tag."""
    if command not in LOCAL_DEVICE:
        return
    if cfg.clip.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"clip.device={cfg.clip.device}: no CUDA device is visible on this "
                              f"machine; use --set clip.device=cpu (or --device cpu)")
    if cfg.clip.pretrained:
        _check_pretrained(cfg.clip.model, cfg.clip.pretrained)


def _check_pretrained(model: str, pretrained: str) -> None:
    """clip.pretrained is a checkpoint file or one of the model's open_clip tags."""
    from pathlib import Path

    if model.startswith(("local-dir:", "hf-hub:")) or Path(pretrained).is_file():
        return
    import open_clip

    from reco.clip import register_project_configs

    register_project_configs()
    if model not in open_clip.list_models():
        return                                  # load_clip names the unknown model
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained not in tags:
        close = difflib.get_close_matches(pretrained, tags, n=1)
        hint = (f"did you mean {close[0]}?" if close else
                f"its tags: {', '.join(tags[:8])}" if tags else "it has no pretrained tags")
        raise ConfigError(f"clip.pretrained={pretrained!r} (--pretrained): not a file, nor an open_clip "
                          f"tag of {model}; {hint}")


def _unknown(args: argparse.Namespace, extras: list[str]) -> None:
    """An unknown flag: the subcommand's usage and error (with "did you mean"), exit 2."""
    args._parser.error(f"unrecognized arguments: {' '.join(extras)}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extras = build_parser(argv[0] if argv else None).parse_known_args(argv)
    if extras:
        _unknown(args, extras)
    console.setup_logging(console.QUIET if args.quiet else args.verbose, json_summaries=args.json)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        cfg = config_from_args(args)
        check_before_work(cfg, args.command)
        if args.command in RECORDS_CONFIG:
            from reco.config_tree import record_new

            record_new(cfg)      # the first stage of a run writes its config
        rc = int(_load(COMMANDS[args.command].module).main(cfg, args) or 0)
        if rc == 0 and args.command in RECORDS_CONFIG:
            from reco.config_tree import record

            record(cfg)          # the run remembers the options its stages ran with
        return rc
    except RecoError as exc:
        print(f"reco {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
