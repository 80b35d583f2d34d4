"""Weight-only quantization of the frozen base (cgjax.quantize): the quantized weights against an
independent numpy abs-max, the quantized model against the float model holding the dequantized
weights, the quality against fp32, saving and loading, and the errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx

import cgjax
from cgjax import quantize as Q
from cgjax.kernels import int8_cpu
from cgjax.quantize import QuantConfig
from converters import hf_llava
from converters.tiny_llava import make_llava_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("qllava") / "llava")
    make_llava_checkpoint(d, "tiny", seed=3)
    return d


def _inputs(cfg, batch=2, length=24, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg.text_config.vocab_size - 1, (batch, length))
    ids[:, 2:2 + cfg.num_image_tokens] = cfg.image_token_id
    size = cfg.vision_config.image_size
    size = size if isinstance(size, int) else size[0]
    pix = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
    return jnp.asarray(ids), jnp.asarray(pix)


def _logits(model, ids, pix):
    out = model(input_ids=ids, pixel_values=pix)
    return np.asarray(out[0] if isinstance(out, tuple) else out)


def _kl(p_logits, q_logits) -> float:
    p, q = jax.nn.log_softmax(p_logits, -1), jax.nn.log_softmax(q_logits, -1)
    return float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1)))


def test_int8_weights_equal_a_numpy_absmax():
    w = np.random.default_rng(0).normal(size=(3, 64, 4, 8)).astype(np.float32)  # stacked [L, D, H, hd]
    sshape = (3,) + Q.scale_shape((64, 4, 8), 1, QuantConfig("int8"), "q_proj")
    assert sshape == (3, 1, 4, 8)
    q, s = Q.quantize_array(jnp.asarray(w), sshape, jnp.int8)
    # qwix's abs-max maps the largest |w| to 127.5 (the int8 range's half-width), then clips
    want_s = np.abs(w).max(axis=1, keepdims=True) / 127.5
    ratio = w / want_s
    want_q = np.clip(np.round(ratio), -128, 127)
    np.testing.assert_allclose(np.asarray(s), want_s, rtol=1e-6)
    assert np.asarray(q).dtype == np.int8
    off = np.asarray(q).astype(np.int32) != want_q
    assert off.mean() < 0.01
    assert np.all(np.abs(np.abs(ratio[off]) % 1 - 0.5) < 1e-3)  # only halves (the extremes' +-127.5) round otherwise
    np.testing.assert_allclose(Q.dequantize(q, s), w, atol=float(want_s.max()) / 2 + 1e-7)


def test_int4_groups_bound_the_error():
    w = np.random.default_rng(1).normal(size=(64, 16)).astype(np.float32)
    cfg = QuantConfig("int4", group_size=16)
    sshape = Q.scale_shape(w.shape, 1, cfg, "mlp.up_proj")
    assert sshape == (4, 16)
    q, s = Q.quantize_array(jnp.asarray(w), sshape, jnp.int4)
    qi = np.asarray(q).astype(np.int32)
    assert qi.min() >= -8 and qi.max() <= 7
    groups = np.abs(w.reshape(4, 16, 16)).max(axis=1)  # [groups, out]
    err = np.abs(Q.dequantize(q, s) - w).reshape(4, 16, 16).max(axis=1)
    assert np.all(err <= groups / 7.5 + 1e-6)  # at most one quantization step of its group (abs-max / 7.5)


def test_quantized_dot_is_the_dequantized_matmul():
    rng = np.random.default_rng(2)
    for n_in, shape, cfg in ((1, (64, 4, 8), QuantConfig("int8")), (2, (4, 16, 32), QuantConfig("int4", 8))):
        w = rng.normal(size=shape).astype(np.float32)
        q, s = Q.quantize_array(jnp.asarray(w), Q.scale_shape(shape, n_in, cfg, "w"), cfg.qtype)
        x = rng.normal(size=(3, 5) + shape[:n_in]).astype(np.float32)
        np.testing.assert_allclose(np.asarray(Q.dot(jnp.asarray(x), q, s, n_in)),
                                   np.tensordot(x, Q.dequantize(q, s), n_in), rtol=1e-5, atol=1e-4)


def test_w8a8_dot_of_many_rows_is_the_int8_product(monkeypatch):
    """A CPU w8a8 product of many rows runs as bf16 on the int8 values: the same numbers as the int8
    matmul, and as numpy's product of the quantized rows with the quantized weight."""
    rng = np.random.default_rng(3)
    for n_in, shape in ((1, (64, 4, 8)), (2, (4, 16, 32))):
        w = rng.normal(size=shape).astype(np.float32)
        q, s = Q.quantize_array(jnp.asarray(w), Q.scale_shape(shape, n_in, QuantConfig("int8"), "w"), jnp.int8)
        x = rng.normal(size=(3, 100) + shape[:n_in]).astype(np.float32)
        xq = qwix.quantize(jnp.asarray(x), jnp.int8, channelwise_axes=(0, 1))  # the rows, as the dot quantizes them
        want = np.tensordot(np.asarray(xq.qvalue, np.float32) * np.asarray(xq.scale), Q.dequantize(q, s), n_in)
        got = {}
        for name, min_rows in (("bf16", 1), ("int8", 10**9)):
            monkeypatch.setattr(Q, "CPU_BF16_MIN_ROWS", min_rows)
            def w8a8(x, q, s):  # a new function each time: no trace cached under the other setting
                return Q.dot(x, q, s, n_in, True)

            assert ("bf16" in str(jax.make_jaxpr(w8a8)(jnp.asarray(x), q, s))) == (name == "bf16"), name
            got[name] = np.asarray(jax.jit(w8a8)(jnp.asarray(x), q, s))
            np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(got["bf16"], got["int8"], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("activations", [False, True], ids=["int8", "w8a8"])
def test_a_product_of_no_rows_is_empty(activations):
    """A layer trimmed to ``last=0`` multiplies no rows (a Stage A prefix pass): an empty result."""
    q, s = Q.quantize_array(jnp.ones((8, 4, 2)), (1, 4, 2), jnp.int8)
    y = jax.jit(lambda x: Q.dot(x, q, s, 1, activations))(jnp.zeros((3, 0, 8)))
    assert y.shape == (3, 0, 4, 2)


def test_w8a8_prefix_pass_of_a_train_step(tiny):
    """Stage A runs the prompt prefix through the stack with ``last=0`` (keys and values only): with
    int8 activations it gives the cache of the full pass."""
    lm = hf_llava.load(tiny, quant=QuantConfig("int8", activations=True)).language_model
    emb = jnp.asarray(np.random.default_rng(4).normal(size=(2, 10, lm.config.hidden_size)), jnp.float32)
    prefix = jax.jit(lambda e: lm.hidden_states(e, prefill_len=12, last=0)[1])(emb)
    full = jax.jit(lambda e: lm.hidden_states(e, prefill_len=12)[1])(emb)
    np.testing.assert_allclose(np.asarray(prefix.k), np.asarray(full.k), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(prefix.v), np.asarray(full.v), rtol=1e-5, atol=1e-5)


def test_int8_as_bf16_is_exact_for_every_int8_value():
    every = np.arange(-128, 128, dtype=np.int8).reshape(16, 16)
    got = np.asarray(Q.int8_as_bf16(jnp.asarray(every)))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), every.astype(np.float32))


