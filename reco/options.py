"""Types and ranges of config options, declared once beside each stage's config dataclass.

Each stage config dataclass names its section (``SECTION = "embed"``), declares a rule per option
that needs more than its type (``RULES = {"threads": Range(1, MAX_THREADS), ...}``) and calls
:func:`check` from ``__post_init__``. So every way of building a config (a preset, ``--set``, a
``--config`` file, the run's recorded ``config.yaml``, ``dataclasses.replace``, a library call)
is validated before any work: the type from the annotation (``int``, ``float``, ``bool``,
``str``, ``X | None``, ``tuple[X, ...]``), then the rule. A bad value raises
:class:`OptionError` naming ``section.option``, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from dataclasses import dataclass
from typing import Any

from reco.errors import ConfigError

# sane maxima shared by several sections
MAX_K = 1024                 # neighbours per query (paper: 10-16)
MAX_BATCH = 1 << 20
MAX_ROWS = 10 ** 9
MAX_THREADS = 1024
MAX_SEED = 2 ** 32 - 1       # numpy's seed range
CLIP_PRECISIONS = ("fp32", "fp16", "bf16", "amp", "amp_bf16", "amp_bfloat16", "pure_fp16", "pure_bf16")
DEVICE = r"cpu|cuda(:\d+)?|auto|mps"


class OptionError(ConfigError):
    """One option's value is of the wrong type or out of its range."""

    def __init__(self, option: str, value: Any, reason: str):
        self.option, self.value, self.reason = option, value, reason
        super().__init__(f"{option}={_show(value)}: {reason}")


