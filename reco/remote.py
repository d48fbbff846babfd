"""Stage inputs and outputs on any fsspec filesystem (``gs://``, ``s3://``, ``memory://``, local).

The work directory is local: it is where faiss, the trainer and evaluation read memory-mapped
files. A stage input given by URL is *mirrored* into its place in the work directory (or into a
cache folder under it) before the stage runs, fetching only files whose size changed; an output
given by URL is written locally, then *published* to the URL. Marker files (``manifest.json``,
``info.json``, ``heads.json``, ``results.json``), which readers take as "this folder is
complete", are copied last, so a reader never sees a marker beside half a folder, and each file is
written to a temporary name and renamed. A protocol whose package is missing is one clear error
naming the extra that installs it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Iterator, Mapping

from reco.errors import ConfigError, FormatError

log = logging.getLogger(__name__)
LOCAL_PROTOCOLS = ("file", "local")
MARKERS = ("manifest.json", "info.json", "heads.json", "results.json")
# protocol -> (package, extra of reco-clip that installs it)
EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"),
          "gcs": ("gcsfs", "gcs")}


def protocol(path: str | Path) -> str:
    """``gs`` for ``gs://b/x``; ``file`` for a local path."""
    text = str(path)
    return text.split("://", 1)[0] if "://" in text else "file"


def is_url(path: str | Path | None) -> bool:
    """True for a path on a non-local fsspec filesystem."""
    return path is not None and protocol(path) not in LOCAL_PROTOCOLS


def filesystem(path: str | Path, option: str = "path"):
    """``(fs, path within fs)``; a protocol whose package is missing is a ConfigError naming
    the extra to install (``pip install 'reco-clip[s3]'``)."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(str(path))
    except ImportError as exc:
        proto = protocol(path)
        package, extra = EXTRAS.get(proto, (None, None))
        hint = (f"pip install 'reco-clip[{extra}]' (adds {package})" if extra
                else f"install the fsspec implementation of {proto}:// ({exc})")
        raise ConfigError(f"{option} {path}: the {proto}:// protocol needs a package that is not "
                          f"installed; {hint}") from None
    except ValueError as exc:
        raise ConfigError(f"{option} {path}: {exc}") from None


def check_paths(**paths: str | Path | None) -> None:
    """Fail early (before any work) on a path whose protocol cannot be opened here."""
    for option, path in paths.items():
        for item in ([] if path is None else path if isinstance(path, (list, tuple)) else [path]):
            if is_url(item):
                filesystem(item, f"--{option.replace('_', '-')}")


def _listing(fs, root: str) -> dict[str, int]:
    """``{relative path: size}`` of the files under ``root``, temporaries left out."""
    root = root.rstrip("/")
    out = {}
    for path, info in fs.find(root, detail=True).items():
        rel = path[len(root):].lstrip("/")
        if rel and info.get("type", "file") == "file" and not re.search(r"(^|/)\.[^/]*\.tmp-", rel):
            out[rel] = int(info.get("size") or 0)
    return out


def _marker_last(names) -> list[str]:
    return sorted(names, key=lambda rel: (os.path.basename(rel) in MARKERS, rel))


def mirror(src: str | Path, dest: str | Path, *, option: str = "input") -> dict:
    """Copy the folder ``src`` (any fsspec URL) into the local folder ``dest``: files missing
    or of another size are fetched (each to a temporary name, then renamed), markers last."""
    fs, root = filesystem(src, f"--{option}")
    if not fs.isdir(root):
        raise FormatError(f"--{option} {src}: no such folder")
    dest = Path(dest)
    if not is_url(src) and dest.exists() and Path(src).resolve() == dest.resolve():
        return {"source": str(src), "local": str(dest), "files": 0, "fetched": 0}
    files, fetched = _listing(fs, root), 0
    if not files:
        raise FormatError(f"--{option} {src}: the folder is empty; has the previous stage run?")
    for rel in _marker_last(files):
        target = dest / rel
        if target.is_file() and target.stat().st_size == files[rel] and os.path.basename(rel) not in MARKERS:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            fs.get_file(f"{root.rstrip('/')}/{rel}", str(tmp))
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        fetched += 1
    log.info("%s -> %s: %d file(s) fetched, %d up to date", src, dest, fetched, len(files) - fetched)
    return {"source": str(src), "local": str(dest), "files": len(files), "fetched": fetched}


def publish(src: str | Path, dest: str | Path, *, option: str = "output") -> dict:
    """Copy the local folder ``src`` to ``dest`` (any fsspec URL), markers last; each file is
    written to a temporary name then moved (a plain put where the store's puts are atomic)."""
    import fsspec

    fs, root = filesystem(dest, f"--{option}")
    local = fsspec.filesystem("file")
    files = _listing(local, str(Path(src).resolve()))
    root = root.rstrip("/")
    for rel in _marker_last(files):
        target = f"{root}/{rel}"
        fs.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{os.path.dirname(target)}/.{os.path.basename(target)}.tmp-{uuid.uuid4().hex[:8]}"
        fs.put_file(str(Path(src) / rel), tmp)
        fs.mv(tmp, target)
    log.info("%s -> %s: %d file(s) published", src, dest, len(files))
    return {"local": str(src), "destination": str(dest), "files": len(files)}


def cache_folder(workdir: str | Path, url: str | Path) -> Path:
    """A local folder under ``workdir/cache`` for the mirror of ``url``."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(url).replace("://", "/")).strip("_.")
    return Path(workdir) / "cache" / slug


def local_input(workdir: str | Path, path: str | Path | None, option: str) -> str | Path | None:
    """``path`` itself when local (or None); a URL is mirrored into a cache folder of
    ``workdir`` and that folder returned."""
    if not is_url(path):
        return path
    return mirror(path, cache_folder(workdir, path), option=option)["local"]


@contextlib.contextmanager
def staged(inputs: Mapping[Path, str | Path | None] = {},
           outputs: Mapping[Path, str | Path | None] = {}) -> Iterator[dict]:
    """Mirror each ``{local place: source}`` input whose source is given, run the block, then
    publish each ``{local place: destination}`` output whose destination is given. Local sources
    and destinations are copied the same way (any fsspec path)."""
    info: dict = {"inputs": [], "outputs": []}
    for place, (option, src) in _named(inputs):
        info["inputs"].append(mirror(src, place, option=option))
    check_paths(**{option: dst for _, (option, dst) in _named(outputs)})
    yield info
    for place, (option, dst) in _named(outputs):
        info["outputs"].append(publish(place, dst, option=option))


def _named(mapping) -> list[tuple[Path, tuple[str, str]]]:
    """``{place: src}`` or ``{place: (option, src)}`` -> [(place, (option, src))] for set srcs."""
    out = []
    for place, value in mapping.items():
        option, src = value if isinstance(value, tuple) else ("path", value)
        if src:
            out.append((Path(place), (option, str(src))))
    return out


def published(folder: str | Path, dest: str | Path | None) -> str:
    """``folder`` as a stage summary shows it, with where :func:`staged` published it (if it did)."""
    return f"{folder}" + (f" (published to {dest})" if dest else "")
