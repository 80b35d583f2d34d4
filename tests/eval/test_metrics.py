"""Metrics against sklearn, calibration by hand, coherence on crafted texts, the CLI round trip on
reasoning.json files in the original project's exact shape."""
import json
import os
import random

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from cgjax.data.records import read_dataset_json, read_targets_csv
from cgjax.data.schema import Dataset, Record
from cgjax.eval.metrics import (EvidenceLexicon, activation_metrics, calibration_metrics, classification_metrics,
                                coherence, compare, comparison_rows, coverage, evaluate, expected_calibration_error,
                                explanation_coverage, match_records, multi_label_all_correct, reliability_bins)
from cgjax.eval.parser import LabelMatcher

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _evaluate_script():
    from cgjax.eval import cli

    return cli


# ------------------------------------------------------------------------------------------------
# classification against sklearn


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_matches_sklearn(seed):
    rng = random.Random(seed)
    classes = ["a", "b", "c", "d"]
    y_true, y_pred = [], []
    for _ in range(60):
        t = rng.choice(classes[:3] + [None])  # "d" never a ground truth; None = missing label
        r = rng.random()
        p = t if (r < 0.5 and t is not None) else rng.choice(classes + ["Unknown"])
        y_true.append(t)
        y_pred.append(p)
    got = classification_metrics(y_true, y_pred)
    t = [a for a, b in zip(y_true, y_pred) if a is not None]
    p = [b for a, b in zip(y_true, y_pred) if a is not None]
    labels = sorted(set(t))
    prec, rec, f1, sup = precision_recall_fscore_support(t, p, labels=labels, zero_division=0)
    for k, c in enumerate(labels):
        pc = got["per_concept"][c]
        assert pc["precision"] == pytest.approx(prec[k])
        assert pc["recall"] == pytest.approx(rec[k])
        assert pc["f1"] == pytest.approx(f1[k])
        assert pc["support"] == sup[k]
    assert got["macro_f1"] == pytest.approx(f1_score(t, p, labels=labels, average="macro", zero_division=0))
    assert got["weighted_f1"] == pytest.approx(f1_score(t, p, labels=labels, average="weighted", zero_division=0))
    assert got["accuracy"] == pytest.approx(accuracy_score(t, p))
    assert got["n"] == len(t)
    m = np.asarray(got["confusion"]["matrix"])
    assert m.sum() == len(t) and got["confusion"]["labels"] == labels
    assert got["confusion"]["predicted"][-1] == "Unknown" and "d" in got["confusion"]["predicted"]


def test_classification_edge_cases():
    got = classification_metrics(["x", "x", "y"], ["Unknown", "Unknown", "Unknown"])
    assert got["accuracy"] == 0 and got["macro_f1"] == 0 and got["per_concept"]["x"]["precision"] == 0
    assert classification_metrics([None, None], ["a", "b"])["accuracy"] is None
    perfect = classification_metrics(["x", "y"], ["x", "y"])
    assert perfect["macro_f1"] == 1 and perfect["weighted_f1"] == 1


def test_multi_label_all_correct():
    dims = ("artist", "style", "genre")
    gts = [{"artist": "a", "style": "s", "genre": "g"}, {"artist": "a", "style": "s", "genre": None},
           {"artist": "a", "style": "s", "genre": "g"}, {"artist": None, "style": None, "genre": None}]
    preds = [{"artist": "a", "style": "s", "genre": "g"}, {"artist": "a", "style": "s", "genre": "Unknown"},
             {"artist": "a", "style": "Unknown", "genre": "g"}, {"artist": "a", "style": "s", "genre": "g"}]
    assert multi_label_all_correct(preds, gts, dims) == pytest.approx(2 / 3)  # item 4 has no ground truth


