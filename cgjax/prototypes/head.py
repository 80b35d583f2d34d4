"""The prototype concept head: CLIP image embeddings vs per-concept prototypes.

Per dimension and concept the prototype is the L2-normalised mean of the L2-normalised embeddings
of that concept's images; concepts are indexed in order of first appearance and a concept with no
(existing) image is not indexed. The signal of an image for a concept is the raw cosine
``s = f . p_c`` (post-processing lives in ``calibrate.postprocess``).

``PrototypeSet`` holds prototypes and the concept index (numpy, framework-free);
``PrototypeHead`` adds the frozen open_clip image tower (converted to cgjax) and encodes images in
jitted batches of a fixed shape (the last batch is padded, so there is one compilation).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from cgjax.data.records import read_dataset_json, resolve_image
from cgjax.preprocess import preprocess_image

DEFAULT_CLIP_MODEL = "hf-hub:apple/DFN5B-CLIP-ViT-H-14-384"


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


@dataclasses.dataclass
class PrototypeSet:
    """Prototypes ``{dim: float32 [K, D]}`` with their concept index, as the original's payload."""

    clip_model_name: str
    prototypes: dict[str, np.ndarray]
    concept_to_idx: dict[str, dict[str, int]]
    idx_to_concept: dict[str, list[str]]
    temperatures: dict[str, float] = dataclasses.field(default_factory=dict)  # calibration (cgjax)
    source: str = "<memory>"

    def __post_init__(self):
        self.prototypes = {d: np.asarray(p, np.float32) for d, p in self.prototypes.items()}
        self.check()

    def check(self) -> None:
        widths = set()
        for d, p in self.prototypes.items():
            if p.ndim != 2:
                raise ValueError(f"{self.source}: prototypes[{d!r}] must be [K, D], got shape {p.shape}")
            names = self.idx_to_concept.get(d)
            if names is None or len(names) != p.shape[0]:
                raise ValueError(f"{self.source}: idx_to_concept[{d!r}] has {None if names is None else len(names)} "
                                 f"names for {p.shape[0]} prototypes")
            c2i = self.concept_to_idx.get(d)
            if c2i is None or any(c2i.get(n) != i for i, n in enumerate(names)) or len(c2i) != len(names):
                raise ValueError(f"{self.source}: concept_to_idx[{d!r}] disagrees with idx_to_concept[{d!r}]")
            widths.add(p.shape[1])
        if len(widths) > 1:
            raise ValueError(f"{self.source}: dimensions have different embedding widths {sorted(widths)}")

    @property
    def dimensions(self) -> list[str]:
        return list(self.prototypes)

    @property
    def width(self) -> int:
        return next(iter(self.prototypes.values())).shape[1] if self.prototypes else 0

    def require(self, dimension: str) -> None:
        if dimension not in self.prototypes:
            raise ValueError(f"unknown dimension {dimension!r}: {self.source} has prototypes for "
                             f"{self.dimensions}")

    def signals(self, embeddings: Any, dimension: str) -> np.ndarray:
        """Raw cosine ``[N, K]`` of embeddings ``[N, D]`` (normalised here) with ``dimension``'s prototypes."""
        self.require(dimension)
        f = l2_normalize(np.asarray(embeddings, np.float32))
        p = self.prototypes[dimension]
        if f.shape[-1] != p.shape[1]:
            raise ValueError(f"embeddings are {f.shape[-1]} wide but {self.source} holds {p.shape[1]}-wide "
                             f"prototypes: the checkpoint was made with another CLIP model")
        return (f.astype(np.float64) @ p.T.astype(np.float64)).astype(np.float32)

    def subset(self, dimensions: Sequence[str]) -> "PrototypeSet":
        for d in dimensions:
            self.require(d)
        return PrototypeSet(self.clip_model_name, {d: self.prototypes[d] for d in dimensions},
                            {d: dict(self.concept_to_idx[d]) for d in dimensions},
                            {d: list(self.idx_to_concept[d]) for d in dimensions},
                            {d: t for d, t in self.temperatures.items() if d in dimensions}, self.source)

    def merged(self, other: "PrototypeSet") -> "PrototypeSet":
        """This set plus ``other``'s dimensions (other wins on overlap)."""
        if self.prototypes and other.prototypes and self.width != other.width:
            raise ValueError(f"cannot merge {self.source} ({self.width}-wide) with {other.source} "
                             f"({other.width}-wide prototypes)")
        return PrototypeSet(self.clip_model_name, {**self.prototypes, **other.prototypes},
                            {**self.concept_to_idx, **other.concept_to_idx},
                            {**self.idx_to_concept, **other.idx_to_concept},
                            {**self.temperatures, **other.temperatures}, self.source)

    def padded(self, dimensions: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``P [n_dims, K_max, D]`` (zero rows for padding) and the concept mask ``[n_dims, K_max]``."""
        dims = list(dimensions or self.dimensions)
        k_max = max(self.prototypes[d].shape[0] for d in dims)
        p = np.zeros((len(dims), k_max, self.width), np.float32)
        m = np.zeros((len(dims), k_max), bool)
        for i, d in enumerate(dims):
            k = self.prototypes[d].shape[0]
            p[i, :k] = self.prototypes[d]
            m[i, :k] = True
        return p, m

    def with_padded(self, protos: Any, dimensions: Sequence[str] | None = None) -> "PrototypeSet":
        """A copy whose prototypes are taken from a padded ``[n_dims, K_max, D]`` array."""
        dims = list(dimensions or self.dimensions)
        protos = np.asarray(protos, np.float32)
        new = {d: protos[i, : self.prototypes[d].shape[0]].copy() for i, d in enumerate(dims)}
        return dataclasses.replace(self, prototypes={**self.prototypes, **new})

    def label_indices(self, labels: Mapping[str, Sequence[str | None]], dimensions: Sequence[str] | None = None) -> np.ndarray:
        """``[N, n_dims]`` int32 concept indices; -1 for a missing or unknown label."""
        dims = list(dimensions or self.dimensions)
        n = len(labels[dims[0]]) if dims else 0
        out = np.full((n, len(dims)), -1, np.int32)
        for j, d in enumerate(dims):
            c2i = self.concept_to_idx[d]
            for i, lab in enumerate(labels[d]):
                if lab is not None and lab in c2i:
                    out[i, j] = c2i[lab]
        return out


def build_prototypes(
    embeddings: Any,
    labels: Mapping[str, Sequence[str | None]],
    clip_model_name: str = DEFAULT_CLIP_MODEL,
    present: Sequence[bool] | None = None,
) -> PrototypeSet:
    """Mean prototypes, as the original ``build_prototypes``.

    ``embeddings [N, D]`` (normalised here), ``labels[dim][i]`` the label of image i (None when
    missing), ``present[i]`` False for an image that does not exist (it counts for nothing, so a
    concept whose images are all missing is not indexed). Dimensions without any concept are
    left out, as in the original.
    """
    f = l2_normalize(np.asarray(embeddings, np.float32))
    n = f.shape[0]
    present = np.ones(n, bool) if present is None else np.asarray(present, bool)
    protos, c2i, i2c = {}, {}, {}
    for d, labs in labels.items():
        if len(labs) != n:
            raise ValueError(f"dimension {d!r}: {len(labs)} labels for {n} embeddings")
        rows: dict[str, list[int]] = {}
        for i, lab in enumerate(labs):
            if lab is None or lab == "" or not present[i]:
                continue
            rows.setdefault(lab, []).append(i)
        if not rows:
            continue
        names = list(rows)
        means = np.stack([f[rows[c]].astype(np.float64).mean(0) for c in names]).astype(np.float32)
        protos[d] = l2_normalize(means)
        i2c[d] = names
        c2i[d] = {c: i for i, c in enumerate(names)}
    if not protos:
        raise ValueError("build_prototypes: no concept has an existing image in any dimension")
    return PrototypeSet(clip_model_name, protos, c2i, i2c)


# ----------------------------------------------------------------------------- records

def read_records(dataset_json: str, images_root: str | None = None, dimensions: Sequence[str] | None = None,
                 skip_bad: bool = False):
    """The dataset JSON via ``cgjax.data.records`` (``Dataset``: records, dimensions, images_root)."""
    return read_dataset_json(dataset_json, images_root, dimensions=dimensions, skip_bad=skip_bad)


def record_paths(dataset: Any) -> list[str]:
    """Absolute image paths of a ``Dataset``'s records (dataset order)."""
    return [os.path.abspath(resolve_image(dataset.images_root, r.image)) for r in dataset.records]


# ----------------------------------------------------------------------------- head with CLIP

@functools.lru_cache(maxsize=8)
def _encode_fn(graphdef: Any):
    """Jitted ``(state, pixels) -> L2-normalised embeddings``, shared by towers of one structure."""
    def encode(state, pixels):
        f = nnx.merge(graphdef, state).encode_image(pixels).astype(jax.numpy.float32)
        return f / jax.numpy.maximum(jax.numpy.linalg.norm(f, axis=-1, keepdims=True), 1e-12)

    return jax.jit(encode)


class ImageEncoder:
    """Frozen CLIP image tower encoding ``[N, 3, H, W]`` in jitted batches of ONE fixed shape."""

    def __init__(self, model: Any, batch_size: int = 32):
        self.batch_size = int(batch_size)
        graphdef, state = nnx.split(model)
        self._state = state
        self._encode = _encode_fn(graphdef)

    def dispatch(self, pixels: np.ndarray) -> list:
        """Start encoding ``[N, 3, H, W]`` (asynchronously: device arrays, one per batch); the
        caller can prepare the next images meanwhile and :meth:`collect` these later."""
        pixels = np.asarray(pixels, np.float32)
        n, b = pixels.shape[0], self.batch_size
        outs = []
        for s in range(0, n, b):
            chunk = pixels[s: s + b]
            m = chunk.shape[0]
            if m < b:
                chunk = np.concatenate([chunk, np.zeros((b - m,) + chunk.shape[1:], np.float32)])
            outs.append(self._encode(self._state, chunk)[:m])
        return outs

    @staticmethod
    def collect(outs: list) -> np.ndarray:
        """Float32 embeddings ``[N, D]`` of :meth:`dispatch` results (waits for them)."""
        if not outs:
            return np.zeros((0, 0), np.float32)
        return np.asarray(jax.device_get(jax.numpy.concatenate(outs)), np.float32)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """L2-normalised float32 embeddings ``[N, D]``."""
        return self.collect(self.dispatch(pixels))


def _augment_one(img, key, min_scale: float):
    """Random horizontal flip + random resized crop (scale in [min_scale, 1], same aspect) of ``[3, H, W]``."""
    kf, ks, ky, kx = jax.random.split(key, 4)
    h, w = img.shape[1], img.shape[2]
    img = jnp.where(jax.random.bernoulli(kf), img[:, :, ::-1], img)
    s = jax.random.uniform(ks, (), minval=min_scale, maxval=1.0)
    oy = jax.random.uniform(ky, ()) * (1.0 - s) * h
    ox = jax.random.uniform(kx, ()) * (1.0 - s) * w
    return jax.image.scale_and_translate(img, img.shape, (1, 2), jnp.array([1 / s, 1 / s]),
                                         jnp.array([-oy / s, -ox / s]), "linear")


class AugmentedEncoder(ImageEncoder):
    """``ImageEncoder`` applying a random flip + resized crop (jitted, per image) before encoding."""

    def __init__(self, model: Any, batch_size: int = 32, min_scale: float = 0.8):
        super().__init__(model, batch_size)
        graphdef = nnx.graphdef(model)

        def encode_aug(state, pixels, key):
            keys = jax.random.split(key, pixels.shape[0])
            pixels = jax.vmap(lambda x, k: _augment_one(x, k, min_scale))(pixels, keys)
            f = nnx.merge(graphdef, state).encode_image(pixels).astype(jax.numpy.float32)
            return f / jax.numpy.maximum(jax.numpy.linalg.norm(f, axis=-1, keepdims=True), 1e-12)

        self._encode_aug = jax.jit(encode_aug)

    def augmented(self, pixels: np.ndarray, key: Any) -> np.ndarray:
        pixels = np.asarray(pixels, np.float32)
        n, b = pixels.shape[0], self.batch_size
        outs = []
        for i, s in enumerate(range(0, n, b)):
            chunk = pixels[s: s + b]
            m = chunk.shape[0]
            if m < b:
                chunk = np.concatenate([chunk, np.zeros((b - m,) + chunk.shape[1:], np.float32)])
            outs.append(self._encode_aug(self._state, chunk, jax.random.fold_in(key, i))[:m])
        return np.asarray(jax.device_get(jax.numpy.concatenate(outs)), np.float32)


class PrototypeHead:
    """open_clip image tower (cgjax) + prototypes: ``embed_paths`` and ``extract_signal``.

    ``converters.openclip.load_head(model_name, checkpoint)`` builds one from an open_clip
    checkpoint, with the preprocessing from the model's config.
    """

    def __init__(self, model: Any, preprocess_cfg: Any, clip_model_name: str = DEFAULT_CLIP_MODEL,
                 batch_size: int = 32, prototypes: PrototypeSet | None = None, num_workers: int = 8):
        self.model = model
        self.preprocess_cfg = preprocess_cfg
        self.clip_model_name = clip_model_name
        self.encoder = ImageEncoder(model, batch_size)
        self.num_workers = num_workers
        self.prototypes: PrototypeSet | None = None
        if prototypes is not None:
            self.load_prototypes(prototypes)

    @property
    def width(self) -> int:
        """The embedding width D of the CLIP tower (from shapes only, nothing is run)."""
        if getattr(self, "_width", None) is None:
            h, w = tuple(self.preprocess_cfg.size)
            out = jax.eval_shape(self.encoder._encode, self.encoder._state,
                                 jax.ShapeDtypeStruct((self.encoder.batch_size, 3, h, w), np.float32))
            self._width = int(out.shape[-1])
        return self._width

    def load_prototypes(self, ps: PrototypeSet) -> PrototypeSet:
        """Use ``ps`` (read one with :func:`cgjax.prototypes.io.load_prototypes`), checking its width."""
        w = self.width
        if ps.width != w:
            raise ValueError(f"{ps.source} holds {ps.width}-wide prototypes (made with "
                             f"{ps.clip_model_name!r}) but this CLIP model ({self.clip_model_name!r}) embeds "
                             f"to {w}: use the CLIP model the prototypes were built with")
        self.prototypes = ps
        return ps

    # -- images
    def load_pixels(self, paths: Sequence[str]) -> np.ndarray:
        """Preprocessed ``[N, 3, H, W]`` float32 of existing images (PIL ``convert("RGB")``)."""
        def one(p):
            with Image.open(p) as im:
                return preprocess_image(im.convert("RGB"), self.preprocess_cfg)

        if not paths:
            return np.zeros((0, 3, 1, 1), np.float32)
        with ThreadPoolExecutor(max(1, self.num_workers)) as ex:
            return np.stack(list(ex.map(one, paths))).astype(np.float32)

    def embed_paths(self, paths: Sequence[str], missing: str = "skip") -> tuple[np.ndarray, list[str]]:
        """``(embeddings [M, D], kept paths)``; missing files are skipped (``missing="skip"``) or
        raise ``FileNotFoundError`` naming them (``missing="error"``). Images are decoded and
        encoded chunk by chunk, so memory stays bounded."""
        exists = [os.path.isfile(p) for p in paths]
        if missing == "error" and not all(exists):
            bad = [p for p, e in zip(paths, exists) if not e]
            raise FileNotFoundError(f"{len(bad)} image(s) not found, e.g. {bad[:3]}")
        kept = [str(p) for p, e in zip(paths, exists) if e]
        chunk = self.encoder.batch_size * 8
        outs, pending = [], None
        for s in range(0, len(kept), chunk):  # decode chunk k+1 on the host while chunk k encodes
            started = self.encoder.dispatch(self.load_pixels(kept[s: s + chunk]))
            if pending is not None:
                outs.append(self.encoder.collect(pending))
            pending = started
        if pending is not None:
            outs.append(self.encoder.collect(pending))
        emb = np.concatenate(outs) if outs else np.zeros((0, self.width), np.float32)
        return emb, kept

    def build_prototypes(self, concept_to_paths: Mapping[str, Mapping[str, Sequence[str]]]) -> PrototypeSet:
        """The original's ``build_prototypes({dim: {concept: [paths]}})``: missing paths skipped."""
        all_paths = list(dict.fromkeys(p for cp in concept_to_paths.values() for ps in cp.values() for p in ps))
        emb, kept = self.embed_paths(all_paths)
        row = {p: i for i, p in enumerate(kept)}
        protos, c2i, i2c = {}, {}, {}
        for d, cp in concept_to_paths.items():
            names, vecs = [], []
            for c, ps in cp.items():
                rows = [row[p] for p in ps if p in row]
                if rows:
                    names.append(c)
                    vecs.append(emb[rows].astype(np.float64).mean(0))
            if names:
                protos[d] = l2_normalize(np.stack(vecs))
                i2c[d] = names
                c2i[d] = {c: i for i, c in enumerate(names)}
        if not protos:
            raise ValueError("build_prototypes: no image could be found for any concept")
        self.prototypes = PrototypeSet(self.clip_model_name, protos, c2i, i2c)
        return self.prototypes

    def extract_signal(self, image_paths: Sequence[str], dimension: str) -> dict[str, dict[int, np.ndarray]]:
        """``{path: {concept_idx: float32 [1 - s, s]}}`` with raw cosine s; ``{}`` for a missing image."""
        if self.prototypes is None:
            raise ValueError("no prototypes loaded")
        self.prototypes.require(dimension)
        emb, kept = self.embed_paths(list(image_paths))
        s = self.prototypes.signals(emb, dimension) if len(kept) else np.zeros((0, 0), np.float32)
        row = {p: i for i, p in enumerate(kept)}
        out: dict[str, dict[int, np.ndarray]] = {}
        for p in image_paths:
            p = str(p)
            if p in row:
                v = s[row[p]]
                out[p] = {j: np.array([1.0 - v[j], v[j]], np.float32) for j in range(len(v))}
            else:
                out[p] = {}
        return out
