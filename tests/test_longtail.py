"""The long-tail world presets (issue 20): Zipf training frequencies (over >= 1,000 species in
``longtail``), a memory covering every species, test species from head, tail and never-seen;
and (slow) the experiment command on ``longtail_small``, end to end."""
import dataclasses
import json

import numpy as np
import pytest

from reco import config as config_lib
from reco.errors import ConfigError
from reco.world.build import pick_test_groups, species_ids, world_key
from reco.world.species import split_seen_unseen


def _plan(seed=0, **changes):
    cfg = dataclasses.replace(config_lib.preset("longtail").world, seed=seed, **changes)
    seen, _ = split_seen_unseen(cfg.n_species, cfg.unseen_fraction, cfg.seed)
    train = species_ids("train", cfg, cfg.n_species, seen)
    return cfg, train, pick_test_groups(cfg, train, cfg.n_species)


@pytest.mark.parametrize("seed", [0, 1])
def test_longtail_training_split_is_zipf_over_a_thousand_species(seed):
    cfg, train, groups = _plan(seed)
    counts = np.bincount(train, minlength=cfg.n_species)
    present = counts[counts > 0]
    assert len(present) >= 1000                               # spans >= 1,000 species
    assert np.median(present) <= 5 and (present <= 5).mean() > 0.7   # most a handful of times
    assert (counts == 0).sum() >= 300                         # many not at all
    top = np.sort(present)[::-1]
    assert top[0] > 50 * np.median(present)                   # a head hundreds of times
    memory = species_ids("memory", cfg, cfg.n_species, [])
    assert set(memory.tolist()) == set(range(cfg.n_species))  # the memory covers them all
    assert {g: len(ids) for g, ids in groups.items()} == {"head": 60, "tail": 60, "unseen": 60}
    assert counts[groups["head"]].min() > cfg.tail_max
    assert counts[groups["tail"]].min() >= 1 and counts[groups["tail"]].max() <= cfg.tail_max
    assert counts[groups["unseen"]].max() == 0
    test = species_ids("test", cfg, cfg.n_species, [], sorted(sum(groups.values(), [])))
    assert len(test) == 180 * cfg.n_test_per_species


def test_balanced_worlds_keep_their_plans_and_keys():
    tiny = config_lib.preset("tiny").world
    seen, _ = split_seen_unseen(tiny.n_species, tiny.unseen_fraction, tiny.seed)
    train = species_ids("train", tiny, tiny.n_species, seen)
    assert sorted(set(train.tolist())) == seen and pick_test_groups(tiny, train, tiny.n_species) == {}
    assert world_key(tiny) == world_key(dataclasses.replace(tiny, tail_max=5))
    assert world_key(tiny) != world_key(dataclasses.replace(tiny, train_zipf=1.0))


def test_too_small_a_long_tail_is_a_clear_error():
    with pytest.raises(ConfigError, match="test_group_size"):
        _plan(test_group_size=900)


@pytest.mark.slow
def test_longtail_experiment_end_to_end(tmp_path):
    """One world seed of ``python -m experiments.longtail`` on the ``longtail_small`` preset
    (world and base CLIP restored from RECO_TEST_CACHE when present): the report, the k figure,
    and retrieval helping the never-seen species (margin measured on world seeds 0-2: README)."""
    from experiments import stats
    from experiments.longtail import main

    assert main(["--seeds", "0", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "longtail.md").read_text()
    for label in stats.LABELS.values():
        assert f"| {label} |" in text
    assert (tmp_path / "k_saturation.png").read_bytes()[:4] == b"\x89PNG"
    spec = json.loads((tmp_path / "seed0" / "world" / "species.json").read_text())
    assert len(spec["seen"]) >= 300 and set(spec["test_groups"]) == {"head", "tail", "unseen"}
    summary = json.loads((tmp_path / "results.json").read_text())["scores"]
    clip, mean = summary["clip"]["unseen"][0], summary["mean"]["unseen"][0]
    assert mean >= clip + 10, f"mean fusion {mean:.1f} vs CLIP {clip:.1f} on never-seen species"
