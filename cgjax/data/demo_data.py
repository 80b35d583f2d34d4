"""An embedded demo data set: procedural "paintings" whose dimensions are real visual factors.

* artist = palette + stroke character (scale, elongation, preferred angle, jitter);
* style = rendering: ``Pointillism_Dots``, ``Impasto_Dabs``, ``Cubist_Facets``, ``Color_Field_Flat``,
  ``Engraved_Hatching`` (correlated with the artist, not determined by it);
* genre = composition: ``landscape`` (horizon), ``portrait`` (central figure), ``still_life``
  (table with objects), ``cityscape`` (vertical blocks).

Per-image palette jitter, borrowed colours, scale/angle jitter and pixel noise make it learnable but
not trivial. Everything derives from ``seed`` (image i from ``default_rng([seed, i])``), so the same
seed gives byte-identical files. Output (the original formats, see ``docs/schema.md``)::

    DIR/images/<artist_folder>/<artist_folder>_<k>.png
    DIR/dataset.json  (image paths "images/<folder>/<file>": valid with the images root DIR, the
                       original default, or DIR/images, where the leading "images/" is stripped)
    DIR/train.json  DIR/val.json  DIR/test.json  DIR/targets.csv  DIR/vocab.json
"""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Sequence

import numpy as np
from absl import flags, logging
from PIL import Image

from cgjax import commandline, persistence
from cgjax.data.examples import load_data
from cgjax.data.records import format_target_keys, write_dataset_json, write_targets_csv
from cgjax.data.schema import DEFAULT_DIMENSIONS, Record, TargetRow, Vocabulary, read_json, save_vocab
from cgjax.data.signals import Signals, write_signals


@dataclasses.dataclass(frozen=True)
class Artist:
    slug: str
    folder: str
    palette: tuple[tuple[int, int, int], ...]
    palette_desc: str
    stroke_desc: str
    scale: float        # stroke / dot / facet size multiplier
    aspect: float       # dab elongation
    angle: float        # preferred stroke angle (degrees)
    angle_jitter: float
    style_weights: tuple[float, ...]   # over STYLES
    genre_weights: tuple[float, ...]   # over GENRES
    years: tuple[int, int]


STYLES = ("Pointillism_Dots", "Impasto_Dabs", "Cubist_Facets", "Color_Field_Flat", "Engraved_Hatching")
GENRES = ("landscape", "portrait", "still_life", "cityscape")

ARTISTS = (
    Artist("maren-okafor", "okafor",
           ((204, 153, 51), (170, 75, 40), (120, 80, 45), (238, 222, 180), (110, 120, 60)),
           "warm ochre and rust", "short comma-like strokes", 1.0, 2.2, 45.0, 20.0,
           (0.25, 0.50, 0.05, 0.10, 0.10), (0.40, 0.20, 0.25, 0.15), (1881, 1905)),
    Artist("teodor-lindqvist", "lindqvist",
           ((30, 60, 120), (40, 130, 140), (100, 110, 130), (225, 235, 245), (90, 70, 150)),
           "cool blue and slate", "long thin horizontal strokes", 0.8, 3.5, 0.0, 10.0,
           (0.10, 0.15, 0.05, 0.25, 0.45), (0.35, 0.15, 0.15, 0.35), (1902, 1931)),
    Artist("ilse-marchetti", "marchetti",
           ((240, 170, 190), (170, 225, 190), (245, 235, 140), (190, 170, 230), (250, 200, 160)),
           "pale pastel", "tiny soft touches", 0.6, 1.4, 90.0, 60.0,
           (0.50, 0.20, 0.05, 0.15, 0.10), (0.25, 0.30, 0.30, 0.15), (1890, 1912)),
    Artist("jun-abernathy", "abernathy",
           ((90, 60, 35), (40, 80, 45), (50, 50, 55), (140, 30, 35), (225, 215, 190)),
           "dark earthy umber and green", "broad heavy vertical strokes", 1.5, 2.6, 90.0, 12.0,
           (0.05, 0.20, 0.45, 0.05, 0.25), (0.20, 0.35, 0.20, 0.25), (1910, 1944)),
    Artist("odile-kestrel", "kestrel",
           ((225, 50, 35), (30, 70, 190), (245, 200, 30), (25, 25, 25), (245, 245, 240)),
           "vivid primary red, blue and yellow", "crisp angular marks", 1.3, 1.8, 135.0, 25.0,
           (0.10, 0.05, 0.35, 0.45, 0.05), (0.15, 0.20, 0.25, 0.40), (1915, 1950)),
)

