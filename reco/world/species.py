"""Species of the generated world: attribute combinations with invented two-word names.

A species is a shape, a body colour, a pattern and (unless plain) a pattern colour, e.g. a red
circle with blue stripes, named something like "velar thornwick". Names are random syllables,
never colour or shape words, so a name tells nothing about the look: a CLIP learns a name only
from captions that use it. Everything is a pure function of the seed.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from reco.errors import ConfigError

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon", "ring")
# body colours: saturated, all readable on grey/dark/light backgrounds at 32 px
BODY_COLOURS = {
    "red": (214, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40),
    "green": (40, 170, 60), "cyan": (40, 200, 220), "blue": (40, 70, 220),
    "purple": (140, 50, 190), "pink": (250, 130, 200),
}
PATTERN_COLOURS = {**BODY_COLOURS, "white": (250, 250, 250), "black": (15, 15, 15)}
PATTERNS = ("plain", "stripes", "dots", "checker", "rim")

_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "gl", "h", "k", "l", "m", "n", "p", "pl", "qu",
           "r", "s", "sk", "t", "th", "tr", "v", "w", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
_CODAS = ("", "l", "n", "r", "s", "th", "x", "nd", "rn", "sk")
_ENDINGS = ("wick", "mere", "lark", "fin", "back", "wort", "ling", "tail", "crest", "moth",
            "shell", "horn", "bane", "wing", "kin", "scale")
# words a name must not contain: they would leak the look of the species through the text
_FORBIDDEN = set(SHAPES) | set(PATTERN_COLOURS) | set(PATTERNS) | {
    "red", "tan", "dot", "ring", "star", "grey", "gray", "dark", "light", "stripe", "check", "rim"}


@dataclass(frozen=True)
class Species:
    id: int
    name: str
    shape: str
    body: str
    pattern: str
    pattern_colour: str | None    # None for plain

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def attributes(self) -> tuple:
        return (self.shape, self.body, self.pattern, self.pattern_colour)


def all_attribute_combinations() -> list[tuple]:
    combos = []
    for shape in SHAPES:
        for body in BODY_COLOURS:
            combos.append((shape, body, "plain", None))
            for pattern in PATTERNS[1:]:
                for pcol in PATTERN_COLOURS:
                    if pcol != body:
                        combos.append((shape, body, pattern, pcol))
    return combos


def make_species(n: int, seed: int) -> list[Species]:
    """``n`` species with distinct attribute combinations and distinct names.

    Args:
        n: number of species (1 .. number of attribute combinations).
        seed: world seed; same seed -> same species.
    """
    combos = all_attribute_combinations()
    if not 1 <= n <= len(combos):
        raise ConfigError(f"world.n_species={n}: must be between 1 and {len(combos)}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 101]))
    picked = _pick_spread(combos, n, rng)
    names = make_names(n, rng)
    return [Species(i, names[i], *combos[j]) for i, j in enumerate(picked)]


def _pick_spread(combos: list[tuple], n: int, rng: np.random.Generator) -> list[int]:
    """Random combinations, balanced so every shape and body colour is used about equally."""
    order = rng.permutation(len(combos))
    used: dict[tuple, int] = {}
    picked: list[int] = []
    taken: set[int] = set()
    for rnd in range(1, len(combos) + 1):
        for j in order:
            if len(picked) == n:
                return picked
            shape, body, pattern, _ = combos[j]
            keys = (("s", shape), ("b", body), ("p", pattern))
            if j in taken or any(used.get(k, 0) >= rnd * max(1, n // _size(k)) for k in keys):
                continue
            picked.append(int(j))
            taken.add(int(j))
            for k in keys:
                used[k] = used.get(k, 0) + 1
    return picked


def _size(key: tuple) -> int:
    return {"s": len(SHAPES), "b": len(BODY_COLOURS), "p": len(PATTERNS)}[key[0]]


def make_names(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` invented two-word names; no word is used twice."""
    words: set[str] = set()
    names = []
    while len(names) < n:
        first = _word(rng, 2, "")
        second = _word(rng, 1, _ENDINGS[rng.integers(len(_ENDINGS))])
        if first in words or second in words or _leaks(first) or _leaks(second):
            continue
        words |= {first, second}
        names.append(f"{first} {second}")
    return names


def _word(rng: np.random.Generator, syllables: int, ending: str) -> str:
    parts = []
    for _ in range(int(syllables)):
        parts.append(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))])
    parts.append(_CODAS[rng.integers(len(_CODAS))])
    return "".join(parts) + ending


def _leaks(word: str) -> bool:
    return len(word) < 4 or any(bad in word for bad in _FORBIDDEN)


def split_seen_unseen(n: int, unseen_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(seen ids, unseen ids), sorted; unseen species never appear in the RECO training split."""
    if not 0.0 <= unseen_fraction < 1.0:
        raise ConfigError(f"world.unseen_fraction={unseen_fraction}: must be in [0, 1)")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 202]))
    n_unseen = int(round(unseen_fraction * n))
    unseen = sorted(int(i) for i in rng.permutation(n)[:n_unseen])
    seen = [i for i in range(n) if i not in set(unseen)]
    return seen, unseen


def species_json(species: list[Species], seen: list[int], unseen: list[int],
                 test_groups: dict[str, list[int]] | None = None) -> str:
    """species.json: every species, the ``seen`` / ``unseen`` ids and, for a long-tail world,
    ``test_groups`` (the test species of head, tail and unseen)."""
    data = {"species": [s.to_dict() for s in species], "seen": seen, "unseen": unseen}
    if test_groups:
        data["test_groups"] = test_groups
    return json.dumps(data, indent=2)


def load_species(path) -> tuple[list[Species], list[int], list[int]]:
    """Read ``species.json`` back: (species, seen ids, unseen ids)."""
    with open(path) as f:
        data = json.load(f)
    return [Species(**d) for d in data["species"]], data["seen"], data["unseen"]
