"""Gating against a plain-Python statement of the original MultiTokenConceptLayer selection."""
import numpy as np
import pytest
from original_concept_layer import original_selection

from cgjax.concepts import gating


def _check(scores, cfg):
    sel = gating.select(scores, cfg)
    concept, score, n_tok, valid = (np.asarray(x) for x in (sel.concept, sel.score, sel.n_tokens, sel.valid))
    for b in range(scores.shape[0]):
        sig = {i: float(np.float32(scores[b, i])) for i in range(scores.shape[1])}
        want = original_selection(
            sig, cfg.dim_ranges, cfg.threshold, cfg.backoff_delta, cfg.topk_per_dim,
            cfg.max_concepts, list(cfg.priority) if cfg.priority else None, cfg.k_max,
        )
        got = [(int(concept[b, j]), float(score[b, j]), int(n_tok[b, j])) for j in range(cfg.n_slots) if valid[b, j]]
        assert [(i, k) for i, _, k in got] == [(i, k) for i, _, k in want], (b, sig)
        # valid slots are packed first; the rest carry no tokens
        assert list(valid[b]) == sorted(valid[b], reverse=True)
        assert np.all(n_tok[b][~valid[b]] == 0)


@pytest.mark.parametrize(
    "threshold,backoff,topk,budget,priority",
    [
        (0.75, 0.05, 2, 3, None),  # the original training defaults
        (0.6, 0.05, 2, 3, (2, 0, 1)),
        (0.5, 0.0, 0, 0, None),  # no budget, no top-k
        (0.7, 0.2, 1, 2, (1,)),  # priority naming one dimension only
        (0.3, 0.1, 3, 4, None),
    ],
)
def test_select_matches_original(threshold, backoff, topk, budget, priority):
    rng = np.random.default_rng(0)
    cfg = gating.GatingConfig(
        dim_ranges=gating.dim_ranges_from_sizes([5, 4, 6]), k_max=6, threshold=threshold,
        backoff_delta=backoff, topk_per_dim=topk, max_concepts=budget, priority=priority,
    )
    scores = rng.uniform(0.2, 1.0, size=(64, 15)).astype(np.float32)
    # ties and exact threshold hits
    scores[:8, 1] = scores[:8, 3]
    scores[8:16, 6] = np.float32(threshold)
    scores[16:20] = np.float32(threshold - backoff / 2)
    _check(scores, cfg)


def test_threshold_compares_like_python_floats():
    # float32(0.7) < 0.7 as a Python float: the original does not select it.
    cfg = gating.GatingConfig(dim_ranges=((0, 2),), threshold=0.7, backoff_delta=0.0, topk_per_dim=0, max_concepts=0)
    sel = gating.select(np.array([[0.7, 0.71]], np.float32), cfg)
    assert np.asarray(sel.valid).tolist() == [[True, False]]
    assert int(sel.concept[0, 0]) == 1


def test_token_counts_and_mask():
    cfg = gating.GatingConfig(dim_ranges=((0, 3),), k_max=4, threshold=0.0, backoff_delta=0.0, topk_per_dim=0, max_concepts=0)
    sel = gating.select(np.array([[0.1, 0.5, 1.0]], np.float32), cfg)
    assert np.asarray(sel.n_tokens).tolist() == [[4, 2, 1]]  # sorted by score: 1.0, 0.5, 0.1
    assert np.asarray(sel.token_mask(4)).astype(int).tolist() == [[1, 1, 1, 1, 1, 1, 0, 0, 1, 0, 0, 0]]
    # scores clipped to [0, 1] first: 1.3 -> 4 tokens, -0.3 -> the minimum of 1
    every = gating.GatingConfig(dim_ranges=((0, 4),), k_max=4, threshold=-1.0, backoff_delta=0.0, topk_per_dim=0,
                                max_concepts=0)
    assert np.asarray(gating.select(np.array([[0.1, -0.3, 1.3, 0.5]], np.float32), every).n_tokens).tolist() == [
        [4, 2, 1, 1]]


def test_bad_config_and_shapes():
    with pytest.raises(ValueError, match="contiguous"):
        gating.GatingConfig(dim_ranges=((0, 2), (3, 4)))
    cfg = gating.GatingConfig(dim_ranges=((0, 2),))
    with pytest.raises(ValueError, match=r"\[batch, 2\]"):
        gating.select(np.zeros((1, 3), np.float32), cfg)
