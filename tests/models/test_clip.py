"""CLIP vision tower parity ladder vs PyTorch (open_clip and HF CLIPVisionModel), fp32."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from cgjax import sharding
from cgjax.models.clip import CLIPVisionConfig, CLIPVisionTransformer
from converters import common as C
from converters import openclip as oc
from converters.tiny_clip import cached_openclip_checkpoint

ATOL = 1e-4

# jitted entry points (one compile per model structure; eager first calls compile op by op)
_encode = jax.jit(lambda m, x: m.encode_image(x))


def _torch_model(name, ckpt):
    import open_clip

    m = open_clip.create_model(name)
    m.load_state_dict(torch.load(ckpt, weights_only=True))
    return m.eval()


@pytest.fixture(scope="session", params=["quick_gelu", "gelu"])
def pair(request):
    name, ckpt = cached_openclip_checkpoint(act=request.param)
    tm = _torch_model(name, ckpt)
    jm, _ = oc.load(name, ckpt)
    return tm, jm


@pytest.fixture(scope="session")
def pixels():
    return torch.from_numpy(np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32))


def _j(x):
    return jnp.asarray(x.detach().numpy())


def test_patch_embedding(pair, pixels):
    tm, jm = pair
    with torch.no_grad():
        want = tm.visual.conv1(pixels).flatten(2).transpose(1, 2).numpy()
    np.testing.assert_allclose(np.asarray(jm.patch_embeddings(_j(pixels))), want, atol=ATOL, rtol=0)


def test_embeddings_with_ln_pre(pair, pixels):
    tm, jm = pair
    with torch.no_grad():
        want = tm.visual._embeds(pixels).numpy()
    np.testing.assert_allclose(np.asarray(jm.hidden_states(_j(pixels), 0)), want, atol=ATOL, rtol=0)


def test_one_block(pair):
    tm, jm = pair
    x = torch.randn(2, jm.config.num_tokens, jm.config.width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = tm.visual.transformer.resblocks[1](x).numpy()
    got = jm.run_blocks(_j(x), 1, 2)
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=0)


def test_tower_and_encode_image(pair, pixels):
    tm, jm = pair
    with torch.no_grad():
        tokens = tm.visual.transformer(tm.visual._embeds(pixels)).numpy()
        want = tm.encode_image(pixels).numpy()
        want_n = tm.encode_image(pixels, normalize=True).numpy()
    fwd = jax.jit(lambda m, x: (m.hidden_states(x, -1), m.encode_image(x), m.encode_image(x, normalize=True)))
    got_tokens, got, got_n = (np.asarray(a) for a in fwd(jm, _j(pixels)))
    np.testing.assert_allclose(got_tokens, tokens, atol=ATOL, rtol=0)
    assert got.shape == (3, jm.config.output_dim)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(got_n, want_n, atol=ATOL, rtol=0)


def test_variants_avg_pool_ln_after_pool_layer_scale_no_ln_pre(pixels):
    extra = dict(pool_type="avg", final_ln_after_pool=True, ls_init_value=0.5, no_ln_pre=True)
    name, ckpt = cached_openclip_checkpoint(act="gelu", layers=1, **extra)
    tm = _torch_model(name, ckpt)
    jm, _ = oc.load(name, ckpt)
    assert jm.config.pool == "avg" and jm.config.layer_scale and not jm.config.ln_pre and jm.config.final_ln_after_pool
    with torch.no_grad():
        want = tm.encode_image(pixels).numpy()
    np.testing.assert_allclose(np.asarray(_encode(jm, _j(pixels))), want, atol=ATOL, rtol=0)


def test_unsupported_open_clip_configs_rejected():
    base = {"embed_dim": 8, "vision_cfg": {"width": 16, "layers": 1, "head_width": 8, "patch_size": 8, "image_size": 16}}
    for key, val, msg in [("attentional_pool", True, "attentional pooler"), ("timm_model_name", "vit", "timm"),
                          ("qk_norm", True, "qk_norm"), ("pool_type", "none", "pool_type")]:
        cfg = {**base, "vision_cfg": {**base["vision_cfg"], key: val}}
        with pytest.raises(ValueError, match=msg):
            CLIPVisionConfig.from_open_clip(cfg)
    with pytest.raises(ValueError, match="ResNet"):
        CLIPVisionConfig.from_open_clip({**base, "vision_cfg": {**base["vision_cfg"], "layers": [1, 1, 1, 1]}})


# ----------------------------------------------------------------------------- HF CLIPVisionModel


@pytest.fixture(scope="session")
def hf_pair():
    from transformers import CLIPVisionConfig as HFConfig
    from transformers import CLIPVisionModel

    hc = HFConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                  patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-6)
    torch.manual_seed(0)
    tm = CLIPVisionModel(hc).eval()
    with torch.no_grad():
        for p in tm.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    cfg = CLIPVisionConfig.from_hf(hc)
    assert cfg.layer_norm_eps == 1e-6 and cfg.output_dim is None
    jm = C.load_state(oc.abstract_model(cfg), tm, oc.hf_clip_vision_rules(""))
    return tm, jm


HF_LAYERS = (0, 1, -2, -1)


@pytest.fixture(scope="session")
def hf_outputs(hf_pair, pixels):
    tm, jm = hf_pair
    with torch.no_grad():
        out = tm(pixel_values=pixels, output_hidden_states=True)
    want = {layer: out.hidden_states[layer].numpy() for layer in HF_LAYERS}
    want["pooled"] = out.pooler_output.numpy()
    fwd = jax.jit(lambda m, x: ({layer: m.hidden_states(x, layer) for layer in HF_LAYERS},
                                m.pooled(x), m.encode_image(x)))
    hidden, pooled, enc = fwd(jm, _j(pixels))
    got = {layer: np.asarray(hidden[layer]) for layer in HF_LAYERS}
    got["pooled"], got["encode"] = np.asarray(pooled), np.asarray(enc)
    return want, got


@pytest.mark.parametrize("layer", HF_LAYERS)
def test_hidden_states_match_hf(hf_outputs, layer):
    want, got = hf_outputs
    assert got[layer].shape == want[layer].shape == (3, 17, 32)
    np.testing.assert_allclose(got[layer], want[layer], atol=ATOL, rtol=0)


def test_pooled_matches_hf_and_index_errors(hf_pair, hf_outputs, pixels):
    want, got = hf_outputs
    np.testing.assert_allclose(got["pooled"], want["pooled"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(got["encode"], want["pooled"], atol=ATOL, rtol=0)  # no proj
    _, jm = hf_pair
    with pytest.raises(ValueError, match="out of range"):
        jm.hidden_states(_j(pixels), 4)
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        jm.hidden_states(jnp.zeros((1, 3, 16, 16)), 0)


def test_bf16_compute_close(pixels):
    name, ckpt = cached_openclip_checkpoint(act="quick_gelu")
    jm, _ = oc.load(name, ckpt)
    bf_graph = nnx.split(nnx.eval_shape(lambda: CLIPVisionTransformer(jm.config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)))[0]
    bf = nnx.merge(bf_graph, nnx.state(jm))
    assert bf.blocks.attn.qkv_kernel.get_value().dtype == jnp.float32  # params stay fp32
    out = _encode(bf, _j(pixels))
    assert out.dtype == jnp.bfloat16
    ref = np.asarray(_encode(jm, _j(pixels)))
    err = np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max()
    assert 0 < err < 0.05


def test_sharded_forward_matches_single_device(pixels):
    name, ckpt = cached_openclip_checkpoint(act="quick_gelu")
    jm, _ = oc.load(name, ckpt)
    x = jnp.tile(_j(pixels), (3, 1, 1, 1))[:8]
    single = np.asarray(_encode(jm, x))
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    sharding.shard_model(jm, mesh)
    qkv = jm.blocks.attn.qkv_kernel.get_value()
    assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, "tensor", None)
    out = _encode(jm, jax.device_put(x, sharding.batch_sharding(mesh, 4)))
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), single, atol=ATOL, rtol=0)
