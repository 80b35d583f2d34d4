"""The PyTorch copy of the gating rule and concept tokens (``cgjax/torch_export/concept_tokens.py``,
shipped by the export) against cgjax's JAX reference: ``gating.select`` and ``layer.concept_block``."""
import importlib

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cgjax import torch_export  # noqa: E402
from cgjax.concepts import gating  # noqa: E402
from cgjax.concepts.layer import concept_block  # noqa: E402
from cgjax.torch_export import concept_tokens  # noqa: E402

DIMS = ("artist", "style", "genre")


def concepts_json(cfg: gating.GatingConfig) -> dict:
    """What ``concepts.json`` holds (cgjax.export writes it), built by hand here."""
    pri = cfg.priority if cfg.priority is not None else range(len(cfg.dim_ranges))
    return {"dims": list(DIMS), "k_max": cfg.k_max, "n_concepts": cfg.n_concepts,
            "dim_ranges": {d: list(r) for d, r in zip(DIMS, cfg.dim_ranges)},
            "gating": {"threshold": cfg.threshold, "backoff_delta": cfg.backoff_delta,
                       "topk_per_dim": cfg.topk_per_dim, "max_concepts": cfg.max_concepts,
                       "priority": [DIMS[i] for i in pri], "k_max": cfg.k_max}}


