"""Inference (cgjax.infer) and occlusion saliency (cgjax.eval.saliency) on a tiny setup.

One tiny LLaVA + tokenizer, 24 demo images at 32 px, label-derived signals, a Stage A work dir
saved by the trainer's own checkpoint code (values moved from init; no train-step compile), a tiny
open_clip tower with mean prototypes and an exported keyed signals file (zscore, T 0.8), shared by
every test. Fixed batch and prompt shapes keep compiles few.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cgjax import demo, infer, text
from cgjax.config import load_config
from cgjax.data.demo_data import make_demo
from cgjax.eval import saliency as sal
from cgjax.config import override
from cgjax.testing import fake_trained_stage, tiny_llava_with_tokenizer
from cgjax.data.demo_data import write_label_signals
from cgjax.concepts.index import ConceptIndex

STRUCTURED_PROMPT = (
    "Between <BEGIN_JSON> and <END_JSON>, return only a compact JSON with keys artist, style, genre, evidence. "
    "Use 'Unknown' if uncertain. In 'evidence', write 2\u20133 concise sentences explaining your reasoning. "
    "Do not include any text outside the JSON.")
NATURAL_PROMPT = (
    "Describe this painting in one cohesive paragraph. Naturally mention the artist, style, and genre in the prose "
    "(no JSON, no key-value lines). Then briefly justify your identification by referring to brushwork, palette, "
    "and composition.")
DIMS = ("artist", "style", "genre")
MAX_NEW = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from converters.tiny_clip import make_openclip_checkpoint
    from cgjax.data.records import read_dataset_json
    from cgjax.data.signals import write_signals_keyed
    from cgjax.prototypes import export, io as pio
    from cgjax.prototypes.head import build_prototypes, record_paths
    from converters import openclip

    root = str(tmp_path_factory.mktemp("infer"))
    paths = make_demo(os.path.join(root, "data"), n_images=24, size=32)
    ckpt, tok = tiny_llava_with_tokenizer(os.path.join(root, "llava"), paths["targets_csv"],
                                          [STRUCTURED_PROMPT, NATURAL_PROMPT])
    data_dir = os.path.dirname(paths["dataset_json"])
    label_signals = os.path.join(root, "signals.keyed.json")
    write_label_signals(paths["dataset_json"], data_dir, label_signals, dims=DIMS, seed=0)

    # a Stage A work dir written by the trainer's own checkpoint code (no train-step compile): the
    # initial state with its values moved, saved as step 2 with the concept index, plus the .pt export
    c = demo.stage_config("A", ckpt, paths, label_signals, mesh="data=1",
                          **{"data.images_root": data_dir, "checkpoint.async_save": False})
    stage_wd = os.path.join(root, "stageA")
    tr, state = fake_trained_stage(c, stage_wd, 2)
    pt, _ = tr.export_pt(state["params"], 2)
    trained = np.asarray(state["params"]["concepts"]["values"])

    # prototypes work dir: tiny CLIP, mean prototypes of all records, signals exported as the stage does
    clip_dir = os.path.join(root, "clip")
    name, _ = make_openclip_checkpoint(clip_dir, width=64, layers=2, heads=2, patch=8, image_size=32, embed_dim=32)
    clip_name = f"local-dir:{os.path.join(clip_dir, name)}-hub"
    head = openclip.load_head(clip_name, None, batch_size=8)
    ds = read_dataset_json(paths["dataset_json"], data_dir, dimensions=DIMS)
    emb, _ = head.embed_paths(record_paths(ds), missing="error")
    ps = build_prototypes(emb, {d: [r.labels.get(d) for r in ds.records] for d in DIMS}, clip_name)
    protos_wd = os.path.join(root, "prototypes")
    pio.save_checkpoint(ps, os.path.join(protos_wd, "prototypes"))
    sig = export.make_signals(ps, ds, emb, np.ones(len(ds.records), bool), DIMS, "zscore", 0.8)
    keyed = os.path.join(protos_wd, "artifacts", "concept_signals.keyed.json")
    os.makedirs(os.path.dirname(keyed))
    write_signals_keyed(keyed, sig)

    test = [r for r in ds.records if r.split == "test"]
    assert len(test) >= 2
    return {"root": root, "ckpt": ckpt, "stage_wd": stage_wd, "pt": pt, "trained": trained, "protos_wd": protos_wd,
            "keyed": keyed, "label_signals": label_signals, "data_dir": data_dir, "dataset": ds, "test": test,
            "test_paths": [os.path.abspath(os.path.join(ds.images_root, r.image)) for r in test], **paths}


def infer_config(s, **over):
    c = load_config("infer.py:preset=demo")
    c.workdir = os.path.join(s["root"], "run")
    c.llava_checkpoint, c.stage_workdir, c.prototypes.workdir = s["ckpt"], s["stage_wd"], s["protos_wd"]
    c.data.dataset_json, c.data.images_root = s["dataset_json"], s["data_dir"]
    c.generation.max_new_tokens, c.generation.batch_size = MAX_NEW, 4
    c.prototypes.batch_size = 8
    c.saliency.n_images, c.saliency.grid, c.saliency.minibatch = 1, 4, 8
    return override(c, **over)


@pytest.fixture(scope="module")
def run(setup):
    c = infer_config(setup)
    written = infer.run_inference(c)
    return c, written


@pytest.fixture(scope="module")
def inferencer(setup):
    return infer.Inferencer.from_workdirs(setup["ckpt"], setup["stage_wd"], prototypes=setup["protos_wd"],
                                          clip_batch_size=8, batch_size=4, max_new_tokens=MAX_NEW)


# ------------------------------------------------------------------------------------------------


def test_trained_values_loaded(setup):
    import torch

    tv = infer.load_trained_values(setup["stage_wd"])
    assert tv.step == 2 and tv.stage == "A" and tv.index.dims == DIMS
    pt = torch.load(setup["pt"], weights_only=True)[2]["values"].numpy()
    np.testing.assert_array_equal(tv.values, pt)
    np.testing.assert_array_equal(tv.values, setup["trained"])
    assert tv.export_meta["gating"]["max_concepts"] == 3
    bad = ConceptIndex(tv.index.dims, tv.index.names, tv.index.k_max + 1)
    with pytest.raises(ValueError, match="concept index"):
        infer.load_trained_values(setup["stage_wd"], index=bad)


def test_reasoning_json_schema(setup, run):
    c, written = run
    path = written["reasoning"]
    assert path == os.path.join(c.workdir, "eval", "reasoning.json")
    raw = open(path).read()
    obj = json.loads(raw)
    assert raw == json.dumps(obj, indent=4, sort_keys=True)
    assert sorted(obj) == sorted(setup["test_paths"])  # one entry per test image, absolute paths
    tv = infer.load_trained_values(setup["stage_wd"])
    g = tv.export_meta["gating"]  # the trained gating, which inference applies
    n_selected = 0
    for key, entry in obj.items():
        assert set(entry) == {"__meta__", STRUCTURED_PROMPT, NATURAL_PROMPT}
        assert all(isinstance(entry[p], str) for p in (STRUCTURED_PROMPT, NATURAL_PROMPT))
        act = entry["__meta__"]["activation"]
        assert list(act) == sorted(DIMS)
        for d, names, (a, e) in zip(tv.index.dims, tv.index.names, tv.index.ranges):
            m = act[d]
            assert set(m) == {"selected_global", "selected_names", "ranked_global", "ranked_names"}
            ranked = m["ranked_global"]
            assert sorted(i for i, _ in ranked) == list(range(a, e))
            assert [names[i - a] for i, _ in ranked] == m["ranked_names"]
            scores = [s for _, s in ranked]
            assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
            assert [names[i - a] for i in m["selected_global"]] == m["selected_names"]
            # the gating: selected ones pass the threshold (or back-off), best first, at most top-k per dim
            assert len(m["selected_global"]) <= g["topk_per_dim"]
            if m["selected_global"]:
                assert m["selected_global"][0] == ranked[0][0]
                assert ranked[0][1] >= g["threshold"] - g["backoff_delta"]
            n_selected += len(m["selected_global"])
        assert sum(len(act[d]["selected_global"]) for d in DIMS) <= g["max_concepts"]  # the budget
    assert n_selected > 0
    # saliency stats of the first image (the original's meta keys)
    first = obj[setup["test_paths"][0]]["__meta__"]
    assert set(first["saliency"]) == set(DIMS) and "structured" in first["saliency_llava"]
    assert first["saliency"]["artist"]["stats"]["grid"] == [4, 4]


def test_signals_equal_the_exported_ones(setup, inferencer):
    """The head's signals at inference = the exported keyed signals (zscore, T 0.8) for the same images."""
    from cgjax.data.signals import read_signals_keyed

    exported = read_signals_keyed(setup["keyed"], images_root=setup["dataset"].images_root)
    assert inferencer.signal_normalize == "zscore" and inferencer.signal_temperature == pytest.approx(0.8)
    got = inferencer.scores(setup["test_paths"])
    want = np.concatenate([np.stack([exported.for_image(r.image)[d] for r in setup["test"]])
                           for d in inferencer.index.dims], axis=1)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_baseline_equals_plain_llava(setup, run):
    """The baseline = plain Llava greedy decoding of the same prompts without any concept slot
    (masked slots are skipped by attention and positions, so this is the original's baseline)."""
    from transformers import AutoTokenizer

    from converters import hf_llava
    from cgjax.generate import generate

    c, written = run
    base = json.load(open(written["reasoning_baseline"]))
    concept = json.load(open(written["reasoning"]))
    assert sorted(base) == sorted(concept)
    tok = AutoTokenizer.from_pretrained(setup["ckpt"])
    llava = hf_llava.load(setup["ckpt"])
    inf = infer.Inferencer.from_workdirs(setup["ckpt"], setup["stage_wd"], signals=setup["label_signals"],
                                         dataset_json=setup["dataset_json"], images_root=setup["data_dir"],
                                         batch_size=4, max_new_tokens=MAX_NEW)
    px = inf.pixels(setup["test_paths"])
    n_img, img_id = llava.config.num_image_tokens, llava.config.image_token_id
    differs = 0
    for prompt in (STRUCTURED_PROMPT, NATURAL_PROMPT):
        rows = [text.encode(tok, prompt, n_img, img_id)] * len(px)
        b = text.pad_rows(rows, len(rows[0].input_ids), 0, side="left")
        out = np.asarray(generate(llava, b["input_ids"], px, b["attention_mask"], max_new_tokens=MAX_NEW,
                                  eos_token_id=tok.eos_token_id))
        for key, ids in zip(setup["test_paths"], out):
            hits = np.flatnonzero(ids == tok.eos_token_id)
            ids = ids[: hits[0] + 1] if hits.size else ids
            want = tok.decode(ids.tolist(), skip_special_tokens=True).strip()
            assert base[key][prompt] == want
            assert base[key]["__meta__"] == {"activation": {}, "config_fingerprint": infer.inference_fingerprint(c)}
            differs += concept[key][prompt] != want
    assert differs > 0  # the concept tokens change some answer


