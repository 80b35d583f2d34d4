"""The optimizer and a stage's length (cgjax.steps): the original's per-micro-batch clipping against
a NumPy re-implementation of its PyTorch loop, Stage A's AdamW moments carried into Stage B, and
``num_epochs`` / ``num_steps`` resolved to steps."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cgjax import checkpoints, steps
from cgjax.config import load_config, override

B1, B2, EPS, LR, WD = 0.9, 0.999, 1e-8, 0.1, 1e-4


def _data(seed=0, n_micro=6, rows=5):
    rng = np.random.default_rng(seed)
    params = {"b": rng.normal(size=3).astype(np.float32), "w": rng.normal(size=(4, 3)).astype(np.float32)}
    batches = [(rng.normal(size=(rows, 4)).astype(np.float32), rng.integers(0, 3, size=rows)) for _ in range(n_micro)]
    return params, batches


def _np_grad(p, x, y):
    """Gradient of the mean softmax cross-entropy of ``x @ w + b``, by hand."""
    z = x @ p["w"] + p["b"]
    e = np.exp(z - z.max(axis=1, keepdims=True))
    d = e / e.sum(axis=1, keepdims=True)
    d[np.arange(len(y)), y] -= 1.0
    d /= len(y)
    return {"b": d.sum(axis=0), "w": x.T @ d}


def _np_adamw(p, m, v, t, g):
    """torch.optim.AdamW.step (decoupled decay, bias corrections)."""
    out_p, out_m, out_v = {}, {}, {}
    for k in p:
        out_m[k] = B1 * m[k] + (1 - B1) * g[k]
        out_v[k] = B2 * v[k] + (1 - B2) * g[k] ** 2
        denom = np.sqrt(out_v[k]) / np.sqrt(1 - B2 ** t) + EPS
        out_p[k] = p[k] * (1 - LR * WD) - LR / (1 - B1 ** t) * out_m[k] / denom
    return out_p, out_m, out_v


def _norm(tree):
    return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in tree.values())))


def _original_loop(params, batches, accum, max_norm):
    """The original trainer: backward adds to .grad, clip_grad_norm_ after every backward, step +
    zero_grad every ``accum`` micro-batches. Returns the parameters and how often the clip bit."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    acc = {k: np.zeros_like(x) for k, x in p.items()}
    t, clipped = 0, 0
    for i, (x, y) in enumerate(batches):
        g = _np_grad(p, x, y)
        acc = {k: acc[k] + g[k] for k in acc}
        norm = _norm(acc)
        coef = min(1.0, max_norm / (norm + 1e-6))
        clipped += coef < 1.0
        acc = {k: a * coef for k, a in acc.items()}
        if (i + 1) % accum == 0:
            t += 1
            p, m, v = _np_adamw(p, m, v, t, acc)
            acc = {k: np.zeros_like(a) for k, a in acc.items()}
    return p, clipped


def _cgjax_loop(params, batches, sc):
    tx = steps.make_optimizer(sc)

    def loss(p, x, y):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y))

    @jax.jit
    def step(p, s, x, y):
        u, s = tx.update(jax.grad(loss)(p, x, y), s, p)
        return optax.apply_updates(p, u), s

    p = {k: jnp.asarray(v) for k, v in params.items()}
    s = tx.init(p)
    for x, y in batches:
        p, s = step(p, s, x, y)
    return p, s


def test_original_micro_clipping_follows_the_original_loop():
    """accumulation 2, three updates: clip_mode original_micro gives the original's parameters; the
    default (one clip of the averaged gradient per update) does not."""
    params, batches = _data()
    max_norm = 1.0
    want, clipped = _original_loop(params, batches, 2, max_norm)
    assert 0 < clipped < len(batches)  # the clip bit on some running sums, not all
    sc = steps.StepConfig(lr=LR, weight_decay=WD, clip_norm=max_norm, b1=B1, b2=B2, eps=EPS, grad_accum=2,
                          clip_mode="original_micro")
    got, state = _cgjax_loop(params, batches, sc)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-5, atol=1e-6)
        assert not np.allclose(want[k], params[k], atol=1e-3)  # three updates moved every parameter
    assert int(state.mini_step) == 0 and all(not np.asarray(a).any() for a in jax.tree.leaves(state.acc_grads))
    default, _ = _cgjax_loop(params, batches, steps.StepConfig(**{**sc.__dict__, "clip_mode": "update"}))
    assert not np.allclose(np.asarray(default["w"]), want["w"], rtol=1e-3, atol=1e-4)


