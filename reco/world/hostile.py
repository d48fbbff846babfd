"""A hostile URL list made from the generated world, for reliability tests of embed-memory.

:func:`write_hostile_urls` takes good rows of a world split (URL list + images on disk), and mixes
in rows pointing at the world server's ``/_hostile/`` endpoints (:mod:`reco.world.server`) and
other bad URLs, so that at least ``hostile_rate`` of all rows are hostile and every kind in
:data:`KINDS` occurs. It also repeats some good URLs (duplicates) and gives some good rows bad
captions. The list is written as CSV (raw bytes, so a caption can hold invalid UTF-8).

What the embed job must do with each row (checked by ``tests/test_hostile_corpus.py``, stated in
RELIABILITY.md):

* a hostile row ends with the :class:`Kind`'s status and an error message containing its text;
* a good row is ``success`` and embedded exactly once (one output row per input row, by id);
* duplicate URLs: every row is its own sample (id = row number), so a URL listed twice is fetched
  and embedded twice, giving two rows with the same image embedding (deduplicate downstream);
* bad captions: empty -> embedded as the empty text; very long -> stored whole, truncated by the
  tokenizer to the model's context; invalid UTF-8 -> decoded with U+FFFD, row kept.

The corpus is served with ``allow_networks=127.0.0.0/8`` (the world is on loopback), so it holds no
redirect to a private address: tests/test_safety.py and tests/attacks test those.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from reco.errors import ConfigError
from reco.formats import atomic_write_bytes, read_parquet


@dataclass(frozen=True)
class Kind:
    """One kind of hostile row: URL template (``{base}``, ``{host}``, ``{i}``, ``{slow}``),
    expected status and a text the error message must contain (case-insensitive)."""

    url: str
    status: str
    message: str


KINDS: dict[str, Kind] = {
    "dead_404": Kind("{base}_hostile/404/h{i}.png", "failed_to_download", "404"),
    "dead_500": Kind("{base}_hostile/500/h{i}.png", "failed_to_download", "500"),
    "slow": Kind("{base}_hostile/slow/h{i}.png?s={slow}", "failed_to_download", "timed out"),
    "redirect_loop": Kind("{base}_hostile/redirect-loop/h{i}", "failed_to_download", "redirect"),
    "connection_refused": Kind("http://{host}:1/h{i}.png", "failed_to_download", "refused"),
    "not_image": Kind("{base}_hostile/garbage/h{i}.png", "failed_to_resize", "decod"),
    "truncated": Kind("{base}_hostile/truncated/h{i}.png", "failed_to_resize", "decod"),
    "bomb": Kind("{base}_hostile/bomb/h{i}.png", "failed_to_resize", "pixels"),
    "bpp_bomb": Kind("{base}_hostile/bpp-bomb/h{i}.png", "failed_to_resize", "decoding refused"),
    "trickle_headers": Kind("{base}_hostile/trickle-headers/h{i}.png?s={slow}", "failed_to_download",
                            "timed out"),
    "trickle_body": Kind("{base}_hostile/trickle-body/h{i}.png?s={slow}", "failed_to_download",
                         "timed out"),
    "endless_body": Kind("{base}_hostile/endless/h{i}.png?s={slow}", "failed_to_download", "timed out"),
    "short_body": Kind("{base}_hostile/short/h{i}.png", "failed_to_download", "content-length"),
    "redirect_to_metadata": Kind("{base}_hostile/redirect/h{i}?to=http://169.254.169.254/latest/",
                                 "refused", "never allowed"),
    "redirect_chain_to_private": Kind("{base}_hostile/redirect/h{i}?to={base}_hostile/redirect/x%3F"
                                      "to%3Dhttp%253A%252F%252F10.0.0.1%252Fx.png", "refused", "non-global"),
    "oversized": Kind("{base}_hostile/huge/h{i}.png?mb=40", "refused", "larger than"),
    "scheme_file": Kind("file:///etc/passwd#h{i}", "refused", "scheme 'file'"),
    "scheme_ftp": Kind("ftp://{host}/h{i}.png", "refused", "scheme 'ftp'"),
    "redirect_to_file": Kind("{base}_hostile/redirect/h{i}?to=file:///etc/passwd", "refused",
                             "scheme 'file'"),
    "malformed": Kind("http://[::1/h{i}.png", "refused", "malformed"),
    "empty_url": Kind("", "refused", "empty url"),
}
BAD_CAPTIONS: dict[str, bytes] = {
    "empty": b"",
    "long": ("a very long caption of a bird " * 400).encode()[:10_000],
    "non_utf8": b"caf\xe9 bird \xff\xfe with \xc3 broken bytes",
    "csv_quoting": 'a "quoted", comma\nand newline caption'.encode(),
}


@dataclass
class HostileCorpus:
    path: Path                                   # the CSV URL list (url, caption, label)
    rows: int
    good: list[int]                              # ids expected to be success
    hostile: dict[int, str]                      # id -> kind name (see KINDS)
    duplicates: dict[int, int]                   # id -> id of the first row with the same URL
    captions: dict[int, str] = field(default_factory=dict)   # id -> BAD_CAPTIONS kind

    def expected_caption(self, kind: str) -> str:
        """The caption a reader must return for a bad-caption row of ``kind``."""
        return BAD_CAPTIONS[kind].decode("utf-8", "replace")


def good_rows(world_dir: Path, split: str = "memory") -> list[dict]:
    """Rows of a world split whose image exists on disk (the world's own dead links excluded)."""
    from reco.stored_images import WorldImages

    rows = read_parquet(world_dir / "urls" / f"{split}.parquet", required=["url", "caption", "label"])
    store = WorldImages(world_dir)
    return [row for row in rows.to_pylist() if store.path(row["url"]) is not None]


def write_hostile_urls(world_dir: str | Path, out_path: str | Path, *, base_url: str,
                       split: str = "memory", n_good: int = 150, hostile_rate: float = 0.25,
                       duplicate_rate: float = 0.05, slow_seconds: float = 5.0,
                       seed: int = 0) -> HostileCorpus:
    """Write a hostile CSV URL list from ``n_good`` good rows of the world's ``split``.

    Args:
        world_dir: the world folder (``cfg.paths.world``), served at ``base_url``.
        out_path: CSV file to write (atomically).
        base_url: where the world server serves ``world_dir`` (its ``/_hostile/`` endpoints too).
        hostile_rate: lowest fraction of hostile rows among all rows (every kind occurs).
        duplicate_rate: extra rows repeating the URL of a good row (fraction of ``n_good``).
        slow_seconds: delay of the slow endpoint (make it longer than ``embed.timeout``).
    """
    if not 0 < hostile_rate < 1:
        raise ConfigError(f"hostile_rate={hostile_rate}: expected a fraction in (0, 1)")
    rng = np.random.default_rng(seed)
    pool = good_rows(Path(world_dir), split)
    if len(pool) < n_good or n_good < len(BAD_CAPTIONS) + 1:
        raise ConfigError(f"{world_dir}: {len(pool)} good {split} rows, need n_good={n_good} "
                          f"(at least {len(BAD_CAPTIONS) + 1})")
    good = [pool[int(i)] for i in sorted(rng.choice(len(pool), n_good, replace=False))]
    n_dup = max(1, round(duplicate_rate * n_good))
    n_hostile = max(len(KINDS), math.ceil(hostile_rate * (n_good + n_dup) / (1 - hostile_rate)))
    names = [list(KINDS)[j % len(KINDS)] for j in range(n_hostile)]
    host = urlsplit(base_url).hostname
    entries = [("good", r["url"], r["caption"].encode(), r["label"]) for r in good]
    entries += [("dup", good[int(j)]["url"], good[int(j)]["caption"].encode(), good[int(j)]["label"])
                for j in rng.choice(n_good, n_dup, replace=False)]
    entries += [(name, KINDS[name].url.format(base=base_url, host=host, i=j, slow=slow_seconds),
                 f"hostile {name}".encode(), None) for j, name in enumerate(names)]
    entries = [entries[int(i)] for i in rng.permutation(len(entries))]
    return _write(Path(out_path), entries)


def _write(path: Path, entries: list[tuple]) -> HostileCorpus:
    corpus = HostileCorpus(path, len(entries), [], {}, {})
    first: dict[str, int] = {}
    bad = iter(BAD_CAPTIONS)
    lines = []
    for i, (kind, url, caption, label) in enumerate(entries):
        if kind in ("good", "dup"):
            corpus.good.append(i)
            if kind == "dup" or url in first:
                corpus.duplicates[i] = first[url] if url in first else -1
            first.setdefault(url, i)
            name = next(bad, None) if kind == "good" else None
            if name:
                corpus.captions[i], caption = name, BAD_CAPTIONS[name]
        else:
            corpus.hostile[i] = kind
        lines.append((url, caption.decode("utf-8", "surrogateescape"), "" if label is None else label))
    # a duplicate listed before its original: point both at the first occurrence
    corpus.duplicates = {i: first[entries[i][1]] for i in corpus.duplicates if first[entries[i][1]] != i}
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(("url", "caption", "label"))
    writer.writerows(lines)
    atomic_write_bytes(buf.getvalue().encode("utf-8", "surrogateescape"), path)
    return corpus
