"""LLaVA with gated concept tokens: the image block is ``[image tokens | concept slots]``.

``input_ids`` hold ``n_image + gating.n_tokens`` image tokens at ``<image>``; the first
``n_image`` receive the projected image features, the rest the concept tokens of the selected
concepts. Unused concept positions are masked out of attention and skipped by the position
ids, so the result equals the original's variable-length sequence.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cgjax.concepts import gating
from cgjax.concepts.layer import ConceptValues, concept_block
from cgjax.models.llava import Llava


class ConceptLlava(nnx.Module):
    """``llava`` (usually frozen) plus trainable ``concepts.values``."""

    def __init__(self, llava: Llava, gating_cfg: gating.GatingConfig, *, rngs: nnx.Rngs):
        self.llava = llava
        self.gating = gating_cfg
        dim = llava.config.text_config.hidden_size
        self.concepts = ConceptValues(gating_cfg.n_concepts, gating_cfg.k_max, dim, rngs=rngs)

    @property
    def config(self):
        return self.llava.config

    @property
    def language_model(self):
        return self.llava.language_model

    @property
    def n_image_block(self) -> int:
        """Image tokens per sample in ``input_ids``: image features + concept slots."""
        return self.llava.config.num_image_tokens + self.gating.n_tokens

    def prepare(self, input_ids, pixel_values, attention_mask, scores, use_concepts: bool = True):
        """-> ``(inputs_embeds, attention_mask, selection)`` with concept positions filled/masked."""
        input_ids = jnp.asarray(input_ids)
        feats = self.llava.get_image_features(pixel_values)
        n_img = feats.shape[1]
        sel = gating.select(scores, self.gating)
        if not use_concepts:  # the no-concept baseline: every slot empty
            sel = gating.Selection(sel.concept, sel.score, jnp.zeros_like(sel.n_tokens), jnp.zeros_like(sel.valid))
        tokens, tmask = concept_block(self.concepts.values.get_value(), sel, feats)
        block = jnp.concatenate([feats, tokens], axis=1)
        embeds = self.llava.merge_image_features(input_ids, block)
        is_img = input_ids == self.llava.config.image_token_id
        slot = jnp.cumsum(is_img, axis=1) - 1 - n_img  # index into the concept-token block
        in_block = is_img & (slot >= 0)
        slot_ok = jnp.take_along_axis(tmask, jnp.clip(slot, 0, tmask.shape[1] - 1), axis=1)
        mask = jnp.asarray(attention_mask).astype(bool) & jnp.where(in_block, slot_ok, True)
        return embeds, mask.astype(jnp.int32), sel

    def concept_rows(self, input_ids) -> jax.Array:
        """Positions ``[R]`` of the concept slots (same for every row: the prompt prefix is fixed)."""
        is_img = jnp.asarray(input_ids)[0] == self.llava.config.image_token_id
        start = jnp.argmax(is_img) + self.llava.config.num_image_tokens
        return start + jnp.arange(self.gating.n_tokens)

    def __call__(self, input_ids, pixel_values, attention_mask, scores, use_concepts: bool = True,
                 return_attn_rows=None):
        """fp32 logits ``[B, T, V]`` (and per-layer attention rows if asked)."""
        embeds, mask, _ = self.prepare(input_ids, pixel_values, attention_mask, scores, use_concepts)
        out = self.llava.language_model(inputs_embeds=embeds, attention_mask=mask, return_attn_rows=return_attn_rows)
        return out[0] if return_attn_rows is None else (out[0], out[2])


def attention_regulariser(attn_rows: jax.Array, row_valid: jax.Array, key_valid: jax.Array) -> jax.Array:
    """``sum over layers and samples of mean(attn[concept rows, keys] ** 2)``.

    ``attn_rows [L, B, H, R, S]`` fp32, ``row_valid [B, R]`` (used concept positions),
    ``key_valid [B, S]``. The mean runs over heads, the sample's used concept rows and its valid
    keys; a sample without concept tokens adds nothing (the original swallowed that case as an error).
    """
    sq = attn_rows.astype(jnp.float32) ** 2
    w = row_valid[None, :, None, :, None].astype(jnp.float32) * key_valid[None, :, None, None, :].astype(jnp.float32)
    num = jnp.sum(sq * w, axis=(2, 3, 4))  # [L, B]
    den = jnp.sum(jnp.broadcast_to(w, sq.shape), axis=(2, 3, 4))
    return jnp.sum(jnp.where(den > 0, num / jnp.maximum(den, 1.0), 0.0))
