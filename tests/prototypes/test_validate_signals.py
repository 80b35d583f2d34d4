"""validate_signals on a hand-worked example (threshold 0.6, backoff 0.05, top-k 2, budget 3, fairness)."""
import pytest

from cgjax.prototypes.validate_signals import (fair_budget_merge, ground_truth_from_dataset, normalize_name,
                                               select_per_dim, validate_signals)


def pair(x):
    return [1.0 - x, x]


SIGNALS = {
    "artist": [{"artist": {"0": pair(.8), "1": pair(.3)}}, {"artist": {"0": pair(.5), "1": pair(.55)}},
               {"artist": {"0": pair(.4), "1": pair(.45)}}],
    "style": [{"style": {"0": pair(.65), "1": pair(.7)}}, {"style": {"0": pair(.9)}}, {"style": {"1": pair(.8)}}],
    "genre": [{"genre": {"0": pair(.58), "1": pair(.1)}}, {}, {"genre": {"0": pair(.7), "1": pair(.65)}}],
}
GT = {"artist": ["a0", "a0", "a1"], "style": ["cubism", "post-impressionism", None],
      "genre": ["Landscape", None, "portrait"]}
NAMES = {"artist": ["a0", "a1"], "style": ["Post_Impressionism", "Cubism"], "genre": ["landscape", "portrait"]}


def test_report_hand_worked():
    r = validate_signals(SIGNALS, GT, NAMES)
    assert r["samples"] == 3
    a, s, g = r["artist"], r["style"], r["genre"]
    assert a["activation_rate"] == pytest.approx(2 / 3) and a["coverage_rate"] == a["activation_rate"]
    assert a["activation_pre_backoff_rate"] == pytest.approx(1 / 3)
    assert a["backoff_usage_rate"] == pytest.approx(1 / 3)
    assert a["precision_top1"] == pytest.approx(0.5) and a["false_injection_rate_known_gt"] == pytest.approx(0.5)
    assert s["activation_rate"] == 1.0 and s["precision_top1"] == 1.0  # "post-impressionism" == Post_Impressionism
    assert s["injection_when_unknown_gt"] == pytest.approx(1 / 3)
    assert g["activation_rate"] == pytest.approx(2 / 3) and g["activation_pre_backoff_rate"] == pytest.approx(1 / 3)
    assert g["backoff_usage_rate"] == pytest.approx(1 / 3) and g["precision_top1"] == pytest.approx(0.5)
    assert r["budget_hit_rate"] == pytest.approx(2 / 3)
    assert r["budget_overflow_precut_rate"] == pytest.approx(1 / 3)


def test_selection_and_merge():
    chosen, pre, backoff = select_per_dim({"0": pair(.65), "1": pair(.7), "2": pair(.9)}, topk_per_dim=2)
    assert chosen == [(2, .9), (1, .7)] and pre == 3 and not backoff
    chosen, pre, backoff = select_per_dim({"0": pair(.57)}, backoff_delta=0.0)
    assert chosen == [] and not backoff
    chosen, _, _ = select_per_dim({"0": [0.3, 0.7], "1": [0.5, 0.5]}, threshold=0.4, threshold_mode="distance")
    assert [i for i, _ in chosen] == [0]
    per = {"artist": [(0, .61)], "style": [(1, .9), (0, .8)], "genre": [(0, .85)]}
    fair = fair_budget_merge(per, 2, fairness=True, priority=["artist", "style", "genre"])
    assert fair == {"artist": [(0, .61)], "style": [(1, .9)], "genre": []}
    greedy = fair_budget_merge(per, 2, fairness=False)
    assert greedy == {"artist": [], "style": [(1, .9)], "genre": [(0, .85)]}
    assert fair_budget_merge(per, 0) == per
    assert normalize_name(" Post_Impressionism ") == normalize_name("post-impressionism") == "post impressionism"