def _dequantized_float_model(tiny, qmodel):
    """The fp32 model of ``tiny`` with every quantized weight replaced by its dequantized value."""
    fmodel = hf_llava.load(tiny)
    qflat = dict(nnx.to_flat_state(nnx.state(qmodel)))
    new = []
    for path, var in nnx.to_flat_state(nnx.state(fmodel)):
        scale = path[:-1] + (path[-1] + Q.SCALE_SUFFIX,)
        if scale in qflat:
            var = var.replace(jnp.asarray(Q.dequantize(qflat[path].get_value(), qflat[scale].get_value())))
        new.append((path, var))
    nnx.update(fmodel, nnx.from_flat_state(new))
    return fmodel


@pytest.mark.parametrize("cfg", [QuantConfig("int8"), QuantConfig("int4", 16)], ids=["int8", "int4"])
def test_quantized_llava_is_the_dequantized_model(tiny, cfg):
    qmodel = hf_llava.load(tiny, quant=cfg)
    flat = [("/".join(map(str, p)), v.get_value().dtype) for p, v in nnx.to_flat_state(nnx.state(qmodel))]
    lm_kernels = {str(d) for p, d in flat if p.endswith("kernel") and not p.startswith("vision_tower")}
    assert lm_kernels == {cfg.mode}  # every linear weight of the LM and the projector
    assert {str(d) for p, d in flat if p.startswith("vision_tower")} == {"float32"}  # the vision tower is not
    lm = qmodel.language_model.layers
    assert lm.mlp.up_proj.kernel.get_value().dtype == cfg.qtype
    assert qmodel.multi_modal_projector.linear_1.kernel.get_value().dtype == cfg.qtype
    assert qmodel.language_model.lm_head.kernel.get_value().dtype == cfg.qtype
    assert qmodel.language_model.embed_tokens.embedding.get_value().dtype == jnp.float32
    ids, pix = _inputs(qmodel.config)
    np.testing.assert_allclose(_logits(qmodel, ids, pix), _logits(_dequantized_float_model(tiny, qmodel), ids, pix),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg", [QuantConfig("int8"), QuantConfig("int8", activations=True), QuantConfig("int4", 16)],
                         ids=["int8", "w8a8", "int4"])
