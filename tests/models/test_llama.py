"""LLaMA parity with HF PyTorch (fp32, same weights): embeddings -> one layer -> stack -> logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from cgjax.models import llama as L
from converters import hf_llava

ATOL = 1e-4


def _hf_llama(tied: bool, kv_heads: int = 2, seed: int = 0, layers: int = 2):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                                   rope_parameters={"rope_theta": 500.0, "rope_type": "default"},
                                   attn_implementation="eager")
    torch.manual_seed(seed)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1: perturb so a wrong norm mapping cannot pass
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module", params=["gqa-untied", "gqa-tied", "mha-untied"])
def pair(request):
    tied = "tied" in request.param and "untied" not in request.param
    hm = _hf_llama(tied=tied, kv_heads=4 if request.param.startswith("mha") else 2)
    return hm, hf_llava.load_llama(hm)


@pytest.fixture(scope="module")
def gqa():
    hm = _hf_llama(tied=False)
    return hm, hf_llava.load_llama(hm)


def _inputs(B=2, T=12, seed=0):
    rs = np.random.RandomState(seed)
    ids = rs.randint(0, 128, (B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, :3] = 0  # left padding
    return ids, mask


def _positions(mask):
    return np.maximum(mask.cumsum(-1) - 1, 0)


def _hf_logits(hm, ids, mask, pos):
    with torch.no_grad():
        return hm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(pos)).logits.numpy()


def test_config_round_trip():
    hc = _hf_llama(tied=False).config
    cfg = L.LlamaConfig.from_hf(hc.to_dict())
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.rope_theta) == (2, 16, 500.0)
    again = transformers.LlamaConfig(**cfg.to_hf())
    for k in ("vocab_size", "hidden_size", "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(again, k) == getattr(hc, k), k
    assert again.rope_parameters["rope_theta"] == 500.0
    assert L.LlamaConfig.from_hf(cfg.to_hf()) == cfg
    # legacy (transformers 4) keys
    legacy = L.LlamaConfig.from_hf({"hidden_size": 64, "num_attention_heads": 4, "rope_theta": 1e6, "rope_scaling": None})
    assert legacy.rope_theta == 1e6 and legacy.head_dim == 16
    with pytest.raises(NotImplementedError, match="rope type 'linear'"):
        L.LlamaConfig.from_hf({"rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    with pytest.raises(NotImplementedError, match="llama3"):
        L.LlamaConfig.from_hf({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}})


def test_embeddings(gqa):
    hm, m = gqa
    ids, _ = _inputs()
    with torch.no_grad():
        ref = hm.model.embed_tokens(torch.tensor(ids)).numpy()
    np.testing.assert_array_equal(np.asarray(m.embed(ids)), ref)


def test_rope_tables(gqa):
    hm, m = gqa
    pos = np.array([[0, 1, 2, 7, 300]])
    with torch.no_grad():
        cos, sin = hm.model.rotary_emb(torch.zeros(1, 5, 64), torch.tensor(pos))
    c, s = L.rope_cos_sin(jnp.asarray(pos), m.config.head_dim, m.config.rope_theta)
    np.testing.assert_allclose(np.asarray(c), cos.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(s), sin.numpy(), atol=1e-5)


def test_one_decoder_layer(gqa):
    hm, m = gqa
    rs = np.random.RandomState(1)
    h = rs.randn(2, 7, 64).astype(np.float32)
    pos = np.tile(np.arange(7), (2, 1))
    with torch.no_grad():
        pe = hm.model.rotary_emb(torch.tensor(h), torch.tensor(pos))
        causal = torch.full((7, 7), float("-inf")).triu(1)[None, None].expand(2, 1, 7, 7)
        ref = hm.model.layers[1](torch.tensor(h), attention_mask=causal, position_embeddings=pe,
                                 position_ids=torch.tensor(pos)).numpy()
    graphdef, state = nnx.split(m.layers)
    layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[1], state))
    cos, sin = L.rope_cos_sin(jnp.asarray(pos), m.config.head_dim, m.config.rope_theta)
    mask = jnp.tril(jnp.ones((7, 7), bool))[None, None, None]
    out, _, _ = jax.jit(lambda x: layer(x, cos, sin, mask, lambda k, v: (k, v, None)))(jnp.asarray(h))
    np.testing.assert_allclose(np.asarray(out), ref, atol=ATOL)


def test_stack_hidden_states(gqa):
    hm, m = gqa
    ids, mask = _inputs()
    pos = _positions(mask)
    with torch.no_grad():
        ref = hm.model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(pos)).last_hidden_state.numpy()
    h, cache, attn = jax.jit(lambda i, a: m.hidden_states(m.embed(i), a))(ids, mask)
    assert cache is None and attn is None
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(h)[valid], ref[valid], atol=ATOL)


def test_logits_left_padding(pair):
    hm, m = pair
    ids, mask = _inputs()
    ref = _hf_logits(hm, ids, mask, _positions(mask))
    out, _ = jax.jit(lambda i, a: m(i, attention_mask=a))(ids, mask)
    valid = mask.astype(bool)
    assert np.abs(ref[valid]).max() > 0.1
    np.testing.assert_allclose(np.asarray(out)[valid], ref[valid], atol=ATOL)


def test_masked_slot_inside_sequence(gqa):
    """A masked-out slot in the middle: not attended to, and positions skip it (cumsum)."""
    hm, m = gqa
    ids, mask = _inputs()
    mask[0, 5] = 0
    pos = _positions(mask)
    ref = _hf_logits(hm, ids, mask, pos)
    fwd = jax.jit(lambda i, a, p: m(i, attention_mask=a, position_ids=p)[0])
    out = fwd(ids, mask, None)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out)[valid], ref[valid], atol=ATOL)
    # the same thing as a full [B, T, S] mask (caller-owned causality) + explicit positions
    full = np.tril(np.ones((12, 12), bool))[None] & mask.astype(bool)[:, None, :]
    out3 = fwd(ids, full, pos)
    np.testing.assert_allclose(np.asarray(out3)[valid], ref[valid], atol=ATOL)


def test_kv_cache_matches_full_forward(gqa):
    hm, m = gqa
    ids, mask = _inputs(T=12)
    ref = _hf_logits(hm, ids, mask, _positions(mask))
    cache = m.init_cache(2, 16)
    step = jax.jit(lambda i, a, c: m(i, attention_mask=a, cache=c))
    o1, cache = step(ids[:, :8], mask[:, :8], cache)
    outs = [np.asarray(o1)]
    for t in range(8, 12):  # one token at a time
        o, cache = step(ids[:, t:t + 1], mask[:, t:t + 1], cache)
        outs.append(np.asarray(o))
    assert int(cache.index) == 12
    out = np.concatenate(outs, axis=1)
    valid = mask.astype(bool)
    np.testing.assert_allclose(out[valid], ref[valid], atol=ATOL)


@pytest.mark.parametrize("layers,last", [(2, 1), (2, 3), (2, 0), (1, 1)])
def test_last_positions_only(layers, last):
    """``last`` runs the final layer for the last positions only: their logits equal HF's, and
    the cache (the final layer's keys/values still cover the whole prompt) equals the untrimmed one."""
    hm = _hf_llama(tied=False, layers=layers)
    m = hf_llava.load_llama(hm)
    ids, mask = _inputs(T=12)
    ref = _hf_logits(hm, ids, mask, _positions(mask))
    emb = m.embed(ids)
    h, cache, _ = jax.jit(lambda e, a: m.hidden_states(e, a, prefill_len=16, last=last))(emb, mask)
    _, want, _ = jax.jit(lambda e, a: m.hidden_states(e, a, prefill_len=16))(emb, mask)
    assert h.shape == (2, last, 64)
    np.testing.assert_allclose(np.asarray(m.logits(h)), ref[:, 12 - last:], atol=ATOL)
    assert int(cache.index) == int(want.index) == 12
    np.testing.assert_array_equal(np.asarray(cache.valid), np.asarray(want.valid))
    for got, full in ((cache.k, want.k), (cache.v, want.v)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=1e-6)
    h_plain, no_cache, _ = jax.jit(lambda e, a: m.hidden_states(e, a, last=last))(emb, mask)
    assert no_cache is None
    np.testing.assert_allclose(np.asarray(m.logits(h_plain)), ref[:, 12 - last:], atol=ATOL)
    with pytest.raises(ValueError, match="last=13 needs no cache"):
        m.hidden_states(emb, mask, last=13)
    with pytest.raises(ValueError, match="last=1 needs no cache, no return_attn_rows"):
        m.hidden_states(emb, mask, return_attn_rows=[0], last=1)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "separate"])