def test_evaluate_runs_on_output(setup, run):
    from cgjax.eval.metrics import evaluate

    c, written = run
    for name in ("reasoning", "reasoning_baseline"):
        m = evaluate(json.load(open(written[name])), setup["dataset"])
        assert m["n_images"] == len(setup["test"]) and m["n_unmatched"] == 0
        assert m["modes"] == ["structured", "natural"]
        assert m["structured"]["n"] == len(setup["test"])


def test_answer_stage_prompts_and_pil(setup, inferencer):
    from PIL import Image

    paths = setup["test_paths"][:2]
    pil = Image.open(paths[1]).convert("RGB")
    entries = inferencer.answer([paths[0], pil], "stageA,stageB", keys=paths)
    assert len(entries) == 2
    for entry, key in zip(entries, paths):
        want_b = text.stage_b_prompt_for_image(key, 42)  # from the image's path, never its labels
        assert set(entry) == {"__meta__", text.STAGE_A_PROMPT, want_b}
        assert set(entry["__meta__"]["activation"]) == set(DIMS)
    # a PIL image and its file give the same signals and answers
    again = inferencer.answer([paths[1]], "stageA")[0]
    assert again[text.STAGE_A_PROMPT] == entries[1][text.STAGE_A_PROMPT]
    assert again["__meta__"] == entries[1]["__meta__"]
    base = inferencer.answer([paths[0]], "structured", use_concepts=False)[0]
    assert base["__meta__"] == {"activation": {}} and set(base) == {"__meta__", STRUCTURED_PROMPT}
    assert infer.prompt_modes("both") == ["structured", "natural"]
    assert infer.structured_prompt() == STRUCTURED_PROMPT and infer.natural_prompt() == NATURAL_PROMPT
    with pytest.raises(ValueError, match="prompt mode"):
        infer.prompt_modes("poem")


