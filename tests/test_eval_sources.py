"""Labelled sets a user brings (reco.evaluation.sources): webdataset shards (local and fsspec),
CLIP_benchmark data sets read offline by name, and one clear error for each kind of bad input."""
from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch

from reco.errors import ConfigError, FormatError
from reco.evaluation.sources import DataSpec, load_set, read_templates

COLOURS = [(220, 40, 40), (40, 200, 60), (40, 60, 220)]


@pytest.fixture(scope="module")
def clip():
    from reco.clip import load_clip

    torch.manual_seed(0)
    return load_clip("reco-tiny")


def _png(colour, seed) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour)[None, None] + rng.integers(-30, 30, (16, 16, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path, samples) -> None:
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def _samples(n=6, **extra):
    return [{"__key__": f"k{i:03d}", "png": _png(COLOURS[i % 3], i), "cls": i % 3, **extra}
            for i in range(n)]


def test_webdataset_local_and_on_a_bucket_give_the_same_set(tmp_path, clip):
    import fsspec

    _tar(tmp_path / "shards" / "a-000.tar", _samples(4, txt="a red thing"))
    _tar(tmp_path / "shards" / "a-001.tar", _samples(2, txt="a red thing"))
    (tmp_path / "names.txt").write_text("red\ngreen\nblue\n")
    local = load_set(DataSpec("webdataset", str(tmp_path / "shards"), classnames=str(tmp_path / "names.txt")), clip)
    assert local.classnames == ["red", "green", "blue"] and len(local.split) == 6
    assert local.split.labels.tolist() == [0, 1, 2, 0, 0, 1] and local.split.text_emb.shape == (6, clip.embed_dim)
    mem = fsspec.filesystem("memory")
    for name in ("a-000.tar", "a-001.tar"):
        mem.pipe(f"/bucket/eval/{name}", (tmp_path / "shards" / name).read_bytes())
    mem.pipe("/bucket/eval/names.txt", b"red\ngreen\nblue\n")
    remote = load_set(DataSpec("webdataset", "memory://bucket/eval/a-{000..001}.tar",
                               classnames="memory://bucket/eval/names.txt"), clip)
    np.testing.assert_array_equal(remote.split.image_emb, local.split.image_emb)


def test_bad_webdataset_members_name_the_shard_and_sample(tmp_path, clip):
    names = tmp_path / "names.txt"
    names.write_text("red\ngreen\nblue\n")
    cases = {
        "corrupt": ([{"__key__": "bad", "png": b"\x89PNG not really", "cls": 0}], "corrupt image"),
        "nolabel": ([{"__key__": "nocls", "png": _png(COLOURS[0], 0)}], "no .cls"),
        "noimage": ([{"__key__": "noimg", "cls": 1, "txt": "x"}], "no image"),
        "beyond": ([{"__key__": "far", "png": _png(COLOURS[0], 0), "cls": 7}], "label 7 but 3 class names"),
    }
    for name, (samples, message) in cases.items():
        _tar(tmp_path / name / "0.tar", samples)
        with pytest.raises(FormatError, match=message) as err:
            load_set(DataSpec("webdataset", str(tmp_path / name), classnames=str(names)), clip)
        assert name in str(err.value)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "0.tar").write_bytes(b"not a tar at all" * 40)
    with pytest.raises(FormatError, match="0.tar"):
        load_set(DataSpec("webdataset", str(tmp_path / "junk"), classnames=str(names)), clip)
    with pytest.raises(FormatError, match="no webdataset .tar shards"):
        load_set(DataSpec("webdataset", str(tmp_path / "nowhere")), clip)
    with pytest.raises(ConfigError, match="--classnames"):
        load_set(DataSpec("webdataset", str(tmp_path / "nolabel")), clip)


def test_template_files(tmp_path):
    (tmp_path / "t.txt").write_text("a photo of a {c}.\n\nitap of a {c}\n")
    assert read_templates(tmp_path / "t.txt") == ("a photo of a {c}.", "itap of a {c}")
    (tmp_path / "bad.txt").write_text("a photo of a {c}.\na photo\n")
    with pytest.raises(FormatError, match="line 2"):
        read_templates(tmp_path / "bad.txt")
    with pytest.raises(FormatError, match="missing.txt"):
        read_templates(tmp_path / "missing.txt")


def _idx(path, array: np.ndarray, magic: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in array.shape)
                     + array.astype(np.uint8).tobytes())


def test_clip_benchmark_torchvision_set_offline_by_name(tmp_path, clip):
    """mnist through CLIP_benchmark's build_dataset(download=False): its class names and
    templates come with it; a missing root or a pickled set is one clear error."""
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    for prefix, n in (("train", 4), ("t10k", 7)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)), 2051)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, 2049)
    got = load_set(DataSpec("clip-benchmark", str(tmp_path), name="mnist"), clip, batch_size=3)
    assert got.classnames == [str(i) for i in range(10)] and len(got.split) == 7
    assert got.split.labels.tolist() == list(range(7)) and got.templates and "{c}" in got.templates[0]
    with pytest.raises(FormatError, match="not a folder"):
        load_set(DataSpec("clip-benchmark", str(tmp_path / "empty_root"), name="mnist"), clip)
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(FormatError, match="cannot read it offline"):
        load_set(DataSpec("clip-benchmark", str(tmp_path / "empty_root"), name="mnist"), clip)
    with pytest.raises(ConfigError, match="wds/cifar10"):
        load_set(DataSpec("clip-benchmark", str(tmp_path), name="cifar10"), clip)
