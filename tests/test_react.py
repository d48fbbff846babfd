"""REACT: gated blocks (exact start, frozen weights, save/load), retrieval of the customisation set,
image sources, training and zero-shot evaluation on a small synthetic stand-in world."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from reco.clip import load_clip, save_local_dir
from reco.errors import ConfigError, FormatError, MismatchError
from reco.react import images
from reco.react.gated import (GatedResidualBlock, customise, gated_blocks, load_gated, save_gated,
                              trainable_parameters)
from reco.react.model import ReactModel
from reco.react.retrieve import read_customisation_set, retrieve_customisation_set
from reco.react.train import ReactTrainConfig, react_train
from tests.react_stand_in import CLASSNAMES, make_world


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny model trains fastest on one thread (and the test machine's cores are shared)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A random-init reco-tiny saved as a local dir (as the world saves its base CLIP)."""
    torch.manual_seed(0)
    spec = save_local_dir(load_clip("reco-tiny").model, "reco-tiny", tmp_path_factory.mktemp("base"))
    clip = load_clip(spec)
    clip.model.requires_grad_(False)          # the frozen CLIP (as load_frozen_clip gives it)
    return clip


@pytest.fixture(scope="module")
def world(tmp_path_factory, clip):
    return make_world(tmp_path_factory.mktemp("react"), clip)


def _perturb(model, scale=0.5):
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(scale * torch.randn_like(p))


# --------------------------------------------------------------------------------------------
# gated blocks
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["copy", "random"])
def test_customised_model_starts_exactly_as_frozen_clip(clip, init):
    n = len(clip.model.visual.transformer.resblocks)
    model = customise(clip.model, 2, init=init)
    blocks = model.visual.transformer.resblocks
    assert [type(b).__name__ for b in blocks] == ["ResidualAttentionBlock"] * (n - 2) + [
        "GatedResidualBlock", "ResidualAttentionBlock"] * 2
    x = torch.randn(5, 3, 32, 32)
    tokens = clip.tokenizer(["a photo of a red finch.", "a bird"])
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), clip.model.encode_image(x))
        assert torch.equal(model.encode_text(tokens), clip.model.encode_text(tokens))
    # with autograd on, torch's attention fast path differs in the last bits only
    torch.testing.assert_close(model.encode_image(x), clip.model.encode_image(x), atol=1e-6, rtol=0)


def test_only_gated_parameters_require_grad(clip):
    model = customise(clip.model, 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".resblocks." in n for n in trainable)
    gated_names = {f"visual.transformer.resblocks.{i}.{n}"
                   for i, b in enumerate(model.visual.transformer.resblocks)
                   if isinstance(b, GatedResidualBlock) for n, _ in b.named_parameters()}
    assert trainable == gated_names
    assert len(gated_blocks(model)) == 2 and not gated_blocks(clip.model)   # input not modified
    assert not any(p.requires_grad for p in clip.model.parameters())
    assert not model.logit_scale.requires_grad
    # gradients reach the gates (and nothing else) from an image loss
    model.encode_image(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(b.alpha_attn.grad is not None for b in gated_blocks(model))
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_customise_refuses_bad_k_and_double_customisation(clip):
    n = len(clip.model.visual.transformer.resblocks)
    with pytest.raises(ConfigError, match=f"k_blocks={n + 1}"):
        customise(clip.model, n + 1)
    model = customise(clip.model, 1)
    with pytest.raises(ConfigError, match="already REACT-customised"):
        customise(model, 1)


def test_save_load_round_trip(tmp_path, clip):
    model = customise(clip.model, 2)
    _perturb(model)
    save_gated(model, tmp_path, extra={"model_id": clip.model_id})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gated.json", "gated.safetensors"]
    again = load_gated(clip.model, tmp_path, model_id=clip.model_id)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again.encode_image(x), model.encode_image(x))
        assert not torch.equal(again.encode_image(x), clip.model.encode_image(x))
    with pytest.raises(MismatchError, match="not on 'other"):
        load_gated(clip.model, tmp_path, model_id="other|x")
    meta = json.loads((tmp_path / "gated.json").read_text())
    meta["format"] = "pickle"
    (tmp_path / "gated.json").write_text(json.dumps(meta))
    with pytest.raises(FormatError, match="format 'pickle'"):
        load_gated(clip.model, tmp_path)


