"""The second demo domain: procedural bird photographs with three non-art dimensions.

* species = the bird: body colour, wing/head colour, size, body elongation, tail and beak;
* habitat = the background: ``forest`` (dark trunks), ``wetland`` (water and reeds), ``grassland``
  (green field, blades), ``desert`` (sand dunes), ``city`` (grey blocks);
* season = light and palette: ``spring`` (fresh, pink blossoms), ``summer`` (bright, saturated),
  ``autumn`` (orange cast, falling leaves), ``winter`` (pale, blue cast, snow).

The three are drawn independently (uniform), so no dimension gives another away. Per-image pose,
size, colour jitter and pixel noise keep it learnable but not trivial; image i comes from
``default_rng([seed, i])``. Written in the original formats by :func:`make_birds` (the same layout
as :func:`cgjax.data.demo_data.make_demo`: ``images/<species>/<species>_<k>.png``).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from cgjax import persistence
from cgjax.data.demo_data import DemoSample, check_demo_output, demo_paths, write_demo_set

DIMENSIONS = ("species", "habitat", "season")


@dataclasses.dataclass(frozen=True)
class Species:
    slug: str
    body: tuple[int, int, int]
    wing: tuple[int, int, int]
    scale: float       # body radius multiplier
    aspect: float      # body elongation
    tail: float        # tail length multiplier
    desc: str


SPECIES = (
    Species("crimson_finch", (205, 30, 40), (90, 20, 25), 0.8, 1.2, 0.6, "small round red body with a dark wing"),
    Species("azure_jay", (40, 90, 215), (235, 235, 245), 1.0, 1.5, 1.2, "blue body with a white wing bar"),
    Species("golden_oriole", (245, 200, 20), (20, 20, 20), 0.9, 1.6, 0.9, "bright yellow body and black wings"),
    Species("snowy_egret", (245, 245, 240), (200, 200, 190), 1.2, 2.4, 0.4, "tall slender white body"),
    Species("black_crow", (25, 25, 30), (60, 60, 70), 1.4, 1.7, 1.0, "large all-black body"),
    Species("green_parakeet", (60, 190, 70), (230, 90, 40), 0.9, 1.3, 2.0, "green body and a long tail"),
)
HABITATS = ("forest", "wetland", "grassland", "desert", "city")
SEASONS = ("spring", "summer", "autumn", "winter")

HABITAT_EVIDENCE = {
    "forest": "Dark tree trunks fill the background",
    "wetland": "Still water with reeds lies behind the bird",
    "grassland": "An open green field of grass blades stretches behind it",
    "desert": "Pale sand dunes roll under an empty sky",
    "city": "Grey building blocks with windows stand behind it",
}
SEASON_EVIDENCE = {
    "spring": "fresh light and pink blossoms",
    "summer": "bright saturated light",
    "autumn": "an orange cast and falling leaves",
    "winter": "pale blue light and falling snow",
}
# season: colour multiplier, brightness offset, saturation, particle colour (None: none)
SEASON_LIGHT = {
    "spring": ((0.95, 1.05, 0.95), 15.0, 1.0, (245, 160, 200)),
    "summer": ((1.05, 1.05, 0.9), 25.0, 1.35, None),
    "autumn": ((1.15, 0.85, 0.6), -10.0, 1.0, (215, 100, 25)),
    "winter": ((0.85, 0.95, 1.15), 30.0, 0.55, (250, 250, 255)),
}


@dataclasses.dataclass
class DemoBird:
    species: Species
    habitat: str
    season: str
    image: np.ndarray  # uint8 [H, W, 3]
    reason: str


def _background(habitat: str, size: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.zeros((size, size, 3), np.float32)
    if habitat == "forest":
        img[:] = (40, 85, 45)
        for cx in rng.uniform(0, 1, int(rng.integers(4, 8))):
            w = rng.uniform(0.03, 0.07)
            img[np.abs(x - cx) < w] = (70, 45, 25)
        img[y > 0.88] = (55, 60, 30)
    elif habitat == "wetland":
        h = rng.uniform(0.45, 0.6)
        img[:] = (170, 200, 220)
        water = y > h
        img[water] = (50, 100, 150)
        img[water & (np.sin(y * size * 1.3 + rng.uniform(0, 6)) > 0.8)] = (90, 140, 180)
        for cx in rng.uniform(0, 1, int(rng.integers(5, 10))):
            img[(np.abs(x - cx) < 0.012) & (y > h - rng.uniform(0.1, 0.25)) & (y < h + 0.1)] = (90, 110, 50)
    elif habitat == "grassland":
        h = rng.uniform(0.35, 0.5)
        img[:] = (150, 190, 230)
        img[y > h] = (110, 170, 60)
        blades = (y > h) & (np.sin(x * size * 2.1 + rng.uniform(0, 6)) > 0.6)
        img[blades] = (80, 140, 40)
    elif habitat == "desert":
        img[:] = (200, 215, 235)
        dune = rng.uniform(0.45, 0.6) + 0.06 * np.sin(rng.uniform(3, 7) * x + rng.uniform(0, 6))
        img[y > dune] = (225, 190, 130)
        img[y > dune + 0.2 + 0.04 * np.sin(9 * x)] = (200, 160, 100)
    elif habitat == "city":
        img[:] = (175, 180, 190)
        edges = np.sort(np.concatenate([[0.0, 1.0], rng.uniform(0.05, 0.95, int(rng.integers(3, 6)))]))
        for k in range(len(edges) - 1):
            top = rng.uniform(0.1, 0.5)
            block = (x >= edges[k]) & (x < edges[k + 1]) & (y > top)
            img[block] = (95, 95, 105) if k % 2 else (125, 125, 135)
            win = block & (np.sin(x * size * 1.2) > 0.6) & (np.sin(y * size * 1.2) > 0.6)
            img[win] = (225, 215, 150)
    else:
        raise ValueError(f"unknown habitat {habitat!r}")
    return img


def _draw_bird(img: np.ndarray, sp: Species, rng: np.random.Generator) -> None:
    size = img.shape[0]
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cx, cy = rng.uniform(0.35, 0.65), rng.uniform(0.4, 0.6)
    r = 0.11 * sp.scale * rng.uniform(0.9, 1.1)
    rx, ry = r * np.sqrt(sp.aspect), r / np.sqrt(sp.aspect)
    if sp.aspect > 2:  # a standing, upright bird
        rx, ry = ry, rx
    facing = 1.0 if rng.random() < 0.5 else -1.0
    body_col = np.asarray(sp.body, np.float32) + rng.normal(0, 10, 3)
    wing_col = np.asarray(sp.wing, np.float32) + rng.normal(0, 10, 3)
    tail = ((x - cx) * -facing > rx * 0.6) & ((x - cx) * -facing < rx * (0.6 + sp.tail)) & (
        np.abs(y - cy - 0.3 * ((x - cx) * -facing - rx)) < ry * 0.25)
    img[tail] = wing_col
    img[((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1.0] = body_col
    img[((x - cx + facing * rx * 0.1) / (rx * 0.6)) ** 2 + ((y - cy + ry * 0.1) / (ry * 0.45)) ** 2 < 1.0] = wing_col
    hx, hy, hr = cx + facing * rx * 0.85, cy - ry * 0.85, r * 0.5
    img[(x - hx) ** 2 + (y - hy) ** 2 < hr * hr] = body_col
    beak = ((x - hx) * facing > hr * 0.7) & ((x - hx) * facing < hr * 1.6) & (np.abs(y - hy) < hr * 0.25)
    img[beak] = (240, 160, 30)
    img[(x - hx - facing * hr * 0.35) ** 2 + (y - hy + hr * 0.2) ** 2 < (hr * 0.22) ** 2] = (10, 10, 10)


def _season(img: np.ndarray, season: str, rng: np.random.Generator) -> np.ndarray:
    tint, bright, sat, particle = SEASON_LIGHT[season]
    grey = img.mean(-1, keepdims=True)
    img = grey + (img - grey) * sat
    img = img * np.asarray(tint, np.float32) + bright
    if particle is not None:
        size = img.shape[0]
        n = int(size * size / 60)
        py, px = rng.integers(0, size, n), rng.integers(0, size, n)
        img[py, px] = particle
        img[np.clip(py + 1, 0, size - 1), px] = particle
    return img


def render_bird(index: int, seed: int, size: int = 64) -> DemoBird:
    """Bird image ``index`` of the set with ``seed`` (independent of the set's size)."""
    rng = np.random.default_rng([seed, index, 2])
    sp = SPECIES[int(rng.integers(len(SPECIES)))]
    habitat = HABITATS[int(rng.integers(len(HABITATS)))]
    season = SEASONS[int(rng.integers(len(SEASONS)))]
    img = _background(habitat, size, rng)
    _draw_bird(img, sp, rng)
    img = _season(img, season, rng)
    img = img + rng.normal(0, 5.0, img.shape)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    reason = (f"The {sp.desc} identify a {sp.slug}. {HABITAT_EVIDENCE[habitat]}, so the habitat is {habitat}. "
              f"The scene has {SEASON_EVIDENCE[season]}, typical of {season}.")
    return DemoBird(sp, habitat, season, image, reason)


def bird_labels(b: DemoBird) -> dict[str, str]:
    return {"species": b.species.slug, "habitat": b.habitat, "season": b.season}


def _sample(i: int, seed: int, size: int) -> DemoSample:
    b = render_bird(i, seed, size)
    return DemoSample(b.species.slug, bird_labels(b), b.image, b.reason,
                      title=f"{b.species.slug.replace('_', ' ').title()} No. {{k}}")


def make_birds(out_dir: str | os.PathLike, n_images: int = 240, size: int = 64, seed: int = 0,
               split: Sequence[float] = (0.7, 0.15, 0.15), image_format: str = "png",
               overwrite: bool = True) -> dict[str, str]:
    """The birds set in ``out_dir`` (as :func:`cgjax.data.demo_data.make_demo`; the same paths)."""
    out_dir = check_demo_output(out_dir, n_images, size, image_format, overwrite)
    with persistence.atomic_dir(out_dir) as tmp:
        write_demo_set(tmp, lambda i: _sample(i, seed, size), n_images, DIMENSIONS, seed, split, image_format,
                       {"domain": "birds", "size": size})
    return demo_paths(out_dir)
