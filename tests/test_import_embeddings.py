"""``reco import-embeddings``: clip-retrieval embedding releases (img_emb/, text_emb/,
metadata/) into an embedded memory; bad releases give one error naming the file."""
from __future__ import annotations

import pickle  # noqa: S403 - only to write a hostile .npy that must be refused
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reco.errors import FormatError, MismatchError, RecoError
from reco.formats import Manifest, decode_vectors
from reco.pipelines.import_embeddings import import_embeddings

MODEL = "reco-tiny"          # embed_dim 64; only its config is read
DIM = 64


def unit(rng, n, dim=DIM):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_part(root: Path, n: int, rows: int, seed: int, *, dim=DIM, dtype="float16",
               sides=("image", "text"), text_rows=None) -> dict:
    rng = np.random.default_rng(seed)
    data = {"image": unit(rng, rows, dim), "text": unit(rng, text_rows or rows, dim)}
    for side, (folder, prefix) in {"image": ("img_emb", "img_emb"), "text": ("text_emb", "text_emb")}.items():
        if side in sides:
            (root / folder).mkdir(parents=True, exist_ok=True)
            np.save(root / folder / f"{prefix}_{n}.npy", data[side].astype(dtype))
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"url": [f"https://example.com/{n}/{i}.jpg" for i in range(rows)],
                             "caption": [f"part {n} row {i}" for i in range(rows)],
                             "similarity": np.ones(rows)}), root / "metadata" / f"metadata_{n}.parquet")
    return data


def release(root: Path, sizes=(10, 7, 12), **kw) -> list[dict]:
    return [write_part(root, n, rows, seed=n, **kw) for n, rows in enumerate(sizes)]


def read_out(folder: Path):
    manifest = Manifest.read(folder, kind="embedded")
    table = pa.concat_tables([pq.read_table(p) for p in manifest.shard_paths(folder)])
    return manifest, table


def test_import_streams_every_row_and_resumes(tmp_path):
    parts = release(tmp_path / "rel", sizes=(10, 7, 12, 11))       # part 10 sorts before 2
    write_part(tmp_path / "rel", 10, 5, seed=10)
    parts.append(None)
    parts[2]["image"][3] *= 3.0                                     # not unit: normalised
    np.save(tmp_path / "rel" / "img_emb" / "img_emb_2.npy", parts[2]["image"].astype("float16"))
    zero = np.load(tmp_path / "rel" / "text_emb" / "text_emb_1.npy")
    zero[4] = 0
    np.save(tmp_path / "rel" / "text_emb" / "text_emb_1.npy", zero)
    out = tmp_path / "out"
    manifest, info = import_embeddings(str(tmp_path / "rel"), str(out), model=MODEL, shard_size=8)
    _, table = read_out(out)
    assert table.num_rows == info["rows"] == 45 and info["shards"] == 6
    assert table.column("id").to_pylist() == list(range(45))
    # ids in the parts' file-name order, as embedding-reader and autofaiss number them: 0, 1, 10, 2, 3
    assert table.column("url")[10 + 7].as_py() == "https://example.com/10/0.jpg"
    assert table.column("url")[10 + 7 + 5].as_py() == "https://example.com/2/0.jpg"
    image = decode_vectors(table.column("image_emb"), DIM)
    np.testing.assert_allclose(image[:10], parts[0]["image"], atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(image[22 + 3]), 1, atol=1e-3)
    assert manifest.info["normalised"]["image"] == 1
    bad = table.slice(10 + 4, 1).to_pylist()[0]
    assert bad["status"] == "failed_to_embed" and "text_emb_1.npy row 4: zero" in bad["error_message"]
    assert manifest.counts["success"] == 44 and manifest.info["input_format"] == "clip-retrieval"
    # rerun: nothing to do; a lost shard: only it is imported again, the same bytes
    before = (out / "part-00003.parquet").read_bytes()
    assert import_embeddings(str(tmp_path / "rel"), str(out), model=MODEL, shard_size=8)[1]["shards_run"] == 0
    (out / "part-00003.parquet").unlink()
    again = import_embeddings(str(tmp_path / "rel"), str(out), model=MODEL, shard_size=8)[1]
    assert again["shards_run"] == 1 and pq.read_table(out / "part-00003.parquet").equals(
        pq.read_table(pa.BufferReader(before)))


