"""Typed run configuration: one dataclass per stage, composed here, with named presets.

Each stage owns its config dataclass in its own package (``reco.fixture_config`` for the world,
``reco.pipelines.config``, ``reco.index.config``, ``reco.trainer.config``,
``reco.evaluation.config``) and a ``PRESETS`` dict of named instances. This module composes them
into :class:`RecoConfig`, applies ``--set section.field=value`` overrides, and fixes the layout
of a work directory (:class:`Paths`). Nothing below ``main`` ever sees an argparse namespace.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reco import options as o
from reco.errors import ConfigError
from reco.evaluation.config import PRESETS as EVAL_PRESETS, EvalConfig
from reco.index.config import PRESETS as INDEX_PRESETS, IndexConfig, NeighboursConfig
from reco.index.config import NEIGHBOUR_PRESETS
from reco.pipelines.config import PRESETS as EMBED_PRESETS, EmbedConfig
from reco.trainer.config import PRESETS as TRAIN_PRESETS, TrainConfig
from reco.fixture_config import PRESETS as WORLD_PRESETS, WorldConfig
from reco.fixture_config import BASE_CLIP_PRESETS, BaseClipConfig
from reco.react.config import ReactConfig

PRESET_NAMES = ("tiny", "demo", "longtail", "longtail_small")
# presets whose stages have no preset of their own take another's (longtail: tiny's pipeline)
_STAGE_PRESET = {"longtail": "tiny", "longtail_small": "longtail"}


@dataclass(frozen=True)
class ClipConfig:
    """Which open_clip model embeds everything. ``pretrained`` is an open_clip tag (``openai``,
    ``laion2b_s34b_b79k``), a local checkpoint path, or None (random init). When ``model`` is a
    project config (``reco-tiny``) and ``pretrained`` is None, the world's trained base CLIP in
    the work directory is used."""

    model: str = "reco-tiny"
    pretrained: str | None = None
    device: str = "cpu"
    precision: str = "fp32"

    SECTION = "clip"
    RULES = dict(model=o.NON_EMPTY, pretrained=o.NON_EMPTY, device=o.Pattern(o.DEVICE, "cpu, cuda, cuda:1, auto"),
                 precision=o.Choice(o.CLIP_PRECISIONS))

    def __post_init__(self):
        o.check(self)


@dataclass(frozen=True)
class RecoConfig:
    workdir: str = "runs/demo"
    preset: str = "demo"
    seed: int = 0
    clip: ClipConfig = field(default_factory=ClipConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    base_clip: BaseClipConfig = field(default_factory=BaseClipConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    neighbours: NeighboursConfig = field(default_factory=NeighboursConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    react: ReactConfig = field(default_factory=ReactConfig)

    SECTION = ""
    RULES = dict(workdir=o.NON_EMPTY, preset=o.Choice(PRESET_NAMES), seed=o.SEED)

    def __post_init__(self):
        o.check(self)

    @property
    def paths(self) -> "Paths":
        return Paths(Path(self.workdir))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the whole config (JSON, or YAML for a .yaml/.yml path) atomically."""
        from omegaconf import OmegaConf

        from reco.formats import atomic_write_text

        text = (OmegaConf.to_yaml(OmegaConf.structured(self)) if Path(path).suffix in (".yaml", ".yml")
                else json.dumps(self.to_dict(), indent=2, sort_keys=True))
        atomic_write_text(path, text)


@dataclass(frozen=True)
class Paths:
    """Layout of a work directory; every stage reads and writes through these names."""

    root: Path

    world: Path = field(init=False)
    base_clip: Path = field(init=False)
    embeddings: Path = field(init=False)
    index: Path = field(init=False)
    neighbours: Path = field(init=False)
    heads: Path = field(init=False)
    eval: Path = field(init=False)
    react: Path = field(init=False)

    def __post_init__(self):
        for name in ("world", "base_clip", "embeddings", "index", "neighbours", "heads", "eval", "react"):
            object.__setattr__(self, name, self.root / name)

    def urls(self, split: str) -> Path:
        """URL list of a world split: pretrain, memory, train, test."""
        return self.world / "urls" / f"{split}.parquet"

    def embedded(self, split: str) -> Path:
        """Embedded Parquet shards (+ manifest.json) of a split."""
        return self.embeddings / split


def preset(name: str, **top: Any) -> RecoConfig:
    """The named preset (``tiny`` for tests/CI, ``demo`` for ``make demo``, ``longtail``: a
    2,000-species world with Zipf training frequencies, issue 20's experiment)."""
    if name not in PRESET_NAMES:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    def pick(presets: dict, which: str = name) -> Any:
        return presets.get(which) or pick(presets, _STAGE_PRESET[which])

    cfg = RecoConfig(
        preset=name,
        world=pick(WORLD_PRESETS),
        base_clip=pick(BASE_CLIP_PRESETS),
        embed=pick(EMBED_PRESETS),
        index=pick(INDEX_PRESETS),
        neighbours=pick(NEIGHBOUR_PRESETS),
        train=pick(TRAIN_PRESETS),
        eval=pick(EVAL_PRESETS),
    )
    return dataclasses.replace(cfg, **top) if top else cfg


def load(path: str | Path) -> RecoConfig:
    """Read a config saved with :meth:`RecoConfig.save` (JSON or YAML; validated: unknown keys,
    wrong types and out-of-range values are ConfigErrors naming the file and option)."""
    from reco import config_tree

    data = config_tree.read_file(path)
    config_tree.check_tree(data, str(path))
    return config_tree.merge(preset(data.get("preset", "demo")), data, str(path))


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """A config dataclass from a (nested) dict; ConfigError for an unknown key, OptionError (a
    ConfigError naming section.option) for a bad value."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of options for {cls.__name__}, got {data!r:.60}")
    hints = o.hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), list(hints), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{where}: unknown option(s) {unknown} for {cls.__name__}{hint}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            kwargs[key] = from_dict(hint, value, where=f"{where}.{key}")
        else:
            kwargs[key] = value
    return cls(**kwargs)


def override(cfg: RecoConfig, assignments: list[str]) -> RecoConfig:
    """Apply ``section.field=value`` strings (``--set``), with type coercion and validation."""
    from reco import config_tree

    return config_tree.apply_sets(cfg, assignments)
