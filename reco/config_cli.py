"""``reco config show`` (a run's effective config, as YAML) and ``reco config keys`` (every
option with its type, value and allowed range)."""
from __future__ import annotations

import argparse
import sys

from reco import config_tree, options
from reco.config import RecoConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("show", "keys"),
                        help="show: the config a stage of WORKDIR would use (with any --set / "
                             "--config applied, not recorded); keys: every option")


def main(cfg: RecoConfig, args: argparse.Namespace) -> int:
    if args.action == "keys":
        print(keys_table(cfg))
        return 0
    from omegaconf import OmegaConf

    recorded = config_tree.recorded_file(cfg.workdir)
    source = f"recorded in {recorded}" if recorded else f"no config recorded yet; preset {cfg.preset!r}"
    print(f"# run {cfg.workdir} ({source})")
    print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
    if not recorded:
        print(f"# {cfg.workdir}: no config.yaml yet; the first stage run there records this",
              file=sys.stderr)
    return 0


def keys_table(cfg: RecoConfig) -> str:
    """One line per option: ``key = value  # type and range`` (values of ``cfg``)."""
    rows = []
    for key, (cls, name) in config_tree.option_keys().items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        flag = config_tree.TOP_ONLY.get(key)
        rows.append((f"{key} = {_show(value)}", f"set with {flag}" if flag else options.rule_text(cls, name)))
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{width}}  # {b}" for a, b in rows)


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
