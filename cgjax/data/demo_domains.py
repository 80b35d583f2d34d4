"""The demo's concept domains by name: ``art`` (procedural paintings, artist / style / genre,
:mod:`cgjax.data.demo_data`) and ``birds`` (procedural birds, species / habitat / season,
:mod:`cgjax.data.demo_birds`). Each gives its data-set writer and an image renderer with labels
(the demo's CLIP pretraining corpus)."""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from cgjax.data import demo_birds, demo_data
from cgjax.data.schema import DEFAULT_DIMENSIONS


@dataclasses.dataclass(frozen=True)
class DemoDomain:
    name: str
    dims: tuple[str, ...]
    classes: tuple[tuple[str, ...], ...]                       # per dimension, every label the renderer draws
    make: Callable[..., dict[str, str]]                        # make(out_dir, n_images=, size=, seed=) -> paths
    render: Callable[[int, int, int], tuple[np.ndarray, dict[str, str]]]  # (i, seed, size) -> image, labels
    clip_loss_weights: tuple[float, ...]                       # the CLIP pretraining's loss weight per dimension
    noun: str                                                  # what an image shows, for log lines


def _painting(i: int, seed: int, size: int):
    p = demo_data.render_painting(i, seed, size)
    return p.image, {"artist": p.artist.slug, "style": p.style, "genre": p.genre}


def _bird(i: int, seed: int, size: int):
    b = demo_birds.render_bird(i, seed, size)
    return b.image, demo_birds.bird_labels(b)


DOMAINS = {
    "art": DemoDomain("art", DEFAULT_DIMENSIONS,
                      (tuple(a.slug for a in demo_data.ARTISTS), demo_data.STYLES, demo_data.GENRES),
                      demo_data.make_demo, _painting, (1.0, 1.0, 2.0), "paintings"),  # genre learns slowest
    "birds": DemoDomain("birds", demo_birds.DIMENSIONS,
                        (tuple(s.slug for s in demo_birds.SPECIES), demo_birds.HABITATS, demo_birds.SEASONS),
                        demo_birds.make_birds, _bird, (1.0, 1.0, 1.0), "bird images"),
}


def get_domain(name: str) -> DemoDomain:
    """The demo domain ``name``; an unknown name is an error listing the known ones."""
    if name not in DOMAINS:
        raise ValueError(f"unknown demo domain {name!r}; expected one of {sorted(DOMAINS)}")
    return DOMAINS[name]
