"""Caption generators of the generated world.

Kinds (registry :data:`CAPTIONERS`, each ``(species, background, rng, world) -> str``):

* ``attribute``: describes the look ("a red circle with blue stripes on a dark background");
* ``name``: names the species ("a photo of a velar thornwick");
* ``mixed``: both ("velar thornwick, a red striped circle");
* ``generic``: says nothing ("an image");
* ``wrong_name``: names another species (caption noise).

:func:`attribute_prompt` and :func:`name_prompt` are the fixed zero-shot prompts of a species.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from reco.world.species import Species

_PATTERN_ADJ = {"stripes": "striped", "dots": "dotted", "checker": "checkered", "rim": "rimmed"}
_PATTERN_NOUN = {"stripes": "{} stripes", "dots": "{} dots", "checker": "a {} checker pattern",
                 "rim": "a {} rim"}
_ATTRIBUTE_TEMPLATES = (
    "a {look}",
    "a photo of a {look}",
    "a {look} on a {bg} background",
    "a picture of a {look} on a {bg} background",
    "there is a {look} here",
    "a small {look}",
    "a {look}, seen from above",
)
_NAME_TEMPLATES = (
    "a photo of a {name}.",
    "a {name}",
    "my {name}",
    "a {name} on a {bg} background",
    "the {name} we saw today",
    "{name}",
    "a picture of a {name}",
    "another {name} for the collection",
)
_MIXED_TEMPLATES = (
    "a {name}, a {look}",
    "{name}: a {look}",
    "a photo of a {name}, which is a {look}",
    "a {look} called a {name}",
)
_GENERIC = ("an image", "a picture", "a photo", "untitled", "image", "a photo of something",
            "look at this", "a thumbnail", "new upload", "a photo taken today")


def look(species: Species, rng: np.random.Generator | None = None) -> str:
    """Attribute phrase; with ``rng`` one of several equivalent wordings."""
    body, shape, pattern, pcol = species.body, species.shape, species.pattern, species.pattern_colour
    if pattern == "plain":
        return f"plain {body} {shape}" if rng is not None and rng.random() < 0.3 else f"{body} {shape}"
    if rng is None or rng.random() < 0.5:
        return f"{body} {shape} with {_PATTERN_NOUN[pattern].format(pcol)}"
    return f"{pcol} {_PATTERN_ADJ[pattern]} {body} {shape}"


def attribute_prompt(species: Species) -> str:
    """The zero-shot prompt of a species by its look."""
    return f"a photo of a {look(species)}."


def name_prompt(species: Species) -> str:
    """The zero-shot prompt of a species by its name (also the test-split caption)."""
    return f"a photo of a {species.name}."


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def attribute_caption(species: Species, background: str, rng: np.random.Generator,
                      world: Sequence[Species] = ()) -> str:
    return _pick(rng, _ATTRIBUTE_TEMPLATES).format(look=look(species, rng), bg=background)


def name_caption(species: Species, background: str, rng: np.random.Generator,
                 world: Sequence[Species] = ()) -> str:
    return _pick(rng, _NAME_TEMPLATES).format(name=species.name, bg=background)


def mixed_caption(species: Species, background: str, rng: np.random.Generator,
                  world: Sequence[Species] = ()) -> str:
    return _pick(rng, _MIXED_TEMPLATES).format(name=species.name, look=look(species, rng))


def generic_caption(species: Species, background: str, rng: np.random.Generator,
                    world: Sequence[Species] = ()) -> str:
    return _pick(rng, _GENERIC)


def wrong_name_caption(species: Species, background: str, rng: np.random.Generator,
                       world: Sequence[Species] = ()) -> str:
    others = [s for s in world if s.id != species.id]
    if not others:
        return generic_caption(species, background, rng)
    return name_caption(others[int(rng.integers(len(others)))], background, rng)


CAPTIONERS: dict[str, Callable[..., str]] = {
    "attribute": attribute_caption,
    "name": name_caption,
    "mixed": mixed_caption,
    "generic": generic_caption,
    "wrong_name": wrong_name_caption,
}


def choose_kind(rng: np.random.Generator, name_rate: float, noise: float = 0.0) -> str:
    """Kind of caption for one pair: with probability ``noise`` a wrong name or a generic
    caption (half each); otherwise a naming caption (name or mixed) with ``name_rate``, else an
    attribute description."""
    if rng.random() < noise:
        return "wrong_name" if rng.random() < 0.5 else "generic"
    if rng.random() < name_rate:
        return "name" if rng.random() < 0.6 else "mixed"
    return "attribute"


def caption(kind: str, species: Species, background: str, rng: np.random.Generator,
            world: Sequence[Species] = ()) -> str:
    return CAPTIONERS[kind](species, background, rng, world)