def test_clip_mode_comes_from_the_config():
    c = override(load_config("stageA.py:preset=demo"), **{"optim.clip_mode": "original_micro"})
    sc = steps.StepConfig.from_config(c)
    assert sc.clip_mode == "original_micro"
    assert isinstance(steps.make_optimizer(sc).init({"x": jnp.zeros(2)}), steps.AccumulateState)
    with pytest.raises(ValueError, match="unknown clip_mode 'per_step'"):
        steps.make_optimizer(steps.StepConfig(clip_mode="per_step"))


def _nodes(tree, kind):
    return [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, kind)) if isinstance(x, kind)]


def test_carry_adam_takes_the_moments_and_restarts_the_rest():
    """Stage A's AdamW moments and count go to Stage B; a half-done accumulation and the schedule's
    count do not."""
    sc = steps.StepConfig(lr=LR, grad_accum=2, schedule="warmup_cosine", warmup_updates=1, decay_updates=4)
    params, batches = _data()
    _, stage_a = _cgjax_loop(params, batches[:5], sc)  # 2 updates + 1 micro-batch accumulated
    fresh = steps.make_optimizer(sc).init({k: jnp.asarray(v) for k, v in params.items()})
    got = steps.carry_adam(stage_a, fresh)
    (adam_a,), (adam,) = _nodes(stage_a, optax.ScaleByAdamState), _nodes(got, optax.ScaleByAdamState)
    assert int(adam.count) == int(adam_a.count) == 2
    for k in params:
        np.testing.assert_array_equal(np.asarray(adam.mu[k]), np.asarray(adam_a.mu[k]))
        np.testing.assert_array_equal(np.asarray(adam.nu[k]), np.asarray(adam_a.nu[k]))
        assert np.asarray(adam.mu[k]).any() and not np.asarray(got.acc_grads[k]).any()
        assert np.asarray(stage_a.acc_grads[k]).any()
    assert int(got.mini_step) == 0 and int(stage_a.mini_step) == 1
    (sched_a,), (sched,) = _nodes(stage_a, optax.ScaleByScheduleState), _nodes(got, optax.ScaleByScheduleState)
    assert int(sched.count) == 0 and int(sched_a.count) == 2


def test_tree_differences_name_the_arrays():
    a = {"opt_state": {"mu": np.zeros((2, 3)), "count": np.zeros(())}}
    assert checkpoints.tree_differences(a, a) == []
    b = {"opt_state": {"mu": np.zeros((2, 4)), "nu": np.zeros(())}}
    assert checkpoints.tree_differences(a, b) == ["opt_state.count: saved only", "opt_state.nu: this run only",
                                                  "opt_state.mu: shape (2, 3) saved, (2, 4) here"]


def test_stage_length_in_epochs_or_steps():
    def c(**over):
        return override(load_config("stageA.py:preset=llava-1.5-7b"), **over)

    assert (c().num_epochs, c().num_steps) == (100, 0)  # the original's 100 epochs per stage
    # the original's set: 175 images at batch 4 = 44 batches an epoch, an update every 4: 11
    got = steps.stage_length(c(), 175)
    assert (got.steps, got.updates) == (100 * 44, 100 * 11)
    assert "100 epochs (config.num_epochs) of 175 training examples" in got.describe()
    # 10 images at batch 4: 3 batches an epoch; 2 epochs = 6 batches, rounded up to whole updates
    assert steps.stage_length(c(num_epochs=2), 10).steps == 8
    sc = steps.StepConfig.from_config(c(**{"optim.schedule": "warmup_cosine"}), num_steps=got.steps)
    assert sc.decay_updates == 1100
    with pytest.raises(ValueError, match="needs the training set size"):
        steps.stage_length(c())
    with pytest.raises(ValueError, match="needs the training set size"):  # a cosine schedule, length unknown
        steps.StepConfig.from_config(c(**{"optim.schedule": "warmup_cosine"}))
    assert steps.StepConfig.from_config(c()).decay_updates == 0  # the constant schedule has no length
    d = load_config("stageA.py:preset=demo")
    assert (d.num_epochs, d.num_steps) == (0, 64) and steps.stage_length(d, 1000).steps == 64
    with pytest.raises(ValueError, match=r"num_steps=64 and config.num_epochs=3 are both set.*--config.num_epochs=0"):
        steps.stage_length(override(d, num_epochs=3), 1000)
    with pytest.raises(ValueError, match="both 0"):
        steps.check_stage_length(override(load_config("stageA.py:preset=demo"), num_steps=0))