STYLE_EVIDENCE = {
    "Pointillism_Dots": ("The surface is built from small separate dots of colour on a pale ground",
                         "Discrete round dots of unmixed colour cover the canvas"),
    "Impasto_Dabs": ("Thick overlapping dabs with visible direction and raised highlights",
                     "Dense, loaded dabs of paint laid side by side"),
    "Cubist_Facets": ("The forms are broken into angular facets with dark contour lines",
                      "Flat polygonal planes, each shaded in one direction, fracture the scene"),
    "Color_Field_Flat": ("Large flat fields of few colours with crisp edges",
                         "The image is reduced to broad, evenly filled colour areas"),
    "Engraved_Hatching": ("Parallel and crossed hatching lines model light and shade",
                          "Tone is rendered by regular ink lines, denser and crossed in the darks"),
}
STYLE_LINK = ("the hallmark of {s}", "as in {s}")
ARTIST_LINK = ("point to {a}", "suggest the hand of {a}")


@dataclasses.dataclass
class DemoPainting:
    artist: Artist
    style: str
    genre: str
    image: np.ndarray  # uint8 [H, W, 3]
    genre_evidence: str
    reason: str


# ------------------------------------------------------------------------------------------------
# composition (genre): a role map plus one colour per role


def _compose(genre: str, size: int, rng: np.random.Generator):
    """Returns (roles int [H,W], n_roles, evidence sentence)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    roles = np.zeros((size, size), np.int32)
    if genre == "landscape":
        h = rng.uniform(0.35, 0.68)
        amp, freq, ph = rng.uniform(0.01, 0.08), rng.uniform(3, 9), rng.uniform(0, 6.3)
        roles[y > h + amp * np.sin(freq * x + ph)] = 1
        hills = h - rng.uniform(0.05, 0.15) + 0.06 * np.sin(rng.uniform(2, 5) * x + ph)
        roles[(roles == 0) & (y > hills)] = 2
        if rng.random() < 0.6:
            cx, cy, r = rng.uniform(0.15, 0.85), rng.uniform(0.08, h - 0.15), rng.uniform(0.05, 0.1)
            roles[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = 3
        where = "low" if h > 0.55 else ("high" if h < 0.45 else "")
        evidence = f"A {where + ' ' if where else ''}horizon line dividing sky from ground marks it as a landscape"
    elif genre == "portrait":
        cx, cy = 0.5 + rng.uniform(-0.08, 0.08), rng.uniform(0.33, 0.45)
        rx, ry = rng.uniform(0.13, 0.19), rng.uniform(0.17, 0.24)
        roles[(y > cy + ry * 0.8) & (np.abs(x - cx) < 0.18 + (y - cy - ry * 0.8) * 0.9)] = 1  # shoulders
        roles[((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1.0] = 2                          # head
        roles[(((x - cx) / (rx * 1.08)) ** 2 + ((y - cy + 0.05) / ry) ** 2 < 1.0) & (y < cy - ry * 0.45)] = 3  # hair
        evidence = "A single central figure with head and shoulders facing out makes it a portrait"
    elif genre == "still_life":
        t = rng.uniform(0.58, 0.72)
        roles[y > t] = 1
        n = int(rng.integers(2, 5))
        for cx in np.sort(rng.uniform(0.15, 0.85, n)):
            if rng.random() < 0.5:  # fruit
                r = rng.uniform(0.06, 0.11)
                roles[(x - cx) ** 2 + (y - (t - r * 0.8)) ** 2 < r * r] = 2
            else:  # bottle / vase
                w, hgt = rng.uniform(0.04, 0.08), rng.uniform(0.2, 0.35)
                roles[(np.abs(x - cx) < w) & (y > t - hgt) & (y < t + 0.03)] = 3
        evidence = "Several objects resting on a table edge make it a still_life"
    elif genre == "cityscape":
        n = int(rng.integers(4, 8))
        edges = np.sort(np.concatenate([[0.0, 1.0], rng.uniform(0.05, 0.95, n - 1)]))
        for k in range(n):
            top = rng.uniform(0.15, 0.6)
            roles[(x >= edges[k]) & (x < edges[k + 1]) & (y > top)] = 1 + (k % 2)
        win = (np.sin(x * size * 0.9) > 0.7) & (np.sin(y * size * 0.9) > 0.7) & (roles > 0)
        roles[win] = 3
        roles[y > 0.9] = 4
        evidence = "Tall vertical blocks of buildings against the sky make it a cityscape"
    else:
        raise ValueError(f"unknown genre {genre!r}")
    return roles, int(roles.max()) + 1, evidence


# Luminance rank (0 darkest .. 4 lightest of the 5 palette colours) of each composition role: the
# genre's light/dark layout (light sky over dark ground, a lit face on a dark ground, ...) with the
# artist's own colours. Exactly the colours of a random permutation, so the palette cue is unchanged.
GENRE_ROLE_LUMINANCE = {
    "landscape": (4, 0, 1, 3),        # sky, ground, hills, sun
    "portrait": (0, 2, 4, 1),         # background, shoulders, head, hair
    "still_life": (1, 2, 4, 3),       # wall, table, fruit, bottle
    "cityscape": (3, 0, 1, 4, 2),     # sky, building, building, windows, street
}


def _role_palette_index(genre: str, pal: np.ndarray, n_roles: int, rng: np.random.Generator) -> np.ndarray:
    """Palette index per role: by the genre's luminance layout (80%), else a random permutation."""
    if rng.random() < 0.8:
        by_luminance = np.argsort(pal @ np.array([0.299, 0.587, 0.114], np.float32), kind="stable")
        return by_luminance[np.asarray(GENRE_ROLE_LUMINANCE[genre][:n_roles])]
    return rng.permutation(len(pal))[:n_roles] if n_roles <= len(pal) else rng.integers(len(pal), size=n_roles)


