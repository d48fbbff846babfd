"""REACT on the tiny generated world: retrieve a customisation set for every species from the real
memory index, train gated blocks, and compare zero-shot accuracy with the frozen base CLIP.

Uses the session fixture ``tiny_indexed`` (world + base CLIP + embedded memory/test + index);
skipped until that fixture exists."""
from __future__ import annotations

import pytest
import torch

from reco.evaluation.data import read_classnames
from reco.react.model import ReactModel
from reco.react.retrieve import retrieve_customisation_set
from reco.react.train import ReactTrainConfig, react_train

# the defaults (600 steps, ~31 s on one idle core). On the 80-species tiny world, world seed 0,
# zero-shot top-1 on all species gains +0 after 100 steps, +10 after 300, +19.6 after 600.
FAST = ReactTrainConfig(image_source="world")
SLOW = ReactTrainConfig(image_source="world")


@pytest.fixture(scope="module")
def indexed(request):
    try:
        cfg = request.getfixturevalue("tiny_indexed")
    except pytest.FixtureLookupError:
        pytest.skip("the tiny_indexed session fixture is not available yet")
    old = torch.get_num_threads()
    torch.set_num_threads(1)                # the tiny ViT trains fastest on one thread
    yield cfg
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def customisation(indexed):
    names = read_classnames(indexed.paths.world / "classnames.txt")
    table, info = retrieve_customisation_set(indexed, names)
    return table, info


def _report(tag, zs):
    rows = {name: {g: round(v["top1"], 1) for g, v in zs[name].items()} for name in ("frozen", "react")}
    print(f"\n[{tag}] zero-shot top1 (%): frozen {rows['frozen']}  react {rows['react']}")


def test_customisation_set_from_the_real_index(indexed, customisation):
    table, info = customisation
    names = read_classnames(indexed.paths.world / "classnames.txt")
    ids = table.column("memory_id").to_pylist()
    assert len(ids) == len(set(ids)) and set(info["per_class_counts"]) == set(names)
    assert info["min_count"] >= 1 and table.num_rows >= 10 * len(names)
    print(f"\ncustomisation set: {table.num_rows} pairs, species precision "
          f"{info['label_precision']:.3f}, per class {info['min_count']}..{info['max_count']}")
    # retrieval finds the right species far above chance (1/80)
    assert info["label_precision"] > 0.4, info["label_precision"]


def test_react_improves_zero_shot_over_frozen_clip(indexed, customisation, tmp_path):
    info = react_train(indexed, out_dir=tmp_path / "react", options=FAST)
    zs = info["zeroshot"]
    _report("fast", zs)
    assert zs["react"]["all"]["top1"] >= zs["frozen"]["all"]["top1"] + 8
    model = ReactModel.load(tmp_path / "react")
    assert model.meta["model_id"] == info["model_id"]


SEEDS = (0, 1, 2)
COLUMNS = ("all", "seen", "unseen", "unseen_among_unseen")     # the README table's columns


@pytest.fixture(scope="module")
def memory_runs(indexed, customisation, tmp_path_factory):
    """REACT's zero-shot results per seed, the set decoded into memory from the world's files."""
    import dataclasses

    root = tmp_path_factory.mktemp("react_memory")
    return {seed: react_train(indexed, out_dir=root / f"seed{seed}",
                              options=dataclasses.replace(SLOW, seed=seed))["zeroshot"]
            for seed in SEEDS}


@pytest.fixture(scope="module")
def shard_runs(indexed, customisation, tmp_path_factory):
    """The same, through the new path: the memory exported as an img2dataset webdataset
    download, react-download reusing it (by URL), react-train streaming the shards, evaluation
    reading the test images from an exported download of the test split."""
    import dataclasses

    from reco.react.download import react_download
    from tests.foreign import world_samples, write_webdataset

    root = tmp_path_factory.mktemp("react_shards")
    table, _ = customisation
    wanted = set(table.column("url").to_pylist())
    memory = [s for s in world_samples(indexed, "memory") if s["url"] in wanted]
    write_webdataset(memory, root / "download", per_shard=200)
    write_webdataset(world_samples(indexed, "test"), root / "evalset", per_shard=200)
    react = dataclasses.replace(indexed.react, reuse=str(root / "download"), shards=str(root / "shards"),
                                eval_shards=str(root / "evalset"), shard_size=200)
    cfg = dataclasses.replace(indexed, react=react)
    _, down = react_download(cfg)
    runs = {}
    for seed in SEEDS:
        cfg = dataclasses.replace(indexed, react=dataclasses.replace(react, seed=seed))
        runs[seed] = react_train(cfg, out_dir=root / f"seed{seed}")["zeroshot"]
    return down, table.num_rows, runs


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_react_improvement_is_seed_robust(memory_runs, seed):
    zs = memory_runs[seed]
    _report(f"slow seed {seed}", zs)
    assert zs["react"]["all"]["top1"] >= zs["frozen"]["all"]["top1"] + 15
    assert zs["react"]["unseen"]["top1"] >= zs["frozen"]["unseen"]["top1"] + 10


@pytest.mark.slow
def test_react_table_through_downloaded_shards(shard_runs, memory_runs):
    """The README's REACT row (mean over seeds 0-2) through the new path: every column within
    one standard error (binomial, of the column's test images) of the in-memory path's."""
    import math

    down, rows, runs = shard_runs
    assert down["status_counts"].get("success", 0) >= 0.9 * rows
    for seed, zs in runs.items():
        _report(f"shards seed {seed}", zs)
        assert zs["react"]["all"]["top1"] >= zs["frozen"]["all"]["top1"] + 15
    for col in COLUMNS:
        memory = sum(memory_runs[s]["react"][col]["top1"] for s in SEEDS) / len(SEEDS)
        shards = sum(runs[s]["react"][col]["top1"] for s in SEEDS) / len(SEEDS)
        n = runs[0]["react"][col]["n"]
        se = 100 * math.sqrt(memory / 100 * (1 - memory / 100) / n)
        print(f"{col}: in memory {memory:.1f}, through shards {shards:.1f}, "
              f"difference {shards - memory:+.1f} = {(shards - memory) / se:+.2f} SE (n={n})")
        assert abs(shards - memory) <= se, (col, memory, shards, se)