def test_prefill_and_decode_steps_on_unstacked_layers(gqa, fused):
    """``prefill`` (unrolled on per-layer weights, per-layer caches) gives HF's logits at the last
    positions and the cache ``hidden_states(prefill_len=...)`` builds; ``decode_step`` from it
    continues with HF's logits one token at a time. Fused layers (q/k/v and gate/up as one matmul
    each) and separate ones alike."""
    hm, m = gqa
    ids, mask = _inputs(T=12)
    ref = _hf_logits(hm, ids, mask, _positions(mask))
    emb = m.embed(ids[:, :8])
    layers = m.unstacked_layers(fused=fused)
    assert hasattr(layers[0].self_attn, "qkv_proj") == fused == hasattr(layers[0].mlp, "gate_up_proj")
    assert hasattr(layers[0].self_attn, "q_proj") != fused
    h, cache = jax.jit(lambda e, a: m.prefill(e, a, m.unstacked_layers(fused), 16, last=2))(emb, mask[:, :8])
    np.testing.assert_allclose(np.asarray(m.logits(h)), ref[:, 6:8], atol=ATOL)
    _, stacked, _ = jax.jit(lambda e, a: m.hidden_states(e, a, prefill_len=16))(emb, mask[:, :8])
    assert len(cache.k) == m.config.num_hidden_layers and int(cache.index) == 8
    np.testing.assert_array_equal(np.asarray(cache.valid), np.asarray(stacked.valid))
    for layer in range(m.config.num_hidden_layers):
        np.testing.assert_allclose(np.asarray(cache.k[layer]), np.asarray(stacked.k[layer]), atol=1e-6)
        np.testing.assert_allclose(np.asarray(cache.v[layer]), np.asarray(stacked.v[layer]), atol=1e-6)
    step = jax.jit(lambda i, c: m.decode_step(m.embed(i), m.unstacked_layers(fused), c))
    for t in range(8, 12):
        h, cache = step(ids[:, t:t + 1], cache)
        np.testing.assert_allclose(np.asarray(m.logits(h[:, 0])), ref[:, t], atol=ATOL)
    assert int(cache.index) == 12
    with pytest.raises(ValueError, match="max_len >= 8"):
        m.prefill(emb, mask[:, :8], m.unstacked_layers(), 4)


