"""Segment-weighted next-token cross-entropy (Stage A: keys only; Stage B: keys + reason)."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100
# Segment ids of target tokens; 0 marks tokens that are not supervised.
SEGMENT_NONE, SEGMENT_KEYS, SEGMENT_REASON = 0, 1, 2
SEGMENT_NAMES = ("none", "keys", "reason")


def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-position CE of ``logits [B, T, V]`` against ``labels [B, T]`` (fp32; 0 where ignored)."""
    logits = logits.astype(jnp.float32)
    valid = labels != IGNORE_INDEX
    safe = jnp.where(valid, labels, 0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return jnp.where(valid, lse - picked, 0.0)


def segment_weighted_loss(
    logits: jax.Array,
    labels: jax.Array,
    segment_ids: jax.Array,
    segment_weights: Sequence[float] | jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``L = sum_t w_t CE_t [y_t != -100] / sum_t w_t [y_t != -100]`` on shifted logits.

    ``labels`` and ``segment_ids`` are aligned with the input sequence (the token at position t
    is predicted from position t-1); ``segment_weights[k]`` is the weight of segment id ``k``.
    Returns the loss and the mean CE per segment (for logging).
    """
    logits, labels, segment_ids = logits[:, :-1], labels[:, 1:], segment_ids[:, 1:]
    ce = token_cross_entropy(logits, labels)
    valid = (labels != IGNORE_INDEX).astype(jnp.float32)
    w = jnp.asarray(segment_weights, jnp.float32)[segment_ids] * valid
    den = jnp.sum(w)
    loss = jnp.sum(w * ce) / jnp.maximum(den, 1e-8)
    per_segment = {}
    for k, name in enumerate(SEGMENT_NAMES):
        if k == SEGMENT_NONE:
            continue
        m = (segment_ids == k).astype(jnp.float32) * valid
        per_segment[f"loss_{name}"] = jnp.sum(m * ce) / jnp.maximum(jnp.sum(m), 1.0)
    return loss, per_segment