def test_explanation_coverage_counts_aliases():
    m = LabelMatcher({"artist": ["claude-monet", "rembrandt"], "genre": ["landscape", "portrait"]})
    texts = ["Monet's landscapes shimmer.", "A portrait in brown tones.", "Nothing named."]
    gts = [{"artist": "claude-monet", "genre": "landscape"}, {"artist": "rembrandt", "genre": "portrait"},
           {"artist": "rembrandt", "genre": None}]
    cov, per = explanation_coverage(texts, gts, m, ("artist", "genre"))
    assert cov == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert per["artist"]["rembrandt"] == {"coverage": 0.0, "support": 2}
    assert per["genre"]["landscape"] == {"coverage": 1.0, "support": 1}


def original_coverage_score(texts, activated):
    """The original's ``coverage_score`` (myvlm_art/evaluation/metrics.py), restated."""
    import re

    def canon(s):
        return re.sub(r"[^a-z0-9]+", " ", s.lower()).strip()

    scores = []
    for text, concepts in zip(texts, activated):
        t = canon(text)
        covered = sum(1 for c in concepts if canon(c) and (" " + t + " ").find(" " + canon(c) + " ") != -1)
        scores.append(covered / max(1, len(concepts)))
    return sum(scores) / max(1, len(scores))


def test_coverage_is_the_originals_verbatim_rule():
    """``coverage``: the canonical label verbatim in the whole answer; aliases do not count."""
    texts = ['{"artist": "claude_monet", "genre": "landscapes"} Monet!', "A Rembrandt portrait.",
             "Still-Life by van Gogh", "nothing"]
    gts = [{"artist": "claude-monet", "genre": "landscape"}, {"artist": "rembrandt", "genre": "portrait"},
           {"artist": "vincent-van-gogh", "genre": "still_life"}, {"artist": "rembrandt", "genre": "Unknown Genre"}]
    cov, per = coverage(texts, gts, ("artist", "genre"))
    want = original_coverage_score(texts, [[g["artist"], g["genre"]] for g in gts])
    assert cov == pytest.approx(want) and cov == pytest.approx((0.5 + 1.0 + 0.5 + 0.0) / 4)
    assert per["genre"]["landscape"] == {"coverage": 0.0, "support": 1}  # "landscapes" is not verbatim
    assert per["artist"]["rembrandt"] == {"coverage": 0.5, "support": 2}


# ------------------------------------------------------------------------------------------------
# calibration


def test_ece_hand_computed():
    conf = [0.95, 0.85, 0.82, 0.55, 0.15]
    correct = [1, 0, 1, 0, 1]
    # bins (0.9,1]: acc 1 conf .95 | (0.8,0.9]: acc .5 conf .835 | (0.5,0.6]: 0 vs .55 | (0.1,0.2]: 1 vs .15
    expected = (1 * 0.05 + 2 * 0.335 + 1 * 0.55 + 1 * 0.85) / 5
    assert expected_calibration_error(conf, correct) == pytest.approx(0.424)
    assert expected_calibration_error(conf, correct) == pytest.approx(expected)
    bins = reliability_bins(conf, correct)
    assert bins["count"] == [0, 1, 0, 0, 0, 1, 0, 0, 2, 1]
    assert bins["accuracy"][8] == pytest.approx(0.5) and bins["confidence"][8] == pytest.approx(0.835)
    assert bins["accuracy"][0] is None
    # right-closed bins: 0.3 falls in (0.2, 0.3], 0 in the first bin, 1 in the last
    assert reliability_bins([0.3, 0.0, 1.0], [1, 1, 1])["count"] == [1, 0, 1, 0, 0, 0, 0, 0, 0, 1]
    assert expected_calibration_error([1.0, 1.0], [1, 1]) == 0.0
    assert expected_calibration_error([], []) is None
    with pytest.raises(ValueError):
        expected_calibration_error([0.5], [1, 0])


