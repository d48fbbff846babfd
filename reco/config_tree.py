"""One config tree per run: read, merged and recorded with OmegaConf, validated as dataclasses.

A run's effective config lives in ``WORKDIR/config.yaml`` (written atomically by the first
stage, updated when a stage succeeds with changed options). Every command builds its config
the same way (:func:`resolve`):

    the run's config.yaml (or, for a new run, the preset: --preset, $RECO_PRESET or demo)
      <- each --config FILE (JSON or YAML, any subset of the tree)
      <- each --set section.option=value

OmegaConf parses the files and merges the trees (unknown keys refused); the result is built
into the frozen :class:`reco.config.RecoConfig`, whose stage dataclasses check every option's
type and range (:mod:`reco.options`). Errors name the option, the value and the file or flag.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from pathlib import Path
from typing import Any

from reco import options as o
from reco.config import PRESET_NAMES, RecoConfig, from_dict, preset
from reco.errors import ConfigError

CONFIG_FILE = "config.yaml"
LEGACY_FILE = "config.json"          # what `reco demo` wrote before config.yaml
DEFAULT_PRESET = "demo"
HEADER = ("# reco run config: the options every stage of this run uses.\n"
          "# Show it with `reco config show --workdir W`; change it with --set section.option=value\n"
          "# or --config FILE on a stage (recorded here when the stage succeeds).\n")
TOP_ONLY = {"workdir": "--workdir", "preset": "--preset"}


# ---------------------------------------------------------------------------------------------
# the schema: every option as a dotted key
# ---------------------------------------------------------------------------------------------

def option_keys(cls: type = RecoConfig, prefix: str = "") -> dict[str, tuple[type, str]]:
    """{"train.steps": (TrainConfig, "steps"), ...}: every leaf option of the tree."""
    out: dict[str, tuple[type, str]] = {}
    for name, hint in o.hints(cls).items():
        base, _ = o.optional(hint)
        if dataclasses.is_dataclass(base):
            out.update(option_keys(base, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = (cls, name)
    return out


def did_you_mean(key: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def unknown_key(key: str, where: str) -> ConfigError:
    section, _, name = key.rpartition(".")
    return ConfigError(f"{where}: unknown option {key} ({section or 'the config'} has no option {name!r})"
                       f"{did_you_mean(key, option_keys())} (`reco config keys` lists them)")


# ---------------------------------------------------------------------------------------------
# reading files and --set, merging
# ---------------------------------------------------------------------------------------------

def read_file(path: str | Path) -> dict[str, Any]:
    """A config file (JSON or YAML) as a plain dict; ConfigError naming the file for a missing,
    unreadable or malformed one."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    try:
        text = path.read_text()
        if path.suffix == ".json":
            tree = OmegaConf.create(json.loads(text) if text.strip() else {})
        else:
            tree = OmegaConf.create(text) if text.strip() else OmegaConf.create({})
        data = OmegaConf.to_container(tree)        # no ${...} interpolation: text stays text
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError, ValueError, OmegaConfBaseException) as exc:
        raise ConfigError(f"{path}: cannot read config: {_one_line(exc)}") from None
    except Exception as exc:                 # the YAML parser's own errors (yaml.YAMLError)
        raise ConfigError(f"{path}: not valid JSON or YAML: {_one_line(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (e.g. {{\"train\": {{\"steps\": 50}}}}), "
                          f"got {type(data).__name__}")
    return data


def check_tree(data: dict[str, Any], where: str, cls: type = RecoConfig, prefix: str = "") -> None:
    """Every key of ``data`` is an option (did you mean ...), every section a mapping and every
    value of its option's type, before anything is merged (YAML reads off/no/yes as booleans: a
    boolean given for a text option is refused rather than turned into 'False')."""
    fields = o.hints(cls)
    for key, value in data.items():
        full = f"{prefix}{key}"
        if not isinstance(key, str) or key not in fields:
            raise unknown_key(str(full), where)
        base, _ = o.optional(fields[key])
        if dataclasses.is_dataclass(base):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {full} is a section: expected a mapping of its options, "
                                  f"got {o._show(value)}")
            check_tree(value, where, base, f"{full}.")
        else:
            try:
                o.normalise(value, fields[key], full)
            except o.OptionError as exc:
                raise ConfigError(f"{where}: {exc}") from None


