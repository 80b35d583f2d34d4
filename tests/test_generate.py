"""``cgjax.generate``: greedy tokens identical to HF ``generate``; EOS / sampling / compile cache."""
import jax
import numpy as np
import pytest
import torch
import transformers

import cgjax
from cgjax import generate as gen_module
from converters import hf_llava
from converters.tiny_llava import make_llava_checkpoint

N_NEW = 32


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = make_llava_checkpoint(str(tmp_path_factory.mktemp("gen") / "tiny"), "tiny", seed=1)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(path).eval()
    return hf, hf_llava.load(path)


@pytest.fixture(scope="module")
def prompt(pair):
    _, m = pair
    cfg = m.config
    n, T = cfg.num_image_tokens, cfg.num_image_tokens + 8
    rs = np.random.RandomState(0)
    ids = rs.randint(3, cfg.image_token_id, (2, T))
    mask = np.ones((2, T), np.int64)
    mask[1, :3], ids[1, :3] = 0, 0  # row 1 left padded
    ids[0, 1:1 + n] = cfg.image_token_id
    ids[1, 4:4 + n] = cfg.image_token_id
    pix = rs.randn(2, 3, 32, 32).astype(np.float32)
    return ids, mask, pix


def _hf_generate(hf, ids, mask, pix=None, **kw):
    args = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=N_NEW,
                do_sample=False, pad_token_id=0)
    if pix is not None:
        args["pixel_values"] = torch.tensor(pix)
    args.update(kw)
    with torch.inference_mode():
        return hf.generate(**args)[:, ids.shape[1]:].numpy()


@pytest.mark.parametrize("how", ["generate", "Generator", "scanned"])
def test_greedy_matches_hf_llava(pair, prompt, how):
    """Both layouts of the decoder stack (unrolled on per-layer weights, scanned over the stack)."""
    hf, m = pair
    ids, mask, pix = prompt
    ref = _hf_generate(hf, ids, mask, pix, eos_token_id=None)
    run = {"generate": cgjax.generate,
           "Generator": lambda model, *a, **k: cgjax.Generator(model, unstack_once=True, layout="unrolled")(*a, **k),
           "scanned": lambda model, *a, **k: cgjax.Generator(model, layout="scanned")(*a, **k)}[how]
    out = np.asarray(run(m, ids, pix, mask, max_new_tokens=N_NEW))
    assert out.shape == (2, N_NEW) and ref.shape == (2, N_NEW)
    assert len(set(out[0].tolist())) > 1  # not a degenerate constant stream
    np.testing.assert_array_equal(out, ref)


def test_greedy_matches_hf_text_only(pair):
    hf, m = pair
    rs = np.random.RandomState(5)
    ids = rs.randint(3, 120, (2, 9))
    mask = np.ones_like(ids)
    mask[0, :4], ids[0, :4] = 0, 0
    lm_hf = transformers.LlamaForCausalLM(hf.config.text_config).eval()
    lm_hf.model.load_state_dict(hf.model.language_model.state_dict())
    lm_hf.lm_head.load_state_dict(hf.lm_head.state_dict())
    out = np.asarray(cgjax.generate(m.language_model, ids, None, mask, max_new_tokens=N_NEW))
    np.testing.assert_array_equal(out, _hf_generate(lm_hf, ids, mask, eos_token_id=None))


def test_eos_then_pad_and_hf_agrees(pair, prompt):
    hf, m = pair
    ids, mask, pix = prompt
    free = np.asarray(cgjax.generate(m, ids, pix, mask, max_new_tokens=N_NEW))
    eos = int(free[0, 4])  # a token row 0 emits at step 4 (or earlier)
    out = np.asarray(cgjax.generate(m, ids, pix, mask, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=0))
    scanned = cgjax.generate(m, ids, pix, mask, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=0,
                             layout="scanned")
    np.testing.assert_array_equal(np.asarray(scanned), out)
    for b in range(2):
        hits = np.flatnonzero(free[b] == eos)
        stop = hits[0] if len(hits) else N_NEW
        np.testing.assert_array_equal(out[b, :stop + 1], free[b, :stop + 1])
        assert (out[b, stop + 1:] == 0).all()
    ref = _hf_generate(hf, ids, mask, pix, eos_token_id=eos)  # HF stops early once all rows are done
    np.testing.assert_array_equal(out[:, :ref.shape[1]], ref)


