"""The run options a benchmark honours: ``reco bench --set KEY=VALUE``, ``--model``,
``--pretrained``, ``--device`` (and ``--config`` files) reach the benches that use them; an
option no selected bench can use is refused, naming the benches that take it."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from reco.config import RecoConfig
from reco.errors import ConfigError

# bench -> the option keys (or KEY. prefixes of whole sections) it honours
HONOURS: dict[str, tuple[str, ...]] = {
    "embed": ("clip.model", "clip.pretrained", "clip.device", "clip.precision",
              "embed.batch_size", "embed.torch_threads", "embed.decode_workers", "embed.encode_format"),
    "index": ("index.", "neighbours."),
    "train": ("train.batch_size", "train.num_workers"),
    "import": (),
    "react": (),
    "gpu": ("clip.model", "clip.pretrained", "clip.device", "clip.precision", "embed.batch_size",
            "train.batch_size"),
}
FLAGS = {"model": "clip.model", "pretrained": "clip.pretrained", "device": "clip.device"}
OPTIONS_FILE = "bench-options.json"


def _flat(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        out += _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return out


def explicit_keys(args: argparse.Namespace) -> list[str]:
    """The option keys the command line gave: --set, --model/--pretrained/--device, --config."""
    from reco.config_tree import read_file

    keys = [item.split("=", 1)[0].strip() for item in getattr(args, "overrides", None) or []]
    keys += [key for flag, key in FLAGS.items() if getattr(args, flag, None)]
    for path in getattr(args, "config_files", None) or []:
        keys += _flat(read_file(path))
    return list(dict.fromkeys(keys))


def value_of(cfg: RecoConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return list(node) if isinstance(node, tuple) else node


def honours(bench: str, key: str) -> bool:
    return any(key == h or (h.endswith(".") and key.startswith(h)) for h in HONOURS[bench])


def bench_options(names: list[str], args: argparse.Namespace, cfg: RecoConfig) -> dict[str, dict]:
    """{bench: {key: typed value}} for the options given; ConfigError for an option that one of
    the selected benches cannot use (it would silently measure something else)."""
    keys = explicit_keys(args)
    for key in keys:
        deaf = [n for n in names if not honours(n, key)]
        if deaf:
            takers = [n for n in HONOURS if honours(n, key)]
            hint = (f"run `reco bench --only {takers[0]}` with it" if takers
                    else "no benchmark takes it")
            raise ConfigError(f"reco bench: option {key} does not apply to the "
                              f"{', '.join(deaf)} benchmark(s) (their options: "
                              f"{'; '.join(f'{n}: ' + (', '.join(HONOURS[n]) or 'none') for n in deaf)}); "
                              f"{hint}")
    return {n: {key: value_of(cfg, key) for key in keys} for n in names}


def apply(cfg: RecoConfig, options: dict[str, Any]) -> RecoConfig:
    """``cfg`` with the bench options merged onto it (validated as --set is)."""
    from reco.config_tree import merge, tree_of

    for key, value in options.items():
        cfg = merge(cfg, tree_of(key, value), f"reco bench option {key}")
    return cfg


def save(folder: Path, options: dict[str, Any]) -> None:
    """For the measured subprocesses of a bench: the options, beside its work folder."""
    from reco.formats import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / OPTIONS_FILE, json.dumps(options))


def load(folder: Path) -> dict[str, Any]:
    path = Path(folder) / OPTIONS_FILE
    return json.loads(path.read_text()) if path.exists() else {}
