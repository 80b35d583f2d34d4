"""LLaVA parity with HF ``LlavaForConditionalGeneration`` (fp32, same weights), presets, sharding."""
import dataclasses

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from cgjax import sharding
from cgjax.models.llava import LLAVA_PRESETS, Llava, LlavaConfig
from converters import hf_llava
from converters.tiny_llava import make_llava_checkpoint

ATOL = 1e-4


@jax.jit
def _logits(model, ids, pix, mask):  # one compiled function per (config, shapes): tests share it
    return model(ids, pix, mask)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_llava_checkpoint(str(tmp_path_factory.mktemp("llava") / "tiny"), "tiny", seed=0)


@pytest.fixture(scope="module")
def hf(ckpt):
    return transformers.LlavaForConditionalGeneration.from_pretrained(ckpt).eval()


@pytest.fixture(scope="module")
def model(ckpt):
    return hf_llava.load(ckpt)


def _variant(model, layer, strategy):
    """The same weights under another vision_feature_layer / select strategy."""
    if (layer, strategy) == (model.config.vision_feature_layer, model.config.vision_feature_select_strategy):
        return model
    cfg = dataclasses.replace(model.config, vision_feature_layer=layer, vision_feature_select_strategy=strategy)
    other = nnx.eval_shape(lambda: Llava(cfg, rngs=nnx.Rngs(0)))
    nnx.update(other, nnx.state(model))
    return other


def _prompt(cfg: LlavaConfig, B=2, T=30, seed=0):
    """Left-padded prompts: row b has 3*b padding slots, BOS, image tokens, text."""
    rs = np.random.RandomState(seed)
    n = cfg.num_image_tokens
    ids = rs.randint(3, cfg.image_token_id, (B, T))
    mask = np.ones((B, T), np.int64)
    for b in range(B):
        mask[b, :3 * b] = 0
        ids[b, :3 * b] = 0
        ids[b, 3 * b + 1: 3 * b + 1 + n] = cfg.image_token_id
    size = cfg.vision_config.image_size
    pix = rs.randn(B, 3, size[0], size[1]).astype(np.float32)
    return ids, mask, pix


def test_config_round_trip(ckpt, hf):
    cfg = LlavaConfig.from_hf(hf.config.to_dict())
    assert cfg.image_token_id == hf.config.image_token_id == 127
    assert cfg.vision_config.width == 32 and cfg.text_config.num_key_value_heads == 2
    d = cfg.to_hf()
    again = transformers.LlavaConfig(**d)
    assert again.image_token_id == 127 and again.vision_feature_layer == -2
    assert again.text_config.num_key_value_heads == 2 and again.vision_config.patch_size == 8
    assert LlavaConfig.from_hf(d) == cfg
    # transformers-5 name and the legacy name both work
    assert LlavaConfig.from_hf({**d, "image_token_index": None, "image_token_id": 5}).image_token_id == 5
    with pytest.raises(NotImplementedError, match="list of vision_feature_layer"):
        LlavaConfig.from_hf({**d, "vision_feature_layer": [-2, -5]})
    with pytest.raises(ValueError, match="select_strategy"):
        LlavaConfig.from_hf({**d, "vision_feature_select_strategy": "patch"})


@pytest.mark.parametrize("layer,strategy", [(-2, "default"), (-1, "full")])
def test_image_features(hf, model, layer, strategy):
    m = _variant(model, layer, strategy)
    _, _, pix = _prompt(m.config)
    with torch.no_grad():
        ref = hf.model.get_image_features(pixel_values=torch.tensor(pix), vision_feature_layer=layer,
                                          vision_feature_select_strategy=strategy)
        ref = ref.pooler_output if hasattr(ref, "pooler_output") else ref
        ref = torch.stack(list(ref)) if isinstance(ref, (list, tuple)) else ref
    out = jax.jit(m.get_image_features)(pix)
    assert out.shape == (2, m.config.num_image_tokens, 64)
    np.testing.assert_allclose(np.asarray(out), ref.reshape(out.shape).numpy(), atol=ATOL)


def test_merge_matches_masked_scatter(hf, model):
    cfg = model.config
    n = cfg.num_image_tokens
    rs = np.random.RandomState(3)
    ids = rs.randint(0, 100, (2, 3 * n))
    ids[0, 2:2 + n] = cfg.image_token_id  # n + n image tokens, at different places in each row
    ids[1, 5: 5 + n // 2] = cfg.image_token_id
    ids[1, 9 + n // 2: 9 + n] = cfg.image_token_id
    feats = rs.randn(2, n, 64).astype(np.float32)
    out = model.merge_image_features(ids, feats)
    with torch.no_grad():
        emb = hf.get_input_embeddings()(torch.tensor(ids))
        m = torch.tensor(ids == cfg.image_token_id)[..., None].expand_as(emb)
        ref = emb.masked_scatter(m, torch.tensor(feats)).numpy()
    np.testing.assert_array_equal(np.asarray(out), ref)
    with pytest.raises(ValueError, match="do not match"):
        model.merge_image_features(ids[:, 2 + n // 2:], feats)  # fewer image tokens than feature rows


@pytest.mark.parametrize("layer,strategy", [(-2, "default"), (-1, "default"), (-2, "full"), (-1, "full")])
def test_logits_left_padding(hf, model, layer, strategy):
    m = _variant(model, layer, strategy)
    ids, mask, pix = _prompt(m.config)
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos), vision_feature_layer=layer,
                 vision_feature_select_strategy=strategy).logits.numpy()
    out = _logits(m, ids, pix, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out)[valid], ref[valid], atol=ATOL)


def test_hf_default_positions_equal_cumsum_on_left_padding(hf, model):
    """HF's forward (no position_ids) uses arange positions; RoPE is shift invariant, so with
    pure left padding it equals cumsum(mask)-1 on the real tokens."""
    ids, mask, pix = _prompt(model.config)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix),
                 attention_mask=torch.tensor(mask)).logits.numpy()
    out = _logits(model, ids, pix, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out)[valid], ref[valid], atol=ATOL)


def test_sharded_forward_equals_single_device(ckpt, model):
    assert len(jax.devices()) == 8
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    placed = hf_llava.load(ckpt, mesh=mesh)  # tensors placed straight into their shardings
    q = placed.language_model.layers.self_attn.q_proj.kernel.get_value()
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    resharded = sharding.shard_model(hf_llava.load(ckpt), mesh)  # same placement via shard_model
    for (k, a), (_, b) in zip(nnx.to_flat_state(nnx.state(placed)), nnx.to_flat_state(nnx.state(resharded))):
        assert a.get_value().sharding == b.get_value().sharding, k
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))
    ids, mask, pix = _prompt(model.config, B=4)
    ref = np.asarray(_logits(model, ids, pix, mask))
    args = [jax.device_put(x, sharding.batch_sharding(mesh, x.ndim)) for x in (ids, pix, mask)]
    out = _logits(placed, *args)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


@pytest.mark.parametrize("name,count", [("llava-1.5-7b", 7_063_427_072), ("llava-1.5-13b", 13_351_494_656)])
def test_preset_parameter_counts(name, count):
    cfg = LlavaConfig.from_hf(LLAVA_PRESETS[name])
    abstract = nnx.eval_shape(lambda: Llava(cfg, rngs=nnx.Rngs(0)))  # nothing allocated
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert sum(int(np.prod(x.shape)) for x in leaves) == count
    with torch.device("meta"):
        ref = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**LLAVA_PRESETS[name]))
    assert sum(p.numel() for p in ref.parameters()) == count
    assert cfg.num_image_tokens == 576 and cfg.vision_config.image_size == (336, 336)
