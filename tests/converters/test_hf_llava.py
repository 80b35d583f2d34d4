"""HF LLaVA <-> cgjax conversion: every key layout, dtypes, shards, round trips, errors, CLI."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from converters import common, hf_llava
from converters.tiny_llava import make_llava_checkpoint, make_llava_model
from cgjax.testing import assert_same_params


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A transformers-5 ``save_pretrained`` checkpoint (+ a fake tokenizer file)."""
    path = make_llava_checkpoint(str(tmp_path_factory.mktemp("src") / "tiny"), "tiny", seed=2)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 64}, f)
    return path


@pytest.fixture(scope="module")
def model(src):
    return hf_llava.load(src)


@pytest.fixture(scope="module")
def hf(src):
    return transformers.LlavaForConditionalGeneration.from_pretrained(src).eval()




def _inputs(cfg, B=2):
    rs = np.random.RandomState(0)
    n = cfg.num_image_tokens
    ids = rs.randint(3, cfg.image_token_id, (B, n + 6))
    ids[:, 1:1 + n] = cfg.image_token_id
    return ids, np.ones_like(ids), rs.randn(B, 3, 32, 32).astype(np.float32)


def _hf_logits(hf_model, cfg):
    ids, mask, pix = _inputs(cfg)
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix),
                        attention_mask=torch.tensor(mask)).logits.numpy()


def _write(tmp, tensors: dict, src_dir: str) -> str:
    os.makedirs(tmp, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(tmp, "model.safetensors"))
    shutil.copy(os.path.join(src_dir, "config.json"), tmp)
    return str(tmp)


def _relayout(tensors: dict, layout: str) -> dict:
    """Rename 'saved'-layout keys into another layout."""
    out = {}
    old, new = hf_llava.LAYOUTS["saved"], hf_llava.LAYOUTS[layout]
    for k, v in tensors.items():
        for o, n in sorted(zip(old, new), key=lambda p: -len(p[0])):
            if k.startswith(o):
                out[n + k[len(o):]] = v
                break
        else:
            raise AssertionError(k)
    return out


def test_source_is_transformers5_layout(src, model):
    keys = load_file(os.path.join(src, "model.safetensors")).keys()
    assert any(k.startswith("language_model.model.layers.") for k in keys)
    assert any(k.startswith("vision_tower.encoder.") for k in keys)
    assert model.source_layout == "saved"


def test_round_trip_bitwise_and_from_pretrained(src, model, hf, tmp_path):
    out = hf_llava.save(model, str(tmp_path / "out"))
    a = load_file(os.path.join(src, "model.safetensors"))
    b = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    assert os.path.exists(os.path.join(out, "tokenizer_config.json"))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
    again = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    np.testing.assert_array_equal(_hf_logits(again, model.config), _hf_logits(hf, model.config))


@pytest.mark.parametrize("layout", ["hub", "live_v4", "live"])
def test_other_key_layouts(src, model, tmp_path, layout):
    tensors = _relayout(load_file(os.path.join(src, "model.safetensors")), layout)
    m = hf_llava.load(_write(tmp_path / layout, tensors, src))
    assert m.source_layout == layout
    assert_same_params(m, model)


def test_hub_layout_is_what_transformers_reads(src, hf, model, tmp_path):
    """Sanity: the 'hub' layout (vision_tower.vision_model.*) is a real HF layout, and save
    keeps a hub-layout source in its own layout."""
    path = _write(tmp_path / "hub", _relayout(load_file(os.path.join(src, "model.safetensors")), "hub"), src)
    m = hf_llava.load(path)
    out = hf_llava.save(m, str(tmp_path / "hub_out"))
    keys = load_file(os.path.join(out, "model.safetensors")).keys()
    assert any(k.startswith("vision_tower.vision_model.") for k in keys)
    again = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    np.testing.assert_array_equal(_hf_logits(again, model.config), _hf_logits(hf, model.config))


def test_live_model(hf, model):
    m = hf_llava.load(hf)
    assert m.source_layout == "live" and m.source_dir is None
    assert_same_params(m, model)


def test_tied_live_model():
    hf = make_llava_model("tiny", seed=4, tie_word_embeddings=True)
    assert "lm_head.weight" in hf.state_dict()  # the tied copy is present and ignored
    m = hf_llava.load(hf)
    assert not hasattr(m.language_model, "lm_head")
    ids, mask, pix = _inputs(m.config)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix), attention_mask=torch.tensor(mask)).logits
    out = jax.jit(lambda i, p, a: m(i, p, a))(ids, pix, mask)
    np.testing.assert_allclose(np.asarray(out), ref.numpy(), atol=1e-4)
    assert not any(k.endswith("lm_head.weight") for k in hf_llava.export_tensors(m))


def test_sharded_safetensors(model, tmp_path):
    path = make_llava_checkpoint(str(tmp_path / "sharded"), "tiny", seed=2, max_shard_size="40KB")
    files = os.listdir(path)
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    assert_same_params(hf_llava.load(path), model)


