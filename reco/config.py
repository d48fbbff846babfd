"""Typed run configuration: one dataclass per stage, composed here, with named presets.

Each stage owns its config dataclass in its own package (``reco.fixture_config`` for the world,
``reco.pipelines.config``, ``reco.index.config``, ``reco.trainer.config``,
``reco.evaluation.config``) and a ``PRESETS`` dict of named instances. This module composes them
into :class:`RecoConfig`, applies ``--set section.field=value`` overrides, and fixes the layout
of a work directory (:class:`Paths`). Nothing below ``main`` ever sees an argparse namespace.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reco.errors import ConfigError
from reco.evaluation.config import PRESETS as EVAL_PRESETS, EvalConfig
from reco.index.config import PRESETS as INDEX_PRESETS, IndexConfig, NeighboursConfig
from reco.index.config import NEIGHBOUR_PRESETS
from reco.pipelines.config import PRESETS as EMBED_PRESETS, EmbedConfig
from reco.trainer.config import PRESETS as TRAIN_PRESETS, TrainConfig
from reco.fixture_config import PRESETS as WORLD_PRESETS, WorldConfig
from reco.fixture_config import BASE_CLIP_PRESETS, BaseClipConfig
from reco.react.config import ReactConfig

PRESET_NAMES = ("tiny", "demo")


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

    @property
    def paths(self) -> "Paths":
        return Paths(Path(self.workdir))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        from reco.formats import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True))


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
    """The named preset (``tiny`` for tests/CI, ``demo`` for ``make demo``)."""
    if name not in PRESET_NAMES:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    cfg = RecoConfig(
        preset=name,
        world=WORLD_PRESETS[name],
        base_clip=BASE_CLIP_PRESETS[name],
        embed=EMBED_PRESETS[name],
        index=INDEX_PRESETS[name],
        neighbours=NEIGHBOUR_PRESETS[name],
        train=TRAIN_PRESETS[name],
        eval=EVAL_PRESETS[name],
    )
    return dataclasses.replace(cfg, **top) if top else cfg


def load(path: str | Path) -> RecoConfig:
    """Read a config saved with :meth:`RecoConfig.save` (validated: unknown keys are errors)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    return from_dict(RecoConfig, data, where=str(path))


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {sorted(unknown)} for {cls.__name__}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            kwargs[key] = from_dict(hint, value, where=f"{where}.{key}")
        elif isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def override(cfg: RecoConfig, assignments: list[str]) -> RecoConfig:
    """Apply ``section.field=value`` (or top-level ``field=value``) strings, with type coercion."""
    for item in assignments:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.steps=200")
        key, raw = item.split("=", 1)
        cfg = _set_path(cfg, key.strip().split("."), raw, key)
    return cfg


def _set_path(obj: Any, parts: list[str], raw: str, full: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(obj)}
    head = parts[0]
    if head not in names:
        raise ConfigError(f"--set {full}: {type(obj).__name__} has no option {head!r}; "
                          f"options are {sorted(names)}")
    current = getattr(obj, head)
    if len(parts) > 1:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"--set {full}: {head!r} is not a section")
        return dataclasses.replace(obj, **{head: _set_path(current, parts[1:], raw, full)})
    hint = typing.get_type_hints(type(obj))[head]
    return dataclasses.replace(obj, **{head: _coerce(raw, hint, full)})


def _coerce(raw: str, hint: Any, full: str) -> Any:
    if raw.lower() in ("none", "null") and _allows_none(hint):
        return None
    base = _strip_optional(hint)
    try:
        if base is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if base in (int, float, str):
            return base(raw)
        if typing.get_origin(base) is tuple:
            inner = typing.get_args(base)[0]
            return tuple(inner(x) for x in raw.split(",") if x != "")
    except ValueError as exc:
        raise ConfigError(f"--set {full}={raw}: not a valid {getattr(base, '__name__', base)}") from exc
    return raw


def _allows_none(hint: Any) -> bool:
    return type(None) in typing.get_args(hint)


def _strip_optional(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return args[0]
    return hint
