"""Evaluation metrics against hand-computed values; evaluation plumbing on in-test data."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from reco.errors import FormatError
from reco.evaluation.data import image_folder_labels, load_embedded, read_classnames, read_groups
from reco.evaluation.evaluate import EvalInputs, evaluate_model, markdown_report, write_outputs
from reco.evaluation.retrieval import recall_at_k, retrieval_metrics
from reco.evaluation.zeroshot import (class_embeddings, format_prompt, image_folder_inputs,
                                      zeroshot_metrics)
from reco.formats import Manifest, atomic_write_table, embedded_schema, encode_vectors
from reco.model import RecoModel
from tests.test_model import ArrayMemory


def test_zeroshot_metrics_hand_computed():
    classes = np.eye(3, dtype=np.float32)[:, :3]
    # rows: scores against classes 0,1,2 are the image vector itself
    images = np.array([[0.9, 0.1, 0.0],    # label 0 -> pred 0  (hit)
                       [0.2, 0.7, 0.1],    # label 1 -> pred 1  (hit)
                       [0.6, 0.3, 0.1],    # label 1 -> pred 0  (miss), 1 is 2nd
                       [0.5, 0.1, 0.4],    # label 2 -> pred 0  (miss), 2 is 2nd
                       [0.0, 0.1, 0.9]],   # label 2 -> pred 2  (hit)
                      dtype=np.float32)
    labels = np.array([0, 1, 1, 2, 2])
    m = zeroshot_metrics(images, labels, classes, {"seen": np.array([0, 1]), "unseen": np.array([2])})
    assert m["all"]["top1"] == pytest.approx(60.0)
    assert m["all"]["top5"] == pytest.approx(100.0)               # only 3 classes
    assert m["all"]["mean_per_class_recall"] == pytest.approx(100 * (1 + 0.5 + 0.5) / 3)
    assert m["seen"]["top1"] == pytest.approx(100 * 2 / 3) and m["seen"]["n"] == 3
    assert m["unseen"]["top1"] == pytest.approx(50.0) and m["unseen"]["n"] == 2
    # each group as a data set of its own: its images among its classes only
    assert m["seen_among_seen"]["top1"] == pytest.approx(100 * 2 / 3)
    assert m["unseen_among_unseen"]["top1"] == 100.0 and m["unseen_among_unseen"]["top5"] == 100.0
    # unlabelled rows (-1) are skipped
    m2 = zeroshot_metrics(np.vstack([images, images[:1]]), np.append(labels, -1), classes)
    assert m2["all"]["n"] == 5 and m2["all"]["top1"] == pytest.approx(60.0)


def test_top5_with_many_classes():
    scores_rank = np.arange(10)[::-1].astype(np.float32)      # class 0 best ... class 9 worst
    images = np.tile(scores_rank, (10, 1))
    classes = np.eye(10, dtype=np.float32)
    labels = np.arange(10)
    m = zeroshot_metrics(images, labels, classes)["all"]
    assert m["top1"] == pytest.approx(10.0) and m["top5"] == pytest.approx(50.0)
    assert m["mean_per_class_recall"] == pytest.approx(10.0)


def test_recall_at_k_hand_computed():
    scores = np.array([[0.9, 0.8, 0.1],     # query 0: positive 0 ranked 1st
                       [0.9, 0.1, 0.5],     # query 1: positive 1 ranked 3rd
                       [0.1, 0.9, 0.5]])    # query 2: positive 2 ranked 2nd
    r = recall_at_k(scores, np.eye(3, dtype=bool), ks=(1, 2, 3))
    assert r == {"R@1": pytest.approx(100 / 3), "R@2": pytest.approx(200 / 3), "R@3": 100.0}


def test_retrieval_counts_identical_captions_as_correct():
    img = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)
    txt = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)
    diag = retrieval_metrics(img, txt, None, ks=(1,))
    same = retrieval_metrics(img, txt, ["a cat", "a cat", "a dog"], ks=(1,))
    assert diag["image_to_text"]["R@1"] == pytest.approx(200 / 3)   # tie: image 1 gets text 0
    assert same["image_to_text"]["R@1"] == 100.0 and same["text_to_image"]["R@1"] == 100.0


def test_prompts_and_class_embeddings():
    assert format_prompt("a photo of a {}.", "velar thornwick") == "a photo of a velar thornwick."
    assert format_prompt("a {c}!", "x") == "a x!"
    prompts = np.array([[[1, 0], [0, 1]], [[1, 0], [1, 0]]], dtype=np.float32)   # (C=2, T=2, d=2)
    cls = class_embeddings(prompts)
    assert np.allclose(cls, [[2 ** -0.5, 2 ** -0.5], [1, 0]], atol=1e-6)
    flipped = class_embeddings(prompts, refine=lambda x: x[:, ::-1])
    assert np.allclose(flipped, [[2 ** -0.5, 2 ** -0.5], [0, 1]], atol=1e-6)


# ------------------------------------------------------------------------------------------
# a small world of "concepts": the memory's texts carry the class, CLIP's own image does not
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip():
    from reco.clip import load_clip

    torch.manual_seed(0)
    return load_clip("reco-tiny")


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def concept_world(clip):
    """8 classes. Test images: noisy views of an 'image concept'; memory images are close to
    the image concept and their texts equal the class prompt embedding, so retrieving the
    images' neighbours' texts (v_img_txt) and averaging (mean fusion) names the class."""
    rng = np.random.default_rng(0)
    d, c = clip.embed_dim, 8
    prompts = _unit(rng.normal(size=(c, 1, d))).astype(np.float32)
    img_concept = _unit(rng.normal(size=(c, d)))
    mem_labels = np.repeat(np.arange(c), 20)
    mem_img = _unit(img_concept[mem_labels] + 0.3 * rng.normal(size=(len(mem_labels), d)) / np.sqrt(d))
    mem_txt = prompts[mem_labels, 0]
    test_labels = np.repeat(np.arange(c), 10)
    test_img = _unit(img_concept[test_labels] + 0.5 * rng.normal(size=(len(test_labels), d)) / np.sqrt(d))
    test_txt = prompts[test_labels, 0]
    memory = ArrayMemory(mem_img, mem_txt, clip.model_id)
    return dict(prompts=prompts, test_img=test_img.astype(np.float32), test_txt=test_txt,
                test_labels=test_labels, memory=memory, classes=c)


def _mean_model(clip, memory, k=5):
    from reco.trainer.heads import build_head

    heads = {s: build_head("mean", clip.embed_dim) for s in ("image", "text")}
    meta = {"train": {"fusion": "mean", "image_context": "v_img_txt", "text_context": "t_txt_img",
                      "k": k}, "dim": clip.embed_dim, "k": k, "model_id": clip.model_id}
    return RecoModel(clip, memory, heads, meta, mode="off")


def _split(w):
    from reco.evaluation.data import EmbeddedSplit

    n = len(w["test_labels"])
    return EmbeddedSplit(ids=np.arange(n), image_emb=w["test_img"], text_emb=w["test_txt"],
                         labels=w["test_labels"], captions=[f"c{i}" for i in w["test_labels"]],
                         urls=[""] * n)


def test_evaluate_model_modes_on_concept_world(clip, concept_world):
    w = concept_world
    model = _mean_model(clip, w["memory"])
    groups = {"seen": np.arange(4), "unseen": np.arange(4, 8)}
    inputs = EvalInputs(_split(w), [f"class {i}" for i in range(8)], w["prompts"], groups)
    res = evaluate_model(model, inputs, ("off", "image", "text", "both"))
    assert list(res) == ["off", "image", "text", "both"]
    off = zeroshot_metrics(w["test_img"], w["test_labels"], class_embeddings(w["prompts"]), groups)
    assert res["off"]["zeroshot"] == off
    assert res["off"]["zeroshot"]["all"]["top1"] < 40            # image concept unrelated to text
    assert res["image"]["zeroshot"]["all"]["top1"] > 90          # neighbours' texts name the class
    assert res["image"]["zeroshot"]["unseen"]["n"] == 40
    for mode in res:
        assert set(res[mode]["retrieval"]) == {"image_to_text", "text_to_image"}
    assert model.mode == "off"                                   # restored


def test_evaluate_model_skips_modes_without_heads(clip, concept_world):
    model = _mean_model(clip, concept_world["memory"])
    del model.heads["text"]
    inputs = EvalInputs(_split(concept_world), [str(i) for i in range(8)], concept_world["prompts"], {})
    assert list(evaluate_model(model, inputs, ("off", "image", "text", "both"))) == ["off", "image"]


def test_outputs_report_and_chart(tmp_path, clip, concept_world):
    model = _mean_model(clip, concept_world["memory"])
    inputs = EvalInputs(_split(concept_world), [str(i) for i in range(8)], concept_world["prompts"],
                        {"seen": np.arange(4), "unseen": np.arange(4, 8)})
    results = {"model_id": clip.model_id, "memory": "m", "memory_size": 160, "k": 5, "train_k": 5,
               "fusion": "mean", "n_test": 80, "n_classes": 8, "image_folder": None,
               "modes": evaluate_model(model, inputs, ("off", "both"))}
    write_outputs(tmp_path, results)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["modes"]["both"]["zeroshot"]["unseen"]["n"] == 40
    report = (tmp_path / "report.md").read_text()
    assert "| CLIP (frozen) |" in report and "unseen top-1" in report
    assert (tmp_path / "zeroshot.png").read_bytes()[:4] == b"\x89PNG"
    assert markdown_report(results) == report


# ------------------------------------------------------------------------------------------
# inputs: embedded shards, class names, groups, image folders
# ------------------------------------------------------------------------------------------

def _write_embedded(folder, emb, labels, captions, status=None, model_id="m|"):
    n, d = emb.shape
    status = status or ["success"] * n
    ok = [s == "success" for s in status]
    schema = embedded_schema(d)
    # zero vectors, not nulls, where status != success (as the embed job writes them)
    masked = encode_vectors(np.where(np.array(ok)[:, None], emb, 0), d)
    table = pa.Table.from_arrays([
        pa.array(np.arange(n), pa.int64()), pa.array([f"http://x/{i}.png" for i in range(n)]),
        pa.array(captions), pa.array(labels, pa.int64()), pa.array(status), pa.array([None] * n, pa.string()),
        masked, masked], schema=schema)
    atomic_write_table(table, folder / "part-00000.parquet")
    Manifest(kind="embedded", shards=["part-00000.parquet"], counts={"rows": n},
             info={"model_id": model_id}).write(folder)


def test_load_embedded_keeps_successes(tmp_path):
    from reco.errors import MismatchError

    emb = _unit(np.random.default_rng(0).normal(size=(4, 8))).astype(np.float32)
    _write_embedded(tmp_path, emb, [0, 1, None, 2], ["a", "b", "c", "d"],
                    status=["success", "failed_to_download", "success", "success"])
    split = load_embedded(tmp_path, model_id="m|")
    assert split.ids.tolist() == [0, 2, 3] and split.labels.tolist() == [0, -1, 2]
    assert split.captions == ["a", "c", "d"]
    assert np.allclose(split.image_emb, emb[[0, 2, 3]], atol=2e-3)
    with pytest.raises(MismatchError, match="embedded with"):
        load_embedded(tmp_path, model_id="other|")


def test_classnames_and_groups(tmp_path):
    (tmp_path / "c.txt").write_text("velar thornwick\nbrea fin\n\n")
    assert read_classnames(tmp_path / "c.txt") == ["velar thornwick", "brea fin"]
    (tmp_path / "bad.txt").write_text("a\n\nb\n")
    with pytest.raises(FormatError, match="line 2 is empty"):
        read_classnames(tmp_path / "bad.txt")
    assert read_groups(tmp_path) == {}
    (tmp_path / "species.json").write_text(json.dumps({"seen": [0, 2], "unseen": [1]}))
    g = read_groups(tmp_path)
    assert g["seen"].tolist() == [0, 2] and g["unseen"].tolist() == [1]


def _image_folder(root, classes, per_class=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    for ci, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            arr = np.full((32, 32, 3), 40 * ci, dtype=np.uint8) + rng.integers(0, 20, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{j}.png")
    (root / classes[0] / "notes.txt").write_text("not an image")


def test_image_folder_labels(tmp_path):
    _image_folder(tmp_path / "named", ["red_circle", "blue_square"])
    files, labels, names = image_folder_labels(tmp_path / "named", None)
    assert len(files) == 6 and names == ["blue square", "red circle"]
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    _image_folder(tmp_path / "ids", ["2", "0"])
    files, labels, names = image_folder_labels(tmp_path / "ids", ["a", "b", "c"])
    assert sorted(set(labels.tolist())) == [0, 2] and names == ["a", "b", "c"]
    with pytest.raises(FormatError, match="class-name file"):
        image_folder_labels(tmp_path / "ids", None)
    with pytest.raises(FormatError, match="2 class folders but 3"):
        image_folder_labels(tmp_path / "named", ["a", "b", "c"])


@torch.no_grad()
def test_image_folder_zeroshot_matches_manual_clip(tmp_path, clip, concept_world):
    from reco.evaluation.zeroshot import encode_prompts, evaluate_zeroshot

    _image_folder(tmp_path, ["cat", "dog", "fish"], per_class=4)
    imgs, labels, names = image_folder_inputs(clip, tmp_path, None, batch_size=5)
    assert imgs.shape == (12, clip.embed_dim) and names == ["cat", "dog", "fish"]
    prompts = encode_prompts(clip, names, ("a photo of a {}.", "a {}."))
    model = _mean_model(clip, concept_world["memory"])
    got = evaluate_zeroshot(model, imgs, labels, prompts)
    # by hand, with the model's own open_clip calls
    from PIL import Image

    files = sorted(tmp_path.glob("*/*.png"))
    pix = torch.stack([clip.preprocess(Image.open(f).convert("RGB")) for f in files])
    feats = torch.nn.functional.normalize(model.encode_image(pix), dim=-1).numpy()
    w = []
    for name in names:
        t = torch.nn.functional.normalize(
            model.encode_text(clip.tokenizer([f"a photo of a {name}.", f"a {name}."])), dim=-1).mean(0)
        w.append((t / t.norm()).numpy())
    pred = (feats @ np.stack(w).T).argmax(1)
    assert got["all"]["top1"] == pytest.approx(100 * float((pred == labels).mean()))