def test_sampling(pair, prompt):
    _, m = pair
    ids, mask, pix = prompt
    greedy = np.asarray(cgjax.generate(m, ids, pix, mask, max_new_tokens=N_NEW))
    a = np.asarray(cgjax.generate(m, ids, pix, mask, max_new_tokens=N_NEW, temperature=1.0, rng=jax.random.PRNGKey(1)))
    b = np.asarray(cgjax.generate(m, ids, pix, mask, max_new_tokens=N_NEW, temperature=1.0, rng=jax.random.PRNGKey(1)))
    c = np.asarray(cgjax.generate(m, ids, pix, mask, max_new_tokens=N_NEW, temperature=1.0, rng=jax.random.PRNGKey(2)))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != greedy).any()
    # a tiny nucleus keeps only the arg-max token: sampling == greedy
    d = np.asarray(cgjax.generate(m, ids, pix, mask, max_new_tokens=N_NEW, temperature=1.0, top_p=1e-6,
                                  rng=jax.random.PRNGKey(3)))
    np.testing.assert_array_equal(d, greedy)


def test_unknown_layout_is_refused(pair):
    with pytest.raises(ValueError, match="layout must be one of"):
        cgjax.Generator(pair[1], layout="unroled")


def test_greedy_argmax_is_numpys_argmax():
    """The decode step's two-reduction argmax picks numpy's index: the first of tied maxima, the
    first NaN where there is one, the last column, -inf rows."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 1000)).astype(np.float32).round(1)  # many ties
    x[1, [10, 500]] = 9.0
    x[2, 700] = np.nan
    x[3, -1] = 50.0
    x[4] = -np.inf
    x[5, [3, 4]] = np.nan
    got = np.asarray(jax.jit(gen_module.greedy_argmax)(x))
    np.testing.assert_array_equal(got, np.argmax(x, -1))
    assert got.dtype == np.int32 and list(got[1:4]) == [10, 700, 999]


def test_top_p_filter():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    rows = np.repeat(logits, 500, axis=0)  # 500 independent draws in one call
    draws = np.asarray(gen_module._select(rows, jax.random.PRNGKey(0), True, 1.0, 0.7))
    assert set(draws.tolist()) == {0, 1}  # 0.5 < 0.7 needs the 2nd token; 0.8 >= 0.7 excludes the rest
    assert 0.55 < (draws == 0).mean() < 0.70  # renormalised 0.5 / 0.8 = 0.625
    draws = np.asarray(gen_module._select(rows, jax.random.PRNGKey(1), True, 1.0, 0.81))
    assert set(draws.tolist()) == {0, 1, 2}


def test_no_recompile_within_bucket(pair, prompt):
    _, m = pair
    ids, mask, pix = prompt
    cgjax.generate(m, ids, pix, mask, max_new_tokens=20)
    n = gen_module._run._cache_size()
    out = cgjax.generate(m, ids, pix, mask, max_new_tokens=25)
    out2 = cgjax.generate(m, ids, pix, mask, max_new_tokens=N_NEW)
    assert gen_module._run._cache_size() == n
    assert out.shape == (2, 25)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out2)[:, :25])


@pytest.mark.parametrize("unstack_once", [True, False])
def test_generator_works_on_a_snapshot(tmp_path, unstack_once):
    """A Generator keeps the weights it was made with (its per-layer copy, if it holds one, and
    the rest alike); ``generate`` reads the model as it is now."""
    m = hf_llava.load(make_llava_checkpoint(str(tmp_path / "tiny"), "tiny", seed=2))
    rs = np.random.RandomState(1)
    ids = rs.randint(3, m.config.image_token_id, (2, m.config.num_image_tokens + 6))
    ids[:, 1:1 + m.config.num_image_tokens] = m.config.image_token_id
    pix = rs.randn(2, 3, 32, 32).astype(np.float32)
    gen = cgjax.Generator(m, unstack_once=unstack_once)
    before = np.asarray(gen(ids, pix, max_new_tokens=16))
    np.testing.assert_array_equal(before, np.asarray(cgjax.generate(m, ids, pix, max_new_tokens=16)))
    for w in (m.language_model.layers.mlp.down_proj.kernel, m.language_model.lm_head.kernel):
        w.set_value(w.get_value() * -3.0)
    after = np.asarray(cgjax.generate(m, ids, pix, max_new_tokens=16))
    assert (after != before).any()
    np.testing.assert_array_equal(np.asarray(gen(ids, pix, max_new_tokens=16)), before)
    np.testing.assert_array_equal(np.asarray(cgjax.Generator(m)(ids, pix, max_new_tokens=16)), after)
