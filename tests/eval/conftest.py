"""Session fixtures for the evaluation tests: a small demo data set and reasoning files written in
the original project's ``reasoning.json`` shape (absolute image paths, sorted keys, indent 4)."""
import json
import os
import random

import pytest

from cgjax.data.demo_data import make_demo
from cgjax.data.records import read_dataset_json, read_targets_csv

STRUCTURED_PROMPT = (
    "Between <BEGIN_JSON> and <END_JSON>, return only a compact JSON with keys artist, style, genre, evidence. "
    "Use 'Unknown' if uncertain. In 'evidence', write 2\u20133 concise sentences explaining your reasoning. "
    "Do not include any text outside the JSON.")
NATURAL_PROMPT = (
    "Describe this painting in one cohesive paragraph. Naturally mention the artist, style, and genre in the prose "
    "(no JSON, no key-value lines). Then briefly justify your identification by referring to brushwork, palette, "
    "and composition.")


@pytest.fixture(scope="session")
def prompts():
    """The structured and natural prompt texts of the original (as the inference writes them)."""
    return {"structured": STRUCTURED_PROMPT, "natural": NATURAL_PROMPT}


@pytest.fixture(scope="session")
def eval_demo(tmp_path_factory):
    """48 demo images (32x32); returns the demo paths dict."""
    return make_demo(os.path.join(tmp_path_factory.mktemp("evdemo"), "demo"), n_images=48, size=32, seed=3)


@pytest.fixture(scope="session")
def demo_reasoning(eval_demo, tmp_path_factory):
    """reasoning.json (+ baseline) for the demo test split: predictions right with probability 0.7,
    half of the keys absolute paths of another machine (matched by suffix). Returns a dict with
    the paths, the predictions per image and the dataset."""
    root = eval_demo["images_root"]
    dataset = read_dataset_json(eval_demo["test_json"], root)
    targets = read_targets_csv(eval_demo["targets_csv"], root).by_path()
    vocab = json.load(open(eval_demo["vocab_json"]))["concepts"]
    rng = random.Random(0)
    reasoning, baseline, preds = {}, {}, {}
    for i, rec in enumerate(dataset.records):
        lab = rec.labels
        pred = {d: (lab[d] if rng.random() < 0.7 else rng.choice(vocab[d])) for d in dataset.dimensions}
        key = (os.path.abspath(os.path.join(root, rec.image)) if i % 2 else
               "/home/ubuntu/MyVLM_art/data/dataset/" + rec.image)
        preds[rec.image] = pred
        meta, g = {"activation": {}}, 0
        for d in dataset.dimensions:
            names = list(vocab[d])
            rng.shuffle(names)
            if rng.random() < 0.8:
                names.remove(lab[d])
                names.insert(0, lab[d])
            scores = sorted((rng.random() for _ in names), reverse=True)
            meta["activation"][d] = {
                "selected_global": [g], "selected_names": names[:1], "ranked_names": names,
                "ranked_global": [[g + k, s] for k, s in enumerate(scores)]}
            g += len(names)
        reason = targets[rec.image].target_reason
        reasoning[key] = {
            "__meta__": meta,
            STRUCTURED_PROMPT: "<BEGIN_JSON>" + json.dumps({**pred, "evidence": reason}) + "<END_JSON>",
            NATURAL_PROMPT: f"This painting by {pred['artist']} is a {pred['genre']} in the manner of "
                            f"{pred['style']}. {reason}",
        }
        baseline[key] = {"__meta__": {"activation": {}},
                         STRUCTURED_PROMPT: '{"artist": "Unknown", "style": "Unknown", "genre": "landscape", '
                                            '"evidence": "A painting with some colours."}',
                         NATURAL_PROMPT: "A calm painting with a landscape feeling."}
    out = tmp_path_factory.mktemp("reasoning")
    paths = {"reasoning": str(out / "reasoning.json"), "baseline": str(out / "reasoning_baseline.json")}
    for name, obj in (("reasoning", reasoning), ("baseline", baseline)):
        with open(paths[name], "w") as f:
            json.dump(obj, f, indent=4, sort_keys=True)
    return {**paths, "preds": preds, "dataset": dataset, "reasoning_obj": reasoning, "baseline_obj": baseline}