def test_ece_bin_edges_hand_computed():
    """5 right-closed bins (0, .2], (.2, .4], ..., 0 in the first; out-of-range confidences clipped."""
    conf = [0.2, 0.2, 0.0, 0.4, 0.7, 1.0, 1.3]
    correct = [0, 1, 0, 1, 0, 1, 1]
    # (0, .2] with 0: acc 1/3, conf 0.4/3 -> 3 * |1/3 - 0.4/3| = 0.6 | (.2, .4]: 0.4 right -> 0.6
    # (.6, .8]: 0.7 wrong -> 0.7 | (.8, 1]: 1.0 and 1.3 (as 1.0), both right -> 0
    assert expected_calibration_error(conf, correct, n_bins=5) == pytest.approx((0.6 + 0.6 + 0.7) / 7)
    assert reliability_bins(conf, correct, n_bins=5)["count"] == [3, 1, 0, 1, 2]
    # one bin: |mean accuracy - mean confidence|
    assert expected_calibration_error([0.9, 0.5], [1, 1], n_bins=1) == pytest.approx(0.3)


def _meta(ranked, scores, selected):
    return {"activation": {"style": {"ranked_names": ranked, "selected_names": selected,
                                     "ranked_global": [[i, s] for i, s in enumerate(scores)]}}}


def test_signal_metrics_from_meta():
    metas = [_meta(["A", "B", "C", "D"], [0.9, 0.5, 0.2, 0.1], ["A"]),
             _meta(["B", "C", "A", "D"], [0.8, 0.3, 0.2, 0.1], ["B", "C"]),
             _meta(["C", "D", "B", "A"], [0.6, 0.5, 0.4, 0.3], []),
             {"activation": {}},                      # baseline entry: not counted
             _meta(["A", "B"], [0.7, 0.1], ["A"])]    # ground truth missing: not counted
    gts = [{"style": "A"}, {"style": "a"}, {"style": "A"}, {"style": "A"}, {"style": None}]
    act = activation_metrics(metas, gts, ["style"])["style"]
    assert act["support"] == 3
    assert act["recall@1"] == pytest.approx(1 / 3)
    assert act["recall@3"] == pytest.approx(2 / 3)   # "a" == "A" after canonicalisation
    assert act["recall@5"] == pytest.approx(1.0)
    assert act["precision"] == pytest.approx(1 / 3)  # 3 selected, 1 right
    assert act["activation_rate"] == pytest.approx(2 / 3)
    cal = calibration_metrics(metas, gts, ["style"])["style"]
    assert cal["n"] == 3 and cal["top1_accuracy"] == pytest.approx(1 / 3)
    assert cal["ece"] == pytest.approx(expected_calibration_error([0.9, 0.8, 0.6], [1, 0, 0]))


# ------------------------------------------------------------------------------------------------
# coherence


TRAIN = [
    ("Thick swirling strokes and a blazing yellow sky, typical of Vincent van Gogh.", "vincent-van-gogh"),
    ("Swirling strokes in blazing yellow and cobalt point to van Gogh.", "vincent-van-gogh"),
    ("Thick swirling impasto and blazing colour.", "vincent-van-gogh"),
    ("Soft broken touches of lilac light on water, as Monet did.", "claude-monet"),
    ("Broken touches of lilac and pale light on water.", "claude-monet"),
    ("Soft lilac light shimmering on water.", "claude-monet"),
]


@pytest.fixture(scope="module")
def lexicon():
    return EvidenceLexicon.fit([t for t, _ in TRAIN], [{"artist": a} for _, a in TRAIN], ["artist"])


def test_lexicon_terms(lexicon):
    vg, mo = lexicon.terms["artist"]["vincent-van-gogh"], lexicon.terms["artist"]["claude-monet"]
    assert "swirling" in vg and "blazing" in vg and "lilac" in mo and "water" in mo
    # label words are not evidence
    assert not any(w in t for lex in (vg, mo) for t in lex for w in ("gogh", "vincent", "monet", "claude"))
    assert lexicon.implied("Swirling strokes under a blazing sky.", "artist") == "vincent-van-gogh"
    assert lexicon.implied("Lilac reflections on the water.", "artist") == "claude-monet"
    assert lexicon.implied("Clearly a Monet.", "artist") is None       # names only, no evidence
    assert lexicon.implied("", "artist") is None
    assert EvidenceLexicon.from_json(json.loads(json.dumps(lexicon.to_json()))).terms == lexicon.terms


