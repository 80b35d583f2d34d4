"""Concept values and the concept-token block appended after the projected image tokens."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cgjax import sharding
from cgjax.concepts.gating import Selection


class ConceptValues(nnx.Module):
    """Trainable ``values [n_concepts, k_max, dim]``: N(0, 1), each token L2-normalised."""

    def __init__(self, n_concepts: int, k_max: int, dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        v = jax.random.normal(rngs.params(), (n_concepts, k_max, dim), jnp.float32)
        v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
        self.values = sharding.param(v.astype(param_dtype), ("concepts", "concept_tokens", "embed"))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.values.get_value().shape)


def concept_block(values: jax.Array, sel: Selection, image_features: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The tokens that follow the image tokens, and their validity.

    Slot ``j`` of a sample holds the first ``sel.n_tokens[j]`` value tokens of concept
    ``sel.concept[j]``, each L2-normalised and rescaled to the norm of the sample's first image
    token (as the original's LLaVA wrapper does). Unused positions are zero and marked invalid.

    Returns ``tokens [B, n_slots * k_max, D]`` (dtype of ``image_features``) and ``mask [B, n_slots * k_max]``.
    """
    n_concepts, k_max, dim = values.shape
    batch, n_slots = sel.concept.shape
    tok = jnp.take(values, sel.concept, axis=0).astype(jnp.float32)  # [B, S, K, D]
    tok = tok / jnp.linalg.norm(tok, axis=-1, keepdims=True)
    ref = jnp.linalg.norm(image_features[:, 0, :].astype(jnp.float32), axis=-1)  # [B]
    tok = tok * ref[:, None, None, None]
    mask = sel.token_mask(k_max)
    tok = tok.reshape(batch, n_slots * k_max, dim) * mask[..., None]
    return tok.astype(image_features.dtype), mask
