"""REACT end to end from foreign inputs, as a user runs it on data reco did not generate.

``prepare ROOT``: a random-init reco-tiny CLIP (``ROOT/base``), the stand-in world's memory
embedded (:mod:`tests.react_stand_in`), its memory and test images exported as img2dataset-style
webdataset downloads with keys of their own (``ROOT/download``, ``ROOT/evalset``;
:mod:`tests.foreign`), then ``react-retrieve`` on the memory and ``react-download`` reusing the
download (matched by URL): ``ROOT/work/react/shards``.

``train ROOT STEPS``: ``react-train`` streaming those shards (``react.image_source=shards``) and
evaluating on the exported test split (``react.eval_shards``); under ``torchrun`` with DDP. Prints
one JSON line: the train info and whether ``reco.world`` was ever imported.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

TEMPLATES = ("a photo of a {}.",)


def options(root: Path, steps: int, **extra):
    from reco.react.config import ReactConfig

    base = dict(k_blocks=2, steps=steps, batch_size=32, lr=2e-3, warmup_steps=10,
                checkpoint_every=max(1, steps // 2), image_source="shards",
                shards=str(root / "work" / "react" / "shards"),
                eval_shards=str(root / "evalset"), shuffle_buffer=64)
    return ReactConfig(**{**base, **extra})


def config(root: Path, steps: int = 80, **extra):
    import dataclasses

    from reco import config as config_lib

    cfg = config_lib.preset("tiny", workdir=str(root / "work"))
    spec = (root / "clip.spec").read_text()
    cfg = config_lib.override(cfg, [f"clip.model={spec}"])
    return dataclasses.replace(cfg, react=options(root, steps, **extra))


def _samples(rows, world: Path, prefix: str):
    return [{"key": f"{prefix}{i:07d}", "url": r["url"], "caption": r["caption"],
             "image": (world / r["url"].split("/", 3)[3]).read_bytes(), "status": "success",
             "error_message": None} for i, r in enumerate(rows)]


def prepare(root: Path) -> None:
    import dataclasses

    import pyarrow.parquet as pq
    import torch

    from reco.clip import load_clip, save_local_dir
    from reco.react.download import react_download
    from reco.react.retrieve import retrieve_customisation_set
    from tests.foreign import write_webdataset
    from tests.react_stand_in import CLASSNAMES, make_world

    torch.manual_seed(0)
    spec = save_local_dir(load_clip("reco-tiny").model, "reco-tiny", root / "base")
    (root / "clip.spec").write_text(spec)
    clip = load_clip(spec)
    clip.model.requires_grad_(False)
    cfg0, memory, rows = make_world(root, clip, per_class_memory=30, generic=20)
    world = cfg0.paths.world
    write_webdataset(_samples(rows, world, "m"), root / "download", per_shard=40)
    test = pq.read_table(cfg0.paths.urls("test")).to_pylist()
    write_webdataset(_samples(test, world, "t"), root / "evalset", per_shard=40)
    cfg = dataclasses.replace(config(root), react=options(root, 1, reuse=str(root / "download"),
                                                          shard_size=32))
    retrieve_customisation_set(cfg, CLASSNAMES, TEMPLATES, per_class=25, searches=("txt", "img"),
                               memory=memory, clip=clip)
    react_download(cfg)


def train(root: Path, steps: int, **extra) -> dict:
    from reco.react.train import react_train

    cfg = config(root, steps, **extra)
    return react_train(cfg, out_dir=root / "model", evaluate=True)


def main(argv: list[str]) -> int:
    import torch

    torch.set_num_threads(1)
    stage, root = argv[0], Path(argv[1])
    if stage in ("prepare", "all"):
        prepare(root)
    info = None
    if stage in ("train", "all"):
        extra = dict(kv.split("=", 1) for kv in argv[3:])
        extra = {k: int(v) if v.lstrip("-").isdigit() else v for k, v in extra.items()}
        info = train(root, int(argv[2]), **extra)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"info": info, "world_imported": "reco.world" in sys.modules},
                         default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
