"""Back to PyTorch (cgjax.export): the exported files load in PyTorch / HF, and the exported
``concept_tokens.py`` on the exported HF LLaVA gives cgjax's greedy answers with concept tokens.

One tiny setup: a tiny LLaVA + tokenizer, a Stage A work dir saved by the trainer's own checkpoint
code (values moved from init; no train-step compile), a prototypes work dir (tiny open_clip tower,
random prototypes as the original's ``.pt`` files, a signals file), exported once.
"""
import glob
import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from cgjax import demo, infer, text, torch_export
from cgjax.concepts.index import gating_config_from_fields
from cgjax.data.demo_data import make_demo
from cgjax.testing import fake_trained_stage, tiny_llava_with_tokenizer
from cgjax.data.demo_data import write_label_signals

DIMS = ("artist", "style", "genre")
MAX_NEW = 10


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from converters.tiny_clip import make_openclip_checkpoint
    from cgjax import export
    from cgjax.prototypes import io as pio
    from cgjax.prototypes.head import PrototypeSet

    root = str(tmp_path_factory.mktemp("export"))
    work = os.path.join(root, "work")
    paths = make_demo(os.path.join(work, "data"), n_images=12, size=32)
    ckpt, tok = tiny_llava_with_tokenizer(os.path.join(work, "checkpoints", "llava"), paths["targets_csv"])
    data_dir = os.path.dirname(paths["dataset_json"])
    signals = os.path.join(root, "signals.keyed.json")
    write_label_signals(paths["dataset_json"], data_dir, signals, dims=DIMS, seed=0)

    c = demo.stage_config("A", ckpt, paths, signals, mesh="data=1",
                          **{"data.images_root": data_dir, "checkpoint.async_save": False})
    stage_wd = os.path.join(work, "stageA")
    tr, state = fake_trained_stage(c, stage_wd, 3)
    tr.export_pt(state["params"], 3)
    trained = np.asarray(state["params"]["concepts"]["values"])

    # prototypes work dir: tiny CLIP, random prototypes in the original's .pt files, a signals file
    name, _ = make_openclip_checkpoint(os.path.join(work, "checkpoints", "clip"), width=64, layers=2, heads=2,
                                       patch=8, image_size=32, embed_dim=32)
    clip_hub = os.path.join(work, "checkpoints", "clip", f"{name}-hub")
    rng = np.random.default_rng(0)
    protos, c2i, i2c = {}, {}, {}
    for d, names in zip(tr.index.dims, tr.index.names):
        p = rng.normal(size=(len(names), 32)).astype(np.float32)
        protos[d] = p / np.linalg.norm(p, axis=1, keepdims=True)
        c2i[d], i2c[d] = {n: i for i, n in enumerate(names)}, list(names)
    ps = PrototypeSet(f"local-dir:{clip_hub}", protos, c2i, i2c)
    art = os.path.join(work, "prototypes", "artifacts")
    for d in DIMS:
        pio.save_pt(ps, os.path.join(art, f"prototypes_{d}_trained.pt"), [d])
    with open(signals) as f:
        keyed = f.read()
    with open(os.path.join(art, "concept_signals.keyed.json"), "w") as f:
        f.write(keyed)

    out = os.path.join(root, "out")
    written = export.export(work, out)
    return {"root": root, "work": work, "out": out, "written": written, "ckpt": ckpt, "stage_wd": stage_wd,
            "trained": trained, "index": tr.index, "protos": protos, "clip_hub": clip_hub, "keyed": keyed}