def parse_set(item: str) -> tuple[str, Any]:
    """``section.option=value`` -> (key, typed value): text as given (never read as YAML: ``off``
    stays a text), lists split at commas (or ``[a,b]``), ``none``/``null`` for an option that
    allows it, numbers and booleans parsed."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.steps=200")
    key, raw = (s.strip() for s in item.split("=", 1))
    keys = option_keys()
    if key in TOP_ONLY:
        raise ConfigError(f"--set {key}: choose the {key} with {TOP_ONLY[key]}")
    if key not in keys:
        example = next((k for k in keys if k.startswith(key + ".")), None)
        if example:
            raise ConfigError(f"--set {item}: {key} is a section; set one of its options, "
                              f"e.g. --set {example}=... (`reco config keys` lists them)")
        raise unknown_key(key, f"--set {item}")
    cls, name = keys[key]
    base, nullable = o.optional(o.hints(cls)[name])
    if nullable and raw.lower() in ("none", "null", "~"):
        return key, None
    if typing.get_origin(base) is tuple:
        inner = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
        kind = typing.get_args(base)[0]
        return key, [_scalar(x.strip(), kind, item, key) for x in inner.split(",") if x.strip()]
    return key, _scalar(raw, base, item, key)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _scalar(raw: str, kind: type, item: str, key: str) -> Any:
    try:
        if kind is bool:
            if raw.lower() in _TRUE + _FALSE:
                return raw.lower() in _TRUE
            raise ValueError(raw)
        return kind(raw) if kind in (int, float) else raw
    except ValueError:
        raise ConfigError(f"--set {item}: not a valid {kind.__name__}: {key} must be "
                          f"{o.type_name(kind)}") from None


def merge(cfg: RecoConfig, data: dict[str, Any], where: str) -> RecoConfig:
    """``cfg`` with the (partial) tree ``data`` merged onto it by OmegaConf (in struct mode:
    unknown keys refused), then built and validated as a RecoConfig."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    current = cfg.to_dict()
    unknown = [k for k in data if k not in current]
    if unknown:
        raise unknown_key(str(unknown[0]), where)
    tree = OmegaConf.create({k: current[k] for k in data})       # only the sections touched
    OmegaConf.set_struct(tree, True)
    try:
        merged = {**current, **OmegaConf.to_container(OmegaConf.merge(tree, OmegaConf.create(data)))}
    except (OmegaConfBaseException, TypeError) as exc:
        key = getattr(exc, "full_key", "") or ""
        raise ConfigError(f"{where}: {key + ': ' if key else ''}{_one_line(exc)}") from None
    try:
        return from_dict(RecoConfig, merged, where=where)
    except o.OptionError as exc:
        raise ConfigError(f"--set {exc}" if where.startswith("--set ") else f"{where}: {exc}") from None


def apply_file(cfg: RecoConfig, path: str | Path, data: dict[str, Any] | None = None) -> RecoConfig:
    data = read_file(path) if data is None else data
    check_tree(data, str(path))
    return merge(cfg, data, str(path))


def apply_sets(cfg: RecoConfig, items: typing.Iterable[str]) -> RecoConfig:
    """``--set section.option=value`` strings, one at a time (the error names the one at fault)."""
    for item in items:
        key, value = parse_set(item)
        cfg = merge(cfg, tree_of(key, value), f"--set {item}")
    return cfg


def tree_of(key: str, value: Any) -> dict[str, Any]:
    """``section.option`` and its value as the nested tree :func:`merge` takes."""
    *sections, leaf = key.split(".")
    data: dict[str, Any] = {leaf: value}
    for s in reversed(sections):
        data = {s: data}
    return data


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


# ---------------------------------------------------------------------------------------------
# the run's recorded config
# ---------------------------------------------------------------------------------------------

def config_path(workdir: str | Path) -> Path:
    return Path(workdir) / CONFIG_FILE


def recorded_file(workdir: str | Path) -> Path | None:
    for name in (CONFIG_FILE, LEGACY_FILE):
        if (Path(workdir) / name).is_file():
            return Path(workdir) / name
    return None