def test_coherence_crafted(lexicon):
    texts = ["Swirling strokes under a blazing sky.",   # implies van Gogh
             "Lilac reflections on the water.",         # implies Monet
             "Swirling, blazing strokes.",              # implies van Gogh
             "A nice painting.",                        # implies nothing: not counted
             "Lilac light on water."]                   # key Unknown: not counted
    keys = [{"artist": "vincent-van-gogh"}, {"artist": "vincent-van-gogh"}, {"artist": "vincent-van-gogh"},
            {"artist": "claude-monet"}, {"artist": "Unknown"}]
    got = coherence(texts, keys, lexicon, ["artist"])
    assert got["coherence"]["artist"] == pytest.approx(2 / 3)
    assert got["coherence_support"]["artist"] == 3
    assert got["coherence_mean"] == pytest.approx(2 / 3)


def test_lexicon_assigns_terms_to_their_dimension():
    # the palette word "ochre" always comes with artist X, and X mostly paints style P: it must describe
    # the artist, not the style
    texts, labels = [], []
    for i in range(12):
        style = "P" if i % 4 else "Q"
        texts.append(f"Ochre palette. {'Dotted surface' if style == 'P' else 'Flat planes'}.")
        labels.append({"artist": "x-x", "style": style})
    for i in range(12):
        style = "Q" if i % 4 else "P"
        texts.append(f"Teal palette. {'Dotted surface' if style == 'P' else 'Flat planes'}.")
        labels.append({"artist": "y-y", "style": style})
    lex = EvidenceLexicon.fit(texts, labels, ["artist", "style"])
    assert "ochre" in lex.terms["artist"]["x-x"]
    assert "ochre" not in lex.terms["style"]["P"] and "dotted" in lex.terms["style"]["P"]
    assert lex.implied("Ochre palette. Flat planes.", "style") == "Q"


def test_coherence_on_demo_reasons(eval_demo):
    root = eval_demo["images_root"]
    targets = read_targets_csv(eval_demo["targets_csv"], root)
    test = {r.image for r in read_dataset_json(eval_demo["test_json"], root).records}
    lex = EvidenceLexicon.from_targets(targets, exclude_images=test)
    held_out = [r for r in targets.rows if r.image_path in test]
    assert lex.n_documents == len(targets.rows) - len(held_out) and held_out
    dims = list(targets.dimensions)
    right = coherence([r.target_reason for r in held_out], [r.labels for r in held_out], lex, dims)
    assert all(right["coherence"][d] == 1.0 and right["coherence_support"][d] == len(held_out) for d in dims)
    rng = random.Random(0)
    wrong = [{d: rng.choice(sorted({x.labels[d] for x in targets.rows} - {r.labels[d]})) for d in dims}
             for r in held_out]
    assert all(v == 0.0 for v in coherence([r.target_reason for r in held_out], wrong, lex, dims)["coherence"].values())


# ------------------------------------------------------------------------------------------------
# reasoning.json: matching, evaluate, compare, the CLI