@pytest.mark.parametrize("threshold,backoff,topk,budget,priority", [
    (0.6, 0.05, 2, 3, ("artist", "style", "genre")),  # the report's defaults
    (0.75, 0.1, 1, 2, ("genre", "artist")),
    (0.5, 0.0, 0, 0, ("artist", "style", "genre")),
    (0.7, 0.3, 3, 4, ("style",)),
])
def test_similarity_gating_equals_jax_reference(threshold, backoff, topk, budget, priority):
    """The report keeps its own statement of the gating (the original tool's, with distance mode and
    fairness off); in similarity mode with fairness it selects what cgjax's ``gating.select`` does."""
    import numpy as np

    from cgjax.concepts import gating

    dims, sizes = ("artist", "style", "genre"), (5, 3, 4)
    cfg = gating.GatingConfig(dim_ranges=gating.dim_ranges_from_sizes(sizes), threshold=threshold,
                              backoff_delta=backoff, topk_per_dim=topk, max_concepts=budget,
                              priority=tuple(dims.index(p) for p in priority))
    rng = np.random.default_rng(7)
    scores = rng.uniform(0.0, 1.0, size=(48, cfg.n_concepts)).astype(np.float32)
    scores[:6, 1] = scores[:6, 0]  # ties
    scores[6:12, 5] = np.float32(threshold)  # exact hits
    scores[12:18] = np.float32(threshold - backoff / 2)  # the back-off band
    ref = gating.select(scores, cfg)
    concept, valid = np.asarray(ref.concept), np.asarray(ref.valid)
    n_picked = 0
    for b in range(len(scores)):
        per_dim = {d: select_per_dim({str(i): pair(float(scores[b, a + i])) for i in range(e - a)},
                                     threshold, backoff, topk)[0]
                   for d, (a, e) in zip(dims, cfg.dim_ranges)}
        merged = fair_budget_merge(per_dim, budget, True, priority)
        got = [a + i for d, (a, _) in zip(dims, cfg.dim_ranges) for i, _ in merged[d]]
        assert got == concept[b][valid[b]].tolist(), b
        n_picked += len(got)
    assert n_picked > 0


def test_unknown_genre_is_a_ground_truth_class(tmp_path):
    """As the original: ``Unknown Genre`` is judged like any label (precision), not an unknown ground truth."""
    import json

    recs = [{"image": "a.jpg", "concepts": {"genre": "Unknown Genre"}},
            {"image": "b.jpg", "concepts": {"genre": "landscape"}}, {"image": "c.jpg", "concepts": {}}]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    gt = ground_truth_from_dataset(str(tmp_path / "d.json"), ["genre"])
    assert gt == {"genre": ["Unknown Genre", "landscape", None]}
    sig = {"genre": [{"genre": {"0": pair(.9)}}, {"genre": {"0": pair(.9)}}, {"genre": {"1": pair(.9)}}]}
    r = validate_signals(sig, gt, {"genre": ["Unknown_Genre", "landscape"]})["genre"]
    assert r["judged"] == 2 and r["precision_top1"] == pytest.approx(0.5)
    assert r["injection_when_unknown_gt"] == pytest.approx(1 / 3)  # only the record without a genre


def test_another_domain_gets_the_data_order_as_priority():
    """Dimensions the art priority does not name (species/habitat/season): the data's own order, and
    the same report as the art data renamed (the art priority is that same order)."""
    rename = {"artist": "species", "style": "habitat", "genre": "season"}
    sig = {rename[d]: [{rename[d]: e[d]} if d in e else {} for e in v] for d, v in SIGNALS.items()}
    r = validate_signals(sig, {rename[d]: v for d, v in GT.items()}, {rename[d]: v for d, v in NAMES.items()})
    assert r["settings"]["priority"] == ["species", "habitat", "season"]
    art = validate_signals(SIGNALS, GT, NAMES)
    assert {rename[d]: art[d] for d in rename} == {d: r[d] for d in rename.values()}