def _concept_tokens_module(out):
    spec = importlib.util.spec_from_file_location("exported_concept_tokens", os.path.join(out, "concept_tokens.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_files_and_formats(exported):
    from safetensors.torch import load_file

    out = exported["out"]
    assert not [n for n in os.listdir(os.path.dirname(out)) if n.startswith(".tmp")]  # nothing half-written
    ck = torch.load(os.path.join(out, "concepts.pt"), weights_only=True)
    assert list(ck) == [3] and set(ck[3]) == {"values"}
    np.testing.assert_array_equal(ck[3]["values"].numpy(), exported["trained"])
    meta = json.load(open(os.path.join(out, "concepts.json")))
    idx = exported["index"]
    assert meta["dims"] == list(DIMS) and meta["k_max"] == idx.k_max and meta["n_concepts"] == idx.n_concepts
    assert meta["names"] == {d: list(n) for d, n in zip(idx.dims, idx.names)}
    assert meta["dim_ranges"] == {d: list(r) for d, r in zip(idx.dims, idx.ranges)}
    assert meta["gating"]["max_concepts"] == 3 and meta["gating"]["priority"] == list(DIMS)
    assert meta["trained_on_quantize"]["mode"] == "none"
    for d in DIMS:
        pt = torch.load(os.path.join(out, f"prototypes_{d}_trained.pt"), weights_only=True)
        assert set(pt) == {"clip_model_name", "prototypes", "concept_to_idx", "idx_to_concept"}
        np.testing.assert_array_equal(pt["prototypes"][d].numpy(), exported["protos"][d])
    sd = torch.load(os.path.join(out, "clip", "open_clip_visual.pt"), weights_only=True)
    src = load_file(os.path.join(exported["clip_hub"], "open_clip_model.safetensors"))
    vis = [k for k in src if k.startswith("visual.")]
    assert vis and sorted(sd) == sorted(vis)
    for k in vis:
        np.testing.assert_array_equal(sd[k].numpy(), src[k].numpy(), err_msg=k)
    assert open(os.path.join(out, "signals", "concept_signals.keyed.json")).read() == exported["keyed"]
    # concept_tokens.py and example.py: cgjax/torch_export/'s files as they are; example.py imports
    # concept_tokens from beside it (the export folder, no cgjax package around it)
    for name in torch_export.FILES:
        with open(os.path.join(out, name), "rb") as f:
            assert f.read() == torch_export.source(name)
    sys.path.insert(0, out)
    try:
        spec = importlib.util.spec_from_file_location("example", os.path.join(out, "example.py"))
        example = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(example)
        assert example.ConceptTokens.__module__ == "concept_tokens" and callable(example.main)
        assert sys.modules["concept_tokens"].__file__ == os.path.join(out, "concept_tokens.py")
        # --load-in 8bit/4bit: bitsandbytes loads the exported (unquantized) base in 8 or 4 bits
        assert example.quantization_kwargs(None) == {}
        if importlib.util.find_spec("bitsandbytes") is None:
            with pytest.raises(SystemExit, match="needs bitsandbytes"):
                example.quantization_kwargs("8bit")
        else:
            assert example.quantization_kwargs("4bit")["quantization_config"].load_in_4bit
    finally:
        sys.path.remove(out)
        sys.modules.pop("concept_tokens", None)


def test_hf_llava_logits_equal_cgjax(exported):
    from transformers import LlavaForConditionalGeneration

    from converters import hf_llava

    hf = LlavaForConditionalGeneration.from_pretrained(os.path.join(exported["out"], "llava")).eval()
    ours = hf_llava.load(exported["ckpt"])
    cfg = ours.config
    size = cfg.vision_config.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    rng = np.random.default_rng(1)
    px = rng.normal(size=(2, 3, size, size)).astype(np.float32)
    ids = np.concatenate([[[1, 5]] * 2, np.full((2, cfg.num_image_tokens), cfg.image_token_id),
                          rng.integers(10, 200, size=(2, 6))], axis=1).astype(np.int64)
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(px)).logits.numpy()
    got = np.asarray(ours(jnp.asarray(ids, jnp.int32), jnp.asarray(px)))
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_concept_tokens_generate_equals_cgjax(exported):
    """The key check: greedy ids of concept_tokens.generate_with_concepts on the exported HF LLaVA =
    cgjax's generate(..., concept_scores=...) (2 images, different selections, MAX_NEW tokens)."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from converters import hf_llava
    from cgjax.concepts.model import ConceptLlava
    from cgjax.generate import generate

    out = exported["out"]
    mod = _concept_tokens_module(out)
    meta = json.load(open(os.path.join(out, "concepts.json")))
    ck = torch.load(os.path.join(out, "concepts.pt"), weights_only=True)
    ct = mod.ConceptTokens(ck[max(ck)]["values"], meta)
    hf = LlavaForConditionalGeneration.from_pretrained(os.path.join(out, "llava")).eval()
    tok = AutoTokenizer.from_pretrained(os.path.join(out, "llava"))

    tv = infer.load_trained_values(exported["stage_wd"])
    gcfg = gating_config_from_fields(tv.index, tv.export_meta.get("gating") or {})
    llava = hf_llava.load(exported["ckpt"])
    model = ConceptLlava(llava, gcfg, rngs=nnx.Rngs(0))
    model.concepts.values.set_value(jnp.asarray(tv.values))

    size = llava.config.vision_config.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    rng = np.random.default_rng(0)
    px = rng.normal(size=(2, 3, size, size)).astype(np.float32)
    (a0, _), (s0, _), (g0, _) = tv.index.ranges
    sc = rng.uniform(0, 0.6, size=(2, gcfg.n_concepts)).astype(np.float32)
    sc[0, a0:a0 + 2] = [0.9, 0.97]  # artist: two over the threshold
    sc[0, g0] = 0.72  # genre: back-off (0.70 <= s < 0.75); budget 3 = artist top-1, genre top-1, artist #2
    sc[1, s0:s0 + 3] = [0.99, 0.8, 0.76]  # style: top-2 of three, fewer tokens for lower scores
    sc[1, a0 + 1] = 0.74
    sel = [ct.select(s) for s in sc]
    ref = jax.device_get(jax.jit(lambda s: __import__("cgjax.concepts.gating", fromlist=["x"]).select(s, gcfg))(sc))
    for b in range(2):  # the PyTorch gating = cgjax's
        n = int(ref.valid[b].sum())
        assert [(i, k) for i, _, k in sel[b]] == list(zip(ref.concept[b, :n].tolist(), ref.n_tokens[b, :n].tolist()))
    assert sel[0] != sel[1] and all(sel) and {k for s in sel for _, _, k in s} != {gcfg.k_max}

    prompt = text.STAGE_A_PROMPT
    row = text.encode(tok, prompt, llava.config.num_image_tokens + gcfg.n_tokens, llava.config.image_token_id)
    b = text.pad_rows([row, row], len(row.input_ids), 0, side="left")
    runs = {}
    for use in (True, False):
        want = np.asarray(generate(model, b["input_ids"], px, b["attention_mask"], max_new_tokens=MAX_NEW,
                                   eos_token_id=tok.eos_token_id, concept_scores=sc, use_concepts=use))
        got = mod.generate_with_concepts(hf, tok, torch.from_numpy(px), prompt, torch.from_numpy(sc), MAX_NEW,
                                         concept_tokens=ct, use_concepts=use)
        for w, g in zip(want, got):
            assert len(g) >= 1
            hits = np.flatnonzero(w == tok.eos_token_id)
            w = w[: hits[0] + 1] if hits.size else w
            assert g == w.tolist()
        runs[use] = got
    assert min(len(g) for g in runs[True]) >= 8, runs  # at least 8 tokens per image compared
    assert runs[True] != runs[False]  # the concept tokens change the answer: the check can fail


def test_exported_image_processor_matches_cgjax_preprocessing(exported):
    """example.py preprocesses with the exported llava/preprocessor_config.json: it must give the
    pixels cgjax trained with (HF's default torchvision backend resizes uint8 tensors, so up to
    about one uint8 step apart)."""
    from PIL import Image
    from transformers import AutoConfig, AutoImageProcessor

    from cgjax.preprocess import llava_preprocess_config, preprocess_image

    llava_dir = os.path.join(exported["out"], "llava")
    assert os.path.isfile(os.path.join(llava_dir, "preprocessor_config.json"))
    size = AutoConfig.from_pretrained(llava_dir).vision_config.image_size
    ours_cfg = llava_preprocess_config(exported["ckpt"], size)
    proc = AutoImageProcessor.from_pretrained(llava_dir)
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (10, 8, 3)), np.ones((6, 6, 1))).astype(np.uint8)  # 60x48, not square
    demo_image = sorted(glob.glob(os.path.join(exported["work"], "data", "images", "*", "*.png")))[0]
    for img in (Image.fromarray(smooth), Image.open(demo_image).convert("RGB")):
        ours = preprocess_image(img, ours_cfg)
        theirs = proc(images=img, return_tensors="np")["pixel_values"][0]
        assert theirs.shape == ours.shape == (3, size, size)
        step = (1 / 255) / min(ours_cfg.std)
        assert np.abs(theirs - ours).max() <= 1.5 * step
        assert np.abs(theirs - ours).mean() < 0.25 * step


def test_frozen_base_is_linked_not_rewritten(exported):
    """The HF base files are exported as they are (hard links here, one file system), each listed
    with its SHA-256; the export's own preprocessor_config.json never writes into the source."""
    import hashlib

    src, dst = exported["ckpt"], os.path.join(exported["out"], "llava")
    weights = sorted(os.path.basename(p) for p in glob.glob(os.path.join(src, "*.safetensors")))
    assert weights and sorted(os.path.basename(p) for p in glob.glob(os.path.join(dst, "*.safetensors"))) == weights
    sums = dict(reversed(line.split()) for line in open(os.path.join(dst, "SHA256SUMS")))
    for name in weights:
        assert os.stat(os.path.join(src, name)).st_ino == os.stat(os.path.join(dst, name)).st_ino
        assert sums[name] == hashlib.sha256(open(os.path.join(src, name), "rb").read()).hexdigest()
    pp = os.path.join(dst, "preprocessor_config.json")
    src_pp = os.path.join(src, "preprocessor_config.json")
    assert os.path.isfile(pp)
    assert not os.path.exists(src_pp) or os.stat(src_pp).st_ino != os.stat(pp).st_ino


def test_a_quantized_base_is_not_exported(exported, tmp_path):
    """The export ships the original base: a quantized params-only copy is refused, naming it."""
    from cgjax import export
    from cgjax.quantize import QuantConfig
    from converters import hf_llava

    q8 = hf_llava.save_orbax(hf_llava.load(exported["ckpt"], quant=QuantConfig("int8")), str(tmp_path / "q8"))
    with pytest.raises(ValueError, match=r"q8 .* is a quantized copy of the base"):
        export.export(exported["work"], str(tmp_path / "out"), llava_checkpoint=q8, accept_mismatch=True)
    assert not os.path.exists(tmp_path / "out")
