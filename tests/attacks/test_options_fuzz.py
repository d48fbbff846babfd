"""Option fuzzing over EVERY config field (issue 19, item 9).

The keys come from the dataclasses (``reco.config_tree.option_keys``), the valid and invalid
values from each field's annotation and declared rule (``RULES`` beside each stage config,
``reco.options``): a new field or rule is fuzzed without touching this file (a new rule type
fails here until it gets strategies below). Three ways in are attacked:

* the dataclass itself (library calls, presets, ``dataclasses.replace``),
* a ``--config`` file's tree (``config_tree.apply_file``: check_tree + OmegaConf merge),
* ``--set KEY=TEXT`` with arbitrary text.

Invalid values must raise a ConfigError naming ``section.option`` (never another exception);
valid values must be accepted and kept.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from reco import config_tree, options as o
from reco.config import RecoConfig, preset
from reco.errors import ConfigError

KEYS = {k: v for k, v in config_tree.option_keys().items() if k not in config_tree.TOP_ONLY}
BASE = preset("tiny")
# config dataclasses outside the run tree (flags of one command), fuzzed at the dataclass level;
# none today (REACT's options are the tree's ``react`` section)
STANDALONE: dict[str, tuple[type, str]] = {}
FAST = settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
TREE = settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))


def _field(key: str):
    cls, name = KEYS.get(key) or STANDALONE[key]
    base, nullable = o.optional(o.hints(cls)[name])
    return cls, name, base, nullable, getattr(cls, "RULES", {}).get(name)


# ---------------------------------------------------------------------------------------------
# strategies from the annotation and the rule
# ---------------------------------------------------------------------------------------------

def valid_scalar(kind: type, rule) -> st.SearchStrategy:
    if isinstance(rule, o.Choice):
        return st.sampled_from(rule.values)
    if isinstance(rule, o.Pattern):
        if rule is o.NON_EMPTY:
            return st.text(min_size=1).filter(lambda s: s.strip() and "," not in s)
        return st.from_regex(rule.regex, fullmatch=True).filter(lambda s: "," not in s)
    if isinstance(rule, o.Check):
        return st.sampled_from(rule.examples)
    if isinstance(rule, o.Range):
        if kind is int:
            lo = None if rule.lo is None else int(rule.lo) + (1 if rule.lo_open else 0)
            return st.integers(lo, None if rule.hi is None else int(rule.hi))
        return st.floats(rule.lo, rule.hi, allow_nan=False, allow_infinity=False,
                         exclude_min=rule.lo_open and rule.lo is not None)
    assert rule is None, f"no strategy for rule {rule!r}: add one to this test"
    return {bool: st.booleans(), int: st.integers(), str: st.text().filter(lambda s: "," not in s),
            float: st.floats(allow_nan=False, allow_infinity=False)}[kind]


def valid_value(key: str) -> st.SearchStrategy:
    _, _, base, nullable, rule = _field(key)
    if typing.get_origin(base) is tuple:
        kind = typing.get_args(base)[0]
        rule = rule if rule is not None else o.Items()
        assert isinstance(rule, o.Items), f"{key}: a list option needs an Items rule"
        values = st.lists(valid_scalar(kind, rule.rule), min_size=rule.min_items, max_size=4)
    else:
        values = valid_scalar(base, rule)
    return st.one_of(st.none(), values) if nullable else values


def invalid_scalar(kind: type, rule) -> st.SearchStrategy:
    wrong = {bool: st.one_of(st.integers(), st.text()), int: st.one_of(st.booleans(), st.text(), st.floats()),
             float: st.one_of(st.booleans(), st.text()), str: st.one_of(st.booleans(), st.integers(),
                                                                         st.floats())}[kind]
    bad = [wrong, st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)]
    if kind is float:
        bad.append(st.sampled_from([math.nan, math.inf, -math.inf, 10 ** 400]))
    if isinstance(rule, o.Range):
        if rule.lo is not None:
            below = st.integers(max_value=math.ceil(rule.lo) - 1) if kind is int else \
                st.floats(max_value=rule.lo, exclude_max=not rule.lo_open, allow_nan=False, allow_infinity=False)
            bad.append(below)
        if rule.hi is not None:
            bad.append(st.integers(min_value=math.floor(rule.hi) + 1))
    if isinstance(rule, o.Choice):
        bad.append(st.text().filter(lambda s: s not in rule.values))
    if isinstance(rule, o.Pattern):
        bad.append(st.text().filter(lambda s: not re.fullmatch(rule.regex, s)))
    if isinstance(rule, o.Check):
        bad.append(st.text().filter(lambda s: rule.problem(s) is not None))
    return st.one_of(*bad)


def invalid_value(key: str) -> st.SearchStrategy:
    _, _, base, nullable, rule = _field(key)
    bad = [] if nullable else [st.none()]
    if typing.get_origin(base) is tuple:
        kind = typing.get_args(base)[0]
        items = rule if isinstance(rule, o.Items) else o.Items()
        bad += [st.integers(), st.text(min_size=1),       # not a list
                st.lists(invalid_scalar(kind, items.rule), min_size=1, max_size=3)]
        if items.min_items:
            bad.append(st.just([]))
    else:
        bad += [invalid_scalar(base, rule), st.lists(st.integers(), max_size=2)]
    return st.one_of(*bad)


def _nested(key: str, value) -> dict:
    *sections, leaf = key.split(".")
    data: dict = {leaf: value}
    for s in reversed(sections):
        data = {s: data}
    return data


def _get(cfg, key: str):
    if key in STANDALONE:
        key = key.split(".", 1)[1]
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _replace(cfg, key: str, value):
    if key in STANDALONE:
        cls, name = STANDALONE[key]
        return dataclasses.replace(cls(), **{name: value})
    head, _, rest = key.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: _replace(getattr(cfg, head), rest, value)})


def _same(got, want) -> bool:
    if isinstance(want, (list, tuple)):
        return tuple(got) == tuple(want)
    return got == want and type(got) is (float if isinstance(want, float) or
                                          (type(got) is float and type(want) is int) else type(want))


def _names_option(exc: ConfigError, key: str) -> bool:
    return key in str(exc)


# ---------------------------------------------------------------------------------------------
# the attacks
# ---------------------------------------------------------------------------------------------

def test_every_field_has_strategies():
    """Every option of every section is fuzzed (new fields are picked up here)."""
    assert len(KEYS) > 90
    for key in KEYS:
        valid_value(key), invalid_value(key)


@pytest.mark.parametrize("key", sorted(KEYS) + sorted(STANDALONE))
@FAST
@given(data=st.data())
def test_dataclass_accepts_valid_and_names_invalid(key, data):
    value = data.draw(valid_value(key), "valid")
    cfg = _replace(BASE, key, value)
    assert _same(_get(cfg, key), value)
    bad = data.draw(invalid_value(key), "invalid")
    with pytest.raises(ConfigError) as err:
        _replace(BASE, key, bad)
    assert _names_option(err.value, key), str(err.value)


@pytest.mark.parametrize("key", sorted(KEYS))
@TREE
@given(data=st.data())
def test_config_file_tree_accepts_valid_and_names_invalid(key, data):
    value = data.draw(valid_value(key), "valid")
    cfg = config_tree.apply_file(BASE, "fuzz.yaml", _nested(key, value))
    assert _same(_get(cfg, key), value)
    others = {k for k in KEYS if k != key and _get(cfg, k) != _get(BASE, k)}
    assert not others, f"merging {key} changed {others}"
    bad = data.draw(invalid_value(key), "invalid")
    with pytest.raises(ConfigError) as err:
        config_tree.apply_file(BASE, "fuzz.yaml", _nested(key, bad))
    assert "fuzz.yaml" in str(err.value) and _names_option(err.value, key), str(err.value)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(key=st.sampled_from(sorted(KEYS)), text=st.text(max_size=30))
def test_set_with_any_text_is_accepted_or_names_the_option(key, text):
    try:
        cfg = config_tree.apply_sets(BASE, [f"{key}={text}"])
    except ConfigError as exc:
        assert key in str(exc), str(exc)
    else:
        assert isinstance(cfg, RecoConfig)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_set_accepts_every_valid_scalar_as_text(data):
    key = data.draw(st.sampled_from(sorted(KEYS)))
    value = data.draw(valid_value(key))
    if isinstance(value, str) and (value != value.strip() or value.lower() in ("none", "null", "~")):
        return                                    # --set strips, and none/null mean None
    if isinstance(value, list) and any(v != v.strip() or not v for v in value if isinstance(v, str)):
        return
    text = ("none" if value is None else ",".join(map(_text, value)) if isinstance(value, list)
            else _text(value))
    cfg = config_tree.apply_sets(BASE, [f"{key}={text}"])
    got = _get(cfg, key)
    assert _same(got, value) or (isinstance(value, float) and math.isclose(got, value)), (got, value)


def _text(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)
