"""Ablation plumbing on a small in-test "concept world" (real trainer, real heads, in-test memory):
variants train, get evaluated, swept over k and memories, reused, and reported."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from reco import config as config_lib
from reco.errors import ConfigError
from experiments import config as ablation_config
from experiments.ablation_report import markdown_report, write_report
from experiments.ablations import VARIANTS, _check_fields, run_variant, variants_for
from reco.evaluation.data import EmbeddedSplit
from reco.evaluation.evaluate import EvalInputs
from tests.fixtures.trainer import write_tensors
from tests.test_model import ArrayMemory

ALL_FIELDS = ("v_img_txt", "t_txt_img", "v_img_img", "t_txt_txt", "v_txt_txt", "t_img_img",
              "v_txt_img", "t_img_txt")


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Small heads train several times faster on one thread than on two busy cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def clip():
    from reco.clip import load_clip

    torch.manual_seed(0)
    return load_clip("reco-tiny")


@pytest.fixture(scope="module")
def world(clip, tmp_path_factory):
    """400 classes, 300 'seen' in the training pairs (about 3 pairs each, too few concepts per
    class to memorise: the heads must learn to use what is retrieved). Image embeddings are noisy
    views of an image concept unrelated to the class prompt; memory texts are near the prompt."""
    rng = np.random.default_rng(0)
    d, c, n_seen = clip.embed_dim, 1600, 1200
    prompt = _unit(rng.normal(size=(c, d)))
    concept = _unit(rng.normal(size=(c, d)))

    def pairs(labels, noise):
        v = _unit(concept[labels] + noise * rng.normal(size=(len(labels), d)) / np.sqrt(d))
        t = _unit(prompt[labels] + 0.2 * rng.normal(size=(len(labels), d)) / np.sqrt(d))
        return v, t

    mem_labels = np.repeat(np.arange(c), 2)
    memory = ArrayMemory(*pairs(mem_labels, 0.3), clip.model_id)
    small = ArrayMemory(memory.image_emb[::8].astype(np.float32), memory.text_emb[::8].astype(np.float32),
                        clip.model_id)
    train_labels = rng.choice(np.arange(n_seen), 1024)
    v, t = pairs(train_labels, 0.6)
    work = tmp_path_factory.mktemp("ablation_world")
    k = 8
    contexts = {f: memory.context(v if f[0] == "v" else t, f, k) for f in ALL_FIELDS}
    write_tensors(work / "neighbours" / "tensors", v=v, t=t, contexts=contexts, model_id=clip.model_id)
    test_labels = np.repeat(np.r_[0:40, n_seen:n_seen + 40], 2)
    tv, tt = pairs(test_labels, 0.6)
    split = EmbeddedSplit(ids=np.arange(len(tv)), image_emb=tv, text_emb=tt, labels=test_labels,
                          captions=[f"c{i}" for i in test_labels], urls=[""] * len(tv))
    inputs = EvalInputs(split, [f"class {i}" for i in range(c)], prompt[:, None, :],
                        {"seen": np.arange(n_seen), "unseen": np.arange(n_seen, c)})
    cfg = config_lib.preset("tiny", workdir=str(work))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, k=k, batch_size=128, steps=80, lr=5e-3,
                                                             head=dataclasses.replace(cfg.train.head, heads=4)))
    ablation = ablation_config.for_run(cfg, ablation_eval_k=(1, 8), ablation_train_k=(2,))
    return {"cfg": cfg, "ablation": ablation, "memories": {"full": memory, "small": small}, "inputs": inputs}


def _run(world, clip, name, out):
    cfg = world["cfg"]
    return run_variant(cfg, name, variants_for(cfg, world["ablation"])[name], out / name, clip=clip,
                       memories=world["memories"], inputs=world["inputs"], steps=cfg.train.steps,
                       ablation=world["ablation"])


def test_variant_registry():
    cfg = config_lib.preset("tiny")
    table = variants_for(cfg)
    assert {"reco", "mlp", "mean", "small_memory", "image_only", "text_only",
            "cross_search_cross_fusion"} <= set(table)
    assert "train_k1" in table and table["train_k1"].train == {"k": 1}
    fields = set()
    for v in VARIANTS.values():
        fields |= {v.train.get("image_context", "v_img_txt"), v.train.get("text_context", "t_txt_img")}
    assert fields == set(ALL_FIELDS)


def test_missing_fields_is_a_clear_error(tmp_path, clip):
    rng = np.random.default_rng(0)
    v = _unit(rng.normal(size=(16, 64)))
    write_tensors(tmp_path / "neighbours" / "tensors", v=v, t=v,
                  contexts={"v_img_txt": v[:, None].repeat(2, 1), "t_txt_img": v[:, None].repeat(2, 1)})
    cfg = config_lib.preset("tiny", workdir=str(tmp_path))
    _check_fields(cfg, [VARIANTS["reco"], VARIANTS["image_only"]])
    with pytest.raises(ConfigError, match=r"lack context field\(s\) \['t_img_img', 'v_txt_txt'\].*"
                                          r"neighbours.fields="):
        _check_fields(cfg, [VARIANTS["cross_search_cross_fusion"]])


def test_variants_train_evaluate_and_report(world, clip, tmp_path):
    rows = {name: _run(world, clip, name, tmp_path)
            for name in ("reco", "mlp", "image_only", "cross_search_cross_fusion", "mean", "train_k2")}
    reco = rows["reco"]
    assert list(reco["eval"]) == ["off", "image", "text", "both"]
    assert list(rows["image_only"]["eval"]) == ["off", "image"] and rows["image_only"]["sides"] == ["image"]
    off = reco["eval"]["off"]["zeroshot"]["unseen"]["top1"]
    both = reco["eval"]["both"]["zeroshot"]["unseen"]["top1"]
    assert both > off + 20, (off, both)                  # retrieval carries the class
    mlp = rows["mlp"]["eval"]["both"]["zeroshot"]["unseen"]["top1"]
    assert mlp < both - 20, (mlp, both)                  # no retrieval: nothing to learn unseen
    assert rows["mlp"]["fusion"] == "mlp" and rows["mean"]["fusion"] == "mean"
    assert rows["cross_search_cross_fusion"]["contexts"] == {"image": "v_txt_txt", "text": "t_img_img"}
    assert set(reco["k_sweep"]) == {"1", "8"} and set(reco["memory_sweep"]) == {"full", "small"}
    assert rows["train_k2"]["k"] == 2 and set(rows["train_k2"]["k_sweep"]) == {"1", "8"}
    results = {"model_id": clip.model_id, "steps": 80, "train_k": 8, "memory_sizes": {"full": 360, "small": 36},
               "small_memory_fraction": 0.1, "n_test": 96, "variants": rows}
    write_report(tmp_path, results)
    report = (tmp_path / "report.md").read_text()
    for title in ("Table 3", "Table 4", "Fig. 3a", "Fig. 3b", "Fig. 3c"):
        assert title in report
    assert "| CLIP (frozen) |" in report and "v_txt_txt" in report
    assert markdown_report(results) == report
    again = _run(world, clip, "reco", tmp_path)          # same config: heads reused, same numbers
    assert again["train_info"].get("reused") and again["eval"] == reco["eval"]


def test_unknown_variant(world):
    from experiments.ablations import run_ablations

    with pytest.raises(ConfigError, match="ablation variant 'nope'"):
        run_ablations(world["cfg"], variants=("nope",), ablation=world["ablation"])


def test_validation_species_are_held_out_seen_species():
    from experiments.validation import validation_species

    seen = np.arange(0, 56, 2)
    val = validation_species(seen, 0.25, seed=0)
    assert len(val) == 7 and set(val) <= set(seen) and list(val) == sorted(val)
    assert list(validation_species(seen, 0.25, seed=0)) == list(val)          # deterministic
    assert list(validation_species(seen, 0.25, seed=1)) != list(val)
    assert len(validation_species(seen, 0.0, seed=0)) == 0
    assert len(validation_species(seen, 0.01, seed=0)) == 2                   # never one class
    with pytest.raises(ConfigError, match="ablation_val_fraction"):
        validation_species(seen, 1.0, seed=0)


def test_filter_tensors_drops_the_held_out_rows(tmp_path):
    from experiments.validation import filter_tensors
    from reco.trainer.data import read_tensors_info

    rng = np.random.default_rng(0)
    v = _unit(rng.normal(size=(50, 8)))
    ctx = {"v_img_txt": np.repeat(v[:, None], 3, 1), "t_txt_img": np.repeat(v[:, None], 3, 1)}
    write_tensors(tmp_path / "src", v=v, t=v, contexts=ctx, rows_per_shard=20, ids=np.arange(50) + 100)
    rows = filter_tensors(tmp_path / "src", tmp_path / "dst", np.array([100, 101, 125, 149, 7]))
    assert rows == {"rows": 46, "of": 50}
    info = read_tensors_info(tmp_path / "dst", need=("v_img_txt", "t_txt_img"))
    assert info.rows == 46 and info.fields == ("v_img_txt", "t_txt_img") and info.k == 3


def test_one_standard_error_rule_prefers_the_earliest_step_within_noise():
    from experiments.validation import pick_step

    curve = {0: 40.6, 20: 32.8, 40: 41.7, 60: 36.0}            # +1.1 over step 0: noise on 1543
    step, se = pick_step(curve, 1543)
    assert step == 0 and se == pytest.approx(100 * (0.417 * 0.583 / 1543) ** 0.5, abs=1e-3)
    assert pick_step({0: 40.6, 40: 89.6, 60: 91.2, 80: 83.8}, 1543)[0] == 60    # a real gain
    assert pick_step({0: 40.6, 40: 89.6, 60: 91.2}, 50)[0] == 40                 # few images
    assert pick_step({0: 50.0, 10: 50.0}, 10)[0] == 0                            # ties: earliest


def test_variant_keeps_the_checkpoint_best_on_validation_species(world, clip, tmp_path):
    """With validation inputs a trained variant keeps its best checkpoint on them (step 0, the
    frozen CLIP, included); the selection is reported and reused."""
    inputs = world["inputs"]
    t = inputs.test
    keep = t.labels < 40                                  # seen classes stand in for validation
    val = EvalInputs(dataclasses.replace(t, ids=t.ids[keep], image_emb=t.image_emb[keep],
                                         text_emb=t.text_emb[keep], labels=t.labels[keep],
                                         captions=[c for c, k in zip(t.captions, keep) if k],
                                         urls=[u for u, k in zip(t.urls, keep) if k]),
                     inputs.classnames, inputs.prompt_emb, {"val": np.arange(40)})
    cfg = world["cfg"]
    rows = {}
    for name in ("reco", "mlp", "mean"):
        rows[name] = run_variant(cfg, name, variants_for(cfg, world["ablation"])[name], tmp_path / name,
                                 clip=clip, memories=world["memories"], inputs=inputs, steps=cfg.train.steps,
                                 val_inputs=val, ablation=world["ablation"])
    assert "selection" not in rows["mean"]["train_info"]              # nothing to select
    for name in ("reco", "mlp"):
        sel = rows[name]["train_info"]["selection"]
        curve = {int(k): x for k, x in sel["curve"].items()}
        assert sorted(curve) == list(range(0, cfg.train.steps + 1, cfg.train.steps // 10))
        assert max(curve.values()) == sel["best_val_top1"] and curve[sel["step"]] == sel["val_top1"]
        assert sel["step"] == min(s for s, x in curve.items() if x >= sel["best_val_top1"] - sel["standard_error"])
        if sel["step"] == 0:                                          # untrained heads = CLIP
            ev = rows[name]["eval"]
            assert ev["both"]["zeroshot"] == ev["off"]["zeroshot"]
    assert rows["reco"]["train_info"]["selection"]["step"] > 0        # retrieval helps at once
    again = run_variant(cfg, "reco", variants_for(cfg, world["ablation"])["reco"], tmp_path / "reco", clip=clip,
                        memories=world["memories"], inputs=inputs, steps=cfg.train.steps, val_inputs=val,
                        ablation=world["ablation"])
    assert again["train_info"].get("reused") and again["eval"] == rows["reco"]["eval"]
    assert again["train_info"]["selection"] == rows["reco"]["train_info"]["selection"]
    results = {"model_id": clip.model_id, "steps": 80, "train_k": 8, "memory_sizes": {"full": 3200},
               "small_memory_fraction": 0.1, "n_test": 96, "variants": rows,
               "validation": {"fraction": 0.25, "species": list(range(40)), "images": len(val.test),
                              "checkpoints": 10}}
    assert "Model selection on 40 validation species" in markdown_report(results)


def test_selection_warns_and_keeps_the_last_step_when_validation_cannot_discriminate(caplog):
    from experiments.validation import choose_step, pick_step

    flat = {0: 100.0, 40: 100.0, 80: 98.3}          # frozen CLIP perfect: no room to be better
    step, _, warning = choose_step(flat, 60)
    assert pick_step(flat, 60)[0] == 0 and step == 80
    assert "cannot discriminate" in warning and "100.0%" in warning and "ablation_val_fraction" in warning
    assert "cannot discriminate" in caplog.text
    assert choose_step({0: 99.5, 40: 100.0}, 200)[2]                # headroom 0.5 < 1 SE (0.9)
    assert "validation images" in choose_step({0: 40.0, 40: 90.0}, 12)[2]   # too few images
    good = {0: 40.6, 40: 89.6, 60: 91.2, 80: 83.8}                   # room to improve: no warning
    assert choose_step(good, 1543) == (*pick_step(good, 1543), None)


def test_saturated_validation_is_reported(world, clip, tmp_path):
    """Validation images the frozen CLIP already classifies perfectly (here: the class prompts
    themselves) cannot tell checkpoints apart: the variant keeps its last step, and both the
    selection record and the report say why (the 13-species outside world of issue 20)."""
    inputs = world["inputs"]
    ids = np.arange(40)
    emb = inputs.prompt_emb[ids, 0]
    split = EmbeddedSplit(ids=ids, image_emb=emb, text_emb=emb, labels=ids,
                          captions=[""] * 40, urls=[""] * 40)
    val = EvalInputs(split, inputs.classnames, inputs.prompt_emb, {"val": ids})
    cfg = world["cfg"]
    row = run_variant(cfg, "reco", variants_for(cfg, world["ablation"])["reco"], tmp_path / "reco", clip=clip,
                      memories=world["memories"], inputs=inputs, steps=cfg.train.steps, val_inputs=val,
                      ablation=world["ablation"])
    sel = row["train_info"]["selection"]
    assert sel["curve"]["0"] == 100.0 and sel["step"] == cfg.train.steps and sel["warning"]
    results = {"model_id": clip.model_id, "steps": 80, "train_k": 8, "memory_sizes": {"full": 3200},
               "small_memory_fraction": 0.1, "n_test": 96, "variants": {"reco": row},
               "validation": {"fraction": 0.25, "species": ids.tolist(), "images": 40, "checkpoints": 10}}
    assert "**Warning (" in markdown_report(results) and "cannot discriminate" in markdown_report(results)