def _hostile_npy(path: Path):
    with open(path, "wb") as f:
        np.save(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert pickle  # the payload above is a pickle


BAD = {
    "rows_text": (lambda r: write_part(r, 1, 7, 1, text_rows=6), FormatError, r"text_emb_1\.npy: 6 rows, but .*metadata_1\.parquet has 7"),
    "rows_meta": (lambda r: pq.write_table(pa.table({"url": ["u"], "caption": ["c"]}), r / "metadata" / "metadata_2.parquet"),
                  FormatError, r"img_emb_2\.npy: 12 rows, but .*metadata_2\.parquet has 1"),
    "dim_parts": (lambda r: write_part(r, 1, 7, 1, dim=32), FormatError, r"img_emb_1\.npy: dimension 32, but .*img_emb_0\.npy has 64"),
    "no_meta": (lambda r: (r / "metadata" / "metadata_1.parquet").unlink(), FormatError, r"img_emb_1\.npy: part 1 has no metadata/metadata_1\.parquet"),
    "no_text_part": (lambda r: (r / "text_emb" / "text_emb_2.npy").unlink(), FormatError, r"img_emb_2\.npy: part 2 has no text_emb/text_emb_2\.npy"),
    "pickle": (lambda r: _hostile_npy(r / "img_emb" / "img_emb_1.npy"), FormatError, r"img_emb_1\.npy: expected a C-ordered 2-D"),
    "not_npy": (lambda r: (r / "text_emb" / "text_emb_0.npy").write_bytes(b"junk"), FormatError, r"text_emb_0\.npy: not a readable \.npy"),
    "caption_col": (lambda r: pq.write_table(pa.table({"url": ["u"] * 10}), r / "metadata" / "metadata_0.parquet"),
                    FormatError, r"metadata_0\.parquet: missing column\(s\) \['caption'\]"),
    "image_only": (lambda r: [p.unlink() for p in (r / "text_emb").iterdir()] and (r / "text_emb").rmdir(),
                   FormatError, r"img_emb/ but no text_emb/: .*--text-from-captions"),
    "text_only": (lambda r: [p.unlink() for p in (r / "img_emb").iterdir()] and (r / "img_emb").rmdir(),
                  FormatError, r"text_emb/ but no img_emb/: .*reco embed-memory --input .*metadata"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_release_is_one_error_naming_the_file(tmp_path, case):
    make, error, message = BAD[case]
    rel = tmp_path / "rel"
    release(rel)
    import_embeddings(str(rel), str(tmp_path / "out"), model=MODEL, shard_size=8)      # a good import
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    make(rel)
    with pytest.raises(error, match=message):
        import_embeddings(str(rel), str(tmp_path / "out"), model=MODEL, shard_size=8, force=True)
    after = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert after == before                          # checked before anything is deleted or written


def test_model_of_another_dimension_is_a_mismatch(tmp_path):
    release(tmp_path / "rel")
    with pytest.raises(MismatchError, match=r"img_emb_0\.npy: embeddings of dimension 64, but model "
                       r"ViT-B-32 embeds in 512 dimensions"):
        import_embeddings(str(tmp_path / "rel"), str(tmp_path / "out"), model="ViT-B-32",
                          pretrained="openai")
    with pytest.raises(RecoError, match="unknown open_clip model"):
        import_embeddings(str(tmp_path / "rel"), str(tmp_path / "out"), model="ViT-B-33")
    assert not (tmp_path / "out").exists()


def test_image_only_release_with_captions_embedded(tmp_path, embed_model):
    import torch

    from reco.clip import encode_texts, load_clip

    parts = release(tmp_path / "rel", sizes=(6, 5), sides=("image",), dtype="float32")
    _, info = import_embeddings(str(tmp_path / "rel"), str(tmp_path / "out"), model=embed_model,
                                shard_size=4, text_from_captions=True)
    _, table = read_out(tmp_path / "out")
    torch.manual_seed(0)
    want = encode_texts(load_clip(embed_model), table.column("caption").to_pylist()).numpy()
    np.testing.assert_allclose(decode_vectors(table.column("text_emb"), DIM), want, atol=2e-3)
    np.testing.assert_allclose(decode_vectors(table.column("image_emb"), DIM)[6:],
                               parts[1]["image"], atol=1e-3)
    assert info["counts"]["success"] == 11


def test_cli_names_the_file(tmp_path, capsys):
    from reco.cli import main

    release(tmp_path / "rel")
    (tmp_path / "rel" / "metadata" / "metadata_1.parquet").unlink()
    rc = main(["import-embeddings", "--preset", "tiny", "--workdir", str(tmp_path / "w"),
               "--model", MODEL, "--input", str(tmp_path / "rel")])
    err = capsys.readouterr().err
    assert rc == 2 and "img_emb_1.npy: part 1 has no metadata/metadata_1.parquet" in err


def test_release_and_output_on_a_bucket(tmp_path):
    """fsspec end to end: a release on ``memory://`` (the tests' stand-in for a bucket)."""
    import fsspec

    release(tmp_path / "rel", sizes=(6, 9))
    fs = fsspec.filesystem("memory")
    fs.put(str(tmp_path / "rel"), "/byod-bucket/rel", recursive=True)
    _, info = import_embeddings("memory://byod-bucket/rel", "memory://byod-bucket/out",
                                model=MODEL, shard_size=4)
    local, _ = import_embeddings(str(tmp_path / "rel"), str(tmp_path / "out"), model=MODEL, shard_size=4)
    remote = Manifest.read("memory://byod-bucket/out", kind="embedded")
    assert info["rows"] == 15 and remote.shards == local.shards and remote.counts == local.counts
    with fs.open("/byod-bucket/out/part-00002.parquet", "rb") as f:
        assert pq.read_table(f).equals(pq.read_table(tmp_path / "out" / "part-00002.parquet"))
    fs.rm("/byod-bucket", recursive=True)
