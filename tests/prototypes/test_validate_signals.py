"""validate_signals on a hand-worked example (threshold 0.6, backoff 0.05, top-k 2, budget 3, fairness)."""
import pytest

from cgjax.prototypes.validate_signals import fair_budget_merge, normalize_name, select_per_dim, validate_signals


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