# --------------------------------------------------------------------------------------------
# image sources
# --------------------------------------------------------------------------------------------

def test_world_urls_map_to_world_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "world"
    (root / "urls").mkdir(parents=True)
    urls = [f"http://127.0.0.1:5/images/memory/{i:06d}.png" for i in range(124)]
    pq.write_table(pa.table({"url": urls}), root / "urls" / "memory.parquet")
    assert images.world_file(root, "http://127.0.0.1:5/images/memory/000123.png") == \
        (root / "images/memory/000123.png").resolve()
    with pytest.raises(FormatError, match="not name a file under the world"):
        images.world_file(root, "http://h/../../etc/passwd")
    with pytest.raises(ConfigError, match="choose one of embedded, webdataset, world"):
        images.get_source("s3")


def test_embedded_source_without_image_column_is_a_clear_error(world):
    cfg, _, rows = world
    import pyarrow as pa

    table = pa.Table.from_pylist([{"url": rows[0]["url"], "memory_id": rows[0]["id"]}])
    with pytest.raises(FormatError, match="no 'image' column.*--image-source world"):
        images.load_pixels(cfg, table, lambda im: im, source="embedded")


# --------------------------------------------------------------------------------------------
# retrieval
# --------------------------------------------------------------------------------------------

def test_retrieval_writes_per_class_sets_without_duplicates(world, clip):
    cfg, memory, rows = world
    by_id = {r["id"]: r for r in rows}
    table, info = retrieve_customisation_set(cfg, CLASSNAMES, ("a photo of a {}.",), per_class=5,
                                             memory=memory, clip=clip)
    assert table.equals(read_customisation_set(cfg.paths.react / "customisation.parquet"))
    assert (cfg.paths.react / "retrieval.json").is_file()
    ids = table.column("memory_id").to_pylist()
    assert len(ids) == len(set(ids)) == table.num_rows
    assert set(info["per_class_counts"]) == set(CLASSNAMES)
    assert all(n <= 5 for n in info["per_class_counts"].values())
    assert sum(info["per_class_counts"].values()) == table.num_rows
    for row in table.to_pylist():                  # joined back to the right memory rows
        mem = by_id[row["memory_id"]]
        assert (row["url"], row["caption"], row["memory_label"]) == (mem["url"], mem["caption"], mem["label"])
        assert row["classname"] == CLASSNAMES[row["class_id"]]
    # the exact caption "a photo of a <name>." is each class's best hit (score 1 in the txt index)
    for cls in range(len(CLASSNAMES)):
        best = max((r for r in table.to_pylist() if r["class_id"] == cls), key=lambda r: r["score"])
        assert best["caption"] == f"a photo of a {CLASSNAMES[cls]}." and best["search"] == "txt"
        assert best["score"] == pytest.approx(1.0, abs=2e-3)


def test_retrieval_text_only_search_is_exact_and_refuses_other_models(world, clip, tmp_path):
    cfg, memory, _ = world
    out = tmp_path / "set.parquet"
    table, info = retrieve_customisation_set(cfg, CLASSNAMES, ("a photo of a {}.",), per_class=4,
                                             searches=("txt",), memory=memory, clip=clip, out=out)
    assert out.is_file() and (tmp_path / "set.json").is_file()
    assert info["label_precision"] == 1.0 and info["min_count"] == info["max_count"] == 4
    # an evaluation image that duplicates a retrieved memory image keeps that item out
    first = table.column("memory_id")[0].as_py()
    dup = memory.image_emb[list(memory.ids).index(first)][None].astype(np.float32)
    again, info = retrieve_customisation_set(cfg, CLASSNAMES, ("a photo of a {}.",), per_class=4,
                                             searches=("txt",), memory=memory, clip=clip, out=out,
                                             eval_image_emb=dup)
    assert info["eval_duplicates_excluded"] >= 1 and first not in again.column("memory_id").to_pylist()
    assert set(again.column("memory_id").to_pylist()) <= set(memory.ids.tolist())
    memory.model_id, saved = "ViT-B-32|openai", memory.model_id
    try:
        with pytest.raises(MismatchError, match="memory embedded with 'ViT-B-32"):
            retrieve_customisation_set(cfg, CLASSNAMES, per_class=2, memory=memory, clip=clip, out=out)
    finally:
        memory.model_id = saved


