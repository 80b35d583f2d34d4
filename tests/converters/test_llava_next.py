"""HF LLaVA-NeXT -> cgjax in single-crop mode: parity with a PyTorch reference built from the HF
model's own submodules, every key layout, ``image_newline`` kept, export as plain HF LLaVA."""
import os

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from converters import hf_llava, llava_next
from converters.tiny_llava import SIZES
from cgjax.testing import assert_same_params

TOK = 127


def make_next(seed: int = 0, layer: int = -2, strategy: str = "default"):
    """A tiny random ``LlavaNextForConditionalGeneration`` (tiny CLIP + tiny LLaMA, one 32-px pinpoint)."""
    spec = SIZES["tiny"]
    cfg = transformers.LlavaNextConfig(
        vision_config=transformers.CLIPVisionConfig(**spec["vision"]),
        text_config=transformers.LlamaConfig(pad_token_id=0, **spec["text"]),
        image_token_id=TOK, image_grid_pinpoints=[[32, 32]], vision_feature_layer=layer,
        vision_feature_select_strategy=strategy)
    torch.manual_seed(seed)
    model = transformers.LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # HF init leaves norms at 1 / biases at 0: perturb so the test can fail
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model


def inputs(n_img: int, B: int = 2):
    rs = np.random.RandomState(0)
    ids = rs.randint(3, TOK, (B, n_img + 6))
    ids[:, 0], ids[:, 2:2 + n_img] = 1, TOK
    return ids, rs.randn(B, 3, 32, 32).astype(np.float32)


def single_crop_reference(hf, ids, pix) -> np.ndarray:
    """The original project's single-crop LLaVA-1.6 forward from the HF model's submodules:
    tower hidden state -> (drop CLS) -> projector -> scatter at image tokens -> LLaMA -> lm_head."""
    c, m = hf.config, hf.model
    with torch.no_grad():
        out = m.vision_tower(pixel_values=torch.tensor(pix), output_hidden_states=True)
        hs = out.hidden_states[c.vision_feature_layer]
        feats = m.multi_modal_projector(hs[:, 1:] if c.vision_feature_select_strategy == "default" else hs)
        ids_t = torch.tensor(ids)
        emb = hf.get_input_embeddings()(ids_t)
        mask = (ids_t == c.image_token_id)[..., None].expand_as(emb)
        emb = emb.masked_scatter(mask, feats.reshape(-1, emb.shape[-1]))
        return hf.lm_head(m.language_model(inputs_embeds=emb).last_hidden_state).numpy()


def cgjax_logits(model, ids, pix) -> np.ndarray:
    return np.asarray(nnx.jit(lambda m, i, p: m(i, p))(model, ids, pix))




@pytest.fixture(scope="module")
def hf():
    return make_next(seed=1)


@pytest.fixture(scope="module")
def saved(hf, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("next") / "tiny")
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(saved):
    return llava_next.load(saved)


def test_saved_layout_parity(hf, saved, model):
    keys = load_file(os.path.join(saved, "model.safetensors")).keys()
    assert "image_newline" in keys and any(k.startswith("vision_tower.encoder.") for k in keys)
    assert model.source_layout == "saved" and model.source_dir == saved
    cfg = model.config
    assert cfg.image_token_id == TOK and cfg.num_image_tokens == cfg.image_seq_length == 16
    assert "image_grid_pinpoints" not in cfg.extra and model.llava_next.image_grid_pinpoints == [[32, 32]]
    np.testing.assert_array_equal(model.llava_next.image_newline, hf.model.image_newline.detach().numpy())
    ids, pix = inputs(cfg.num_image_tokens)
    np.testing.assert_allclose(cgjax_logits(model, ids, pix), single_crop_reference(hf, ids, pix), atol=1e-4, rtol=1e-4)


def test_full_strategy_last_layer_parity():
    hf = make_next(seed=2, layer=-1, strategy="full")
    m = llava_next.load(hf)
    assert m.config.num_image_tokens == 17
    ids, pix = inputs(17)
    np.testing.assert_allclose(cgjax_logits(m, ids, pix), single_crop_reference(hf, ids, pix), atol=1e-4, rtol=1e-4)


def test_live_model(hf, model):
    m = llava_next.load(hf)
    assert m.source_layout == "live" and m.source_dir is None
    np.testing.assert_array_equal(m.llava_next.image_newline, model.llava_next.image_newline)
    assert_same_params(m, model)


def test_hub_layout(saved, model, tmp_path):
    """llava-hf hub files: ``vision_tower.vision_model.*`` (+ ``image_newline``, ``language_model.*``)."""
    tensors = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
               for k, v in load_file(os.path.join(saved, "model.safetensors")).items()}
    os.symlink(os.path.join(saved, "config.json"), tmp_path / "config.json")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    m = llava_next.load(str(tmp_path))
    assert m.source_layout == "hub"
    np.testing.assert_array_equal(m.llava_next.image_newline, model.llava_next.image_newline)
    assert_same_params(m, model)


def test_export_as_hf_llava(hf, model, tmp_path):
    """The single-crop model written by ``hf_llava.save`` is a plain HF LLaVA with the same logits."""
    out = hf_llava.save(model, str(tmp_path / "llava"))
    plain = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    ids, pix = inputs(model.config.num_image_tokens)
    with torch.no_grad():
        got = plain(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix)).logits.numpy()
    np.testing.assert_allclose(got, single_crop_reference(hf, ids, pix), atol=1e-5, rtol=1e-5)


def test_errors(saved, tmp_path):
    with pytest.raises(ValueError, match="not a LLaVA-NeXT config"):
        llava_next.llava_config({"model_type": "llava"})
    tensors = load_file(os.path.join(saved, "model.safetensors"))
    tensors["multi_modal_projector.linear_1.weight"] = np.zeros((64, 31), np.float32)
    os.symlink(os.path.join(saved, "config.json"), tmp_path / "config.json")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"multi_modal_projector\.linear_1\.weight"):
        llava_next.load(str(tmp_path))


def test_cli_to_orbax(saved, model, tmp_path):
    orb = str(tmp_path / "orbax")
    llava_next.main(["to-orbax", saved, orb])
    assert_same_params(hf_llava.load_orbax(orb), model)
