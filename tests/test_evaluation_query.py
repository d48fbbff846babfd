"""`reco query`, `reco evaluate`, the gallery and RecoModel.load on a small real work directory:
real CLIP (random reco-tiny saved as local-dir), real embedded shards, real build-index, heads
saved by the trainer's checkpoint code (parameter-free mean fusion: nothing to train)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from reco import config as config_lib
from reco.formats import Manifest, atomic_write_table, embedded_schema, encode_vectors

N_CLASSES, PER_CLASS = 4, 6
COLOURS = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 220, 40)]


def _png(path, colour, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour)[None, None] + rng.integers(-30, 30, (32, 32, 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def _write_split(cfg, clip, split, labels, captions):
    from PIL import Image

    from reco.clip import encode_images, encode_texts

    world = cfg.paths.world
    rels = [f"images/{split}/{i:06d}.png" for i in range(len(labels))]
    for i, (rel, lab) in enumerate(zip(rels, labels)):
        _png(world / rel, COLOURS[lab], seed=hash((split, i)) % 2**32)
    pix = torch.stack([clip.preprocess(Image.open(world / r).convert("RGB")) for r in rels])
    img, txt = encode_images(clip, pix).numpy(), encode_texts(clip, captions).numpy()
    n, d = img.shape
    urls = [f"http://127.0.0.1:9/{r}" for r in rels]           # the world's URL list, as `reco world` writes it
    atomic_write_table(pa.table({"url": urls, "caption": captions, "label": pa.array(labels, pa.int64())}),
                       world / "urls" / f"{split}.parquet")
    table = pa.Table.from_arrays([
        pa.array(np.arange(n), pa.int64()), pa.array(urls),
        pa.array(captions), pa.array(labels, pa.int64()), pa.array(["success"] * n),
        pa.nulls(n, pa.string()), encode_vectors(img, d), encode_vectors(txt, d)], schema=embedded_schema(d))
    folder = cfg.paths.embedded(split)
    atomic_write_table(table, folder / "part-00000.parquet")
    Manifest(kind="embedded", shards=["part-00000.parquet"], counts={"success": n},
             info={"model_id": clip.model_id, "dim": d, "rows": n}).write(folder)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from reco.clip import load_clip, save_local_dir
    from reco.index.build import build_memory_index
    from reco.trainer.checkpoint import save_heads
    from reco.trainer.config import TrainConfig
    from reco.trainer.heads import build_head

    root = tmp_path_factory.mktemp("query_work")
    torch.manual_seed(0)
    spec = save_local_dir(load_clip("reco-tiny").model, "reco-tiny", root / "clip")
    cfg = config_lib.preset("tiny", workdir=str(root / "work"))
    cfg = config_lib.override(cfg, [f"clip.model={spec}"])
    clip = load_clip(spec)
    names = ["velar thornwick", "brea fin", "skol mere", "drun lark"]
    mem_labels = np.repeat(np.arange(N_CLASSES), PER_CLASS)
    mem_caps = [f"a photo of a {names[c]} number {i}" for i, c in enumerate(mem_labels)]
    _write_split(cfg, clip, "memory", mem_labels, mem_caps)
    test_labels = np.repeat(np.arange(N_CLASSES), 2)
    _write_split(cfg, clip, "test", test_labels, [f"a photo of a {names[c]}." for c in test_labels])
    (cfg.paths.world / "classnames.txt").write_text("\n".join(names) + "\n")
    (cfg.paths.world / "species.json").write_text(json.dumps({"seen": [0, 1], "unseen": [2, 3]}))
    cfg = config_lib.override(cfg, ["neighbours.eval_dedup_threshold=1.5"])   # keep all memory
    build_memory_index(cfg)
    tc = dataclasses.replace(TrainConfig(), fusion="mean", k=3)
    heads = {s: build_head("mean", clip.embed_dim) for s in ("image", "text")}
    save_heads(cfg.paths.heads, heads, {"train": dataclasses.asdict(tc), "dim": clip.embed_dim, "k": 3,
                                        "fusion": "mean", "model_id": clip.model_id,
                                        "clip": clip.spec(cfg.paths.heads)})   # as reco train writes
    return cfg, clip, mem_caps


def test_query_text_and_image(workdir):
    from reco.evaluation.query import format_rows, run_query

    cfg, clip, caps = workdir
    rows, info = run_query(cfg, text=caps[7], k=4)
    assert info["index"] == "txt" and info["memory_size"] == len(caps) and len(rows) == 4
    assert rows[0]["id"] == 7 and rows[0]["caption"] == caps[7] and rows[0]["score"] > 0.99
    assert rows[0]["url"].endswith("images/memory/000007.png") and rows[0]["label"] == 1
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert all(a["score"] >= b["score"] for a, b in zip(rows, rows[1:]))
    img = cfg.paths.world / "images" / "memory" / "000013.png"
    rows, info = run_query(cfg, image=img, k=3)
    assert info["index"] == "img" and rows[0]["id"] == 13 and rows[0]["score"] > 0.99
    rows, info = run_query(cfg, image=img, k=3, index="txt")
    assert info["index"] == "txt" and len(rows) == 3
    text = format_rows(rows, info)
    assert "txt index" in text and rows[0]["caption"] in text


def test_query_cli(workdir, capsys):
    from reco.cli import main

    cfg, _, caps = workdir
    base = ["query", "--preset", "tiny", "--workdir", cfg.workdir, "--model", cfg.clip.model]
    assert main(base + ["--text", caps[2], "--k", "2"]) == 0
    out = capsys.readouterr().out
    assert caps[2] in out and "rank" in out
    assert main(base + ["--text", caps[2], "--k", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["neighbours"][0]["id"] == 2 and len(data["neighbours"]) == 2
    assert main(base + ["--image", str(cfg.paths.world / "nope.png")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_evaluate_end_to_end(workdir):
    from reco.evaluation.evaluate import evaluate

    cfg, clip, _ = workdir
    results = evaluate(cfg, k=2)
    assert list(results["modes"]) == ["off", "image", "text", "both"]
    assert results["k"] == 2 and results["train_k"] == 3 and results["memory_size"] == 24
    zs = results["modes"]["both"]["zeroshot"]
    assert zs["all"]["n"] == 8 and zs["seen"]["n"] == 4 and zs["unseen"]["n"] == 4
    out = cfg.paths.eval
    assert json.loads((out / "results.json").read_text())["n_classes"] == 4
    assert "| reco both" in (out / "report.md").read_text()
    assert (out / "zeroshot.png").stat().st_size > 1000
    page = (out / "gallery.html").read_text()
    assert "data:image/png;base64," in page and "velar thornwick" in page and "(unseen)" in page
    # every query's CLIP and reco predictions are marked right or wrong
    marks = page.count("class='right'") + page.count("class='wrong'")
    assert marks == 2 * page.count("true: <b>") > 0


def test_gallery_marks_predictions_right_or_wrong():
    from reco.evaluation.gallery import verdict

    names = ["velar thornwick", "a <b>"]
    assert verdict(0, 0, names).startswith("<span class='right'") and "&#10003; velar" in verdict(0, 0, names)
    wrong = verdict(1, 0, names)
    assert wrong.startswith("<span class='wrong'") and "&#10007;" in wrong and "a &lt;b&gt;" in wrong


def test_evaluate_cli_with_image_folder(workdir, tmp_path, capsys):
    from reco.cli import main

    cfg, _, _ = workdir
    for c, colour in enumerate(COLOURS[:3]):
        for j in range(2):
            _png(tmp_path / "folder" / f"class_{c}" / f"{j}.png", colour, seed=100 + j)
    (tmp_path / "names.txt").write_text("velar thornwick\nbrea fin\nskol mere\n")
    argv = ["evaluate", "--preset", "tiny", "--workdir", cfg.workdir, "--model", cfg.clip.model,
            "--modes", "off,both", "--image-folder", str(tmp_path / "folder"),
            "--classnames", str(tmp_path / "names.txt"), "--no-gallery"]
    assert main(argv) == 0
    assert "| CLIP (frozen) |" in capsys.readouterr().out
    res = json.loads((cfg.paths.eval / "results.json").read_text())
    assert res["modes"]["both"]["image_folder"]["all"]["n"] == 6
    assert main(argv[:-5] + ["--modes", "off,sideways"]) == 2
    assert "sideways" in capsys.readouterr().err


def test_reco_model_load_from_workdir(workdir):
    from reco.model import RecoModel, load_model

    cfg, clip, _ = workdir
    model = RecoModel.load(cfg.workdir, mode="text", k=5)
    assert model.mode == "text" and model.k == 5 and model.fusion == "mean"
    assert model.model_id == clip.model_id and len(model.memory.ids) == 24
    tokens = model.tokenizer(["a photo of a brea fin."])
    with torch.no_grad():
        assert model.encode_text(tokens).shape == (1, clip.embed_dim)
    again = load_model(cfg.paths.heads, memory_dir=cfg.paths.index)
    assert again.mode == "both"
    import reco

    top_level = reco.load_model(cfg.workdir, mode="image")     # the one-call entry point
    assert top_level.mode == "image" and top_level.model_id == clip.model_id


def test_evaluate_cli_uses_the_runs_recorded_config_without_preset(workdir, tmp_path, capsys, monkeypatch):
    """Issue 16: `reco evaluate --workdir W` on a tiny run uses the run's config, no --preset."""
    import shutil

    from reco import config_tree
    from reco.cli import main

    monkeypatch.delenv("RECO_PRESET", raising=False)
    cfg, _, _ = workdir
    run = tmp_path / "run"
    shutil.copytree(cfg.workdir, run)
    config_tree.save_recorded(dataclasses.replace(cfg, workdir=str(run)))    # as its first stage did
    assert main(["evaluate", "--workdir", str(run), "--modes", "off,both", "--no-gallery"]) == 0
    capsys.readouterr()
    res = json.loads((run / "eval" / "results.json").read_text())
    assert res["memory_size"] == 24 and list(res["modes"]) == ["off", "both"]
    assert config_tree.load_recorded(run) == dataclasses.replace(cfg, workdir=str(run))
    # the demo preset on it is refused instead of silently evaluating another configuration
    assert main(["evaluate", "--preset", "demo", "--workdir", str(run)]) == 2
    assert "'tiny' run" in capsys.readouterr().err
