"""Images reco stored itself, found without ever turning a URL into a file path.

A URL comes from a URL list, which is untrusted: ``http://host/ok/../../../etc/passwd`` must not
become a path to read. :class:`WorldImages` finds the generated world's image of a URL by looking
the URL up, as an exact string, in the world's own URL lists (``urls/<split>.parquet``, written
by ``reco world``); the file is then ``images/<split>/<row:06d>.png``, named from the split and
the row number only, and read only if it resolves (symlinks followed) to a file inside the world
folder. A URL that is not in those lists has no local image. Used by the evaluation gallery and
REACT's ``world`` image source.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import pyarrow.parquet as pq

from reco.errors import FormatError
from reco.formats import safe_name


class WorldImages:
    """``path(url)``: the world's stored image for ``url`` (or None)."""

    def __init__(self, world_root: str | Path):
        self.root = Path(world_root).resolve()

    @functools.cached_property
    def index(self) -> dict[str, tuple[str, int]]:
        """URL -> (split, row) of the first row listing it, over every URL list of the world."""
        found: dict[str, tuple[str, int]] = {}
        folder = self.root / "urls"
        names = sorted(os.listdir(folder)) if folder.is_dir() else []
        for name in names:
            if not name.endswith(".parquet") or name.startswith("."):
                continue
            split = safe_name(name[: -len(".parquet")], f"{folder}/{name}")
            try:
                urls = pq.read_table(folder / name, columns=["url"]).column("url").to_pylist()
            except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds
                raise FormatError(f"{folder / name}: cannot read the world's URL list ({exc})") from exc
            for row, url in enumerate(urls):
                if isinstance(url, str):
                    found.setdefault(url, (split, row))
        return found

    def expected_path(self, url: str) -> Path:
        """The file the world wrote for ``url`` (which may be a dead link: no file);
        FormatError if ``url`` is not in the world's URL lists or leads out of the folder."""
        hit = self.index.get(url) if isinstance(url, str) else None
        if hit is None:
            raise FormatError(f"url {url!r} does not name a file under the world folder {self.root} "
                              f"(it is in none of the world's URL lists)")
        split, row = hit
        path = (self.root / "images" / split / f"{row:06d}.png").resolve()
        if self.root not in path.parents:
            raise FormatError(f"url {url!r}: the world's file {split}/{row:06d}.png leads out of "
                              f"the world folder {self.root}")
        return path

    def path(self, url: str | None) -> Path | None:
        """The world's stored image file for ``url``, or None (not the world's, or no file)."""
        try:
            path = self.expected_path(url)
        except FormatError:
            return None
        return path if path.is_file() else None