@dataclass(frozen=True)
class Range:
    """A number in [lo, hi] (``lo_open``: lo excluded); always finite."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False

    def problem(self, value: Any) -> str | None:
        if not math.isfinite(value):
            return f"must be a finite number {self.text()}"
        low = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        if low or (self.hi is not None and value > self.hi):
            return f"must be {self.text()}"
        return None

    def text(self) -> str:
        lo, hi = _num(self.lo), _num(self.hi)
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{lo}, {hi}]"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        return f"<= {hi}" if self.hi is not None else "(any finite number)"


def _num(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else str(x)


@dataclass(frozen=True)
class Choice:
    """One of a fixed set of values."""

    values: tuple

    def problem(self, value: Any) -> str | None:
        return None if value in self.values else f"must be one of {', '.join(map(str, self.values))}"

    def text(self) -> str:
        return "one of " + ", ".join(map(str, self.values))


@dataclass(frozen=True)
class Pattern:
    """A string matching ``regex`` in full (``example`` shown in the error)."""

    regex: str
    example: str
    words: str = ""                 # what it is, where "like <example>" does not say it

    def problem(self, value: Any) -> str | None:
        return None if re.fullmatch(self.regex, value) else f"must be {self.text()}"

    def text(self) -> str:
        return self.words or f"like {self.example}"


@dataclass(frozen=True)
class Check:
    """A value for which ``accepts(value)`` is true (``examples``: some that are)."""

    accepts: Any
    words: str
    examples: tuple

    def problem(self, value: Any) -> str | None:
        try:
            ok = self.accepts(value)
        except (ValueError, TypeError):
            ok = False
        return None if ok else f"must be {self.words}"

    def text(self) -> str:
        return self.words


def _is_network(text: str) -> bool:
    import ipaddress

    return bool(ipaddress.ip_network(text.strip(), strict=False))


NETWORK = Check(_is_network, "a network (CIDR such as 127.0.0.0/8)", ("127.0.0.0/8", "10.0.0.0/8", "::1/128"))


@dataclass(frozen=True)
class Items:
    """A tuple whose every item follows ``rule``, with at least ``min_items`` items."""

    rule: Any = None
    min_items: int = 0

    def problem(self, value: tuple) -> str | None:
        if len(value) < self.min_items:
            return f"needs at least {self.min_items} item(s)"
        for item in value:
            bad = self.rule.problem(item) if self.rule is not None else None
            if bad:
                return f"item {_show(item)} {bad}"
        return None

    def text(self) -> str:
        inner = f"each {self.rule.text()}" if self.rule is not None else "any items"
        return inner + (f", at least {self.min_items}" if self.min_items else "")


NON_EMPTY = Pattern(r"(?s).*\S.*", "x", "non-empty")
SIZE = Pattern(r"\d+(\.\d+)?[KMGT]B?", "4G, 512M")
SEED = Range(0, MAX_SEED)
# options that left the run config: a recorded config.yaml or stage record that holds them still
# loads and matches (the ablations' options are the experiment's own: experiments.config)
RETIRED = frozenset(f"eval.{name}" for name in (
    "ablations", "ablation_steps", "small_memory_fraction", "ablation_train_k", "ablation_eval_k",
    "ablation_val_fraction", "ablation_val_checkpoints"))


def check(obj: Any) -> None:
    """Validate (and normalise: lists -> tuples, ints -> floats) every field of a stage config
    dataclass against its annotation and ``RULES``; :class:`OptionError` on the first bad one."""
    cls = type(obj)
    section = getattr(cls, "SECTION", cls.__name__)
    rules = getattr(cls, "RULES", {})
    for name, hint in hints(cls).items():
        option = f"{section}.{name}" if section else name
        value = normalise(getattr(obj, name), hint, option)
        rule = rules.get(name)
        if rule is not None and value is not None:
            bad = rule.problem(value)
            if bad:
                raise OptionError(option, value, bad)
        if value is not getattr(obj, name):
            object.__setattr__(obj, name, value)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> tuple:
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    return tuple((k, v) for k, v in typing.get_type_hints(cls).items() if k in fields)


def hints(cls: type) -> dict[str, Any]:
    """{field: type hint} of a config dataclass (init fields only)."""
    return dict(_hints(cls))


def optional(hint: Any) -> tuple[Any, bool]:
    """(the hint without None, whether None is allowed)."""
    args = typing.get_args(hint)
    if type(None) in args and typing.get_origin(hint) in (typing.Union, _UNION):
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


_UNION = type(int | None)


def normalise(value: Any, hint: Any, option: str) -> Any:
    """``value`` as the type ``hint`` names, or OptionError (never another exception)."""
    base, nullable = optional(hint)
    if value is None:
        if nullable:
            return None
        raise OptionError(option, value, f"must be {type_name(hint)}, not null")
    if dataclasses.is_dataclass(base):
        if isinstance(value, base):
            return value
        raise OptionError(option, value, f"must be a section ({base.__name__})")
    if typing.get_origin(base) is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise OptionError(option, value, f"must be {type_name(hint)}")
        inner = typing.get_args(base)[0]
        return tuple(normalise(v, inner, option) for v in value)
    return _scalar(value, base, option)


def _scalar(value: Any, base: type, option: str) -> Any:
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value) if _fits_float(value) else _bad_float(option, value)
    elif base is str:
        if isinstance(value, str):
            return value
    raise OptionError(option, value, f"must be {type_name(base)}, not {type(value).__name__}")


def _fits_float(value) -> bool:
    try:
        float(value)
        return True
    except OverflowError:
        return False


def _bad_float(option: str, value):
    raise OptionError(option, value, "is too large for a float")


def type_name(hint: Any) -> str:
    base, nullable = optional(hint)
    if typing.get_origin(base) is tuple:
        name = f"a list of {type_name(typing.get_args(base)[0])}"
    elif dataclasses.is_dataclass(base):
        name = f"a section ({base.__name__})"
    else:
        name = {bool: "a boolean", int: "an integer", float: "a number", str: "a text"}.get(base, str(base))
    return name + (" or null" if nullable else "")


def rule_text(cls: type, name: str) -> str:
    """What ``name`` of ``cls`` accepts, in words (``reco config keys``)."""
    rule = getattr(cls, "RULES", {}).get(name)
    return type_name(hints(cls)[name]) + (f", {rule.text()}" if rule is not None else "")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def flag_range(lo: int, hi: int):
    """argparse ``type=`` for an integer flag in [lo, hi] (argparse reports the flag, exit 2)."""
    def parse(text: str) -> int:
        import argparse

        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is not in [{lo}, {hi}]")
        return value

    parse.__name__ = "integer"
    return parse


def value_flags(group, *rows: tuple[str, str, str]) -> None:
    """Declare the flags that take one value and default to None (the stage CLIs' input and
    output folders, files and names), from rows of ``(flag, metavar, help)``."""
    for flag, metavar, text in rows:
        group.add_argument(flag, default=None, metavar=metavar, help=text)