def test_fused_projections_equal_the_separate_ones(tiny, cfg):
    """Generation's fused layers (q/k/v and gate/up each one quantized matmul, their scales
    concatenated; with w8a8 one activation quantization) give the separate layers' numbers."""
    lm = hf_llava.load(tiny, quant=cfg).language_model
    fused = lm.unstacked_layers(fused=True, packed=False)
    qkv = fused[0].self_attn.qkv_proj
    c = lm.config
    assert qkv.kernel.get_value().dtype == cfg.qtype
    assert qkv.kernel.get_value().shape == (c.hidden_size, c.num_attention_heads + 2 * c.num_key_value_heads, c.head_dim)
    assert fused[0].mlp.gate_up_proj.kernel_scale.get_value().shape[-1] == 2 * c.intermediate_size
    rng = np.random.default_rng(1)
    emb = jnp.asarray(rng.normal(size=(2, 10, c.hidden_size)), jnp.float32)
    mask = jnp.asarray(np.r_[[[0, 0] + [1] * 8], [[1] * 10]], jnp.int32)
    run = jax.jit(lambda e, a, fuse: lm.prefill(e, a, lm.unstacked_layers(fuse), 12, last=10)[0], static_argnums=2)
    np.testing.assert_allclose(np.asarray(run(emb, mask, True)), np.asarray(run(emb, mask, False)), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not int8_cpu.available(), reason=f"int8 CPU kernel not used: {int8_cpu.unavailable_reason()}")
