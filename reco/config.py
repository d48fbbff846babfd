"""Typed run configuration: one dataclass per stage, composed here, with named presets.

Each stage owns its config dataclass in its own package (``reco.fixture_config`` for the world,
``reco.pipelines.config``, ``reco.index.config``, ``reco.trainer.config``,
``reco.evaluation.config``, ``reco.react.config``), whose defaults suit a real corpus. This
module composes them into :class:`RecoConfig`, writes every named preset out whole
(:data:`PRESETS`, at the end), applies ``--set section.field=value`` overrides, and fixes the
layout of a work directory (:class:`Paths`). Nothing below ``main`` ever sees an argparse
namespace.
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
from reco.evaluation.config import EvalConfig
from reco.fixture_config import BASE_CLIP_PRESETS, WORLD_PRESETS, BaseClipConfig, WorldConfig
from reco.index.config import IndexConfig
from reco.pipelines.neighbours.config import NeighboursConfig
from reco.pipelines.config import EmbedConfig
from reco.trainer.config import TrainConfig
from reco.react.config import ReactConfig

PRESET_NAMES = ("tiny", "demo", "longtail", "longtail_small")


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


# the stage folders of a work directory: Paths.<name> is WORKDIR/<name>
FOLDERS = ("world", "base_clip", "embeddings", "index", "neighbours", "heads", "eval", "react")


@dataclass(frozen=True)
class Paths:
    """Layout of a work directory; every stage reads and writes through these names: one folder
    per stage (``paths.index`` is ``root/index``, for each name of :data:`FOLDERS`)."""

    root: Path

    def __getattr__(self, name: str) -> Path:
        if name in FOLDERS:
            return self.root / name
        raise AttributeError(f"{type(self).__name__} has no {name!r}; its folders: {', '.join(FOLDERS)}")

    def urls(self, split: str) -> Path:
        """URL list of a world split: pretrain, memory, train, test."""
        return self.world / "urls" / f"{split}.parquet"

    def embedded(self, split: str) -> Path:
        """Embedded Parquet shards (+ manifest.json) of a split."""
        return self.embeddings / split


def preset(name: str, **top: Any) -> RecoConfig:
    """The named preset (:data:`PRESETS`), with top-level fields ``top`` (e.g. ``workdir``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    return dataclasses.replace(PRESETS[name], **top) if top else PRESETS[name]


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


# ---------------------------------------------------------------------------------------------
# presets: each written out whole. The world's sizes and its base CLIP are a test fixture
# (reco.fixture_config); every other section is here.
# ---------------------------------------------------------------------------------------------

# The neighbour defaults (0.97) suit web-trained CLIPs, where near-duplicates (re-encoded,
# resized) score >= 0.97 and different images of one concept far less. The presets embed the
# generated world with its small base CLIP, whose image space is much tighter. Measured on the
# tiny world (memory vs test images, fp16 embeddings renormalised): the planted exact copies score
# 1 - 2e-7 .. 1; the other 2845 memory images have a best match of 1 - 5.8e-3 (median) ..
# 1 - 1.1e-4 (max), and 0.97 would have removed 2832 of them (0.999: 129, 0.9999: 0). For the
# training pairs, 0.97 would exclude ~100 memory items per pair (all of the top 16 for 97% of
# pairs), 0.9999 none but copies. Hence copies-only thresholds for the world presets:
WORLD_DUPLICATE = 0.99995
# Train steps of the generated worlds, chosen on held-out validation species (never the test
# species): heads trained far past the validation peak memorise the seen species. Demo world: the
# validation top-1 of a 1000-step run peaked at step 100 (80.1%) and fell to 54.2% by step 1000;
# tiny world: 100-step runs plateau from step ~50 on world seeds 0-4 (`reco ablations`, the
# `selection` curve in results.json). A real corpus (CC12M) needs TrainConfig()'s long run.

# tiny: what tests and CI use (80 species, 18.8k images)
TINY = RecoConfig(
    preset="tiny",
    world=WORLD_PRESETS["tiny"], base_clip=BASE_CLIP_PRESETS["tiny"],
    embed=EmbedConfig(shard_size=500),
    index=IndexConfig(),
    neighbours=NeighboursConfig(shard_size=1000, dedup_threshold=WORLD_DUPLICATE,
                                eval_dedup_threshold=WORLD_DUPLICATE),
    train=TrainConfig(batch_size=256, steps=100, warmup_steps=20, checkpoint_every=50),
    eval=EvalConfig(),
)
# demo: what `make demo` uses (100 species, 38k images)
DEMO = RecoConfig(
    preset="demo",
    world=WORLD_PRESETS["demo"], base_clip=BASE_CLIP_PRESETS["demo"],
    embed=EmbedConfig(),
    index=IndexConfig(),
    neighbours=NeighboursConfig(dedup_threshold=WORLD_DUPLICATE, eval_dedup_threshold=WORLD_DUPLICATE),
    train=TrainConfig(steps=200, warmup_steps=40, checkpoint_every=100),
    eval=EvalConfig(),
)
PRESETS: dict[str, RecoConfig] = {
    "tiny": TINY, "demo": DEMO,
    # issue 20's long-tail worlds (2,000 / 400 species, Zipf training frequencies) on tiny's pipeline
    **{name: dataclasses.replace(TINY, preset=name, world=WORLD_PRESETS[name],
                                 base_clip=BASE_CLIP_PRESETS[name])
       for name in ("longtail", "longtail_small")},
}
