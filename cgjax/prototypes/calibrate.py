"""Signal post-processing (the original export's modes) and per-dimension temperature calibration.

``postprocess`` reproduces ``export_signals.py`` exactly: raw cosine ``s`` of one image against the
K concepts of one dimension becomes ``x`` in [0, 1], stored downstream as the pair ``[1 - x, x]``.

Beyond the original: ``fit_temperature`` fits one softmax temperature per dimension on validation
(NLL of the softmax over concepts); ``calibrate`` reports it with the top-1 ECE before and after
(``cgjax.eval.metrics.expected_calibration_error``, the one ECE).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from cgjax.eval.metrics import expected_calibration_error

MODES = ("none", "zero_one", "clamp_zero", "zscore")
ZSCORE_EPS = 1e-6


def postprocess(scores: Any, mode: str = "none", temperature: float = 1.0, clip: bool = True) -> np.ndarray:
    """Map raw cosines ``scores [..., K]`` (last axis: the concepts of one dimension) to [0, 1].

    ``none`` / ``zero_one`` / ``clamp_zero``: optionally clip to [-1, 1], map (identity,
    ``(s + 1) / 2`` or ``max(0, s)``), clip to [-1, 1] again, then if ``T != 1``
    ``x = clamp01(x) ** (1 / T)``, finally ``clamp01``. ``zscore``: over the K scores,
    ``sigmoid((s - mean) / (std + 1e-6))`` with the population std, ``** (1 / T)`` if ``T != 1``,
    ``clamp01``. Computed in float64, returned as float32 (what the original stores).
    """
    if mode not in MODES:
        raise ValueError(f"unknown normalize mode {mode!r}; expected one of {MODES}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s = np.asarray(scores, dtype=np.float64)
    inv_t = 1.0 / float(temperature)
    if mode == "zscore":
        if s.ndim == 0 or s.shape[-1] == 0:
            return s.astype(np.float32)
        mu = s.mean(axis=-1, keepdims=True)
        sd = s.std(axis=-1, keepdims=True)  # population std, as the original
        x = 1.0 / (1.0 + np.exp(-(s - mu) / (sd + ZSCORE_EPS)))
        if temperature != 1.0:
            x = x ** inv_t
        return np.clip(x, 0.0, 1.0).astype(np.float32)
    x = np.clip(s, -1.0, 1.0) if clip else s
    if mode == "zero_one":
        x = (x + 1.0) / 2.0
    elif mode == "clamp_zero":
        x = np.maximum(x, 0.0)
    x = np.clip(x, -1.0, 1.0)
    if temperature != 1.0:
        x = np.clip(x, 0.0, 1.0) ** inv_t
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def signal_pairs(scores: Any, mode: str = "none", temperature: float = 1.0, clip: bool = True) -> np.ndarray:
    """``[..., K] -> [..., K, 2]`` float32 pairs ``[1 - x, x]`` as the original stores them."""
    x = postprocess(scores, mode, temperature, clip)
    return np.stack([np.float32(1.0) - x, x], axis=-1)


# ----------------------------------------------------------------------------- calibration

def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def softmax(logits: Any, temperature: float = 1.0) -> np.ndarray:
    return np.exp(_log_softmax(np.asarray(logits, np.float64) / temperature))


def nll(logits: Any, labels: Any, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / T)``."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    if len(labels) == 0:
        return float("nan")
    lp = _log_softmax(logits / temperature)
    return float(-lp[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: Any, labels: Any, t_min: float = 1e-3, t_max: float = 1e2, iters: int = 100) -> float:
    """The temperature minimising ``nll(logits, labels, T)`` on [t_min, t_max].

    NLL is convex in ``1/T``, hence unimodal in ``log T``: a golden-section search on ``log T``
    finds the minimum without tuning. ``logits [N, K]`` are the raw cosines (masked concepts
    removed), ``labels [N]`` the true concept indices.
    """
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    if logits.ndim != 2 or len(labels) != len(logits):
        raise ValueError(f"fit_temperature needs logits [N, K] and labels [N]; got {logits.shape}, {labels.shape}")
    if len(labels) == 0:
        raise ValueError("fit_temperature: no validation samples to fit on")
    f = lambda lt: nll(logits, labels, math.exp(lt))  # noqa: E731
    a, b = math.log(t_min), math.log(t_max)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return float(math.exp((a + b) / 2))


def _top1_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    """Top-1 ECE of ``probs [N, K]``: confidence = the top probability, correct = its argmax is the label."""
    return expected_calibration_error(probs.max(axis=-1), probs.argmax(axis=-1) == labels, n_bins)


def calibrate(
    scores: Mapping[str, np.ndarray],
    labels: Mapping[str, np.ndarray],
    reference_temperature: float = 0.07,
    n_bins: int = 15,
) -> dict[str, dict[str, float]]:
    """Per dimension: fit T on ``(scores[dim] [N, K], labels[dim] [N])``; labels < 0 are ignored.

    Returns ``{dim: {"temperature", "nll_before", "nll_after", "ece_before", "ece_after", "n"}}``,
    "before" being the softmax at ``reference_temperature`` (the training temperature).
    """
    out: dict[str, dict[str, float]] = {}
    for dim, s in scores.items():
        y = np.asarray(labels[dim])
        keep = y >= 0
        s, y = np.asarray(s)[keep], y[keep]
        if len(y) == 0 or s.shape[-1] < 2:
            out[dim] = {"temperature": float(reference_temperature), "n": int(len(y)),
                        "nll_before": float("nan"), "nll_after": float("nan"),
                        "ece_before": float("nan"), "ece_after": float("nan")}
            continue
        t = fit_temperature(s, y)
        out[dim] = {
            "temperature": t,
            "n": int(len(y)),
            "nll_before": nll(s, y, reference_temperature),
            "nll_after": nll(s, y, t),
            "ece_before": _top1_ece(softmax(s, reference_temperature), y, n_bins),
            "ece_after": _top1_ece(softmax(s, t), y, n_bins),
        }
    return out
