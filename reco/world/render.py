"""Rendering of one specimen: the species' sprite under a random pose on a noisy background.

The sprite (shape filled with the body colour and the pattern) depends only on the species and
is drawn once at 3x resolution; each image rotates, scales and places it on a low-frequency noise
background, downsamples to ``image_size`` and adds brightness jitter and pixel noise. Everything
is a pure function of the species and the seed: same seed, same PNG bytes.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from reco.world.species import BODY_COLOURS, PATTERN_COLOURS, Species

SUPERSAMPLE = 3
BACKGROUNDS = {"grey": 128, "dark": 55, "light": 200}


@dataclass(frozen=True)
class Pose:
    background: str      # key of BACKGROUNDS (captions may mention it)
    angle: float         # degrees
    scale: float         # sprite size / image size
    cx: float            # centre, in units of the image size
    cy: float
    brightness: float
    noise_seed: int


def sample_pose(rng: np.random.Generator) -> Pose:
    """A random pose: orientation, size 55-90% of the image, position inside it, background."""
    scale = float(rng.uniform(0.55, 0.9))
    margin = scale / 2
    return Pose(
        background=list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))],
        angle=float(rng.uniform(0.0, 360.0)),
        scale=scale,
        cx=float(rng.uniform(margin, 1 - margin)),
        cy=float(rng.uniform(margin, 1 - margin)),
        brightness=float(rng.uniform(0.88, 1.12)),
        noise_seed=int(rng.integers(2**31)),
    )


def render(species: Species, pose: Pose, image_size: int = 32) -> Image.Image:
    """The RGB image of ``species`` under ``pose``."""
    canvas_size = image_size * SUPERSAMPLE
    rng = np.random.default_rng(pose.noise_seed)
    canvas = _background(pose.background, canvas_size, rng)
    sprite = _sprite(species.shape, species.body, species.pattern, species.pattern_colour, canvas_size)
    side = max(4, int(round(pose.scale * canvas_size)))
    placed = sprite.resize((side, side), Image.BILINEAR, reducing_gap=2.0)
    placed = placed.rotate(pose.angle, resample=Image.BILINEAR).convert("RGBA")
    x = int(round(pose.cx * canvas_size - side / 2))
    y = int(round(pose.cy * canvas_size - side / 2))
    canvas.paste(placed, (x, y), placed)
    small = np.asarray(canvas.resize((image_size, image_size), Image.BOX), dtype=np.float32)
    small = small * pose.brightness + rng.normal(0.0, 4.0, small.shape)
    return Image.fromarray(np.clip(np.rint(small), 0, 255).astype(np.uint8), "RGB")


def to_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def render_png(species: Species, pose: Pose, image_size: int = 32) -> bytes:
    return to_png(render(species, pose, image_size))


def _background(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """Neutral tone plus smooth blotches and a faint colour tint."""
    base = BACKGROUNDS[kind] + rng.uniform(-12, 12, 3)
    blotches = rng.uniform(-28, 28, (4, 4)).astype(np.float32)
    field = np.asarray(Image.fromarray(blotches, "F").resize((size, size), Image.BICUBIC))
    rgb = np.clip(base[None, None, :] + field[:, :, None], 0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


@lru_cache(maxsize=4096)
def _sprite(shape: str, body: str, pattern: str, pcol: str | None, size: int) -> Image.Image:
    """Premultiplied RGBa sprite of a species, centred, fitting its rotation circle."""
    mask = _shape_mask(shape, size)
    texture = Image.new("RGB", (size, size), BODY_COLOURS[body])
    if pattern != "plain":
        PATTERN_DRAWERS[pattern](texture, mask, PATTERN_COLOURS[pcol])
    sprite = texture.convert("RGBA")
    sprite.putalpha(mask)
    return sprite.convert("RGBa")


def _regular(n: int, radius: float, c: float, phase: float = -90.0) -> list[tuple[float, float]]:
    return [(c + radius * math.cos(math.radians(phase + 360 * i / n)),
             c + radius * math.sin(math.radians(phase + 360 * i / n))) for i in range(n)]


def _star(radius: float, c: float) -> list[tuple[float, float]]:
    outer, inner = _regular(5, radius, c), _regular(5, radius * 0.45, c, phase=-90 + 36)
    return [p for pair in zip(outer, inner) for p in pair]


def _cross(radius: float, c: float) -> list[tuple[float, float]]:
    a, b = radius * 0.7, radius * 0.3
    pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b),
           (-a, -b), (-b, -b)]
    return [(c + x, c + y) for x, y in pts]


@lru_cache(maxsize=64)
def _shape_mask(shape: str, size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    c, r = (size - 1) / 2, size * 0.47
    if shape == "circle":
        draw.ellipse([c - r * 0.85, c - r * 0.85, c + r * 0.85, c + r * 0.85], fill=255)
    elif shape == "ring":
        draw.ellipse([c - r * 0.9, c - r * 0.9, c + r * 0.9, c + r * 0.9], fill=255)
        draw.ellipse([c - r * 0.42, c - r * 0.42, c + r * 0.42, c + r * 0.42], fill=0)
    else:
        polygon = {
            "square": lambda: _regular(4, r, c, phase=45),
            "triangle": lambda: [(x, y + r * 0.15) for x, y in _regular(3, r, c)],
            "star": lambda: _star(r, c),
            "diamond": lambda: [(c, c - r), (c + r * 0.6, c), (c, c + r), (c - r * 0.6, c)],
            "cross": lambda: _cross(r * 1.35, c),
            "hexagon": lambda: _regular(6, r * 0.95, c, phase=0),
        }[shape]()
        draw.polygon(polygon, fill=255)
    return mask


def _stripes(texture: Image.Image, mask: Image.Image, colour: tuple) -> None:
    size, draw = texture.size[0], ImageDraw.Draw(texture)
    period = size // 5
    for x0 in range(period // 4, size, period):
        draw.rectangle([x0, 0, x0 + period // 2 - 1, size], fill=colour)


def _dots(texture: Image.Image, mask: Image.Image, colour: tuple) -> None:
    size, draw = texture.size[0], ImageDraw.Draw(texture)
    step, rad = size // 5, size / 16
    for cy in range(step // 2, size, step):
        for cx in range(step // 2 + (step // 2 if (cy // step) % 2 else 0), size, step):
            draw.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=colour)


def _checker(texture: Image.Image, mask: Image.Image, colour: tuple) -> None:
    size, draw = texture.size[0], ImageDraw.Draw(texture)
    cell = size // 6
    for i in range(0, size // cell + 1):
        for j in range(0, size // cell + 1):
            if (i + j) % 2:
                draw.rectangle([i * cell, j * cell, (i + 1) * cell - 1, (j + 1) * cell - 1], fill=colour)


def _rim(texture: Image.Image, mask: Image.Image, colour: tuple) -> None:
    width = max(3, texture.size[0] // 9) | 1
    inner = mask.filter(ImageFilter.MinFilter(width))
    rim = Image.fromarray(((np.asarray(mask) > 127) & (np.asarray(inner) < 128)).astype(np.uint8) * 255)
    texture.paste(Image.new("RGB", texture.size, colour), (0, 0), rim)


PATTERN_DRAWERS = {"stripes": _stripes, "dots": _dots, "checker": _checker, "rim": _rim}