@pytest.mark.parametrize("tdtype,jdtype", [(torch.float16, jnp.float16), (torch.bfloat16, jnp.bfloat16)])
def test_half_precision_files(tmp_path, tdtype, jdtype):
    hf = make_llava_model("tiny", seed=2, dtype=tdtype)
    path = str(tmp_path / "half")
    hf.save_pretrained(path)
    m = hf_llava.load(path)  # fp32 params holding the exact half values
    ref = dict(hf.state_dict())
    q = m.language_model.layers.self_attn.q_proj.kernel.get_value()
    assert q.dtype == jnp.float32
    w = ref["model.language_model.layers.1.self_attn.q_proj.weight"].float().numpy()
    np.testing.assert_array_equal(np.asarray(q[1]).reshape(64, 64), w.T)
    out = hf_llava.save(m, str(tmp_path / "half_out"), dtype=jdtype)  # back to half: bitwise equal
    a, b = (common.read_tensors(p) for p in (path, out))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a.load(k), b.load(k), err_msg=k)
    m16 = hf_llava.load(path, dtype=jdtype)
    assert m16.language_model.layers.self_attn.q_proj.kernel.get_value().dtype == jdtype


def test_missing_and_misshaped_keys(src, tmp_path):
    tensors = load_file(os.path.join(src, "model.safetensors"))
    missing = dict(tensors)
    del missing["language_model.model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match=r"language_model\.model\.layers\.1\.mlp\.up_proj\.weight"):
        hf_llava.load(_write(tmp_path / "missing", missing, src))
    bad = dict(tensors)
    bad["multi_modal_projector.linear_2.weight"] = np.zeros((64, 63), np.float32)
    with pytest.raises(ValueError, match=r"multi_modal_projector\.linear_2\.weight"):
        hf_llava.load(_write(tmp_path / "bad", bad, src))
    extra = dict(tensors)
    extra["language_model.model.layers.0.mystery.weight"] = np.zeros(3, np.float32)
    with pytest.raises(KeyError, match="mystery"):
        hf_llava.load(_write(tmp_path / "extra", extra, src))


def test_save_failure_leaves_nothing(model, tmp_path, monkeypatch):
    out = tmp_path / "never"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(common, "save_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        hf_llava.save(model, str(out))
    assert os.listdir(tmp_path) == []


def test_load_with_mesh_places_shards(src, model):
    from cgjax import sharding

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    m = hf_llava.load(src, mesh=mesh)
    emb = m.language_model.embed_tokens.embedding.get_value()
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert len(emb.addressable_shards) == 8 and emb.addressable_shards[0].data.shape == (64, 32)
    assert_same_params(m, model)


def test_cli_orbax_round_trip(src, model, tmp_path):
    orb, back = str(tmp_path / "orbax"), str(tmp_path / "back")
    hf_llava.main(["to-orbax", src, orb])
    from cgjax.persistence import OUTPUT_MARKER

    listed = set(os.listdir(orb))  # weights, config, the marker and the source's tokenizer/processor files
    assert {"config.json", "state", OUTPUT_MARKER} <= listed
    assert listed - {"config.json", "state", OUTPUT_MARKER} <= set(hf_llava.TOKENIZER_FILES)
    assert_same_params(hf_llava.load_orbax(orb), model)
    hf_llava.main(["to-hf", orb, back, "--tokenizer-from", src])
    a, b = (load_file(os.path.join(p, "model.safetensors")) for p in (src, back))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert os.path.exists(os.path.join(back, "tokenizer_config.json"))


def test_params_only_orbax_base_from_a_bucket(src, model, tmp_path, gcs):
    """``to-orbax`` output uploaded to gs:// loads from the bucket (each host would read its shards)."""
    from cgjax import persistence

    orb = str(tmp_path / "orbax")
    hf_llava.main(["to-orbax", src, orb])
    url = f"gs://{gcs.bucket}/bases/tiny-orbax"
    persistence.upload_tree(orb, url)
    assert hf_llava.is_orbax_dir(url)
    got = hf_llava.load_any(url)
    assert got.source_dir == url
    assert_same_params(got, model)
    local = persistence.localize(url, hf_llava.TOKENIZER_FILES)
    assert sorted(os.listdir(local)) == sorted(n for n in os.listdir(orb) if n in hf_llava.TOKENIZER_FILES)


def test_to_hf_refuses_a_config_that_does_not_match_the_state(src, tmp_path):
    """A config.json with one layer fewer than the saved state: an error naming the parameter, and
    no HF checkpoint written (it would load in transformers with a layer missing)."""
    orb, back = str(tmp_path / "orbax"), str(tmp_path / "back")
    hf_llava.main(["to-orbax", src, orb])
    cfg = json.load(open(os.path.join(orb, "config.json")))
    cfg["text_config"]["num_hidden_layers"] -= 1
    json.dump(cfg, open(os.path.join(orb, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"config.json does not match the saved state .*layers"):
        hf_llava.main(["to-hf", orb, back])
    assert not os.path.exists(back)
