"""Original LLaVA repository layout (``LlavaLlamaForCausalLM``) -> cgjax: PyTorch parity, round trips,
vision tower resolution, errors, CLI.

The original-layout checkpoints are written BY HAND from a tiny random HF LLaVA: an explicit rename
of its live state-dict keys, a hand-written LLaMA-style ``config.json`` with the ``mm_*`` keys, and
the vision tower as a separate ``CLIPVisionModel.save_pretrained`` directory (1.5) or embedded as
``model.vision_tower.vision_tower.vision_model.*`` (1.6)."""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import save_file

from converters import common, hf_llava, llava_original
from converters.tiny_llava import make_llava_model
from cgjax.testing import param_arrays

IMG = llava_original.IMAGE_TOKEN_INDEX


def original_state_dict(hf) -> tuple[dict, dict]:
    """Hand-written rename: HF live LLaVA keys -> (original-repo keys, CLIPVisionModel keys)."""
    main, tower = {}, {}
    for k, v in hf.state_dict().items():
        v = v.detach().clone().contiguous()
        if k.startswith("model.language_model."):  # embed_tokens / layers.N.* / norm
            main["model." + k[len("model.language_model."):]] = v
        elif k == "lm_head.weight":
            main["lm_head.weight"] = v
        elif k.startswith("model.multi_modal_projector.linear_1."):
            main["model.mm_projector.0." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("model.multi_modal_projector.linear_2."):
            main["model.mm_projector.2." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("model.vision_tower."):
            tower[k[len("model.vision_tower."):]] = v
        else:
            raise AssertionError(f"unmapped HF key {k}")
    return main, tower


def original_config(hf, mm_vision_tower: str, **extra) -> dict:
    """A LlamaConfig (transformers 4.3x style) + the LLaVA ``mm_*`` keys, written by hand."""
    t = hf.config.text_config
    feature = {"default": "patch", "full": "cls_patch"}[hf.config.vision_feature_select_strategy]
    cfg = {
        "_name_or_path": "./checkpoints/vicuna-tiny", "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
        "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_parameters["rope_theta"], "rope_scaling": None, "initializer_range": 0.02,
        "pretraining_tp": 1, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
        "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.31.0", "use_cache": True,
        "mm_vision_tower": mm_vision_tower, "mm_vision_select_layer": hf.config.vision_feature_layer,
        "mm_vision_select_feature": feature, "mm_hidden_size": hf.config.vision_config.hidden_size,
        "mm_projector_type": "mlp2x_gelu", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad", "freeze_mm_mlp_adapter": False, "tune_mm_mlp_adapter": False, "use_mm_proj": True,
    }
    cfg.update(extra)
    return cfg


def write_tower(hf, out: str, seed: int | None = None) -> str:
    """The HF LLaVA's vision tower (or, with ``seed``, a random one) via ``CLIPVisionModel.save_pretrained``."""
    if seed is not None:
        torch.manual_seed(seed)
    clip = transformers.CLIPVisionModel(hf.config.vision_config).eval()
    if seed is None:
        clip.load_state_dict(original_state_dict(hf)[1], strict=True)
    clip.save_pretrained(out)
    return out


def write_bin_shards(tensors: dict, out: str) -> None:
    """``pytorch_model-0000i-of-00002.bin`` + ``pytorch_model.bin.index.json`` (llava-v1.5 style)."""
    os.makedirs(out, exist_ok=True)
    keys = sorted(tensors)
    names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    for name, part in zip(names, halves):
        torch.save({k: tensors[k] for k in part}, os.path.join(out, name))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": {k: n for n, part in zip(names, halves) for k in part}}
    with open(os.path.join(out, "pytorch_model.bin.index.json"), "w") as f:
        json.dump(index, f)


def write_v15(hf, root, inv_freq: bool = False) -> tuple[str, str]:
    """1.5 style: sharded ``.bin`` without the tower + a separate tower dir named by ``mm_vision_tower``."""
    tower = write_tower(hf, str(root / "clip"))
    main, _ = original_state_dict(hf)
    if inv_freq:  # transformers 4.31 checkpoints store the RoPE buffer
        hd = hf.config.text_config.hidden_size // hf.config.text_config.num_attention_heads
        for i in range(hf.config.text_config.num_hidden_layers):
            main[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, hd, 2) / hd)
    src = str(root / "llava")
    write_bin_shards(main, src)
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(original_config(hf, tower), f)
    with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 2048}, f)
    return src, tower