def test_prototype_saliency_finds_the_informative_quadrant(setup, inferencer):
    """Only the top-left quadrant differs from the channel mean, and the concept's prototype is the
    image's own embedding: occluding any cell of that quadrant lowers the score, the others change nothing."""
    from cgjax.prototypes.head import PrototypeSet

    head = inferencer.head
    h, w = head.preprocess_cfg.size
    img = np.full((3, h, w), 0.25, np.float32)
    yy, xx = np.mgrid[: h // 2, : w // 2]
    img[:, : h // 2, : w // 2] += np.where((yy + xx) % 2 == 0, 0.5, -0.5)[None]
    base = head.encoder(img[None])[0]
    other = np.random.default_rng(0).normal(size=base.shape)
    ps = PrototypeSet(head.clip_model_name, {"artist": np.stack([base, other / np.linalg.norm(other)])},
                      {"artist": {"a": 0, "b": 1}}, {"artist": ["a", "b"]})
    old = head.prototypes
    head.prototypes = ps
    try:
        g = 4
        heat = sal.prototype_saliency(head, img, {"artist": 0}, g, upsample=False)["artist"]
        heat_mb = sal.prototype_saliency(head, img, {"artist": 0}, g, minibatch=8, upsample=False)["artist"]
        full = sal.prototype_saliency(head, img, {"artist": 0}, g)["artist"]
        # the per-copy loop: occlude in numpy, encode one copy at a time
        fill = img.mean(axis=(1, 2))
        rows, cols = sal.cell_edges(h, g), sal.cell_edges(w, g)
        loop = np.zeros((g, g))
        for i in range(g):
            for j in range(g):
                x = img.copy()
                x[:, rows[i]:rows[i + 1], cols[j]:cols[j + 1]] = fill[:, None, None]
                e = head.encoder(x[None])[0]
                s0, s1 = ps.signals(base[None], "artist")[0, 0], ps.signals(e[None], "artist")[0, 0]
                loop[i, j] = max(0.0, float(s0 - s1))
    finally:
        head.prototypes = old
    assert (heat[:2, :2] > 1e-4).all()
    mask = np.ones((g, g), bool)
    mask[:2, :2] = False
    assert np.abs(heat[mask]).max() < 1e-6
    np.testing.assert_allclose(heat, loop, atol=2e-6)
    np.testing.assert_allclose(heat_mb, heat, atol=1e-6)
    assert full.shape == (h, w)
    np.testing.assert_allclose(full[rows[1]:rows[2], cols[0]:cols[1]], heat[1, 0])


def test_llava_saliency_batched_equals_loop(setup, inferencer):
    from cgjax.losses import token_cross_entropy

    inf = inferencer
    path = setup["test_paths"][0]
    px = inf.pixels([path])[0]
    sc = inf.scores([path])[0]
    prompt = STRUCTURED_PROMPT
    ans = inf.generate_ids(px[None], [prompt], sc[None])[0]
    prompt_ids = inf.encode(prompt)
    g, length = 4, inf.prompt_length + inf.max_new_tokens
    heat, base = sal.llava_saliency(inf.model, prompt_ids, ans, px, sc, g, minibatch=8, length=length,
                                    pad_id=inf.pad_id, upsample=False, return_base=True)
    # per copy: a plain forward of ConceptLlava on the unpadded prompt + answer, CE in numpy
    ids = np.concatenate([prompt_ids, ans])[None]
    gd, st = nnx.split(inf.model)

    @jax.jit
    def loss(st, x):
        logits = nnx.merge(gd, st)(ids, x[None], jnp.ones_like(ids), jnp.asarray(sc)[None])
        labels = np.full(ids.shape, -100)
        labels[0, len(prompt_ids):] = ans
        ce = token_cross_entropy(logits[:, :-1], jnp.asarray(labels[:, 1:]))
        return jnp.sum(ce) / len(ans)

    fill = px.mean(axis=(1, 2))
    rows, cols = sal.cell_edges(px.shape[1], g), sal.cell_edges(px.shape[2], g)
    base_loop = float(loss(st, px))
    loop = np.zeros((g, g))
    for i in range(g):
        for j in range(g):
            x = px.copy()
            x[:, rows[i]:rows[i + 1], cols[j]:cols[j + 1]] = fill[:, None, None]
            loop[i, j] = max(0.0, float(loss(st, x)) - base_loop)
    np.testing.assert_allclose(base, base_loop, rtol=1e-5)
    np.testing.assert_allclose(heat, loop, atol=1e-5 * max(1.0, base_loop))
    assert heat.max() > 0
    maps = inf.saliency(path, ans, prompt, grid=g, scores=sc)  # HxW maps for write_report
    assert maps["llava"].shape == px.shape[1:]
    assert {k for k in maps if k.startswith("prototype/")} == {f"prototype/{d}" for d in DIMS}


def test_sharded_inference_gives_the_same_answers(setup, run, tmp_path):
    """config.mesh: the LLaVA created in its shardings on 8 devices (embed over fsdp, heads/mlp over
    tensor), each batch sharded over the batch axes, the ids gathered: the same greedy answers."""
    c, written = run
    c8 = infer_config(setup, mesh="fsdp=4,tensor=2", output_dir=str(tmp_path))
    c8.saliency.enabled = False
    got = infer.run_inference(c8)
    want = json.load(open(written["reasoning"]))
    have = json.load(open(got["reasoning"]))
    assert sorted(have) == sorted(want)
    for key in want:
        for prompt, answer in want[key].items():
            if prompt != "__meta__":
                assert have[key][prompt] == answer, (key, prompt)
    assert json.load(open(got["reasoning_baseline"])) == json.load(open(written["reasoning_baseline"]))
    # and the weights really were sharded: an embedding holds a quarter of its rows per device
    from cgjax import sharding

    inf = infer.Inferencer.from_workdirs(setup["ckpt"], setup["stage_wd"], prototypes=setup["protos_wd"],
                                         clip_batch_size=8, batch_size=4, max_new_tokens=MAX_NEW,
                                         mesh=sharding.make_mesh({"fsdp": 4, "tensor": 2}))
    emb = inf.model.llava.language_model.embed_tokens.embedding.get_value()
    assert len(emb.sharding.device_set) == 8 and not emb.sharding.is_fully_replicated
    assert emb.addressable_shards[0].data.size < emb.size


def test_a_rerun_keeps_the_answers_already_written(setup, run, tmp_path, monkeypatch):
    """reasoning.json is written every write_every images; a rerun with the same settings answers
    only the images not yet there and ends with the same file as one uninterrupted run."""
    c, written = run
    first = infer_config(setup, output_dir=str(tmp_path), write_every=1, **{"data.limit": 1})
    first.saliency.enabled = False
    infer.run_inference(first)
    assert len(json.load(open(tmp_path / "reasoning.json"))) == 1
    asked = []
    real_run = infer.Inferencer.run
    monkeypatch.setattr(infer.Inferencer, "run", lambda self, images, *a, **kw: (asked.extend(images),
                                                                                  real_run(self, images, *a, **kw))[1])
    again = infer_config(setup, output_dir=str(tmp_path), write_every=1)
    again.saliency.enabled = False
    infer.run_inference(again)
    assert asked == setup["test_paths"][1:]
    got, want = json.load(open(tmp_path / "reasoning.json")), json.load(open(written["reasoning"]))
    assert sorted(got) == sorted(want)
    for k in want:
        assert {p: a for p, a in got[k].items() if p != "__meta__"} == \
            {p: a for p, a in want[k].items() if p != "__meta__"}


def test_saliency_settings_are_checked_before_any_answer(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(infer.Inferencer, "from_workdirs",
                        classmethod(lambda *a, **k: pytest.fail("the model was loaded before the check")))
    c = infer_config(setup, output_dir=str(tmp_path), **{"prompt.mode": "structured"})
    c.saliency.source, c.saliency.prompt_mode = "llava", "natural"
    with pytest.raises(ValueError, match="saliency.prompt_mode 'natural' is not among the prompt modes"):
        infer.run_inference(c)
    c.saliency.source = "llavaa"
    with pytest.raises(ValueError, match="saliency.source 'llavaa'"):
        infer.run_inference(c)
    assert not os.path.exists(tmp_path / "reasoning.json")


def test_input_paths_are_checked_before_anything_loads(setup, tmp_path, monkeypatch):
    """Every missing input is named at once, before the model (or any image) is read."""
    monkeypatch.setattr(infer.Inferencer, "from_workdirs",
                        classmethod(lambda *a, **k: pytest.fail("the model was loaded before the check")))
    c = infer_config(setup, output_dir=str(tmp_path), stage_workdir=str(tmp_path / "no-stage"),
                     **{"prototypes.workdir": str(tmp_path / "no-protos")})
    with pytest.raises(FileNotFoundError, match=r"config.stage_workdir: .*no-stage; config.prototypes.workdir: "
                                                 r".*no-protos"):
        infer.run_inference(c)
    assert not os.path.exists(tmp_path / "reasoning.json")


def test_answers_do_not_depend_on_the_ground_truth(setup, tmp_path):
    """The ground-truth labels of the test records permuted: every generated answer (Stage B
    prompts included) is byte-identical."""
    import random

    records = json.load(open(setup["dataset_json"]))
    test = [i for i, r in enumerate(records) if r.get("split") == "test"]
    labels = [records[i].get("concepts") for i in test]
    random.Random(0).shuffle(labels)
    labels = labels[1:] + labels[:1]  # every record gets another's labels
    for i, lab in zip(test, labels):
        records[i]["concepts"] = lab
    permuted = tmp_path / "dataset.json"
    json.dump(records, open(permuted, "w"))
    got = {}
    for name, dataset_json in (("true", setup["dataset_json"]), ("permuted", str(permuted))):
        c = infer_config(setup, output_dir=str(tmp_path / name), **{"prompt.mode": "stageB,structured",
                                                                    "data.dataset_json": dataset_json})
        c.saliency.enabled = False
        got[name] = open(infer.run_inference(c)["reasoning"]).read()
    assert got["true"] == got["permuted"]
