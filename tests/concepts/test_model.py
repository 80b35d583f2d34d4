"""ConceptLlava (fixed length, masked slots) equals the original's variable-length sequence."""
import numpy as np
import pytest
from flax import nnx
from original_concept_layer import original_sequence_logits

from cgjax.concepts import gating
from cgjax.concepts.model import ConceptLlava, attention_regulariser
from converters import hf_llava
from converters.tiny_llava import make_llava_model


@nnx.jit(static_argnames=("use_concepts",))
def forward(model, ids, pixels, mask, scores, use_concepts=True):
    return model(ids, pixels, mask, scores, use_concepts=use_concepts)


@pytest.fixture(scope="module")
def models():
    hf = make_llava_model("tiny", seed=3)
    return hf, hf_llava.load(hf)


def _batch(hf, model, scores, seed=0):
    rng = np.random.default_rng(seed)
    B = scores.shape[0]
    prefix = [1, 5, 9, 11]
    suffix = list(rng.integers(2, 100, size=7))
    n_block = model.n_image_block
    ids = np.asarray([prefix + [hf.config.image_token_id] * n_block + suffix] * B, np.int32)
    pixels = rng.normal(size=(B, 3, 32, 32)).astype(np.float32)
    return prefix, suffix, ids, pixels


@pytest.mark.parametrize("budget,topk", [(3, 2), (0, 0)])
def test_matches_original_variable_length_sequence(models, budget, topk):
    hf, llava = models
    gcfg = gating.GatingConfig(
        dim_ranges=gating.dim_ranges_from_sizes([3, 4, 2]), k_max=3, threshold=0.6, backoff_delta=0.1,
        topk_per_dim=topk, max_concepts=budget,
    )
    model = ConceptLlava(llava, gcfg, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(budget)
    scores = rng.uniform(0.3, 1.0, size=(4, 9)).astype(np.float32)
    scores[3] = 0.2  # nothing active for this sample
    prefix, suffix, ids, pixels = _batch(hf, model, scores)
    logits = np.asarray(forward(model, ids, pixels, np.ones_like(ids), scores))
    values = np.asarray(model.concepts.values.get_value())
    n_img = llava.config.num_image_tokens
    for b in range(scores.shape[0]):
        sig = {i: float(scores[b, i]) for i in range(scores.shape[1])}
        ref, n_app = original_sequence_logits(hf, prefix, suffix, pixels[b], sig, values, gcfg)
        if b == 3:
            assert n_app == 0
        # text after the image block: shifted by the unused slots
        ours_tail = logits[b, len(prefix) + n_img + gcfg.n_tokens:]
        ref_tail = ref[len(prefix) + n_img + n_app:]
        np.testing.assert_allclose(ours_tail, ref_tail, atol=1e-4, rtol=1e-4)
        # the prefix and image tokens are untouched
        np.testing.assert_allclose(logits[b, : len(prefix) + n_img], ref[: len(prefix) + n_img], atol=1e-4, rtol=1e-4)


def test_baseline_without_concepts_equals_plain_llava(models):
    hf, llava = models
    gcfg = gating.GatingConfig(dim_ranges=((0, 2), (2, 4)), k_max=2, threshold=0.0)
    model = ConceptLlava(llava, gcfg, rngs=nnx.Rngs(0))
    scores = np.full((2, 4), 0.9, np.float32)
    prefix, suffix, ids, pixels = _batch(hf, model, scores)
    got = np.asarray(forward(model, ids, pixels, np.ones_like(ids), scores, use_concepts=False))
    plain_ids = np.asarray([prefix + [hf.config.image_token_id] * llava.config.num_image_tokens + suffix] * 2)
    want = np.asarray(nnx.jit(lambda m, i, p: m(i, p))(llava, plain_ids, pixels))
    np.testing.assert_allclose(got[:, -len(suffix):], want[:, -len(suffix):], atol=1e-4)


def test_attention_regulariser_uses_true_concept_rows(models):
    hf, llava = models
    gcfg = gating.GatingConfig(dim_ranges=((0, 2), (2, 4)), k_max=2, threshold=0.5, backoff_delta=0.0, topk_per_dim=1,
                               max_concepts=2)
    model = ConceptLlava(llava, gcfg, rngs=nnx.Rngs(0))
    scores = np.array([[0.9, 0.1, 0.2, 0.8], [0.1, 0.2, 0.3, 0.1]], np.float32)
    prefix, suffix, ids, pixels = _batch(hf, model, scores)
    rows = model.concept_rows(ids)
    embeds, mask, sel = nnx.jit(lambda m, *a: m.prepare(*a))(model, ids, pixels, np.ones_like(ids), scores)
    _, attn = nnx.jit(lambda m, *a: m(*a, return_attn_rows=rows))(model, ids, pixels, np.ones_like(ids), scores)
    row_valid = np.asarray(sel.token_mask(gcfg.k_max))
    reg = float(attention_regulariser(attn, row_valid, np.asarray(mask)))
    # explicit statement: per layer and sample, mean over heads x used rows x valid keys
    a = np.asarray(attn) ** 2
    want = 0.0
    for l in range(a.shape[0]):
        for b in range(a.shape[1]):
            r = row_valid[b].astype(bool)
            if r.any():
                want += a[l, b][:, r][:, :, np.asarray(mask)[b].astype(bool)].mean()
    assert row_valid[1].sum() == 0 and row_valid[0].sum() == 4
    np.testing.assert_allclose(reg, want, rtol=1e-5)
    assert reg > 0
    # rows are the real concept positions: right after the image tokens
    assert int(rows[0]) == len(prefix) + llava.config.num_image_tokens


def test_generate_with_concepts_matches_full_forward(models):
    """KV-cache decoding of a ConceptLlava equals argmax of the full forward, token by token."""
    from cgjax.generate import generate

    hf, llava = models
    gcfg = gating.GatingConfig(dim_ranges=((0, 2), (2, 4)), k_max=2, threshold=0.5, backoff_delta=0.0, topk_per_dim=1,
                               max_concepts=2)
    model = ConceptLlava(llava, gcfg, rngs=nnx.Rngs(2))
    scores = np.array([[0.9, 0.1, 0.2, 0.8], [0.1, 0.7, 0.3, 0.1]], np.float32)
    _, _, ids, pixels = _batch(hf, model, scores)
    for use in (True, False):
        new = np.asarray(generate(model, ids, pixels, np.ones_like(ids), max_new_tokens=4, concept_scores=scores,
                                  use_concepts=use))
        seq = ids
        for t in range(4):
            logits = np.asarray(forward(model, seq, pixels, np.ones_like(seq), scores, use_concepts=use))
            np.testing.assert_array_equal(new[:, t], logits[:, -1].argmax(-1))
            seq = np.concatenate([seq, new[:, t:t + 1]], axis=1)