def write_v16(hf, root, mm_vision_tower="openai/clip-vit-large-patch14-336") -> str:
    """1.6 style: safetensors holding the (fine-tuned) tower and ``model.image_newline``."""
    main, tower = original_state_dict(hf)
    main.update({llava_original.EMBEDDED_TOWER + k: v for k, v in tower.items()})
    gen = torch.Generator().manual_seed(9)
    main["model.image_newline"] = torch.randn(hf.config.text_config.hidden_size, generator=gen)
    src = str(root / "llava16")
    os.makedirs(src)
    save_file(main, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    cfg = original_config(hf, mm_vision_tower, model_type="llava_llama", unfreeze_mm_vision_tower=True,
                          image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                          image_grid_pinpoints=[[32, 32], [32, 64]])
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(cfg, f)
    return src


def original_ids(B: int = 2, T: int = 9, vocab: int = 127) -> np.ndarray:
    """Prompts as the original repo tokenises them: ``<image>`` is the single id -200."""
    ids = np.random.RandomState(0).randint(3, vocab, (B, T))
    ids[:, 0], ids[:, 2] = 1, IMG
    return ids


def hf_logits(hf, ids: np.ndarray, pix: np.ndarray) -> np.ndarray:
    """HF LLaVA on the same prompt: -200 expanded to ``image_seq_length`` HF image tokens."""
    n, tok = hf.config.image_seq_length, hf.config.image_token_id
    rows = [sum(([tok] * n if t == IMG else [t] for t in row), []) for row in ids.tolist()]
    with torch.no_grad():
        return hf(input_ids=torch.tensor(rows), pixel_values=torch.tensor(pix)).logits.numpy()


def cgjax_logits(model, ids: np.ndarray, pix: np.ndarray) -> np.ndarray:
    expanded = llava_original.expand_image_tokens(ids, model.config)
    return np.asarray(nnx.jit(lambda m, i, p: m(i, p))(model, expanded, pix))


def pixels(B: int = 2) -> np.ndarray:
    return np.random.RandomState(1).randn(B, 3, 32, 32).astype(np.float32)



def assert_same_tensors(a_src, b_src, skip=()):
    a, b = common.read_tensors(a_src), common.read_tensors(b_src)
    ka = sorted(k for k in a if not any(s in k for s in skip))
    assert ka == sorted(b)
    for k in ka:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a.load(k), b.load(k), err_msg=k)


@pytest.fixture(scope="module")
def hf():
    return make_llava_model("tiny", seed=3)


@pytest.fixture(scope="module")
def v15(hf, tmp_path_factory):
    return write_v15(hf, tmp_path_factory.mktemp("v15"), inv_freq=True)


@pytest.fixture(scope="module")
def v16(hf, tmp_path_factory):
    return write_v16(hf, tmp_path_factory.mktemp("v16"))


@pytest.mark.parametrize("layer,strategy", [(-2, "default"), (-1, "full")])
def test_parity_v15_separate_tower(layer, strategy, tmp_path):
    """Sharded .bin + the tower dir found from ``mm_vision_tower``: logits == HF LLaVA's (fp32)."""
    hf = make_llava_model("tiny", seed=5, vision_feature_layer=layer, vision_feature_select_strategy=strategy)
    src, _ = write_v15(hf, tmp_path, inv_freq=True)
    model = llava_original.load(src)
    cfg = model.config
    assert cfg.image_token_id == 128 == cfg.text_config.vocab_size  # default: an id outside the vocabulary
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (layer, strategy)
    assert cfg.num_image_tokens == cfg.image_seq_length == hf.config.image_seq_length
    assert model.llava_original.image_newline is None and not model.llava_original.tower_embedded
    ids, pix = original_ids(), pixels()
    np.testing.assert_allclose(cgjax_logits(model, ids, pix), hf_logits(hf, ids, pix), atol=1e-4, rtol=1e-4)