def load_recorded(workdir: str | Path) -> RecoConfig | None:
    """The config recorded in a run folder (its ``workdir`` is the folder), or None."""
    path = recorded_file(workdir)
    if path is None:
        return None
    data = read_file(path)
    data.pop("workdir", None)               # a run is where it is, not where it was made
    for key in o.RETIRED:                   # options a newer reco no longer has
        section, _, name = key.partition(".")
        if isinstance(data.get(section), dict):
            data[section].pop(name, None)
    name = data.get("preset", DEFAULT_PRESET)
    if name not in PRESET_NAMES:
        raise ConfigError(f"{path}: preset={name!r}: must be one of {', '.join(PRESET_NAMES)}")
    return dataclasses.replace(apply_file(preset(name), path, data), workdir=str(workdir))


def save_recorded(cfg: RecoConfig) -> Path:
    """Write ``cfg`` to its run's config.yaml (atomically; without the workdir: runs move)."""
    from omegaconf import OmegaConf

    from reco.formats import atomic_write_text

    data = {k: v for k, v in OmegaConf.to_container(OmegaConf.structured(cfg)).items() if k != "workdir"}
    path = config_path(cfg.workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, HEADER + OmegaConf.to_yaml(OmegaConf.create(data)))
    return path


def record_new(cfg: RecoConfig) -> bool:
    """Record ``cfg`` when its run has no config yet (the first stage); True when written."""
    if recorded_file(cfg.workdir) is not None:
        return False
    save_recorded(cfg)
    return True


def record(cfg: RecoConfig) -> bool:
    """Record ``cfg`` as its run's config unless it already is; True when written."""
    current = config_path(cfg.workdir)
    if current.is_file() and load_recorded(cfg.workdir) == cfg:
        return False
    save_recorded(cfg)
    return True


# ---------------------------------------------------------------------------------------------
# one command's config
# ---------------------------------------------------------------------------------------------

def resolve(*, workdir: str | None = None, preset_name: str | None = None,
            files: typing.Sequence[str] = (), sets: typing.Sequence[str] = ()) -> tuple[RecoConfig, dict]:
    """The effective config of one command (see the module docstring) and where it came from:
    ``{"recorded": path or None, "preset": name}``.

    Args:
        workdir: the run folder (default: a file's ``workdir``, else ``runs/PRESET``).
        preset_name: --preset as typed (None: not given); it must agree with the run's.
        files: --config files, merged in order.
        sets: --set assignments, applied last.
    """
    datas = [(f, read_file(f)) for f in files]
    for f, data in datas:
        check_tree(data, f)
    named = _preset_choice(preset_name, datas)
    default = os.environ.get("RECO_PRESET") or DEFAULT_PRESET
    file_workdir = next((d["workdir"] for _, d in reversed(datas) if "workdir" in d), None)
    workdir = workdir or file_workdir or f"runs/{named or default}"
    recorded_path = recorded_file(workdir)
    base = load_recorded(workdir)
    if base is not None and named and named != base.preset:
        raise ConfigError(f"{workdir} is a {base.preset!r} run (preset recorded in {recorded_path}), "
                          f"but --preset {named} was given: drop --preset to continue this run, "
                          f"or choose another --workdir for a new {named!r} run")
    cfg = base if base is not None else preset(named or default)
    for f, data in datas:
        cfg = apply_file(cfg, f, {k: v for k, v in data.items() if k not in TOP_ONLY})
    cfg = apply_sets(cfg, sets)
    cfg = dataclasses.replace(cfg, workdir=str(workdir))
    return cfg, {"recorded": str(recorded_path) if recorded_path else None, "preset": cfg.preset}


def _preset_choice(flag: str | None, datas: list[tuple[str, dict]]) -> str | None:
    names = [(f"--preset {flag}", flag)] if flag else []
    names += [(f, d["preset"]) for f, d in datas if "preset" in d]
    for where, name in names:
        if name not in PRESET_NAMES:
            raise ConfigError(f"{where}: unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    if len({n for _, n in names}) > 1:
        raise ConfigError("conflicting presets: " + ", ".join(f"{n!r} ({w})" for w, n in names))
    return names[0][1] if names else None
