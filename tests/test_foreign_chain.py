"""The whole chain from foreign data alone (slow; issue 15).

The tiny world is exported into the formats of the field (tests/foreign.py): its memory as a
clip-retrieval release (npy + parquet, 4 parts) put on a ``memory://`` bucket, its training pairs
and its test images as img2dataset webdataset downloads, its base CLIP as an open_clip
``local-dir:`` checkpoint folder copied out of the run, its test images as an ImageFolder with
class-name and template files and in CLIP_benchmark's webdataset layout. Then, in one process
(the bucket lives there): import-embeddings (bucket to bucket), embed-memory (webdataset to
bucket), build-index, precompute-neighbours and train (each reading its input from the bucket
and publishing its output there), evaluate on the ImageFolder; and in another, CLIP_benchmark's
own command line on the run (``reco-clip-benchmark eval --model_type reco``). Neither process
imports ``reco.world``.

Where the embeddings are the world path's own (the memory, exported and imported), the index
and the neighbours are the world path's; the numbers from images embedded afresh (zero-shot
top-1 on the ImageFolder, CLIP_benchmark's acc1) are within one standard error of the world
path's evaluation of the same images (``reco evaluate`` on the embedded test split).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reco.formats import Manifest, decode_block
from tests.foreign import (BIN, run_reco, run_watched, world_samples, write_clip_benchmark_wds,
                           write_image_folder, write_release, write_webdataset)

pytestmark = pytest.mark.slow
BUCKET = "memory://foreign-chain/reco"
ON_BUCKET = ("index", "neighbours", "heads", "eval")        # stage outputs fetched back from it


def standard_error(top1: float, n: int) -> float:
    """One standard error of a top-1 accuracy of ``n`` images, in percentage points."""
    p = top1 / 100
    return 100 * math.sqrt(p * (1 - p) / n)


def _tensors(folder) -> dict:
    manifest = Manifest.read(folder, kind="tensors")
    table = pa.concat_tables([pq.read_table(p) for p in manifest.shard_paths(folder)])
    dim, k = manifest.info["dim"], manifest.info["k"]
    order = np.argsort(table.column("id").to_numpy())
    out = {"id": table.column("id").to_numpy()[order]}
    for name in ("v", "t", "v_img_txt", "t_txt_img"):
        out[name] = decode_block(table.column(name), dim, 1 if name in "vt" else k)[order].astype(np.float32)
    return out


def _test_images(cfg) -> list[tuple[Path, int]]:
    """(image file, label) of every test row whose image exists (the embedded split's rows)."""
    from reco.react.images import world_file

    rows = pq.read_table(cfg.paths.urls("test"), columns=["url", "label"]).to_pylist()
    found = [(world_file(cfg.paths.world, r["url"]), r["label"]) for r in rows]
    return [(path, label) for path, label in found if path.is_file()]


@pytest.fixture(scope="module")
def exported(tiny_trained, tmp_path_factory):
    """(cfg, root, data folder, test images): the world in foreign formats under ``data``."""
    cfg = tiny_trained
    root = tmp_path_factory.mktemp("foreign_chain")
    data = root / "data"
    write_release(cfg.paths.embedded("memory"), data / "release", 4)
    write_webdataset(world_samples(cfg, "train"), data / "train-wds", 1000)
    write_webdataset(world_samples(cfg, "test"), data / "test-wds", 1000)   # eval duplicates
    shutil.copytree(cfg.paths.base_clip, data / "clip")
    images = _test_images(cfg)
    write_image_folder(data / "folder", images)
    names = (cfg.paths.world / "classnames.txt").read_text()
    templates = "".join(t.replace("{}", "{c}") + "\n" for t in cfg.eval.templates)
    (data / "classnames.txt").write_text(names)
    (data / "templates.txt").write_text(templates)
    write_clip_benchmark_wds(data / "wds", images, names, templates)
    return cfg, root, data, images


@pytest.fixture(scope="module")
def foreign_run(exported):
    """The chain in one process; its bucket's outputs fetched into ``root/bucket``."""
    _, root, data, _ = exported
    b, work = BUCKET, root / "run"
    common = ["--preset", "tiny", "--workdir", str(work), "--model", f"local-dir:{data / 'clip'}"]
    start = time.perf_counter()
    ran = run_reco([
        ["import-embeddings", *common, "--input", f"{b}/release", "--output", f"{b}/memory"],
        ["embed-memory", *common, "--input", str(data / "train-wds"), "--output", f"{b}/train"],
        ["embed-memory", *common, "--input", str(data / "test-wds"), "--output", f"{b}/test"],
        ["build-index", *common, "--memory", f"{b}/memory", "--test", f"{b}/test",
         "--output", f"{b}/index"],
        ["precompute-neighbours", *common, "--train", f"{b}/train", "--index", f"{b}/index",
         "--output", f"{b}/neighbours"],
        ["train", *common, "--neighbours", f"{b}/neighbours", "--out", f"{b}/heads"],
        ["evaluate", *common, "--heads", f"{b}/heads", "--memory", f"{b}/index",
         "--modes", "off,both", "--image-folder", str(data / "folder"),
         "--classnames", str(data / "classnames.txt"), "--templates", str(data / "templates.txt"),
         "--no-gallery", "--output", f"{b}/eval"],
    ], root, upload={str(data / "release"): f"{b}/release"},
        download={f"{b}/{name}": str(root / "bucket" / name) for name in ON_BUCKET}, timeout=1800)
    print(f"foreign chain (import .. evaluate, one process): {time.perf_counter() - start:.0f} s")
    return {**ran, "work": work, "bucket": root / "bucket"}


@pytest.fixture(scope="module")
def world_results(tiny_trained):
    """The world path's evaluation of the same test images (their embedded split)."""
    from reco.evaluation.evaluate import evaluate

    return evaluate(tiny_trained, modes=("off", "both"), gallery=False)


def test_chain_from_foreign_data_alone(exported, foreign_run):
    """No world code on the path; the same memory gives the same index and neighbours."""
    cfg = exported[0]
    assert foreign_run["world_modules"] == []
    got, ref = foreign_run["bucket"] / "index", cfg.paths.index
    info, ref_info = (json.loads((f / "info.json").read_text()) for f in (got, ref))
    for key in ("n", "n_memory_success", "n_removed_eval_duplicates", "dim", "model_id"):
        assert info[key] == ref_info[key], key
    for name in ("memory_image.npy", "memory_text.npy"):       # identical embeddings, same order
        np.testing.assert_array_equal(np.load(got / name), np.load(ref / name))
    world, mine = _tensors(cfg.paths.neighbours / "tensors"), _tensors(foreign_run["bucket"] / "neighbours" / "tensors")
    np.testing.assert_array_equal(mine["id"], world["id"])           # the same training pairs
    np.testing.assert_allclose(mine["v"], world["v"], atol=2e-3)      # decoded from the tars
    for name in ("v_img_txt", "t_txt_img"):
        same = np.all(np.abs(mine[name] - world[name]) < 2e-3, axis=(1, 2))
        assert same.mean() > 0.98, (name, same.mean())                # ties may order differently
    assert (foreign_run["bucket"] / "heads" / "heads.json").is_file()


def test_zero_shot_on_the_image_folder_matches_the_world_path(exported, foreign_run, world_results):
    n = len(exported[3])
    res = json.loads((foreign_run["bucket"] / "eval" / "results.json").read_text())
    assert res["n_test"] == world_results["n_test"] == n and res["sets"] == {}
    assert res["n_classes"] == world_results["n_classes"]
    for mode in ("off", "both"):
        mine = res["modes"][mode]["zeroshot"]["all"]["top1"]
        world = world_results["modes"][mode]["zeroshot"]["all"]["top1"]
        se = standard_error(world, n)
        print(f"zero-shot top-1 {mode}: foreign {mine:.2f}, world {world:.2f}, n {n}, 1 SE {se:.2f}")
        assert abs(mine - world) <= se, (mode, mine, world, se)


def test_clip_benchmark_on_the_foreign_run(exported, foreign_run, world_results):
    _, root, data, images = exported
    out = root / "clip_benchmark.json"
    _, world_modules = run_watched([
        str(BIN / "reco-clip-benchmark"), "eval", "--model_type", "reco",
        "--model", str(foreign_run["work"]), "--pretrained", "both", "--dataset", "wds/tiny",
        "--dataset_root", str(data / "wds"), "--output", str(out), "--num_workers", "0",
        "--batch_size", "64", "--no_amp"], root, env={"OMP_NUM_THREADS": "1"})
    assert world_modules == []
    acc = 100 * json.loads(out.read_text())["metrics"]["acc1"]
    world = world_results["modes"]["both"]["zeroshot"]["all"]["top1"]
    se = standard_error(world, len(images))
    print(f"clip_benchmark acc1 (reco both): {acc:.2f}, world {world:.2f}, n {len(images)}, 1 SE {se:.2f}")
    assert abs(acc - world) <= se, (acc, world, se)