def test_parity_v16_embedded_tower_wins(hf, v16, tmp_path):
    """1.6: the checkpoint's tower weights are used; ``vision_tower=`` (here a different random
    tower) only supplies the config, as in the original code. ``image_newline`` is kept."""
    other = write_tower(hf, str(tmp_path / "other_clip"), seed=11)
    model = llava_original.load(v16, vision_tower=other, image_token_index=127)
    assert model.config.image_token_id == 127 and model.llava_original.tower_embedded
    newline = common.read_tensors(v16).load("model.image_newline")
    np.testing.assert_array_equal(model.llava_original.image_newline, newline)
    ids, pix = original_ids(), pixels()
    np.testing.assert_allclose(cgjax_logits(model, ids, pix), hf_logits(hf, ids, pix), atol=1e-4, rtol=1e-4)
    live = transformers.CLIPVisionModel.from_pretrained(other)  # a live tower object is accepted too
    from_live = param_arrays(llava_original.load(v16, vision_tower=live))
    np.testing.assert_array_equal(from_live["vision_tower.patch_embed"], param_arrays(model)["vision_tower.patch_embed"])


def test_known_hub_tower_config(hf, v16):
    """Without ``vision_tower=``, a 1.6 checkpoint naming a known hub tower gets its config from
    ``KNOWN_TOWERS`` (ViT-L/14-336, which does not fit the tiny checkpoint: a clear error)."""
    assert llava_original.KNOWN_TOWERS["openai/clip-vit-large-patch14-336"]["num_hidden_layers"] == 24
    with pytest.raises(ValueError, match=r"mm_hidden_size 32 != the vision tower's hidden_size 1024"):
        llava_original.load(v16)


def test_tower_from_local_hf_cache(hf, v15, tmp_path, monkeypatch):
    """``mm_vision_tower`` as a hub id resolves from the local HF cache (never downloaded); not
    cached and not in the checkpoint -> a clear error naming the key and ``vision_tower=``."""
    import huggingface_hub.constants as hc

    src, tower = v15
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    hub_src = tmp_path / "hub_llava"
    hub_src.mkdir()
    for name in os.listdir(src):
        if name != "config.json":
            os.symlink(os.path.join(src, name), hub_src / name)
    (hub_src / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "cache"))
    msg = r"'mm_vision_tower' is 'openai/clip-vit-large-patch14-336'.*vision_tower=PATH"
    with pytest.raises(ValueError, match=msg):
        llava_original.load(str(hub_src))
    repo = tmp_path / "cache" / "models--openai--clip-vit-large-patch14-336"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    for name in os.listdir(tower):
        os.symlink(os.path.join(tower, name), snap / name)
    a, b = param_arrays(llava_original.load(str(hub_src))), param_arrays(llava_original.load(src))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_round_trip_v15_bitwise(v15, tmp_path):
    src, tower = v15
    model = llava_original.load(src)
    out = llava_original.save(model, str(tmp_path / "out"), vision_out_dir=str(tmp_path / "out_clip"))
    assert_same_tensors(src, out, skip=("rotary_emb.inv_freq",))  # the RoPE buffer is recomputed, not stored
    assert_same_tensors(tower, str(tmp_path / "out_clip"))  # transformers 5 keys (no vision_model. prefix)
    assert json.load(open(os.path.join(out, "config.json"))) == json.load(open(os.path.join(src, "config.json")))
    assert os.path.exists(os.path.join(out, "tokenizer_config.json"))
    again = llava_original.load(out, vision_tower=str(tmp_path / "out_clip"))
    a, b = param_arrays(again), param_arrays(model)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    clip = transformers.CLIPVisionModel.from_pretrained(str(tmp_path / "out_clip"))  # a real CLIPVisionModel dir
    ref = transformers.CLIPVisionModel.from_pretrained(tower)
    x = torch.tensor(pixels(1))
    with torch.no_grad():
        np.testing.assert_array_equal(clip(x).last_hidden_state.numpy(), ref(x).last_hidden_state.numpy())
    with pytest.raises(ValueError, match="vision_out_dir"):
        llava_original.save(model, str(tmp_path / "lost"))