def test_prefill_len_builds_the_cache(gqa):
    """A prompt run with ``prefill_len`` (attention over the prompt only) leaves the cache a
    preallocated one would hold, and decoding from it matches HF's full forward."""
    hm, m = gqa
    ids, mask = _inputs(T=12)
    ref = _hf_logits(hm, ids, mask, _positions(mask))
    emb = m.embed(ids[:, :8])
    h, cache, _ = jax.jit(lambda e, a: m.hidden_states(e, a, prefill_len=16))(emb, mask[:, :8])
    _, want, _ = jax.jit(lambda e, a: m.hidden_states(e, a, cache=m.init_cache(2, 16)))(emb, mask[:, :8])
    assert cache.k.shape == want.k.shape and int(cache.index) == int(want.index) == 8
    np.testing.assert_array_equal(np.asarray(cache.valid), np.asarray(want.valid))
    valid = mask.astype(bool)
    slots = np.asarray(want.valid)  # padding slots hold garbage that nothing attends to
    assert slots[:, :8].sum() == valid[:, :8].sum() and not slots[:, 8:].any()
    for got, ref_kv in ((cache.k, want.k), (cache.v, want.v)):
        token_major = lambda a: np.moveaxis(np.asarray(a), 3, 2)  # [L, B, S, KV, hd]  # noqa: E731
        np.testing.assert_allclose(token_major(got)[:, slots], token_major(ref_kv)[:, slots], atol=1e-6)
    np.testing.assert_allclose(np.asarray(m.logits(h))[valid[:, :8]], ref[:, :8][valid[:, :8]], atol=ATOL)
    step = jax.jit(lambda i, a, c: m(i, attention_mask=a, cache=c))
    outs = []
    for t in range(8, 12):
        o, cache = step(ids[:, t:t + 1], mask[:, t:t + 1], cache)
        outs.append(np.asarray(o))
    out = np.concatenate(outs, axis=1)
    np.testing.assert_allclose(out[valid[:, 8:]], ref[:, 8:][valid[:, 8:]], atol=ATOL)
    with pytest.raises(ValueError, match="prefill_len=4 needs no cache and at least the prompt's 8 slots"):
        m.hidden_states(emb, mask[:, :8], prefill_len=4)
    with pytest.raises(ValueError, match="prefill_len=16 needs no cache"):
        m.hidden_states(emb, mask[:, :8], cache=m.init_cache(2, 16), prefill_len=16)


