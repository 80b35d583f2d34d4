"""FLOPs accounting (cgjax.flops) against XLA's own count of the compiled programs.

XLA's cost analysis counts a while loop's body once, so the models here have ONE layer in each
scanned stack (the formulas' per-layer terms are then counted exactly once on both sides)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cgjax import flops
from converters import hf_llava
from converters.tiny_llava import make_llava_model


@pytest.fixture(scope="module")
def llava():
    return hf_llava.load(make_llava_model("tiny", seed=0, text_overrides={"num_hidden_layers": 1}))


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def test_param_counts_partition_every_parameter(llava):
    counts = flops.param_counts(nnx.state(llava))
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(llava)))
    assert sum(counts.values()) == total
    t = llava.config.text_config
    assert counts["embed"] == t.vocab_size * t.hidden_size
    assert counts["vision"] == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(llava.vision_tower)))


def test_encode_flops_match_xla():
    from converters import openclip, tiny_clip

    name, ckpt = tiny_clip.cached_openclip_checkpoint(layers=1)
    tower, _ = openclip.load(name, ckpt)
    cfg = tower.config
    graphdef, state = nnx.split(tower)
    B = 2
    n_tok = cfg.grid[0] * cfg.grid[1] + 1
    # one transformer block on every token
    xla_block = _xla_flops(lambda s, h: nnx.merge(graphdef, s).run_blocks(h), state,
                           jnp.zeros((B, n_tok, cfg.width), jnp.float32))
    block = flops.encode_flops(cfg, B, blocks=1, project=False) - flops.encode_flops(cfg, B, blocks=0, project=False)
    # XLA also counts elementwise work (norms, GELU, softmax); the matmuls dominate
    assert 0.75 * xla_block < block <= xla_block, (block, xla_block)
    # encode_image: patch embedding + projection, plus a last block cgjax runs for the CLS query
    # only (the model count credits the full block, like the reference implementation does)
    xla = _xla_flops(lambda s, x: nnx.merge(graphdef, s).encode_image(x), state,
                     jnp.zeros((B, 3, *cfg.image_size), jnp.float32))
    assert flops.encode_flops(cfg, B, blocks=0) < xla < flops.encode_flops(cfg, B), (xla, flops.encode_flops(cfg, B))


def test_generate_flops_prefill_match_xla(llava):
    """With one new token, a generate call is vision + projector + the prompt's forward with the
    last position's logits: compare with XLA's count of exactly that program."""
    cfg = llava.config
    B, n_img = 2, cfg.num_image_tokens
    T = n_img + 6
    ids = np.full((B, T), 5, np.int32)
    ids[:, 1:1 + n_img] = cfg.image_token_id
    pix = jnp.zeros((B, 3, *cfg.vision_config.image_size), jnp.float32)
    graphdef, state = nnx.split(llava)

    def prefill(s, ids, pix):
        m = nnx.merge(graphdef, s)
        embeds = m.merge_image_features(ids, m.get_image_features(pix))
        lm = m.language_model
        h, _, _ = lm.hidden_states(embeds)
        return lm.logits(h[:, -1])

    xla = _xla_flops(prefill, state, ids, pix)
    ours = flops.generate_flops(cfg, flops.param_counts(state), B, T, 1)
    assert 0.75 * xla < ours <= xla, (ours, xla)
    # each further token adds one decoder + head pass per row, and attention over the longer cache
    more = flops.generate_flops(cfg, flops.param_counts(state), B, T, 3) - ours
    assert flops.feature_blocks(cfg) == 1  # 2 vision layers, feature layer -2
    per_token = 2 * B * flops.param_counts(state)["lm"]
    assert 2 * per_token < more < 2 * per_token * 1.5


def test_step_flops_counts_forward_and_activation_backward():
    counts = {"vision": 10, "projector": 4, "lm": 100, "embed": 7, "concepts": 3}
    # forward 2*10*B*(P+1) + 2*4*B*n_img + 2*100*B*T; backward 2*100*B*T
    assert flops.step_flops(counts, 2, 8, 3, 4) == 2 * 10 * 2 * 5 + 2 * 4 * 2 * 3 + 2 * 100 * 2 * 8 * 2
    assert flops.step_flops(counts, 2, 8, 3, 4, n_trainable_dense=5) - flops.step_flops(counts, 2, 8, 3, 4) == 2 * 5 * 2 * 8


def test_matmul_peak_is_the_best_measured_rate():
    peak = flops.matmul_peak(n=256, repeats=2)
    assert peak["jax"] > 0 and peak["torch"] > 0  # torch is installed with the test extras
    assert peak["peak"] == max(peak["jax"], peak["torch"]) and peak["n"] == 256


def test_step_flops_with_the_values_only_shortcuts():
    counts = {"vision": 0, "projector": 0, "lm": 100, "embed": 0, "concepts": 0}
    # lm = 60 body + 40 head; B=1, T=10: gradients for the last 4 positions, logits at 2
    got = flops.step_flops(counts, 1, 10, 0, 0, head_params=40, diff_len=4, logit_positions=2)
    assert got == 2 * 60 * 10 + 2 * 40 * 2 + 2 * 60 * 4 + 2 * 40 * 2
    assert got < flops.step_flops(counts, 1, 10, 0, 0)