def test_match_records_by_path_and_suffix(tmp_path):
    recs = [Record("van_gogh/van_gogh_1.jpg", {"artist": "v"}), Record("monet/monet_1.jpg", {"artist": "m"}),
            Record("a/x.jpg", {"artist": "a"}), Record("b/x.jpg", {"artist": "b"})]
    ds = Dataset(recs, ("artist",), str(tmp_path / "d.json"), str(tmp_path))
    keys = ["van_gogh/van_gogh_1.jpg", str(tmp_path / "monet" / "monet_1.jpg"),
            "/home/ubuntu/MyVLM_art/data/dataset/b/x.jpg", "/elsewhere/x.jpg", "/nothing/here.jpg"]
    got, unmatched = match_records(keys, ds)
    assert {k: r.image for k, r in got.items()} == {keys[0]: "van_gogh/van_gogh_1.jpg", keys[1]: "monet/monet_1.jpg",
                                                    keys[2]: "b/x.jpg"}
    assert unmatched == ["/elsewhere/x.jpg", "/nothing/here.jpg"]  # ambiguous, absent


def test_compare_and_rows():
    c = {"dimensions": ["artist"], "natural": {"accuracy": {"artist": 0.8}, "macro_f1": {"artist": 0.7},
                                               "multi_label_all_correct": 0.5, "coverage": 0.4}}
    b = {"dimensions": ["artist"], "natural": {"accuracy": {"artist": 0.5}, "macro_f1": {"artist": 0.2},
                                               "multi_label_all_correct": None, "coverage": 0.4}}
    got = compare(c, b)
    assert got["natural"]["macro_f1"]["artist"] == {"concept": 0.7, "baseline": 0.2, "delta": pytest.approx(0.5)}
    assert got["natural"]["multi_label_all_correct"]["all"]["delta"] is None
    assert "structured" not in got
    rows = comparison_rows(got)
    assert ("natural", "accuracy", "artist", 0.8, 0.5, pytest.approx(0.3)) in rows


def test_evaluate_demo(demo_reasoning):
    ds, preds = demo_reasoning["dataset"], demo_reasoning["preds"]
    m = evaluate(demo_reasoning["reasoning_obj"], ds)
    assert m["n_images"] == len(ds) and m["n_unmatched"] == 0 and m["modes"] == ["structured", "natural"]
    for d in ds.dimensions:
        want = np.mean([preds[r.image][d] == r.labels[d] for r in ds.records])
        assert m["structured"]["accuracy"][d] == pytest.approx(want)
        assert m["natural"]["accuracy"][d] == pytest.approx(want)
    assert m["structured"]["json_parse_rate"] == 1.0
    assert m["lexicon"] is None and m["structured"]["coherence_mean"] is None