# --------------------------------------------------------------------------------------------
# training, model loading, evaluation
# --------------------------------------------------------------------------------------------

def test_react_train_improves_zero_shot_on_stand_in_world(world, clip, tmp_path):
    """Frozen random-init CLIP is at chance; 120 steps of gated tuning learn the classes."""
    cfg, memory, _ = world
    retrieve_customisation_set(cfg, CLASSNAMES, ("a photo of a {}.",), per_class=10,
                               searches=("txt",), memory=memory, clip=clip)
    before = {n: p.clone() for n, p in clip.model.state_dict().items()}
    out = tmp_path / "react"
    info = react_train(cfg, out_dir=out, clip=clip, options=ReactTrainConfig(
        k_blocks=2, steps=120, batch_size=32, lr=2e-3, warmup_steps=10, checkpoint_every=60,
        image_source="world"))
    assert all(torch.equal(before[n], p) for n, p in clip.model.state_dict().items())
    assert info["final_loss"] < info["first_loss"]
    assert any(abs(g["attn"]) > 0 or abs(g["mlp"]) > 0 for g in info["gates"])
    assert (out / "checkpoints" / "step-000060" / "model.safetensors").is_file()
    zs = info["zeroshot"]
    print("stand-in world zero-shot top1: frozen", zs["frozen"]["all"]["top1"],
          "react", zs["react"]["all"]["top1"])
    assert zs["react"]["all"]["top1"] >= zs["frozen"]["all"]["top1"] + 25
    assert json.loads((out / "eval.json").read_text())["react"]["all"]["top1"] == zs["react"]["all"]["top1"]

    loaded = ReactModel.load(out)                      # one call, from the folder alone
    x = torch.randn(4, 3, 32, 32)
    tokens = loaded.tokenizer(["a photo of a red finch."])
    react = ReactModel.load(out, clip=clip)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), react.encode_image(x))
        assert torch.equal(loaded.encode_text(tokens), clip.model.encode_text(tokens))
        img, txt, scale = loaded(x, tokens)
    assert img.shape == (4, 64) and txt.shape == (1, 64) and scale > 0
    assert loaded.preprocess is not None


def test_react_train_refuses_bad_options(world, clip):
    cfg, _, _ = world
    with pytest.raises(ConfigError, match="steps=0"):
        react_train(cfg, steps=0, clip=clip)
    with pytest.raises(ConfigError, match="image source 'web'"):
        react_train(cfg, options=ReactTrainConfig(image_source="web"), clip=clip)


def test_cli_commands(world, clip, tmp_path, monkeypatch):
    """react-retrieve / react-train through reco.cli (memory injected in place of the index)."""
    from reco import cli
    from reco.react import retrieve

    cfg, memory, _ = world
    monkeypatch.setattr(retrieve, "load_memory", lambda cfg: memory)
    monkeypatch.setattr(retrieve, "load_frozen_clip", lambda cfg: clip)
    common = ["--preset", "tiny", "--workdir", cfg.workdir]
    assert cli.main(["react-retrieve", *common, "--per-class", "3"]) == 0
    set_path = cfg.paths.react / "customisation.parquet"
    assert pq.read_table(set_path).num_rows <= 3 * len(CLASSNAMES)
    out = tmp_path / "m"
    assert cli.main(["react-train", *common, "--set", "react.steps=3", "--set", "react.batch_size=8",
                     "--set", "react.image_source=world", "--no-eval", "--out", str(out)]) == 0
    assert (out / "gated.safetensors").is_file() and (out / "train.json").is_file()
    assert cli.main(["react-train", *common, "--set", "react.steps=0"]) == 2

