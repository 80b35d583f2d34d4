"""Occlusion saliency for the prototype head and for LLaVA's answer, one jitted call per image.

The preprocessed image ``[3, H, W]`` is cut into a ``grid x grid`` lattice of cells (edges at
``round(linspace(0, H, grid + 1))``); copy ``k`` has cell ``k`` (row-major) filled with the image's
per-channel mean. All copies, plus the unoccluded image as copy 0, are built *inside* one jitted
function from the image and the cell masks and run through the model there, in ``lax.map``
minibatches of a fixed size when ``minibatch > 0`` (bounded memory, still one call). The original
project's prototype maps were all ~0 (the occluded image was never used); here it is.

* :func:`prototype_saliency`: ``heat = max(0, s_base - s_occluded)`` of one concept per dimension
  (the top selected one), ``s`` the signal exactly as the inference computes it (cosine with the
  prototypes, then the export's post-processing).
* :func:`llava_saliency`: ``heat = max(0, loss_occluded - loss_base)``, ``loss`` the teacher-forced
  mean CE of a given answer (the model's own generation) after the prompt, concept tokens on.

Maps come back ``H x W`` (each pixel carries its cell's value; ``upsample=False``: ``grid x grid``),
ready for ``cgjax.eval.report.write_report(saliency={key: {name: map}})``.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cgjax.losses import IGNORE_INDEX, token_cross_entropy
from cgjax.prototypes.calibrate import postprocess

__all__ = ["cell_edges", "occlusion_masks", "occluded_copies", "cells_to_map", "saliency_stats",
           "prototype_saliency", "prototype_scores", "llava_saliency", "answer_losses"]


def cell_edges(n: int, grid: int) -> np.ndarray:
    """``grid + 1`` pixel boundaries of the cells along an axis of length ``n``."""
    if not 1 <= grid <= n:
        raise ValueError(f"saliency grid must be in [1, {n}] for an axis of {n} pixels, got {grid}")
    return np.round(np.linspace(0, n, grid + 1)).astype(np.int64)


def occlusion_masks(height: int, width: int, grid: int, with_base: bool = True) -> np.ndarray:
    """``[grid * grid (+1), H, W]`` float32, 1 on the occluded cell (row-major); with
    ``with_base`` an all-zero mask (the unoccluded image) comes first."""
    rows, cols = cell_edges(height, grid), cell_edges(width, grid)
    m = np.zeros((grid * grid, height, width), np.float32)
    for i in range(grid):
        for j in range(grid):
            m[i * grid + j, rows[i]:rows[i + 1], cols[j]:cols[j + 1]] = 1.0
    if with_base:
        m = np.concatenate([np.zeros((1, height, width), np.float32), m])
    return m


def occluded_copies(pixels: jax.Array, masks: jax.Array) -> jax.Array:
    """``pixels [3, H, W]``, ``masks [N, H, W]`` -> ``[N, 3, H, W]``: masked pixels set to the
    image's per-channel mean (traceable)."""
    fill = jnp.mean(pixels.astype(jnp.float32), axis=(1, 2)).astype(pixels.dtype)
    return jnp.where(masks[:, None] > 0, fill[None, :, None, None], pixels[None])


