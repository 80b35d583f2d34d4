"""Signal post-processing against a literal numpy statement of the original export, and calibration."""
import math

import numpy as np
import pytest

from cgjax.prototypes.calibrate import calibrate, fit_temperature, nll, postprocess, signal_pairs, softmax


def original_postprocess(vec, mode, temperature, clip):
    """export_signals.py, one image and dimension, element by element (numpy)."""
    vec = np.asarray(vec, np.float64)
    if mode == "zscore":
        mu = vec.mean()
        sd = np.sqrt(((vec - mu) ** 2).mean())
        out = []
        for s in vec:
            x = 1.0 / (1.0 + math.exp(-(s - mu) / (sd + 1e-6)))
            if temperature != 1.0:
                x = x ** (1.0 / temperature)
            out.append(min(1.0, max(0.0, x)))
        return np.array(out)
    out = []
    for s in vec:
        x = min(1.0, max(-1.0, s)) if clip else s
        if mode == "zero_one":
            x = (x + 1.0) / 2.0
        elif mode == "clamp_zero":
            x = max(0.0, x)
        x = min(1.0, max(-1.0, x))
        if temperature != 1.0:
            x = min(1.0, max(0.0, x)) ** (1.0 / temperature)
        out.append(min(1.0, max(0.0, x)))
    return np.array(out)


@pytest.mark.parametrize("mode", ["none", "zero_one", "clamp_zero", "zscore"])
@pytest.mark.parametrize("temperature", [1.0, 0.8, 2.0])
@pytest.mark.parametrize("clip", [True, False])
def test_modes_match_original(mode, temperature, clip):
    rng = np.random.default_rng(0)
    scores = rng.uniform(-1.3, 1.3, size=(7, 5))  # out-of-range values exercise the clipping
    scores[0] = 0.25  # constant row: zscore -> 0.5
    got = postprocess(scores, mode, temperature, clip)
    assert got.dtype == np.float32
    ref = np.stack([original_postprocess(r, mode, temperature, clip) for r in scores])
    np.testing.assert_allclose(got, ref, atol=1e-6)
    pairs = signal_pairs(scores, mode, temperature, clip)
    np.testing.assert_allclose(pairs[..., 0], np.float32(1) - got, atol=0)
    np.testing.assert_array_equal(pairs[..., 1], got)


def test_mode_specifics():
    assert postprocess([-0.5], "none")[0] == 0.0  # negative cosines become 0 with "none"
    assert postprocess([0.3, 0.3, 0.3], "zscore")[0] == pytest.approx(0.5)
    assert postprocess([0.0], "zero_one")[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="normalize mode"):
        postprocess([0.1], "softmax")
    with pytest.raises(ValueError, match="temperature"):
        postprocess([0.1], "none", 0.0)


def test_calibration_lowers_nll_on_miscalibrated_scores():
    rng = np.random.default_rng(0)
    n, k = 600, 6
    y = rng.integers(0, k, n)
    # z = 2 * onehot + N(0, 1): the Bayes posterior is softmax(2 z). Cosines cos = z / 2 make the
    # true temperature 0.25, so the softmax at the training temperature 0.07 is far too confident.
    z = 2.0 * np.eye(k)[y] + rng.normal(size=(n, k))
    cos = z / 2.0
    val, test = slice(0, 300), slice(300, None)
    cal = calibrate({"a": cos[val]}, {"a": y[val]}, reference_temperature=0.07)["a"]
    t = cal["temperature"]
    assert abs(t - 0.25) < 0.05  # recovers the scale
    assert cal["nll_after"] < cal["nll_before"] - 0.2
    assert cal["ece_after"] < cal["ece_before"]
    # held-out: the fitted temperature generalises
    assert nll(cos[test], y[test], t) < nll(cos[test], y[test], 0.07)
    # it is the minimiser (golden section): neighbours are no better
    for f in (0.9, 1.1):
        assert nll(cos[val], y[val], t) <= nll(cos[val], y[val], t * f) + 1e-9
    # labels < 0 are ignored
    y2 = y.copy()
    y2[:10] = -1
    assert calibrate({"a": cos[val]}, {"a": y2[val]})["a"]["n"] == 290


def test_ece_and_softmax():
    # softmax at T=1 of [log 9, 0] is [0.9, 0.1], of [log 1.5, 0] is [0.6, 0.4]
    scores = np.log([[9.0, 1.0], [9.0, 1.0], [1.5, 1.0], [1.5, 1.0]])
    labels = np.array([0, 1, 0, 0])
    # top-1 bins of 10: 0.9 (acc .5, conf .9) and 0.6 (acc 1, conf .6), two items each
    cal = calibrate({"a": scores}, {"a": labels}, reference_temperature=1.0, n_bins=10)["a"]
    assert cal["ece_before"] == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    np.testing.assert_allclose(softmax([[0.0, math.log(3.0)]]), [[0.25, 0.75]])
    with pytest.raises(ValueError, match="no validation"):
        fit_temperature(np.zeros((0, 3)), np.zeros(0))