def test_cli_round_trip_original_schema(tmp_path):
    """A reasoning.json exactly as the original writes it (absolute paths of its machine, its prompts,
    sort_keys + indent 4, baseline with an empty activation) and its dataset JSON layout."""
    data_root = tmp_path / "data" / "dataset"
    records, truth = [], {}
    artists = {"van_gogh": "vincent-van-gogh", "monet": "claude-monet"}
    styles = {"van_gogh": "Post_Impressionism", "monet": "Impressionism"}
    for folder, artist in artists.items():
        for i in range(3):
            rel = f"{folder}/{folder}_{i}.jpg"
            genre = "landscape" if i < 2 else "portrait"
            records.append({"image": rel, "artist": artist, "concepts": {
                "artist": artist, "style": styles[folder], "genre": genre, "media": ["oil", "canvas"]},
                "title": f"t{i}", "date": "1889"})
            truth[rel] = (artist, styles[folder], genre)
    data_root.mkdir(parents=True)
    (data_root / "wikiart_5artists_dataset.json").write_text(json.dumps(records, indent=4))
    keys_prompt = ("Identify the artist, style, and genre of this painting. First provide three lines: 'artist: ...', "
                   "'style: ...', 'genre: ...'. Then explain your reasoning in 2-3 sentences. For example, you can "
                   "discuss brushwork, color palette, and composition... ")
    json_prompt = ("Return a JSON object with exactly these keys: artist, style, genre, evidence. Wrap the JSON "
                   "between <BEGIN_JSON> and <END_JSON>. If uncertain, use 'Unknown'. Followed by 2-3 brief sentences "
                   "explaining your reasoning. Do not include any text before or after the JSON.")
    names = {"artist": list(artists.values()), "style": ["Post_Impressionism", "Impressionism"],
             "genre": ["landscape", "portrait"]}
    reasoning, baseline = {}, {}
    for rel, (a, s, g) in truth.items():
        key = f"/home/ubuntu/MyVLM_art/data/dataset/{rel}"
        wrong_genre = "portrait" if rel.endswith("_0.jpg") else g  # one genre wrong per artist
        meta, gi = {"activation": {}}, 0
        for d, gt in (("artist", a), ("style", s), ("genre", g)):
            ranked = [gt] + [n for n in names[d] if n != gt]
            meta["activation"][d] = {"ranked_global": [[gi + k, 0.9 - 0.3 * k] for k in range(len(ranked))],
                                     "ranked_names": ranked, "selected_global": [gi], "selected_names": [gt]}
            gi += len(ranked)
        structured = json.dumps({"artist": a.replace("-", "_"), "style": s, "genre": wrong_genre,
                                 "evidence": "Thick swirling strokes and vivid colour."}, indent=0)
        meta["saliency_llava"] = {"structured": {"path": f"/sal/{rel}.png", "stats": {
            "mean": 0.1 * (len(reasoning) + 1), "max": 0.5 + 0.05 * len(reasoning), "grid": [8, 8]}}}
        reasoning[key] = {"__meta__": meta, json_prompt: structured + "\n\nThe",
                          keys_prompt: f"artist: {a.split('-')[-1]}\nstyle: {s.lower()}\ngenre: {g}\nThe brushwork."}
        baseline[key] = {"__meta__": {"activation": {}}, json_prompt: '{\n"artist": "Unknown",\n"style": "Realism",'
                                                                      '\n"genre": "landscape",\n"evidence": "The pai',
                         keys_prompt: "artist: Unknown\nstyle: Realism\ngenre: landscape\nA painting."}
    out = tmp_path / "seed_42" / "reasoning_outputs"
    out.mkdir(parents=True)
    (out / "reasoning.json").write_text(json.dumps(reasoning, indent=4, sort_keys=True))
    (out / "reasoning_baseline.json").write_text(json.dumps(baseline, indent=4, sort_keys=True))
    m = _evaluate_script().main([
        "--reasoning-json", str(out / "reasoning.json"),
        "--dataset-json", str(data_root / "wikiart_5artists_dataset.json"),
        "--baseline-json", str(out / "reasoning_baseline.json"), "--out", str(out / "metrics.json")])
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(m))
    base = json.loads((out / "metrics_baseline.json").read_text())
    assert m["n_images"] == 6 and m["n_unmatched"] == 0 and m["modes"] == ["structured", "keys"]
    s = m["structured"]
    assert s["json_parse_rate"] == 1.0
    assert s["accuracy"] == {"artist": 1.0, "style": 1.0, "genre": pytest.approx(4 / 6)}
    # genre: landscape (4 true) predicted portrait twice; portrait (2 true) always right
    f1_land, f1_port = 2 * 1 * 0.5 / 1.5, 2 * 0.5 * 1 / 1.5
    assert s["per_concept"]["genre"]["landscape"] == pytest.approx(
        {"precision": 1.0, "recall": 0.5, "f1": f1_land, "support": 4})
    assert s["macro_f1"]["genre"] == pytest.approx((f1_land + f1_port) / 2)
    assert s["weighted_f1"]["genre"] == pytest.approx((4 * f1_land + 2 * f1_port) / 6)
    assert s["multi_label_all_correct"] == pytest.approx(4 / 6)
    # the original's coverage: the labels verbatim in the whole answer (the wrong genre misses its label)
    answers = [reasoning[key][json_prompt] for key in sorted(reasoning)]
    gts = [list(truth[key.split("dataset/", 1)[1]]) for key in sorted(reasoning)]
    assert s["coverage"] == pytest.approx(original_coverage_score(answers, gts)) == pytest.approx((4 + 2 * 2 / 3) / 6)
    assert s["explanation_coverage"] == 0.0  # the evidence names no label
    assert s["coverage_per_concept"]["genre"]["landscape"] == {"coverage": 0.5, "support": 4}
    # the original's saliency_llava aggregate of __meta__.saliency_llava.structured
    stats = [e["__meta__"]["saliency_llava"]["structured"] for e in reasoning.values()]
    assert m["saliency_llava"]["stats"] == pytest.approx(
        {"mean": np.mean([x["stats"]["mean"] for x in stats]), "max": max(x["stats"]["max"] for x in stats),
         "count": 6})
    assert sorted(m["saliency_llava"]["paths"]) == sorted(x["path"] for x in stats)
    assert m["keys"]["multi_label_all_correct"] == 1.0  # "artist: gogh" / "realism" lower case snapped
    for d in ("artist", "style", "genre"):
        assert m["activation"][d]["recall@1"] == 1.0 and m["activation"][d]["precision"] == 1.0
        assert m["calibration"][d]["ece"] == pytest.approx(0.1)  # always right at confidence 0.9
    assert base["activation"] == {} and base["calibration"] == {}
    assert base["structured"]["json_parse_rate"] == 0.0  # cut off mid-evidence
    assert base["structured"]["unknown_rate"]["artist"] == 1.0
    assert base["structured"]["accuracy"]["genre"] == pytest.approx(4 / 6)
    assert m["comparison"]["structured"]["accuracy"]["artist"] == {"concept": 1.0, "baseline": 0.0, "delta": 1.0}


