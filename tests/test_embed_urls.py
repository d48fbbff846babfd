"""URL lists -> shards (reco.pipelines.urls): formats, columns, ids, sharding, URL safety."""
from __future__ import annotations

import apache_beam as beam
import pandas as pd
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from reco.errors import FormatError
from reco.pipelines.config import EmbedConfig
from reco.pipelines.embed_memory import pipeline_options
from reco.pipelines.urls import (FilterUnsafeUrls, ReadUrlShards, inspect_url_files,
                                 list_url_files, num_shards, read_rows, refusal, url_format)

CFG = EmbedConfig(url_col="link", caption_col="text", label_col="cls", shard_size=4)


def _pipeline():
    return test_pipeline.TestPipeline(options=pipeline_options(EmbedConfig()))


@pytest.fixture(scope="module")
def url_files(tmp_path_factory):
    """Three lists in three formats with custom column names; 5 + 3 + 4 rows."""
    root = tmp_path_factory.mktemp("urls")

    def frame(start, n, label=True):
        data = {"link": [f"http://example.com/{i}.jpg" for i in range(start, start + n)],
                "text": [f"caption {i}" for i in range(start, start + n)], "extra": 1}
        if label:
            data["cls"] = [i % 3 for i in range(start, start + n)]
        return pd.DataFrame(data)

    frame(0, 5).to_parquet(root / "a.parquet")
    frame(5, 3, label=False).to_csv(root / "b.csv", index=False)
    frame(8, 4).to_csv(root / "c.tsv", sep="\t", index=False)
    (root / "notes.txt").write_text("not a URL list")
    return root


def test_list_inspect_and_ids(url_files):
    files = list_url_files(str(url_files))            # a folder: only known formats, sorted
    assert [f.rsplit("/", 1)[-1] for f in files] == ["a.parquet", "b.csv", "c.tsv"]
    assert list_url_files([str(url_files / "c.tsv"), str(url_files / "*.parquet")]) == [files[0], files[2]]
    inspected = inspect_url_files(files, CFG)
    assert [(f.format, f.offset, f.rows) for f in inspected] == [("parquet", 0, 5), ("csv", 5, 3), ("tsv", 8, 4)]
    assert inspected[1].columns == ("link", "text")  # label optional
    rows = [r for f in inspected for r in read_rows(f)]
    assert [r["id"] for r in rows] == list(range(12))
    assert [r["caption"] for r in rows] == [f"caption {i}" for i in range(12)]
    assert [r["label"] for r in rows] == [0, 1, 2, 0, 1, None, None, None, 2, 0, 1, 2]
    assert num_shards(inspected, 4) == 3


def test_missing_column_is_a_clear_error_naming_the_file(url_files):
    files = list_url_files(str(url_files))
    with pytest.raises(FormatError, match=r"a\.parquet: missing column\(s\) \['url'\]"):
        inspect_url_files(files, EmbedConfig(caption_col="text"))
    with pytest.raises(FormatError, match=r"b\.csv: missing column\(s\) \['caption'\]"):
        inspect_url_files(files[1:], EmbedConfig(url_col="link"))
    with pytest.raises(FormatError, match="no URL list found"):
        list_url_files(str(url_files / "nope.parquet"))
    with pytest.raises(FormatError, match="unknown URL list format"):
        url_format("list.xlsx")


def test_read_url_shards_spans_files_and_skips_done_shards(url_files):
    files = inspect_url_files(list_url_files(str(url_files)), CFG)
    with _pipeline() as p:
        shards = p | ReadUrlShards(files, shard_size=4, skip=[1])
        ids = shards | "Ids" >> beam.Map(lambda s: (s[0], [r["id"] for r in s[1]]))
        assert_that(ids, equal_to([(0, [0, 1, 2, 3]), (2, [8, 9, 10, 11])]))


@pytest.mark.parametrize("url,reason", [
    ("ftp://example.com/a.jpg", "scheme 'ftp' not allowed"),
    ("file:///etc/passwd", "scheme 'file' not allowed"),
    ("example.com/a.jpg", "not allowed"),
    ("", "empty url"),
    (None, "empty url"),
    ("http:///a.jpg", "no host"),
    ("http://127.0.0.1:8000/a.jpg", "private/loopback/link-local"),
    ("http://169.254.169.254/latest/meta-data/", "private/loopback/link-local"),
    ("http://10.1.2.3/a.jpg", "private/loopback/link-local"),
    ("http://192.168.0.1/a.jpg", "private/loopback/link-local"),
    ("http://[::1]/a.jpg", "private/loopback/link-local"),
    ("http://[::ffff:127.0.0.1]/a.jpg", "private/loopback/link-local"),
    ("http://0.0.0.0/a.jpg", "private/loopback/link-local"),
    ("http://localhost/a.jpg", "private/loopback/link-local"),
    ("https://93.184.216.34/a.jpg", None),
])
def test_refusal(url, reason):
    got = refusal(url)
    assert got is None if reason is None else reason in got


def test_refusal_of_names_that_resolve_to_private_addresses():
    # the resolver is the part replaced here (no DNS on the test machine); the logic is real
    resolve = {"metadata.internal": ["169.254.169.254"], "cdn.example": ["93.184.216.34"],
               "mixed.example": ["93.184.216.34", "10.0.0.7"]}.__getitem__
    assert "link-local" in refusal("http://metadata.internal/x", (), resolve)
    assert refusal("https://cdn.example/x.jpg", (), resolve) is None
    assert "private" in refusal("https://mixed.example/x.jpg", (), resolve)
    assert refusal("http://127.0.0.1/x.jpg", ("127.0.0.0/8",)) is None
    assert "scheme" in refusal("gopher://127.0.0.1/x", ("127.0.0.0/8",))


def test_filter_unsafe_urls_transform():
    rows = [{"id": i, "url": u, "caption": "c", "label": None, "status": None, "error_message": None}
            for i, u in enumerate(["https://93.184.216.34/a.jpg", "http://169.254.169.254/",
                                   "ftp://93.184.216.34/a", "http://127.0.0.1:9/a.png"])]

    def statuses(element):
        return element[0], [(r["id"], r["status"]) for r in element[1]]


    with _pipeline() as p:
        shards = p | beam.Create([(0, rows)])
        strict = shards | "Strict" >> FilterUnsafeUrls(()) | "S1" >> beam.Map(statuses)
        loose = shards | "Loose" >> FilterUnsafeUrls(("127.0.0.0/8",)) | "S2" >> beam.Map(statuses)
        assert_that(strict, equal_to([(0, [(0, None), (1, "refused"), (2, "refused"), (3, "refused")])]),
                    label="CheckStrict")
        # metadata (row 1) stays refused even with a network allowed
        assert_that(loose, equal_to([(0, [(0, None), (1, "refused"), (2, "refused"), (3, None)])]),
                    label="CheckLoose")


def test_fsspec_urls(url_files):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/reco-test/lists/x.csv", (url_files / "b.csv").read_bytes())
    fs.pipe("/reco-test/lists/y.parquet", (url_files / "a.parquet").read_bytes())
    files = list_url_files("memory://reco-test/lists")
    assert files == ["memory:///reco-test/lists/x.csv", "memory:///reco-test/lists/y.parquet"]
    inspected = inspect_url_files(files, CFG)
    assert [f.rows for f in inspected] == [3, 5]
    assert [r["id"] for f in inspected for r in read_rows(f)] == list(range(8))