def _map_minibatches(fn, masks: jax.Array, minibatch: int):
    """``fn`` over ``masks [N, ...]`` in ``lax.map`` chunks of ``minibatch`` (0: all at once);
    the last chunk is padded with copies of mask 0 and the padding dropped."""
    n = masks.shape[0]
    if minibatch <= 0 or minibatch >= n:
        return fn(masks)
    n_mb = -(-n // minibatch)
    pad = n_mb * minibatch - n
    if pad:
        masks = jnp.concatenate([masks, jnp.broadcast_to(masks[:1], (pad,) + masks.shape[1:])])
    out = jax.lax.map(fn, masks.reshape((n_mb, minibatch) + masks.shape[1:]))
    return jax.tree.map(lambda x: x.reshape((n_mb * minibatch,) + x.shape[2:])[:n], out)


def cells_to_map(values: Any, grid: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """Per-cell values ``[grid * grid]`` -> ``[grid, grid]``, or ``size`` (H, W) with each pixel
    holding its cell's value (the cells of :func:`occlusion_masks`)."""
    g = np.asarray(values, np.float32).reshape(grid, grid)
    if size is None:
        return g
    h, w = size
    rows, cols = cell_edges(h, grid), cell_edges(w, grid)
    ri = np.repeat(np.arange(grid), np.diff(rows))
    ci = np.repeat(np.arange(grid), np.diff(cols))
    return g[ri][:, ci]


def saliency_stats(heat: Any) -> dict[str, Any]:
    """The original's stats of a map: mean and max of the min-max normalised map, the position
    ``{i, j}`` of the maximum and the map's shape as ``grid``."""
    h = np.nan_to_num(np.asarray(heat, np.float64))
    span = h.max() - h.min() if h.size else 0.0
    norm = (h - h.min()) / span if span > 0 else np.zeros_like(h)
    i, j = np.unravel_index(int(np.argmax(h)), h.shape) if h.size else (0, 0)
    return {"mean": float(norm.mean()) if h.size else 0.0, "max": float(norm.max()) if h.size else 0.0,
            "max_pos": {"i": int(i), "j": int(j)}, "grid": [int(h.shape[0]), int(h.shape[1])]}


# ------------------------------------------------------------------------------------------------
# prototype head


@functools.lru_cache(maxsize=8)
def _clip_occlusion_fn(graphdef: Any):
    def run(state, pixels, masks, minibatch):
        model = nnx.merge(graphdef, state)

        def encode(m):
            f = model.encode_image(occluded_copies(pixels, m)).astype(jnp.float32)
            return f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)

        return _map_minibatches(encode, masks, minibatch)

    return jax.jit(run, static_argnums=(3,))


def prototype_scores(head: Any, pixels: Any, grid: int, *, normalize: str = "none", temperature: float = 1.0,
                     clip: bool = True, minibatch: int = 0,
                     dimensions: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Signals ``{dim: [1 + grid*grid, K]}`` of the unoccluded image (row 0) and every occluded copy,
    from ONE jitted call of ``head``'s CLIP tower (``pixels``: the head's preprocessing, ``[3, H, W]``)."""
    if head.prototypes is None:
        raise ValueError("the prototype head has no prototypes loaded")
    pixels = np.asarray(pixels, np.float32)
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        raise ValueError(f"pixels must be [3, H, W], got shape {pixels.shape}")
    masks = occlusion_masks(pixels.shape[1], pixels.shape[2], grid)
    fn = _clip_occlusion_fn(nnx.graphdef(head.model))
    emb = np.asarray(jax.device_get(fn(head.encoder._state, jnp.asarray(pixels), jnp.asarray(masks), int(minibatch))))
    dims = list(dimensions) if dimensions is not None else head.prototypes.dimensions
    return {d: postprocess(head.prototypes.signals(emb, d), normalize, temperature, clip) for d in dims}


def prototype_saliency(head: Any, pixels: Any, concepts: Mapping[str, int], grid: int = 8, *,
                       normalize: str = "none", temperature: float = 1.0, clip: bool = True, minibatch: int = 0,
                       upsample: bool = True) -> dict[str, np.ndarray]:
    """``{dim: heat}`` with ``heat = max(0, s_base - s_occluded)`` of concept ``concepts[dim]``
    (local index in ``dim``). ``normalize`` / ``temperature`` / ``clip``: the signal
    post-processing (``cgjax.prototypes.calibrate.postprocess``), as the exported signals."""
    scores = prototype_scores(head, pixels, grid, normalize=normalize, temperature=temperature, clip=clip,
                              minibatch=minibatch, dimensions=list(concepts))
    size = tuple(np.shape(pixels)[1:]) if upsample else None
    out = {}
    for d, c in concepts.items():
        s = scores[d][:, int(c)].astype(np.float64)
        out[d] = cells_to_map(np.maximum(0.0, s[0] - s[1:]), grid, size)
    return out


# ------------------------------------------------------------------------------------------------
# LLaVA answer


@functools.partial(jax.jit, static_argnames=("graphdef", "minibatch", "use_concepts"))
def _answer_losses(graphdef, state, input_ids, attention_mask, labels, pixels, scores, masks, *, minibatch: int,
                   use_concepts: bool):
    model = nnx.merge(graphdef, state)
    tgt = labels[1:]
    n_tgt = jnp.maximum(jnp.sum(tgt != IGNORE_INDEX), 1)

    def losses(m):
        b = m.shape[0]
        px = occluded_copies(pixels, m)
        ids = jnp.broadcast_to(input_ids[None], (b,) + input_ids.shape)
        am = jnp.broadcast_to(attention_mask[None], (b,) + attention_mask.shape)
        if scores is None:
            logits = model(ids, px, am)
        else:
            sc = jnp.broadcast_to(scores[None], (b,) + scores.shape)
            logits = model(ids, px, am, sc, use_concepts=use_concepts)
        ce = token_cross_entropy(logits[:, :-1], jnp.broadcast_to(tgt[None], (b,) + tgt.shape))
        return jnp.sum(ce, axis=1) / n_tgt

    return _map_minibatches(losses, masks, minibatch)


def _answer_row(prompt_ids: Any, answer_ids: Any, length: int | None, pad_id: int):
    prompt_ids = np.asarray(prompt_ids, np.int32).reshape(-1)
    answer_ids = np.asarray(answer_ids, np.int32).reshape(-1)
    if answer_ids.size == 0:
        raise ValueError("llava_saliency needs a non-empty answer")
    n = prompt_ids.size + answer_ids.size
    length = n if length is None else int(length)
    if n > length:
        raise ValueError(f"prompt + answer are {n} tokens, more than length={length}")
    ids = np.full(length, pad_id, np.int32)
    ids[:n] = np.concatenate([prompt_ids, answer_ids])
    mask = (np.arange(length) < n).astype(np.int32)
    labels = np.full(length, IGNORE_INDEX, np.int32)
    labels[prompt_ids.size:n] = answer_ids
    return ids, mask, labels


def answer_losses(model: Any, prompt_ids: Any, answer_ids: Any, pixels: Any, scores: Any = None, masks: Any = None,
                  *, minibatch: int = 8, use_concepts: bool = True, length: int | None = None,
                  pad_id: int = 0) -> np.ndarray:
    """Teacher-forced mean CE of ``answer_ids`` after ``prompt_ids`` (1-D, the prompt as
    ``text.encode`` gives it, image block included) for the image under each of ``masks``
    ``[N, H, W]`` (1 = filled with the channel mean; default: just the image). ``scores [C]``: the
    concept signals of a :class:`~cgjax.concepts.model.ConceptLlava` (None for a plain ``Llava``).
    ``length``: pad the row to this many tokens (one compiled shape for every answer)."""
    pixels = np.asarray(pixels, np.float32)
    if masks is None:
        masks = np.zeros((1,) + pixels.shape[1:], np.float32)
    ids, mask, labels = _answer_row(prompt_ids, answer_ids, length, pad_id)
    graphdef, state = nnx.split(model)
    out = _answer_losses(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(labels),
                         jnp.asarray(pixels), None if scores is None else jnp.asarray(scores, jnp.float32),
                         jnp.asarray(masks, jnp.float32), minibatch=int(minibatch), use_concepts=bool(use_concepts))
    return np.asarray(jax.device_get(out), np.float64)


def llava_saliency(model: Any, prompt_ids: Any, answer_ids: Any, pixels: Any, scores: Any = None, grid: int = 8, *,
                   minibatch: int = 8, use_concepts: bool = True, length: int | None = None, pad_id: int = 0,
                   upsample: bool = True, return_base: bool = False):
    """``heat = max(0, loss_occluded - loss_base)`` of the answer (see :func:`answer_losses`), all
    ``grid * grid`` copies and the base in ONE jitted call (``lax.map`` over minibatches of
    ``minibatch`` copies). Returns the map (and the base loss with ``return_base``)."""
    pixels = np.asarray(pixels, np.float32)
    masks = occlusion_masks(pixels.shape[1], pixels.shape[2], grid)
    loss = answer_losses(model, prompt_ids, answer_ids, pixels, scores, masks, minibatch=minibatch,
                         use_concepts=use_concepts, length=length, pad_id=pad_id)
    heat = cells_to_map(np.maximum(0.0, loss[1:] - loss[0]), grid, tuple(pixels.shape[1:]) if upsample else None)
    return (heat, float(loss[0])) if return_base else heat