def test_cli_demo_with_lexicon(demo_reasoning, eval_demo, tmp_path):
    out = tmp_path / "eval"
    m = _evaluate_script().main([
        "--reasoning-json", demo_reasoning["reasoning"], "--dataset-json", eval_demo["test_json"],
        "--images-root", eval_demo["images_root"], "--targets-csv", eval_demo["targets_csv"],
        "--baseline-json", demo_reasoning["baseline"], "--out", str(out / "metrics.json"),
        "--lexicon-out", str(out / "lexicon.json")])
    ds = demo_reasoning["dataset"]
    assert m["n_images"] == len(ds) and m["lexicon"]["n_documents"] == 48 - len(ds)
    preds = demo_reasoning["preds"]
    # evidence = the ground-truth reason: coherent exactly where the prediction is right
    for mode in ("structured", "natural"):
        for d in ds.dimensions:
            want = np.mean([preds[r.image][d] == r.labels[d] for r in ds.records])
            assert m[mode]["coherence"][d] == pytest.approx(want)
            assert m[mode]["coherence_support"][d] == len(ds)
    assert m["structured"]["coverage"] == 1.0  # the demo reasons name all three labels
    for d in ds.dimensions:
        assert m["comparison"]["structured"]["macro_f1"][d]["delta"] > 0
    assert json.loads((out / "lexicon.json").read_text())["format"] == "cgjax.evidence_lexicon"


def test_match_records_needs_the_whole_relative_path_and_rejects_duplicates(tmp_path):
    """Answers from another data set that share only file names are not scored; two answers for one
    record are an error naming both."""
    recs = [Record("van_gogh/1.jpg", {"artist": "v"}), Record("monet/2.jpg", {"artist": "m"})]
    ds = Dataset(recs, ("artist",), str(tmp_path / "d.json"), str(tmp_path))
    got, unmatched = match_records(["/other/set/cats/1.jpg", "2.jpg"], ds)
    assert got == {} and unmatched == ["/other/set/cats/1.jpg", "2.jpg"]
    with pytest.raises(ValueError, match=r"'van_gogh/1.jpg' and '/mnt/data/van_gogh/1.jpg' both match"):
        match_records(["van_gogh/1.jpg", "/mnt/data/van_gogh/1.jpg"], ds)