def _palette(artist: Artist, rng: np.random.Generator) -> np.ndarray:
    pal = np.asarray(artist.palette, np.float32)
    if rng.random() < 0.2:  # borrow one colour from another artist (overlap)
        other = ARTISTS[int(rng.integers(len(ARTISTS)))]
        pal[int(rng.integers(len(pal)))] = other.palette[int(rng.integers(len(other.palette)))]
    pal += rng.normal(0, 14, pal.shape)
    return np.clip(pal, 0, 255)


# ------------------------------------------------------------------------------------------------
# rendering (style)


def _nearest(px: np.ndarray, py: np.ndarray, cx: np.ndarray, cy: np.ndarray, second: bool = False):
    """Nearest centre index, its squared distance (and the second-nearest one) for every pixel."""
    shape = px.shape
    px, py = px.reshape(-1), py.reshape(-1)
    n = len(cx)
    arg = np.empty(px.shape, np.int64)
    d1 = np.empty(px.shape, np.float32)
    d2 = np.full(px.shape, np.inf, np.float32)
    step = max(1, 2_000_000 // max(n, 1))
    for s in range(0, len(px), step):
        d = (px[s:s + step, None] - cx) ** 2 + (py[s:s + step, None] - cy) ** 2
        a = d.argmin(1)
        arg[s:s + step] = a
        d1[s:s + step] = d[np.arange(len(a)), a]
        if second and n > 1:
            d2[s:s + step] = np.partition(d, 1, axis=1)[:, 1]
    return arg.reshape(shape), d1.reshape(shape), d2.reshape(shape)


def _sample(field: np.ndarray, cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
    h, w = field.shape[:2]
    return field[np.clip(cy.astype(np.int32), 0, h - 1), np.clip(cx.astype(np.int32), 0, w - 1)]


def _render(style: str, field: np.ndarray, clean: np.ndarray, pal: np.ndarray, artist: Artist,
            rng: np.random.Generator) -> np.ndarray:
    """Paints ``field`` (noisy scene colours; ``clean`` without pixel noise) in ``style``."""
    size = field.shape[0]
    py, px = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    scale = artist.scale * rng.uniform(0.8, 1.25) * size / 64.0
    angle = np.deg2rad(artist.angle + rng.normal(0, artist.angle_jitter))
    paper = np.clip(np.max(pal, 0) * 0.25 + 190, 0, 255)
    if style == "Pointillism_Dots":
        r = 1.4 * scale
        n = int(1.3 * size * size / (np.pi * r * r))
        cx, cy = rng.uniform(0, size, n), rng.uniform(0, size, n)
        col = _sample(field, cx, cy) + rng.normal(0, 22, (n, 3))
        arg, d2, _ = _nearest(px, py, cx.astype(np.float32), cy.astype(np.float32))
        out = np.where((d2 < r * r)[..., None], col[arg], paper)
    elif style == "Impasto_Dabs":
        length, width = 1.6 * scale * artist.aspect, 1.6 * scale
        n = int(1.6 * size * size / (np.pi * length * width))
        cx, cy = rng.uniform(0, size, n), rng.uniform(0, size, n)
        th = angle + rng.normal(0, np.deg2rad(artist.angle_jitter), n)
        col = _sample(field, cx, cy) * rng.uniform(0.85, 1.15, (n, 1))
        # anisotropic nearest dab: stretch space along the dominant angle
        c, s = np.cos(angle), np.sin(angle)
        u, v = (px * c + py * s) / artist.aspect, (-px * s + py * c)
        cu, cv = (cx * c + cy * s) / artist.aspect, (-cx * s + cy * c)
        arg, d2, _ = _nearest(u, v, cu.astype(np.float32), cv.astype(np.float32))
        dv = (-px * np.sin(th[arg]) + py * np.cos(th[arg])) - (-cx[arg] * np.sin(th[arg]) + cy[arg] * np.cos(th[arg]))
        ridge = 1.0 + 0.25 * np.cos(np.clip(dv / width, -1.5, 1.5) * 2.0)
        out = col[arg] * ridge[..., None] * 0.9
        out = np.where((d2 < (width * 1.6) ** 2)[..., None], out, field * 0.75)
    elif style == "Cubist_Facets":
        n = max(8, int(size * size / (38.0 * scale * scale)))
        cx, cy = rng.uniform(0, size, n), rng.uniform(0, size, n)
        arg, d2, second = _nearest(px, py, cx.astype(np.float32), cy.astype(np.float32), second=True)
        col = _sample(field, cx, cy)
        gx, gy = np.cos(angle + rng.normal(0, 0.6, n)), np.sin(angle + rng.normal(0, 0.6, n))
        shade = 1.0 + 0.045 / scale * ((px - cx[arg]) * gx[arg] + (py - cy[arg]) * gy[arg])
        out = col[arg] * np.clip(shade, 0.6, 1.4)[..., None]
        edge = (np.sqrt(second) - np.sqrt(d2)) < 0.9 * max(1.0, size / 96.0)
        out = np.where(edge[..., None], out * 0.35, out)
    elif style == "Color_Field_Flat":
        k = 4 * max(1, int(round(scale * 2)))
        mixed = 0.5 * clean + 0.5 * np.repeat(np.repeat(clean[::k, ::k], k, 0), k, 1)[:size, :size]
        idx = ((mixed[..., None, :] - pal) ** 2).sum(-1).argmin(-1)  # posterise to the palette
        out = pal[idx]
    elif style == "Engraved_Hatching":
        lum = clean @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0
        lo, hi = float(lum.min()), float(lum.max())
        dark = 0.1 + 0.8 * (hi - lum) / max(hi - lo, 0.15)  # tone relative to the image's own range
        spacing = max(2.2, 2.4 * scale)
        t1 = (px * np.cos(angle) + py * np.sin(angle)) / spacing
        t2 = (px * np.cos(angle + np.pi / 2) + py * np.sin(angle + np.pi / 2)) / spacing
        ink = ((t1 - np.floor(t1)) < 0.1 + 0.45 * dark) | ((t2 - np.floor(t2)) < 0.9 * (dark - 0.55))
        out = np.where(ink[..., None], clean * 0.5, paper)
    else:
        raise ValueError(f"unknown style {style!r}")
    return out


def render_painting(index: int, seed: int, size: int = 64) -> DemoPainting:
    """Painting ``index`` of the demo set with ``seed`` (independent of the set's size)."""
    rng = np.random.default_rng([seed, index])
    artist = ARTISTS[int(rng.integers(len(ARTISTS)))]
    style = STYLES[int(rng.choice(len(STYLES), p=np.asarray(artist.style_weights) / sum(artist.style_weights)))]
    genre = GENRES[int(rng.choice(len(GENRES), p=np.asarray(artist.genre_weights) / sum(artist.genre_weights)))]
    roles, n_roles, genre_evidence = _compose(genre, size, rng)
    pal = _palette(artist, rng)
    role_colors = pal[_role_palette_index(genre, pal, n_roles, rng)]
    y = np.linspace(-1, 1, size, dtype=np.float32)[:, None, None]
    clean = np.clip(role_colors[roles] * (1.0 + 0.08 * y * rng.uniform(-1, 1)), 0, 255)  # soft light gradient
    field = np.clip(clean + rng.normal(0, 6, clean.shape), 0, 255)
    out = _render(style, field.astype(np.float32), clean.astype(np.float32), pal, artist, rng)
    out = (out - 128.0) * rng.uniform(0.85, 1.15) + 128.0 + rng.uniform(-12, 12)  # contrast / brightness
    out = out + rng.normal(0, 4.0, out.shape)
    image = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    reason = " ".join([
        f"The {artist.palette_desc} palette and {artist.stroke_desc} "
        f"{ARTIST_LINK[int(rng.integers(2))].format(a=artist.slug)}.",
        f"{STYLE_EVIDENCE[style][int(rng.integers(2))]}, {STYLE_LINK[int(rng.integers(2))].format(s=style)}.",
        f"{genre_evidence}.",
    ])
    return DemoPainting(artist, style, genre, image, genre_evidence, reason)


# ------------------------------------------------------------------------------------------------
# the data set on disk


def encode_image(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(image).save(buf, format="PNG", optimize=False)
    else:
        Image.fromarray(image).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def split_names(n: int, fractions: Sequence[float], seed: int) -> list[str]:
    f = np.asarray(fractions, np.float64)
    if f.shape != (3,) or (f < 0).any() or f.sum() <= 0:
        raise ValueError(f"split must be three non-negative fractions train,val,test; got {fractions}")
    f = f / f.sum()
    n_train, n_val = int(round(f[0] * n)), int(round(f[1] * n))
    n_val = min(n_val, n - n_train)
    names = np.array(["test"] * n, dtype=object)
    perm = np.random.default_rng([seed, 7919]).permutation(n)
    names[perm[:n_train]] = "train"
    names[perm[n_train:n_train + n_val]] = "validation"
    return list(names)


def make_demo(out_dir: str | os.PathLike, n_images: int = 240, size: int = 64, seed: int = 0,
              split: Sequence[float] = (0.7, 0.15, 0.15), image_format: str = "png",
              overwrite: bool = True) -> dict[str, str]:
    """Generates the demo set into ``out_dir`` (built in a temporary folder, renamed at the end).

    Returns the paths: ``{"images_root", "dataset_json", "train_json", "val_json", "test_json",
    "targets_csv", "vocab_json"}``. An existing ``out_dir`` is replaced only if it is an earlier demo
    set (has ``vocab.json`` from the demo) or empty.
    """
    out_dir = check_demo_output(out_dir, n_images, size, image_format, overwrite)
    with persistence.atomic_dir(out_dir) as tmp:
        _write_demo(tmp, n_images, size, seed, split, image_format)
    return demo_paths(out_dir)


def check_demo_output(out_dir: str | os.PathLike, n_images: int, size: int, image_format: str,
                      overwrite: bool) -> str:
    """The arguments of a demo-set writer checked, and ``out_dir`` (absolute) free to write: empty,
    absent, or an earlier demo set when ``overwrite``."""
    if image_format not in ("png", "jpg"):
        raise ValueError("image_format must be 'png' or 'jpg'")
    if n_images < 1 or size < 16:
        raise ValueError("n_images must be >= 1 and size >= 16")
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and os.listdir(out_dir):
        if not overwrite or not is_demo_dir(out_dir):
            raise FileExistsError(f"{out_dir} exists and is not an earlier demo set; not replacing it")
    return out_dir


def demo_paths(out_dir: str | os.PathLike) -> dict[str, str]:
    d = os.fspath(out_dir)
    return {"images_root": os.path.join(d, "images"), "dataset_json": os.path.join(d, "dataset.json"),
            "train_json": os.path.join(d, "train.json"), "val_json": os.path.join(d, "val.json"),
            "test_json": os.path.join(d, "test.json"), "targets_csv": os.path.join(d, "targets.csv"),
            "vocab_json": os.path.join(d, "vocab.json")}


def is_demo_dir(d: str) -> bool:
    """True when ``d`` holds a demo set cgjax wrote (its ``vocab.json`` says so)."""
    try:
        return read_json(os.path.join(d, "vocab.json")).get("source") == "cgjax.demo"
    except Exception:
        return False


@dataclasses.dataclass
class DemoSample:
    """One generated image of a demo domain, ready to be written."""

    folder: str                      # images/<folder>/<folder>_<k>.<fmt>
    labels: dict[str, str]
    image: np.ndarray                # uint8 [H, W, 3]
    reason: str
    title: str = ""
    date: str = ""
    extra_concepts: dict = dataclasses.field(default_factory=dict)


def write_demo_set(root: str, samples, n: int, dims: Sequence[str], seed: int, split, fmt: str,
                   generator: dict) -> None:
    """Writes ``n`` samples (``samples(i) -> DemoSample``) in the original formats under ``root``:
    images, dataset/train/val/test JSON, targets CSV and ``vocab.json`` (``source: cgjax.demo``)."""
    splits = split_names(n, split, seed)
    counts: dict[str, int] = {}
    records, targets = [], []
    for i in range(n):
        p = samples(i)
        k = counts.get(p.folder, 0)
        counts[p.folder] = k + 1
        rel = f"images/{p.folder}/{p.folder}_{k}.{fmt}"  # relative to DIR; "images/" strips under DIR/images
        os.makedirs(os.path.join(root, "images", p.folder), exist_ok=True)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(encode_image(p.image, fmt))
        title = p.title.format(k=k + 1)
        records.append(Record(image=rel, labels=dict(p.labels), media=[], title=title, date=p.date,
                              split=splits[i], extra_concepts=dict(p.extra_concepts), row=i))
        targets.append(TargetRow(rel, p.labels, format_target_keys(p.labels, dims), p.reason, row=i + 1))
    write_dataset_json(os.path.join(root, "dataset.json"), records, dims)
    for name, split_name in (("train", "train"), ("val", "validation"), ("test", "test")):
        write_dataset_json(os.path.join(root, f"{name}.json"), [r for r in records if r.split == split_name], dims)
    write_targets_csv(os.path.join(root, "targets.csv"), targets, dims)
    vocabs = {d: Vocabulary.build(d, (r.labels[d] for r in records)) for d in dims}
    save_vocab(os.path.join(root, "vocab.json"), vocabs, source="cgjax.demo",
               generator={"n_images": n, **generator, "seed": seed, "split": [float(x) for x in split],
                          "image_format": fmt})


def _painting_sample(i: int, seed: int, size: int) -> DemoSample:
    p = render_painting(i, seed, size)
    a = p.artist
    year = a.years[0] + (i * 7919 + seed) % (a.years[1] - a.years[0] + 1)
    return DemoSample(a.folder, {"artist": a.slug, "style": p.style, "genre": p.genre}, p.image, p.reason,
                      title=f"{p.genre.replace('_', ' ').title()} No. {{k}}", date=str(year),
                      extra_concepts={"art_movement": ""})


def _write_demo(root: str, n: int, size: int, seed: int, split, fmt: str) -> None:
    write_demo_set(root, lambda i: _painting_sample(i, seed, size), n, DEFAULT_DIMENSIONS, seed, split, fmt,
                   {"size": size})


PROG = "data/make_demo.py"


def define_flags(fv: flags.FlagValues, argv: Sequence[str] | None = None) -> None:
    """``data/make_demo.py``'s flags on ``fv`` (see :mod:`cgjax.commandline`)."""
    del argv  # no config file
    flags.DEFINE_string("out", None, "output folder", required=True, flag_values=fv)
    flags.DEFINE_integer("n_images", 240, "images to generate", flag_values=fv)
    flags.DEFINE_integer("size", 64, "image side in pixels", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "the same seed gives byte-identical files", flag_values=fv)
    flags.DEFINE_list("split", ["0.7", "0.15", "0.15"], "train,val,test fractions", flag_values=fv)
    flags.DEFINE_enum("format", "png", ["png", "jpg"], "image file format", flag_values=fv)


def main(argv: Sequence[str]) -> dict[str, str]:
    """Generate cgjax's procedural demo data set (no download) from a command line, in this process:
    ``main(["--out", DIR, "--n_images", "24"])``; the paths written (see :func:`make_demo`)."""
    return run(commandline.parse(define_flags, argv, PROG))


def run(args: flags.FlagValues) -> dict[str, str]:
    """The demo data set from the parsed flags of :func:`define_flags`."""
    fractions = [float(x) for x in args.split]
    paths = make_demo(args.out, args.n_images, args.size, args.seed, fractions, args.format)
    print(f"wrote {args.n_images} images ({args.size}x{args.size}) to {args.out}")
    for k, v in paths.items():
        print(f"  {k}: {v}")
    return paths


def write_label_signals(dataset_json: str, images_root: str | None, out_path: str, dims: Sequence[str],
                        seed: int = 0, p_correct: float = 0.85) -> None:
    """Stand-in signals (keyed format) from the labels: the true concept scores about 0.9 with
    probability ``p_correct`` (else a random wrong one does), the others uniform in [0, 0.6]."""
    data = load_data(dataset_json, images_root, dimensions=dims)
    rng = np.random.default_rng(seed)
    scores = {}
    for d in data.dimensions:
        k = len(data.vocabs[d])
        s = rng.uniform(0.0, 0.6, size=(len(data.records), k)).astype(np.float32)
        for i, r in enumerate(data.records):
            j = data.vocabs[d].index(r.labels.get(d))
            if j < 0:
                continue
            if k > 1 and rng.uniform() > p_correct:
                j = int(rng.choice([x for x in range(k) if x != j]))
            s[i, j] = rng.uniform(0.8, 1.0)
        scores[d] = s
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    sig = Signals([r.image for r in data.records], {d: data.vocabs[d] for d in data.dimensions}, scores)
    write_signals(out_path, sig, fmt="keyed")
    logging.info("demo: label-derived stand-in signals written to %s", out_path)
