"""Segment-weighted CE against torch's cross_entropy."""
import numpy as np
import torch
import torch.nn.functional as F

from cgjax import losses


def test_segment_weighted_loss_matches_torch():
    rng = np.random.default_rng(0)
    B, T, V = 3, 11, 17
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    labels = rng.integers(0, V, size=(B, T))
    labels[:, :4] = losses.IGNORE_INDEX  # prompt
    labels[2, 9:] = losses.IGNORE_INDEX  # padding
    seg = np.where(labels == losses.IGNORE_INDEX, 0, 1)
    seg[:, 8:] = np.where(labels[:, 8:] == losses.IGNORE_INDEX, 0, 2)
    weights = (0.0, 1.0, 0.2)

    got, per_seg = losses.segment_weighted_loss(logits, labels, seg, weights)

    ce = F.cross_entropy(
        torch.tensor(logits[:, :-1]).reshape(-1, V), torch.tensor(labels[:, 1:]).reshape(-1),
        ignore_index=-100, reduction="none",
    ).reshape(B, T - 1).numpy()
    w = np.asarray(weights)[seg[:, 1:]] * (labels[:, 1:] != -100)
    want = (w * ce).sum() / w.sum()
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    keys = (seg[:, 1:] == 1) & (labels[:, 1:] != -100)
    np.testing.assert_allclose(float(per_seg["loss_keys"]), ce[keys].mean(), rtol=1e-5)


def test_stage_a_weights_equal_plain_mean_ce():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 7, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=(2, 7))
    labels[:, :3] = -100
    seg = np.where(labels == -100, 0, 1)
    got, _ = losses.segment_weighted_loss(logits, labels, seg, (0.0, 1.0, 0.0))
    want = F.cross_entropy(torch.tensor(logits[:, :-1]).reshape(-1, 5), torch.tensor(labels[:, 1:]).reshape(-1), ignore_index=-100)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