def random_scores(rng, cfg, batch):
    """Uniform scores in [-0.2, 1.2] (clipping of the token count), with ties, exact threshold hits
    and scores in the back-off band."""
    s = rng.uniform(-0.2, 1.2, size=(batch, cfg.n_concepts)).astype(np.float32)
    n = cfg.n_concepts
    s[: batch // 4, 1] = s[: batch // 4, 0]  # ties inside a dimension
    s[batch // 4: batch // 2, n - 1] = s[batch // 4: batch // 2, 0]  # ties across dimensions
    s[batch // 2: 5 * batch // 8, rng.integers(n)] = np.float32(cfg.threshold)
    band = np.float32(cfg.threshold - cfg.backoff_delta / 2)
    s[5 * batch // 8: 3 * batch // 4] = np.where(rng.random((batch // 8, n)) < 0.5, band, np.float32(0.1))
    return s


CONFIGS = [  # sizes, k_max, threshold, backoff, top-k, budget, priority
    ((5, 4, 6), 6, 0.75, 0.05, 2, 3, None),  # the original training defaults
    ((3, 4, 2), 3, 0.6, 0.1, 2, 3, (2, 0, 1)),
    ((4, 4, 4), 5, 0.5, 0.0, 0, 0, None),  # no back-off, no top-k, no budget
    ((2, 5, 3), 4, 0.7, 0.2, 1, 2, (1,)),  # priority naming one dimension; 0.7 is not a float32
    ((6, 1, 3), 2, 0.3, 0.4, 3, 4, (0, 2)),  # back-off floor at 0
    ((3, 3, 3), 7, 0.9, 0.3, 4, 1, None),
]


@pytest.mark.parametrize("sizes,k_max,threshold,backoff,topk,budget,priority", CONFIGS)
def test_select_equals_jax_reference(sizes, k_max, threshold, backoff, topk, budget, priority):
    cfg = gating.GatingConfig(dim_ranges=gating.dim_ranges_from_sizes(sizes), k_max=k_max, threshold=threshold,
                              backoff_delta=backoff, topk_per_dim=topk, max_concepts=budget, priority=priority)
    ct = concept_tokens.ConceptTokens(np.zeros((cfg.n_concepts, k_max, 4), np.float32), concepts_json(cfg))
    rng = np.random.default_rng(sum(sizes) + k_max)
    scores = random_scores(rng, cfg, 64)
    ref = gating.select(scores, cfg)
    concept, score, n_tok, valid = (np.asarray(x) for x in (ref.concept, ref.score, ref.n_tokens, ref.valid))
    n_selected, n_backoff = 0, 0
    for b in range(len(scores)):
        got = ct.select(torch.from_numpy(scores[b]))
        want = [(int(concept[b, j]), float(score[b, j]), int(n_tok[b, j])) for j in range(cfg.n_slots) if valid[b, j]]
        assert got == want, (b, scores[b].tolist())
        n_selected += len(got)
        n_backoff += any(threshold - backoff <= s < threshold for _, s, _ in got)
    # the cases are exercised: selections, full budgets, back-offs, several token counts
    assert n_selected > 0
    assert budget == 0 or (valid.sum(1) == cfg.n_slots).any()
    assert backoff == 0 or n_backoff > 0
    assert k_max in set(n_tok[valid].tolist()) and len(set(n_tok[valid].tolist())) > 1


def test_token_count_is_ceil_of_clipped_score_times_k_max():
    """Hand values: k = max(1, ceil(clip(s, 0, 1) * K_max)) with K_max = 4, in float32."""
    cfg = gating.GatingConfig(dim_ranges=((0, 6),), k_max=4, threshold=-1.0, backoff_delta=0.0, topk_per_dim=0,
                              max_concepts=0)
    ct = concept_tokens.ConceptTokens(np.zeros((6, 4, 2), np.float32), concepts_json(cfg) | {"dims": ["artist"]})
    s = np.array([1.3, 1.0, 0.500001, 0.5, 0.1, -0.3], np.float32)  # by score: the selection order
    assert [k for _, _, k in ct.select(s)] == [4, 4, 3, 2, 1, 1]
    assert np.asarray(gating.select(s[None], cfg).n_tokens)[0].tolist() == [4, 4, 3, 2, 1, 1]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_concept_tokens_equal_jax_concept_block(dtype):
    """The tokens inserted after the image features: the selected concepts' first k value tokens,
    L2-normalised and rescaled to the norm of the first image token, in block order."""
    cfg = gating.GatingConfig(dim_ranges=gating.dim_ranges_from_sizes((4, 3, 5)), k_max=4, threshold=0.6,
                              backoff_delta=0.1, topk_per_dim=2, max_concepts=4, priority=(1, 0, 2))
    rng = np.random.default_rng(0)
    values = rng.normal(size=(cfg.n_concepts, cfg.k_max, 16)).astype(np.float32)
    feats = (rng.normal(size=(8, 5, 16)) * rng.uniform(0.5, 3.0, size=(8, 1, 1))).astype(dtype)
    scores = rng.uniform(0.0, 1.0, size=(8, cfg.n_concepts)).astype(np.float32)
    scores[7] = 0.2  # nothing selected
    ct = concept_tokens.ConceptTokens(torch.from_numpy(values), concepts_json(cfg))
    sel = gating.select(scores, cfg)
    tokens, mask = (np.asarray(x) for x in concept_block(jnp.asarray(values), sel, jnp.asarray(feats)))
    tol = 1e-5 if dtype == np.float32 else 2e-3
    for b in range(len(scores)):
        got = ct(torch.from_numpy(scores[b]), torch.from_numpy(feats[b]))
        assert got.dtype == torch.from_numpy(feats[b]).dtype
        want = tokens[b][mask[b]]
        assert got.shape == want.shape == (int(np.asarray(sel.n_tokens)[b].sum()), 16)
        np.testing.assert_allclose(got.float().numpy(), want.astype(np.float32), rtol=tol, atol=tol)
    assert np.asarray(sel.n_tokens)[7].sum() == 0 and np.asarray(sel.n_tokens)[:7].sum() > 0


def test_package_files_are_what_the_export_ships():
    """``example.py`` imports from the package too, and ``source`` returns the files as installed."""
    example = importlib.import_module("cgjax.torch_export.example")
    assert example.ConceptTokens is concept_tokens.ConceptTokens and callable(example.main)
    for name, mod in zip(torch_export.FILES, (concept_tokens, example)):
        with open(mod.__file__, "rb") as f:
            assert torch_export.source(name) == f.read()
    with pytest.raises(ValueError):
        torch_export.source("__init__.py")