def test_attention_rows(gqa):
    hm, m = gqa
    ids, mask = _inputs()
    rows = jnp.array([11, 4])
    _, _, attn = jax.jit(lambda i, a: m(i, attention_mask=a, return_attn_rows=rows))(ids, mask)
    assert attn.shape == (2, 2, 4, 2, 12)  # [L, B, H, R, S]
    with torch.no_grad():
        ref = hm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(_positions(mask)), output_attentions=True).attentions
    for layer in range(2):
        for r, row in enumerate([11, 4]):
            np.testing.assert_allclose(np.asarray(attn[layer, :, :, r]), ref[layer][:, :, row].numpy(), atol=1e-5)
    # a regulariser on those rows is differentiable
    g = jax.jit(jax.grad(lambda e: jnp.mean(m.hidden_states(e, mask, return_attn_rows=rows)[2] ** 2)))(m.embed(ids))
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0


def test_bf16_compute_close(gqa):
    hm, m = gqa
    ids, mask = _inputs()
    ref, _ = jax.jit(lambda i, a: m(i, attention_mask=a))(ids, mask)
    m16 = hf_llava.load_llama(hm, compute_dtype=jnp.bfloat16)
    out, _ = jax.jit(lambda i, a: m16(i, attention_mask=a))(ids, mask)
    assert out.dtype == jnp.float32
    valid = mask.astype(bool)
    err = np.abs(np.asarray(out) - np.asarray(ref))[valid].max()
    assert 0 < err < 0.1


def test_rope_tables_gathered_by_position_equal_the_direct_tables():
    from cgjax.models.llama import rope_cos_sin
    pos = jnp.asarray(np.random.RandomState(0).randint(0, 300, (3, 17)), jnp.int32)
    direct = rope_cos_sin(pos, 64, 10000.0)
    gathered = jax.jit(rope_cos_sin, static_argnums=(1, 2, 3))(pos, 64, 10000.0, 300)
    for a, b in zip(direct, gathered):
        assert a.shape == b.shape == (3, 17, 64)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=3e-5)  # fp32 angles up to 300 rad: ulp 3e-5
    # positions past the bound are a caller's error: the table is not silently wider than asked
    assert not np.allclose(np.asarray(jax.jit(rope_cos_sin, static_argnums=(1, 2, 3))(pos, 64, 10000.0, 100)[1]),
                           np.asarray(direct[1]))