def test_round_trip_v16_bitwise(v16, hf, tmp_path):
    model = llava_original.load(v16, vision_tower=write_tower(hf, str(tmp_path / "clip")))
    out = llava_original.save(model, str(tmp_path / "out"))
    assert_same_tensors(v16, out)  # embedded tower and model.image_newline included
    assert json.load(open(os.path.join(out, "config.json"))) == json.load(open(os.path.join(v16, "config.json")))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_from_hf_llava_model_to_original(hf, v15, tmp_path):
    """A model from another source (HF LLaVA) is written with a synthesised config and loads back."""
    src, _ = v15
    model = hf_llava.load(hf)
    out = llava_original.save(model, str(tmp_path / "o"), vision_out_dir=str(tmp_path / "o_clip"))
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["mm_vision_tower"] == str(tmp_path / "o_clip") and cfg["mm_projector_type"] == "mlp2x_gelu"
    assert_same_tensors(src, out, skip=("rotary_emb.inv_freq",))
    assert any(k.startswith("vision_model.") for k in common.read_tensors(str(tmp_path / "o_clip")))
    transformers.CLIPVisionModel.from_pretrained(str(tmp_path / "o_clip"))  # the hub key layout loads too
    back = llava_original.load(out, image_token_index=model.config.image_token_id)
    a, b = param_arrays(back), param_arrays(model)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_to_hf_pads_vocab_for_image_token(v15, tmp_path):
    """Loaded with the default image id (= vocab_size, outside the table), the model still exports
    to a HF LLaVA that runs: embedding and lm_head grow to the next multiple of 64 with mean rows,
    and HF's logits over the original vocabulary equal cgjax's; no new token beats them."""
    model = llava_original.load(v15[0])
    vocab = model.config.text_config.vocab_size
    assert model.config.image_token_id == vocab == 128
    out = hf_llava.save(model, str(tmp_path / "hf"))
    back = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert back.config.text_config.vocab_size == 192 and back.config.image_token_id == 128
    emb = back.get_input_embeddings().weight.detach().numpy()
    src = np.asarray(model.language_model.embed_tokens.embedding.get_value())
    np.testing.assert_array_equal(emb[:vocab], src)
    np.testing.assert_allclose(emb[vocab:], np.broadcast_to(src.mean(0), (192 - vocab, src.shape[1])), atol=1e-6)
    ids, pix = original_ids(), pixels()
    got = hf_logits(back, ids, pix)
    want = cgjax_logits(model, ids, pix)
    np.testing.assert_allclose(got[..., :vocab], want, atol=1e-4, rtol=1e-4)
    assert (got[..., vocab:].max(-1) <= got[..., :vocab].max(-1) + 1e-6).all()
    tensors, hf_cfg = {}, model.config.to_hf()  # an id inside the vocabulary is left alone
    hf_cfg["image_token_index"] = 5
    assert not hf_llava.pad_vocab_for_image_token(tensors, hf_cfg, "saved") and hf_cfg["text_config"]["vocab_size"] == vocab


