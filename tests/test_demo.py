"""The README's demo, end to end at a small size, from a non-editable install: ``scripts/demo.py`` run by the
venv's Python of the ``installed`` fixture (a wheel of this checkout; tests/conftest.py) in a folder outside the
checkout. Every stage runs and leaves its artefacts."""
import json
import os
import re
import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

DEMO_ARGS = ["--n_images", "40", "--pretrain_steps", "6", "--stage_steps", "4", "--eval_images", "3",
             "--clip_pretrain_epochs", "1", "--clip_pretrain_images", "64"]


DOMAINS = {"art": ("artist", "style", "genre"), "birds": ("species", "habitat", "season")}


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_demo_runs_end_to_end(installed, tmp_path, domain):
    """Each demo domain through the whole pipeline; the birds run never names an art dimension."""
    dims = DOMAINS[domain]
    script = os.path.join(installed["repo"], "scripts", "demo.py")
    # -I: no PYTHONPATH and no script folder on sys.path, so cgjax, converters and configs can only come from the
    # venv (tests/test_install.py checks where they resolve), unless the script itself edits sys.path
    with open(script) as f:
        assert "sys.path" not in f.read(), "scripts/demo.py must run on the installed package alone"
    work = str(tmp_path / "demo")
    run_dir = tmp_path / "cwd"
    run_dir.mkdir()
    env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest")  # as tests/conftest.py sets in-process
    out = subprocess.run([installed["python"], "-I", script, "--workdir", work, "--domain", domain, *DEMO_ARGS],
                         cwd=run_dir, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"demo.py failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-8000:]}"
    with open(os.path.join(work, "demo_summary.json")) as f:
        summary = json.load(f)
    assert summary["workdir"] == os.path.abspath(work)
    assert sorted(os.listdir(run_dir)) == []  # everything went to --workdir

    assert summary["conversion"]["clip_max_abs_diff"] < 1e-4
    assert summary["conversion"]["llava_max_abs_diff"] < 1e-4
    # the CLIP tower was pretrained (visual weights moved, text tower untouched) and that is what was converted
    random_dir = os.path.join(work, "checkpoints", "clip", "cgjax-demo-clip-hub")
    assert summary["clip_model"] == "local-dir:" + os.path.join(work, "checkpoints", "clip-pretrained",
                                                                "cgjax-demo-clip-hub")
    before = load_file(os.path.join(random_dir, "open_clip_model.safetensors"))
    after = load_file(os.path.join(summary["clip_model"].removeprefix("local-dir:"), "open_clip_model.safetensors"))
    assert before.keys() == after.keys()
    assert not torch.equal(before["visual.proj"], after["visual.proj"])
    assert torch.equal(before["token_embedding.weight"], after["token_embedding.weight"])

    # signals in the original format: one entry per dataset record, [1 - s, s] pairs
    with open(summary["data"]["dataset_json"]) as f:
        n_records = len(json.load(f))
    art = summary["prototypes"]["artifacts"]
    with open(art["signals"][dims[1]]) as f:
        second = json.load(f)
    assert len(second) == n_records
    pair = next(iter(second[0][dims[1]].values()))
    np.testing.assert_allclose(sum(pair), 1.0, atol=1e-6)
    protos = torch.load(art["pt"][0], weights_only=True)
    assert set(protos) == {"clip_model_name", "prototypes", "concept_to_idx", "idx_to_concept"}

    # both stages trained and reported held-out accuracy with and without concept tokens
    for stage in ("stageA", "stageB"):
        accs = summary["stages"][stage]
        assert 0.0 <= accs["val_key_acc"] <= 1.0 and "val_noconcepts_key_acc" in accs
    values = torch.load(summary["stages"]["stageB_pt"], weights_only=True)
    (step, payload), = values.items()
    assert payload["values"].ndim == 3

    # inference + metrics + report in DIR/eval (concept model and the no-concept baseline)
    eval_dir = os.path.join(work, "eval")
    for name in ("metrics.json", "metrics_baseline.json", "reasoning.json", "reasoning_baseline.json", "report.html",
                 "concept_graph.png"):
        assert os.path.getsize(os.path.join(eval_dir, name)) > 0, name
    with open(os.path.join(eval_dir, "reasoning.json")) as f:
        reasoning = json.load(f)
    assert len(reasoning) == 3
    entry = next(iter(reasoning.values()))
    assert set(entry["__meta__"]["activation"]) == set(dims)
    assert summary["domain"] == domain and tuple(summary["eval"]["keys_macro_f1"]) == dims
    if domain != "art":  # no art dimension in any answer file
        for name in ("reasoning.json", "reasoning_baseline.json", "metrics.json"):
            with open(os.path.join(eval_dir, name), encoding="utf-8") as f:
                assert not re.search(r'"(artist|style|genre)"', f.read()), name
    with open(os.path.join(eval_dir, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["n_images"] == 3 and "comparison" in metrics
    assert summary["eval"]["structured_json_parse_rate"] == metrics["structured"]["json_parse_rate"]
    with open(os.path.join(eval_dir, "report.html"), encoding="utf-8") as f:
        assert '<h2 id="overview">' in f.read()  # the report opens with concept model vs baseline


def test_birds_domain_in_process(tmp_path):
    """The second demo domain in process, beyond what its end-to-end run shows: its data set is read with
    its own dimensions, its labels are visible in the pixels, the demo tokenizer covers its prompts, and a
    training row is built from prompts over species/habitat/season with no art word in it."""
    from cgjax import text
    from cgjax.data.demo_birds import render_bird
    from cgjax.data.demo_domains import get_domain
    from cgjax.data.dimensions import resolve_dimensions
    from cgjax.data.records import read_dataset_json
    from cgjax.demo_assets import tokenizer_corpus
    from cgjax.prototypes.export import read_aligned
    from cgjax.text_rows import TextRows
    from converters.tiny_tokenizer import train_tokenizer

    birds = get_domain("birds")
    paths = birds.make(str(tmp_path / "birds"), n_images=12, size=32, seed=0)
    dims = ("species", "habitat", "season")
    assert resolve_dimensions(paths["dataset_json"], targets_csv=paths["targets_csv"]) == dims
    ds = read_dataset_json(paths["dataset_json"])
    assert ds.dimensions == dims and all(r.labels[d] in names for r in ds.records
                                         for d, names in zip(dims, birds.classes))
    assert read_aligned(paths["dataset_json"], paths["images_root"])[0].dimensions == dims  # no art columns
    with pytest.raises(ValueError, match="unknown demo domain 'fish'"):
        get_domain("fish")

    # the labels drive the pixels: same index and seed, one factor changed at a time -> the image changes there
    a = render_bird(3, 0, 32)
    same = [render_bird(3, 0, 32) for _ in range(2)]
    assert all(np.array_equal(a.image, s.image) for s in same)
    per_class = {}
    for i in range(60):
        b = render_bird(i, 1, 32)
        per_class.setdefault(b.season, []).append(b.image.reshape(-1, 3).mean(0))
    means = {k: np.mean(v, 0) for k, v in per_class.items()}
    assert means["winter"][2] > means["autumn"][2] + 20  # blue cast vs orange cast

    # the tokenizer corpus carries the birds prompts; a Stage B row asks about the birds dims only
    corpus = tokenizer_corpus(paths["targets_csv"])
    assert text.stage_a_prompt(dims) in corpus and not any("artist" in c for c in corpus)
    tok = train_tokenizer(corpus, vocab_size=400)
    vocabs = ds.vocabularies()
    img = tok.convert_tokens_to_ids("<image>")
    rows = TextRows(tokenizer=tok, stage="B", n_image_block=2, image_token_id=img, length=256, concept_dims=dims,
                    label_dims=dims, label_names=tuple(tuple(vocabs[d].names) for d in dims), prompt_seed=0,
                    max_reason_tokens=0, add_eos=True, with_prompt=True)
    r = ds.records[0]
    ex = {"labels": {d: vocabs[d].index(r.labels[d]) for d in dims}, "target_keys": "", "target_reason": "",
          "has_target": 0, "image_path": r.image, "pixel_values": np.zeros((3, 4, 4), np.float32),
          "signals": {d: np.zeros(len(vocabs[d]), np.float32) for d in dims}}
    out = rows(ex)
    decoded = tok.decode(out["input_ids"][out["attention_mask"] > 0])
    assert f"species: {r.labels['species']}" in decoded and "season:" in decoded
    assert any(p in decoded for p in text.stage_b_prompts(dims))
    assert not re.search(r"\b(artist|style|genre|painting|artwork)\b", decoded)