def test_generation_on_packed_weights_is_generation_on_xla_int8(tiny, monkeypatch):
    """On a VNNI CPU a w8a8 Generator lays its layers and lm_head out for cgjax's int8 matmul: the
    same prefill logits and tokens as XLA's int8 matmul (the kernel unavailable)."""
    model = hf_llava.load(tiny, quant=QuantConfig("int8", activations=True))
    ids, pix = _inputs(model.config, batch=3)
    mask = jnp.asarray(np.r_[[[0, 0] + [1] * 22], [[1] * 24], [[0] + [1] * 23]], jnp.int32)

    def run():
        gen = cgjax.Generator(model)
        layers, head = nnx.merge(gen._layers_def, gen._layers_state)
        kernels = [layers[0].self_attn.qkv_proj, layers[-1].mlp.down_proj, head]
        lm = model.language_model
        emb = model.merge_image_features(ids, model.get_image_features(pix))
        logits = jax.jit(lambda e: lm.logits(lm.prefill(e, mask, layers, 32, last=24)[0], head))(emb)
        return [k is not None and k.packed for k in kernels], np.asarray(logits), np.asarray(gen(ids, pix, mask, 8))

    packed, logits, tokens = run()
    monkeypatch.setattr(int8_cpu, "available", lambda: False)
    xla_packed, xla_logits, xla_tokens = run()
    assert packed == [True] * 3 and xla_packed == [False] * 3
    np.testing.assert_allclose(logits, xla_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(tokens, xla_tokens)


def test_int8_is_close_to_fp32_and_int4_further(tiny):
    fp = hf_llava.load(tiny)
    ids, pix = _inputs(fp.config)
    ref = _logits(fp, ids, pix)
    kl8 = _kl(ref, _logits(hf_llava.load(tiny, quant=QuantConfig("int8")), ids, pix))
    kl4 = _kl(ref, _logits(hf_llava.load(tiny, quant=QuantConfig("int4", 16)), ids, pix))
    assert 0 < kl8 < 1e-3
    assert kl4 > kl8


def test_saved_quantized_loads_as_it_is_and_refuses_another_mode(tiny, tmp_path):
    cfg = QuantConfig("int8")
    qmodel = hf_llava.load(tiny, quant=cfg)
    out = hf_llava.save_orbax(qmodel, str(tmp_path / "q8"))
    with open(os.path.join(out, hf_llava.QUANTIZATION_FILE)) as f:
        assert json.load(f)["mode"] == "int8"
    again = hf_llava.load_any(out, quant=cfg)
    ids, pix = _inputs(qmodel.config)
    np.testing.assert_array_equal(_logits(again, ids, pix), _logits(qmodel, ids, pix))
    assert again.language_model.layers.mlp.up_proj.kernel.get_value().dtype == jnp.int8
    with pytest.raises(ValueError, match="quantize=int8.*this run asks quantize=int4"):
        hf_llava.load_any(out, quant=QuantConfig("int4", 16))
    with pytest.raises(ValueError, match="quantize=int8.*this run asks quantize=none"):
        hf_llava.load_any(out)
    # an unquantized params-only checkpoint is quantized as it loads: the same weights as from the HF one
    plain = hf_llava.save_orbax(hf_llava.load(tiny), str(tmp_path / "fp"))
    from_orbax = hf_llava.load_any(plain, quant=cfg)
    np.testing.assert_array_equal(_logits(from_orbax, ids, pix), _logits(qmodel, ids, pix))
    with pytest.raises(ValueError, match="quantized weights"):  # never exported back as if it were the original
        hf_llava.export_tensors(qmodel)


def test_group_size_that_does_not_divide_names_the_layer(tiny):
    with pytest.raises(ValueError, match=r"group size 48 does not divide the input width 32 of multi_modal_projector.linear_1"):
        hf_llava.load(tiny, quant=QuantConfig("int4", 48))


def test_bad_settings_are_errors():
    with pytest.raises(ValueError, match="expected one of none, int8, int4"):
        QuantConfig("int2")
    with pytest.raises(ValueError, match="needs quantize='int8'"):
        QuantConfig("int4", activations=True)


def test_quantized_weights_are_created_in_their_shardings(tiny):
    from cgjax import sharding

    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 1}, jax.devices()[:4])
    q = hf_llava.load(tiny, quant=QuantConfig("int8"), mesh=mesh)
    up = q.language_model.layers.mlp.up_proj.kernel.get_value()
    assert up.dtype == jnp.int8 and len(up.sharding.device_set) == 4
    assert not up.sharding.is_fully_replicated
    single = hf_llava.load(tiny, quant=QuantConfig("int8"))
    ids, pix = _inputs(q.config)
    want = _logits(single, ids, pix)
    with jax.set_mesh(mesh):
        got = _logits(q, ids, pix)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