def original_tokenizer(n_tokens: int):
    """A LLaMA-like fast tokenizer of exactly ``n_tokens`` tokens and no ``<image>`` (the original's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=n_tokens, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    rs = np.random.RandomState(0)  # enough distinct words that BPE reaches n_tokens
    words = ["".join(rs.choice(list("abcdefghijklmnopqrstuvwxyz"), rs.randint(2, 8))) for _ in range(400)]
    tok.train_from_iterator([" ".join(rs.choice(words, 12)) for _ in range(300)], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    assert len(fast) == n_tokens and "<image>" not in fast.get_vocab()
    return fast


def test_to_hf_adds_image_token_to_the_tokenizer(v15, tmp_path):
    """The original's tokenizer has no ``<image>``: the HF export appends it at the model's image id
    (= vocab_size), so HF's tokenizer output, expanded to ``image_seq_length`` image tokens, gives
    cgjax's logits. A tokenizer of another length is left alone, with a warning."""
    src = str(tmp_path / "llava")
    shutil.copytree(v15[0], src)
    original_tokenizer(128).save_pretrained(src)
    model = llava_original.load(src)
    out = hf_llava.save(model, str(tmp_path / "hf"))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<image>") == model.config.image_token_id == 128 and len(tok) == 129
    ids = tok("USER: <image>\na painting").input_ids
    assert ids.count(128) == 1 and max(i for i in ids if i != 128) < 128
    original = np.array([[IMG if i == 128 else i for i in ids]] * 2)  # the original's -200 placeholder
    back = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    got = hf_logits(back, original, pixels())
    np.testing.assert_allclose(got[..., :128], cgjax_logits(model, original, pixels()), atol=1e-4, rtol=1e-4)

    original_tokenizer(120).save_pretrained(src)  # 120 tokens: <image> would land on id 120, not 128
    with pytest.warns(UserWarning, match=f"^{re.escape(src)}: the tokenizer has 120 tokens, but the model's image token id is 128"):
        out = hf_llava.save(llava_original.load(src), str(tmp_path / "hf120"))
    assert "<image>" not in transformers.AutoTokenizer.from_pretrained(out).get_vocab()


def test_errors(hf, v15, tmp_path):
    src, tower = v15
    main = {k: v for k, v in common.read_tensors(src).to_numpy().items() if "inv_freq" not in k}

    def write(name, tensors, cfg_extra=None):
        d = tmp_path / name
        d.mkdir()
        save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()},
                  str(d / "model.safetensors"))
        cfg = dict(json.load(open(os.path.join(src, "config.json"))), **(cfg_extra or {}))
        (d / "config.json").write_text(json.dumps(cfg))
        return str(d)

    bad = dict(main, **{"model.mm_projector.2.weight": np.zeros((64, 63), np.float32)})
    with pytest.raises(ValueError, match=r"model\.mm_projector\.2\.weight.*shape \(64, 63\)"):
        llava_original.load(write("bad", bad))
    missing = {k: v for k, v in main.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        llava_original.load(write("missing", missing))
    t = common.read_tensors(tower).to_numpy()
    del t["encoder.layers.1.mlp.fc1.weight"]
    (tmp_path / "bad_clip").mkdir()
    save_file({k: torch.from_numpy(v) for k, v in t.items()}, str(tmp_path / "bad_clip" / "model.safetensors"))
    os.symlink(os.path.join(tower, "config.json"), tmp_path / "bad_clip" / "config.json")
    with pytest.raises(KeyError, match=r"encoder\.layers\.1\.mlp\.fc1\.weight"):
        llava_original.load(src, vision_tower=str(tmp_path / "bad_clip"))
    with pytest.raises(NotImplementedError, match="mm_projector_type 'linear'"):
        llava_original.load(write("linear", main, {"mm_projector_type": "linear"}))
    with pytest.raises(ValueError, match="HF LLaVA config"):
        llava_original.load(hf_llava.save(hf_llava.load(hf), str(tmp_path / "hfdir")))


def test_expand_image_tokens(v15):
    src, tower = v15
    cfg = llava_original.llava_config(json.load(open(os.path.join(src, "config.json"))),
                                      json.load(open(os.path.join(tower, "config.json"))))
    out = llava_original.expand_image_tokens([1, 5, IMG, 7], cfg)
    assert out.tolist() == [1, 5] + [cfg.image_token_id] * cfg.num_image_tokens + [7]


def test_cli_to_orbax(v15, tmp_path):
    src, tower = v15
    orb = str(tmp_path / "orbax")
    llava_original.main(["to-orbax", src, orb, "--vision-tower", tower])
    a, b = param_arrays(hf_llava.load_orbax(orb)), param_arrays(llava_original.load(src))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert hf_llava.load_orbax(orb).config.image_token_id == 128
