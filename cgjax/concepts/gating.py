"""Static-shape concept selection, equal to the original ``MultiTokenConceptLayer`` gating.

Per sample and dimension: keep concepts with ``s >= threshold`` sorted by ``s`` descending
(ties by concept index); if none and ``backoff_delta > 0``, the single best one with
``s >= max(0, threshold - backoff_delta)``; cut to ``topk_per_dim``. With a budget
``max_concepts > 0``: each dimension in ``priority`` order gets its top-1 while slots remain,
then the remaining candidates fill the budget by score. Each selected concept contributes
``k = max(1, ceil(clip(s, 0, 1) * k_max))`` tokens.

Everything has a fixed shape so it runs under ``jit``: the result is a table of ``n_slots``
slots per sample (concept index, score, token count, validity), in the original's order
(dimension after dimension, by score within a dimension).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class GatingConfig:
    """Gating options (defaults: the original training script)."""

    dim_ranges: tuple[tuple[int, int], ...]  # half-open global index range per dimension
    k_max: int = 6
    threshold: float = 0.75
    backoff_delta: float = 0.05
    topk_per_dim: int = 2
    max_concepts: int = 3  # 0 = no budget
    priority: tuple[int, ...] | None = None  # dimension indices, default dimension order

    def __post_init__(self):
        ends = [0] + [e for _, e in self.dim_ranges]
        for (a, b), prev in zip(self.dim_ranges, ends):
            if a != prev or b <= a:
                raise ValueError(f"dim_ranges must be contiguous and non-empty, got {self.dim_ranges}")
        if self.k_max < 1:
            raise ValueError("k_max must be >= 1")

    @property
    def n_concepts(self) -> int:
        return self.dim_ranges[-1][1]

    def per_dim_bound(self, d: int) -> int:
        a, b = self.dim_ranges[d]
        return min(b - a, self.topk_per_dim) if self.topk_per_dim > 0 else b - a

    @property
    def n_slots(self) -> int:
        """Number of concept slots per sample (the static bound)."""
        total = sum(self.per_dim_bound(d) for d in range(len(self.dim_ranges)))
        return min(total, self.max_concepts) if self.max_concepts > 0 else total

    @property
    def n_tokens(self) -> int:
        """Length of the concept-token block appended after the image tokens."""
        return self.n_slots * self.k_max


def _f32_at_least(x: float) -> np.float32:
    """Smallest float32 ``t`` with ``t >= x``, so ``s32 >= t`` iff ``float(s32) >= x``."""
    t = np.float32(x)
    if float(t) < x:
        t = np.nextafter(t, np.float32(np.inf))
    return t


@dataclasses.dataclass
class Selection:
    """Fixed-shape selection: ``[B, n_slots]`` arrays."""

    concept: jax.Array  # int32 global concept index (0 where invalid)
    score: jax.Array  # float32 s
    n_tokens: jax.Array  # int32 tokens appended for this slot (0 where invalid)
    valid: jax.Array  # bool

    def token_mask(self, k_max: int) -> jax.Array:
        """``[B, n_slots * k_max]`` validity of each concept-token position."""
        t = jnp.arange(k_max)
        return (t[None, None, :] < self.n_tokens[..., None]).reshape(self.n_tokens.shape[0], -1)


jax.tree_util.register_dataclass(Selection, data_fields=["concept", "score", "n_tokens", "valid"], meta_fields=[])


def select(scores: jax.Array, cfg: GatingConfig) -> Selection:
    """Select concepts from ``scores`` ``[B, n_concepts]`` (the ``s`` of each ``[1-s, s]`` pair)."""
    scores = jnp.asarray(scores, jnp.float32)
    if scores.ndim != 2 or scores.shape[1] != cfg.n_concepts:
        raise ValueError(f"scores must be [batch, {cfg.n_concepts}], got {scores.shape}")
    batch = scores.shape[0]
    thr = _f32_at_least(cfg.threshold)
    thr_backoff = _f32_at_least(max(0.0, cfg.threshold - cfg.backoff_delta))

    lists_s, lists_idx, lists_n = [], [], []  # per dim: sorted candidates [B, L_d] and count [B]
    for d, (a, b) in enumerate(cfg.dim_ranges):
        s = scores[:, a:b]
        order = jnp.argsort(-s, axis=1, stable=True)
        s_sorted = jnp.take_along_axis(s, order, axis=1)
        count = jnp.sum(s >= thr, axis=1)
        if cfg.backoff_delta > 0:
            count = jnp.where((count == 0) & (s_sorted[:, 0] >= thr_backoff), 1, count)
        bound = cfg.per_dim_bound(d)
        count = jnp.minimum(count, bound)
        lists_s.append(s_sorted[:, :bound])
        lists_idx.append(order[:, :bound] + a)
        lists_n.append(count)

    # Per dim, which entries of its sorted list are selected.
    chosen = [jnp.arange(s.shape[1])[None, :] < n[:, None] for s, n in zip(lists_s, lists_n)]
    if cfg.max_concepts > 0:
        budget = cfg.max_concepts
        used = jnp.zeros((batch,), jnp.int32)
        first = [jnp.zeros((batch,), bool) for _ in cfg.dim_ranges]
        for d in cfg.priority if cfg.priority is not None else range(len(cfg.dim_ranges)):
            grant = (lists_n[d] > 0) & (used < budget)
            first[d] = grant
            used = used + grant.astype(jnp.int32)
        # The pool: every candidate not granted as a dimension's top-1, by score (stable).
        pool_valid = jnp.concatenate(
            [c & ~((jnp.arange(c.shape[1]) == 0)[None, :] & f[:, None]) for c, f in zip(chosen, first)], axis=1
        )
        pool_s = jnp.concatenate(lists_s, axis=1)
        key = jnp.where(pool_valid, -pool_s, jnp.inf)
        order = jnp.argsort(key, axis=1, stable=True)
        rank = jnp.argsort(order, axis=1)
        granted = pool_valid & (rank < (budget - used)[:, None])
        splits = np.cumsum([s.shape[1] for s in lists_s])[:-1]
        granted = jnp.split(granted, splits, axis=1)
        chosen = [
            g | ((jnp.arange(g.shape[1]) == 0)[None, :] & f[:, None]) for g, f in zip(granted, first)
        ]

    sel = jnp.concatenate(chosen, axis=1)
    all_s = jnp.concatenate(lists_s, axis=1)
    all_idx = jnp.concatenate(lists_idx, axis=1)
    n_slots = cfg.n_slots
    slot = jnp.where(sel, jnp.cumsum(sel, axis=1) - 1, n_slots)  # out-of-range -> dropped
    rows = jnp.arange(batch)[:, None]
    concept = jnp.zeros((batch, n_slots), jnp.int32).at[rows, slot].set(all_idx.astype(jnp.int32), mode="drop")
    score = jnp.zeros((batch, n_slots), jnp.float32).at[rows, slot].set(all_s, mode="drop")
    valid = jnp.zeros((batch, n_slots), bool).at[rows, slot].set(sel, mode="drop")
    n_tok = jnp.maximum(1, jnp.ceil(jnp.clip(score, 0.0, 1.0) * jnp.float32(cfg.k_max))).astype(jnp.int32)
    n_tok = jnp.where(valid, n_tok, 0)
    return Selection(concept=concept, score=score, n_tokens=n_tok, valid=valid)


def dim_ranges_from_sizes(sizes: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """``[n_a, n_s, n_g]`` -> ``((0, n_a), (n_a, n_a + n_s), ...)``: concepts indexed globally."""
    out, start = [], 0
    for n in sizes:
        out.append((start, start + int(n)))
        start += int(n)
    return tuple(out)

