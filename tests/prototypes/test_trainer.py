"""The jitted all-dimension step against a PyTorch statement of the original trainer's formulas."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cgjax.prototypes.trainer import (PrototypeTrainer, TrainerConfig, epoch_batches, num_negatives)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _problem(seed=0, n_dims=3, ks=(6, 4, 1), d=16, b=8):
    rng = np.random.default_rng(seed)
    k_max = max(ks)
    p = np.zeros((n_dims, k_max, d), np.float32)
    mask = np.zeros((n_dims, k_max), bool)
    for i, k in enumerate(ks):
        p[i, :k] = _unit(rng.normal(size=(k, d)))
        mask[i, :k] = True
    f = _unit(rng.normal(size=(b, d))).astype(np.float32)
    labels = np.stack([rng.integers(-1, k, b) for k in ks], 1).astype(np.int32)
    labels[:, 1] = np.where(labels[:, 1] == 0, 7, labels[:, 1])  # out of range = unknown label
    return p, mask, f, labels


def torch_original_step(P, opt, f, labels, k_neg, cfg, neg_idx=None):
    """One step of prototype_trainer.py for one dimension (P: leaf tensor [K, D], Adam opt)."""
    K = P.shape[0]
    valid = [i for i, y in enumerate(labels) if 0 <= y < K]
    if not valid:
        return None
    k = min(max(1, k_neg), max(0, K - 1))
    if k == 0:
        return None
    fb = torch.tensor(f[valid])
    pos_idx = torch.tensor([int(labels[i]) for i in valid])
    S = fb @ P.t()
    if neg_idx is None:
        masked = S.detach().clone()
        masked[torch.arange(len(valid)), pos_idx] = float("-inf")
        neg_idx = masked.topk(k, dim=1).indices
    else:
        neg_idx = torch.tensor(neg_idx[valid][:, :k])
    pos = S[torch.arange(len(valid)), pos_idx]
    neg = S.gather(1, neg_idx)
    logits = torch.cat([pos.unsqueeze(1), neg], 1) / cfg.temperature
    loss = F.cross_entropy(logits, torch.zeros(len(valid), dtype=torch.long))
    loss = loss + cfg.lambda_margin * F.relu(cfg.margin - pos + neg.max(1).values).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        P.copy_(F.normalize(P, dim=-1))
    return float(loss.detach())


@pytest.mark.parametrize("hard,negatives_k,margin,lam", [(True, 2, 0.1, 0.5), (True, "max", 0.0, 0.0),
                                                          (False, 3, 0.3, 0.5)])
def test_step_matches_torch(hard, negatives_k, margin, lam):
    cfg = TrainerConfig(hard_negatives=hard, negatives_k=negatives_k, margin=margin, lambda_margin=lam)
    p, mask, f0, _ = _problem()
    ks = mask.sum(1)
    tr = PrototypeTrainer(cfg, ["a", "b", "c"], p, mask)
    state = tr.init_state()
    tP = [torch.tensor(p[i, :k].copy(), requires_grad=True) for i, k in enumerate(ks)]
    topt = [torch.optim.Adam([t], lr=cfg.lr) for t in tP]
    import jax.numpy as jnp
    for step in range(4):  # several steps: Adam moments and bias correction matter
        _, _, f, labels = _problem(seed=10 + step)
        if step == 2:
            labels[:, 0] = -1  # dimension a has no valid sample: skipped, state untouched
        state, terms = tr.step_fn(state, jnp.asarray(f), jnp.asarray(labels), tr.mask, jnp.asarray(tr.k))
        neg = np.asarray(terms["neg_idx"])
        for i in range(3):
            k_neg = num_negatives(negatives_k, int(ks[i]))
            ref = torch_original_step(tP[i], topt[i], f, labels[:, i], k_neg, cfg,
                                      neg_idx=None if hard else neg[i])
            assert bool(terms["active"][i]) == (ref is not None)
            if ref is not None:
                np.testing.assert_allclose(float(terms["loss"][i]), ref, rtol=1e-5, atol=1e-5)
    got = np.asarray(state["protos"])
    for i, k in enumerate(ks):
        np.testing.assert_allclose(got[i, :k], tP[i].detach().numpy(), atol=2e-6)
        assert np.all(got[i, k:] == 0)
    assert not np.allclose(got[0, :6], p[0, :6])  # it did train


def test_random_negatives_are_distinct_and_valid():
    import jax.numpy as jnp
    cfg = TrainerConfig(hard_negatives=False, negatives_k=3)
    p, mask, f, labels = _problem(ks=(6, 4, 2))
    tr = PrototypeTrainer(cfg, ["a", "b", "c"], p, mask)
    _, terms = tr.step_fn(tr.init_state(), jnp.asarray(f), jnp.asarray(labels), tr.mask, jnp.asarray(tr.k))
    neg, valid = np.asarray(terms["neg_idx"]), np.asarray(terms["neg_valid"])
    for i, k in enumerate(mask.sum(1)):
        kk = num_negatives(3, int(k))
        assert valid[i, 0].sum() == kk
        for b in range(len(f)):
            chosen = neg[i, b, :kk]
            assert len(set(chosen)) == kk and all(c < k for c in chosen)
            if 0 <= labels[b, i] < k:
                assert labels[b, i] not in chosen


def test_num_negatives_and_batches():
    assert num_negatives("max", 5) == 4 and num_negatives(16, 5) == 4 and num_negatives(0, 5) == 1
    assert num_negatives("16", 30) == 16 and num_negatives(3, 1) == 0
    with pytest.raises(ValueError, match="negatives_k"):
        num_negatives("lots", 5)
    b = epoch_batches(21, 8, seed=0, epoch=0)
    assert b.shape == (2, 8) and len(set(b.ravel())) == 16
    assert not np.array_equal(b, epoch_batches(21, 8, seed=0, epoch=1))
    assert np.array_equal(b, epoch_batches(21, 8, seed=0, epoch=0))
    full = epoch_batches(21, 8, seed=0, epoch=0, drop_last=False)
    assert full.shape == (3, 8) and (full == -1).sum() == 3


def _train_data(seed=1, n=64, d=16, ks=(5, 3)):
    rng = np.random.default_rng(seed)
    centers = [_unit(rng.normal(size=(k, d))) for k in ks]
    labels = np.stack([rng.integers(0, k, n) for k in ks], 1).astype(np.int32)
    labels[rng.random(n) < 0.1, 1] = -1
    f = sum(centers[j][np.maximum(labels[:, j], 0)] for j in range(len(ks))) + 0.5 * rng.normal(size=(n, d))
    f = _unit(f).astype(np.float32)
    p = np.zeros((len(ks), max(ks), d), np.float32)
    mask = np.zeros((len(ks), max(ks)), bool)
    for j, k in enumerate(ks):
        p[j, :k] = _unit(rng.normal(size=(k, d)))
        mask[j, :k] = True
    return f, labels, p, mask


@pytest.mark.parametrize("hard", [True, False])
def test_resume_equals_uninterrupted(tmp_path, hard):
    f, y, p, mask = _train_data()
    cfg = TrainerConfig(epochs=2, hard_negatives=hard, negatives_k=2, ema_decay=0.9)
    meta = {"idx_to_concept": {"a": list("vwxyz"), "b": list("pqr")}}
    full, hist_full = PrototypeTrainer(cfg, ["a", "b"], p, mask, meta).train(f, y, f[:16], y[:16],
                                                                            ckpt_dir=str(tmp_path / "full"))
    t1 = PrototypeTrainer(cfg, ["a", "b"], p, mask, meta)
    t1.train(f, y, ckpt_dir=str(tmp_path / "part"), epochs=1)
    t2 = PrototypeTrainer(cfg, ["a", "b"], p, mask, meta)
    resumed, hist = t2.train(f, y, f[:16], y[:16], ckpt_dir=str(tmp_path / "part"))
    assert int(resumed["epoch"]) == 2 and int(resumed["step"]) == int(full["step"]) == 16
    for key in ("protos", "ema"):
        np.testing.assert_array_equal(np.asarray(resumed[key]), np.asarray(full[key]))
    np.testing.assert_array_equal(np.asarray(resumed["opt_state"][0].mu), np.asarray(full["opt_state"][0].mu))
    assert len(hist) == 2 and hist[-1]["a"]["val_top1"] == hist_full[-1]["a"]["val_top1"]
    # a checkpoint with another concept index is refused
    t3 = PrototypeTrainer(cfg, ["a", "b"], p, mask, {"idx_to_concept": {"a": list("VWXYZ"), "b": list("pqr")}})
    with pytest.raises(ValueError, match="idx_to_concept"):
        t3.train(f, y, ckpt_dir=str(tmp_path / "part"))


def test_non_finite_epoch_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    """A NaN embedding in epoch 2 (a corrupt image's features): the run stops before saving it;
    epoch 1's checkpoint stays the latest, with finite prototypes."""
    f, y, p, mask = _train_data()
    bad = f.copy()
    bad[3] = np.nan
    cfg = TrainerConfig(epochs=2, negatives_k=2)
    tr = PrototypeTrainer(cfg, ["a", "b"], p, mask, {"idx_to_concept": {"a": list("vwxyz"), "b": list("pqr")}})
    with pytest.raises(FloatingPointError, match=r"non-finite loss.* in epoch 2.*last good checkpoint is epoch 1"):
        tr.train(lambda epoch: f if epoch == 0 else bad, y, ckpt_dir=str(tmp_path / "ck"))
    t2 = PrototypeTrainer(cfg, ["a", "b"], p, mask, {"idx_to_concept": {"a": list("vwxyz"), "b": list("pqr")}})
    state, _ = t2.restore(t2._manager(str(tmp_path / "ck")))
    assert int(state["epoch"]) == 1 and np.isfinite(np.asarray(state["protos"])).all()
