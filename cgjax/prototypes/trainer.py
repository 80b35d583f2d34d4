"""Prototype training: every dimension in ONE jitted step (concepts padded to K_max and masked).

The original (``prototype_trainer.py``) trains one dimension's prototype matrix ``P [K, D]`` at
a time with CLIP frozen: ``S = f @ P^T``; negatives are other prototypes (the top-k highest, or
k random ones, ``k = min(max(1, negatives_k), K - 1)``); the loss is the cross-entropy over
``[pos, negs] / T`` with target 0 plus ``lambda * mean(relu(margin - pos + max(negs)))``; Adam,
then ``P <- L2normalise(P)``. Samples whose label is missing or unknown are dropped, and a batch
with no sample left is skipped.

Here the D-dimensional prototypes of all dimensions live in one array ``P [n_dims, K_max, D]``
with a concept mask. The loss is the SUM over dimensions of each dimension's batch-mean loss, so
each dimension's gradient is exactly the original's. Adam runs per dimension (``vmap`` over the
leading axis, so each dimension has its own step count), and a dimension with no valid sample in
the batch keeps its prototypes AND its optimizer state, as the original's skipped batch does.
Embeddings are computed once and cached by the caller (CLIP is frozen); ``embeddings`` may also be
a callable ``epoch -> [N, D]`` for augmented, uncached training.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cgjax import checkpoints, failpoints

log = logging.getLogger(__name__)

NEG = -1e9  # finite "minus infinity" for masked logits (keeps gradients finite)
RNG_IMPL = "rbg"  # random negatives; deterministic per (seed, step) on a given backend


@dataclasses.dataclass
class TrainerConfig:
    """Defaults of the original CLI (``train_prototypes.py``), plus cgjax's additions."""

    batch_size: int = 8
    lr: float = 5e-3
    epochs: int = 3
    temperature: float = 0.07
    negatives_k: int | str = 16  # an int, or "max" (= K - 1)
    hard_negatives: bool = True
    margin: float = 0.1
    lambda_margin: float = 0.5
    drop_last: bool = True
    ema_decay: float = 0.99  # 0 disables the EMA (it then equals P)
    seed: int = 0
    log_interval: int = 50
    debug_log: bool = False  # the original's per-step line every log_interval steps
    max_to_keep: int | None = 3


def num_negatives(negatives_k: int | str, n_concepts: int) -> int:
    """``k`` of the original: ``"max"`` -> ``K - 1``; else ``min(max(1, k), K - 1)``; 0 if K <= 1."""
    if isinstance(negatives_k, str):
        if negatives_k.strip().lower() == "max":
            return max(0, n_concepts - 1)
        try:
            negatives_k = int(negatives_k)
        except ValueError as e:
            raise ValueError(f"negatives_k must be an integer or 'max', got {negatives_k!r}") from e
    return min(max(1, int(negatives_k)), max(0, n_concepts - 1))


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``torch.nn.functional.normalize``: ``x / max(||x||, eps)`` (zero rows stay zero)."""
    n = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(n, eps)


# ----------------------------------------------------------------------------- loss

def select_negatives(
    scores: jax.Array, pos: jax.Array, concept_mask: jax.Array, k: jax.Array, k_max: int,
    hard: bool, key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Negative prototype indices ``[n, B, k_max]`` and their validity (``j < k[dim]``).

    ``scores [n, B, K]``, ``pos [n, B]`` (clipped to a valid index), ``concept_mask [n, K]``,
    ``k [n]``. Hard: the top-k scores with the positive and padded concepts excluded. Random: k
    distinct non-positive concepts drawn uniformly (top-k of uniform keys).
    """
    n, b, kk = scores.shape
    allowed = concept_mask[:, None, :] & (jnp.arange(kk)[None, None, :] != pos[..., None])
    if hard:
        ranking = jax.lax.stop_gradient(scores)
    else:
        ranking = jax.random.uniform(key, (n, b, kk))
    ranking = jnp.where(allowed, ranking, -jnp.inf)
    _, idx = jax.lax.top_k(ranking, k_max)
    valid = jnp.arange(k_max)[None, None, :] < k[:, None, None]
    return idx, valid


def prototype_loss(
    protos: jax.Array, feats: jax.Array, labels: jax.Array, concept_mask: jax.Array, k: jax.Array,
    neg_idx: jax.Array, neg_valid: jax.Array, temperature: float, margin: float, lambda_margin: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sum over dimensions of the original's per-dimension batch loss.

    ``protos [n, K, D]``, ``feats [B, D]`` (L2-normalised), ``labels [B, n]`` (-1 = dropped),
    ``neg_idx / neg_valid [n, B, k_max]``. Returns the total and per-dimension terms.
    """
    labels_t = labels.T  # [n, B]
    n_concepts = concept_mask.sum(-1)  # [n]
    valid = (labels_t >= 0) & (labels_t < n_concepts[:, None])
    pos_idx = jnp.where(valid, labels_t, 0)
    s = jnp.einsum("bd,nkd->nbk", feats, protos, precision=jax.lax.Precision.HIGHEST)
    pos = jnp.take_along_axis(s, pos_idx[..., None], axis=-1)[..., 0]  # [n, B]
    neg = jnp.take_along_axis(s, neg_idx, axis=-1)
    neg = jnp.where(neg_valid, neg, NEG)  # [n, B, k_max]
    logits = jnp.concatenate([pos[..., None], neg], axis=-1) / temperature
    ce = jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]
    mloss = jax.nn.relu(margin - pos + neg.max(-1))
    per_sample = ce + lambda_margin * mloss
    count = valid.sum(-1)
    active = (count > 0) & (k > 0)
    w = valid.astype(jnp.float32)
    denom = jnp.maximum(count, 1).astype(jnp.float32)
    per_dim = jnp.where(active, (per_sample * w).sum(-1) / denom, 0.0)
    terms = {
        "loss": per_dim,
        "ce": jnp.where(active, (ce * w).sum(-1) / denom, 0.0),
        "margin_loss": jnp.where(active, (mloss * w).sum(-1) / denom, 0.0),
        "pos_sim": jnp.where(active, (pos * w).sum(-1) / denom, 0.0),
        "max_neg_sim": jnp.where(active, (neg.max(-1) * w).sum(-1) / denom, 0.0),
        "active": active,
    }
    return per_dim.sum(), terms


# ----------------------------------------------------------------------------- state and step

def make_optimizer(lr: float) -> optax.GradientTransformation:
    """torch.optim.Adam defaults: betas (0.9, 0.999), eps 1e-8, no weight decay."""
    return optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)


def init_state(protos: np.ndarray | jax.Array, tx: optax.GradientTransformation, seed: int) -> dict[str, Any]:
    """Train state: prototypes, per-dimension Adam state, EMA, counters and the RNG key."""
    p = jnp.asarray(protos, jnp.float32)
    return {
        "protos": p,
        "opt_state": jax.vmap(tx.init)(p),
        "ema": p,
        "step": jnp.zeros((), jnp.int32),
        "epoch": jnp.zeros((), jnp.int32),
        # raw key data of an "rbg" key: compiles in ~1 s on CPU where threefry takes several
        "rng": jax.random.key_data(jax.random.key(seed, impl=RNG_IMPL)),
    }


def _select_dims(active: jax.Array, new: Any, old: Any) -> Any:
    def pick(a, b):
        m = active.reshape(active.shape + (1,) * (a.ndim - 1))
        return jnp.where(m, a, b)
    return jax.tree.map(pick, new, old)


def make_step(cfg: TrainerConfig, tx: optax.GradientTransformation, k_max: int) -> Callable:
    """``step(state, feats [B, D], labels [B, n], concept_mask [n, K], k [n]) -> (state, metrics)``."""

    def step(state, feats, labels, concept_mask, k):
        protos = state["protos"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"], impl=RNG_IMPL), state["step"])
        labels_t = labels.T
        pos = jnp.clip(labels_t, 0, protos.shape[1] - 1)
        if k_max > 0:
            scores = jnp.einsum("bd,nkd->nbk", feats, protos, precision=jax.lax.Precision.HIGHEST)
            neg_idx, neg_valid = select_negatives(scores, pos, concept_mask, k, k_max, cfg.hard_negatives, key)
        else:
            shape = labels_t.shape + (1,)
            neg_idx, neg_valid = jnp.zeros(shape, jnp.int32), jnp.zeros(shape, bool)
        grad_fn = jax.grad(prototype_loss, has_aux=True)
        grads, terms = grad_fn(protos, feats, labels, concept_mask, k, neg_idx, neg_valid,
                               cfg.temperature, cfg.margin, cfg.lambda_margin)
        updates, opt_state = jax.vmap(tx.update)(grads, state["opt_state"], protos)
        new_protos = l2_normalize(optax.apply_updates(protos, updates))
        active = terms["active"]
        new_protos = _select_dims(active, new_protos, protos)
        opt_state = _select_dims(active, opt_state, state["opt_state"])
        d = cfg.ema_decay
        ema = _select_dims(active, d * state["ema"] + (1.0 - d) * new_protos, state["ema"])
        new_state = dict(state, protos=new_protos, opt_state=opt_state, ema=ema, step=state["step"] + 1)
        return new_state, dict(terms, neg_idx=neg_idx, neg_valid=neg_valid)

    return step


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, drop_last: bool = True) -> np.ndarray:
    """Shuffled sample indices ``[steps, batch]`` for one epoch, a pure function of (seed, epoch).

    With ``drop_last=False`` the last partial batch is padded with -1 (masked samples).
    """
    perm = np.random.default_rng([int(seed), int(epoch)]).permutation(n)
    steps = n // batch_size if drop_last else -(-n // batch_size)
    out = np.full((steps * batch_size,), -1, np.int64)
    m = min(n, steps * batch_size)
    out[:m] = perm[:m]
    return out.reshape(steps, batch_size)


def accuracy(protos: jax.Array, feats: jax.Array, labels: jax.Array, concept_mask: jax.Array,
             ks: Sequence[int] = (1, 3)) -> dict[str, jax.Array]:
    """Per-dimension top-k accuracy of ``argmax cos`` on ``feats [N, D]`` (labels -1 ignored)."""
    s = jnp.einsum("bd,nkd->nbk", feats, protos, precision=jax.lax.Precision.HIGHEST)
    s = jnp.where(concept_mask[:, None, :], s, -jnp.inf)
    labels_t = labels.T
    valid = (labels_t >= 0) & (labels_t < concept_mask.sum(-1)[:, None])
    pos = jnp.take_along_axis(s, jnp.clip(labels_t, 0, s.shape[-1] - 1)[..., None], -1)
    rank = (s > pos).sum(-1)  # concepts strictly better than the true one
    n = jnp.maximum(valid.sum(-1), 1)
    out = {f"top{k}": ((rank < k) & valid).sum(-1) / n for k in ks}
    out["n"] = valid.sum(-1)
    return out


def make_epoch(step: Callable) -> Callable:
    """``run(state, feats [N, D], labels [N, n], batch_idx [steps, B], concept_mask, k)``: the
    epoch as a ``lax.scan`` of ``step`` (index -1 = a padded, masked sample)."""
    def run(state, feats, labels, batch_idx, concept_mask, k):
        def body(st, idx):
            ok = idx >= 0
            f = jnp.where(ok[:, None], feats[jnp.maximum(idx, 0)], 0.0)
            y = jnp.where(ok[:, None], labels[jnp.maximum(idx, 0)], -1)
            st, terms = step(st, f, y, concept_mask, k)
            return st, {k2: v for k2, v in terms.items() if not k2.startswith("neg_")}
        return jax.lax.scan(body, state, batch_idx)
    return run


_STEP_FIELDS = ("lr", "temperature", "hard_negatives", "margin", "lambda_margin", "ema_decay")


def _step_key(cfg: TrainerConfig) -> tuple:
    return tuple((f, getattr(cfg, f)) for f in _STEP_FIELDS)


@functools.lru_cache(maxsize=32)
def _compiled(step_key: tuple, k_max: int) -> tuple[Callable, Callable]:
    """Jitted (step, epoch) per step-relevant config: trainers with equal settings share compilations."""
    cfg = TrainerConfig(**dict(step_key))
    step = make_step(cfg, make_optimizer(cfg.lr), k_max)
    return jax.jit(step), jax.jit(make_epoch(step))


_accuracy_jit = jax.jit(accuracy)


# ----------------------------------------------------------------------------- trainer

class PrototypeTrainer:
    """Trains padded prototypes ``[n_dims, K_max, D]`` with one jitted step for all dimensions.

    ``train`` runs the epochs (each epoch a ``lax.scan`` of the jitted step over its batches),
    logs per-dimension loss and validation top-1/top-3 (of the prototypes and of their EMA),
    writes an orbax checkpoint per epoch and resumes from the latest one.
    """

    def __init__(self, cfg: TrainerConfig, dimensions: Sequence[str], protos: np.ndarray,
                 concept_mask: np.ndarray, metadata: Mapping[str, Any] | None = None):
        self.cfg = cfg
        self.dimensions = list(dimensions)
        protos = np.asarray(protos, np.float32)
        concept_mask = np.asarray(concept_mask, bool)
        if protos.ndim != 3 or protos.shape[0] != len(self.dimensions) or concept_mask.shape != protos.shape[:2]:
            raise ValueError(f"protos {protos.shape} / concept_mask {concept_mask.shape} do not match "
                             f"{len(self.dimensions)} dimensions")
        self.protos0 = protos
        self.mask = jnp.asarray(concept_mask)
        self.n_concepts = concept_mask.sum(-1)
        self.k = np.array([num_negatives(cfg.negatives_k, int(n)) for n in self.n_concepts], np.int32)
        self.k_max = int(self.k.max()) if len(self.k) else 0
        self.metadata = dict(metadata or {})
        self.tx = make_optimizer(cfg.lr)
        self.step_fn, self._epoch_fn = _compiled(_step_key(cfg), self.k_max)
        self._acc_fn = _accuracy_jit

    def init_state(self) -> dict[str, Any]:
        return init_state(self.protos0, self.tx, self.cfg.seed)

    # -- checkpoints
    def _manager(self, ckpt_dir: str):
        return checkpoints.plain_manager(ckpt_dir, keep=self.cfg.max_to_keep)

    def _meta(self, epoch: int) -> dict[str, Any]:
        return {**self.metadata, "dimensions": self.dimensions,
                "n_concepts": [int(x) for x in self.n_concepts], "epoch": int(epoch),
                "trainer": {k: v for k, v in dataclasses.asdict(self.cfg).items()}}

    def save(self, mngr, state: dict[str, Any], epoch: int) -> None:
        checkpoints.save_step(mngr, epoch, jax.device_get(state), self._meta(epoch))
        mngr.wait_until_finished()

    def restore(self, mngr, epoch: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        epoch = mngr.latest_step() if epoch is None else epoch
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), jax.device_get(self.init_state()))
        state, meta = checkpoints.restore_step(mngr, epoch, abstract)
        meta = dict(meta)
        if meta.get("dimensions") != self.dimensions or meta.get("n_concepts") != [int(x) for x in self.n_concepts]:
            raise ValueError(f"checkpoint {mngr.directory} step {epoch} holds dimensions {meta.get('dimensions')} "
                             f"with {meta.get('n_concepts')} concepts; this run has {self.dimensions} with "
                             f"{[int(x) for x in self.n_concepts]}")
        for key in ("concept_to_idx", "idx_to_concept"):
            if key in self.metadata and key in meta and meta[key] != self.metadata[key]:
                raise ValueError(f"checkpoint {mngr.directory} step {epoch}: its {key} differs from this run's")
        return jax.tree.map(jnp.asarray, state), meta

    # -- loop
    def evaluate(self, state: dict[str, Any], feats: Any, labels: Any) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        if feats is None or len(feats) == 0:
            return out
        f, y = jnp.asarray(feats, jnp.float32), jnp.asarray(labels, jnp.int32)
        for name, p in (("", state["protos"]), ("ema_", l2_normalize(state["ema"]))):
            acc = jax.device_get(self._acc_fn(p, f, y, self.mask))
            for i, d in enumerate(self.dimensions):
                row = out.setdefault(d, {"n": int(acc["n"][i])})
                row[f"{name}top1"] = float(acc["top1"][i])
                row[f"{name}top3"] = float(acc["top3"][i])
        return out

    def _debug_lines(self, epoch: int, terms: Mapping[str, np.ndarray], log_fn: Callable[[str], None]) -> None:
        for s in range(0, len(terms["loss"]), max(1, self.cfg.log_interval)):
            for i, d in enumerate(self.dimensions):
                if terms["active"][s, i]:
                    log_fn(f"[{d} epoch {epoch} step {s}] pos_sim={terms['pos_sim'][s, i]:.4f} "
                           f"max_neg_sim={terms['max_neg_sim'][s, i]:.4f} "
                           f"margin={terms['margin_loss'][s, i]:.4f} loss={terms['loss'][s, i]:.4f}")

    def train(
        self,
        embeddings: np.ndarray | Callable[[int], np.ndarray],
        labels: np.ndarray,
        val_embeddings: np.ndarray | None = None,
        val_labels: np.ndarray | None = None,
        ckpt_dir: str | None = None,
        resume: bool = True,
        epochs: int | None = None,
        log_fn: Callable[[str], None] | None = None,
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Train to ``epochs`` (default ``cfg.epochs``) epochs in total; returns (state, history).

        ``labels [N, n_dims]`` int, -1 for a missing/unknown label. With ``ckpt_dir`` an orbax
        checkpoint is written after every epoch and, with ``resume``, training continues from
        the latest one: the shuffling and the random negatives are pure functions of (seed,
        epoch, step), so 2 epochs equal 1 epoch + resume + 1 epoch.
        """
        cfg = self.cfg
        epochs = cfg.epochs if epochs is None else epochs
        log_fn = log_fn or log.info
        labels = np.asarray(labels, np.int32)
        if labels.ndim != 2 or labels.shape[1] != len(self.dimensions):
            raise ValueError(f"labels must be [N, {len(self.dimensions)}], got {labels.shape}")
        mngr = self._manager(ckpt_dir) if ckpt_dir else None
        state = self.init_state()
        history: list[dict[str, Any]] = []
        if mngr is not None and not resume and mngr.latest_step() is not None:
            raise ValueError(f"{ckpt_dir} already holds checkpoints (epochs {list(mngr.all_steps())}): "
                             f"resume from them or use another directory")
        if mngr is not None and resume and mngr.latest_step() is not None:
            state, meta = self.restore(mngr)
            history = list(meta.get("history", []))
            log_fn(f"resumed from {ckpt_dir} at epoch {int(state['epoch'])}")
        y = jnp.asarray(labels)
        k = jnp.asarray(self.k)
        cached = None if callable(embeddings) else jnp.asarray(embeddings, jnp.float32)
        for epoch in range(int(state["epoch"]), epochs):
            feats = cached if cached is not None else jnp.asarray(embeddings(epoch), jnp.float32)
            if feats.shape[0] != labels.shape[0]:
                raise ValueError(f"{feats.shape[0]} embeddings for {labels.shape[0]} labels")
            batches = epoch_batches(labels.shape[0], cfg.batch_size, cfg.seed, epoch, cfg.drop_last)
            if len(batches):
                new_state, terms = self._epoch_fn(state, feats, y, jnp.asarray(batches, jnp.int32), self.mask, k)
                terms = jax.device_get(terms)
                bad = [name for name in ("loss",) if not np.isfinite(terms[name][terms["active"]]).all()]
                bad += [name for name in ("protos", "ema") if not np.isfinite(np.asarray(new_state[name])).all()]
                if bad:  # the same guard as the concept stages: nothing non-finite is kept or saved
                    last = mngr.latest_step() if mngr is not None else None
                    if mngr is not None:
                        mngr.close()
                    raise FloatingPointError(f"prototype training: non-finite {', '.join(bad)} in epoch {epoch + 1}; "
                                             f"stopped. The last good checkpoint is epoch {last} in {ckpt_dir}")
                state = new_state
            else:
                terms = None
            state = dict(state, epoch=jnp.asarray(epoch + 1, jnp.int32))
            if cfg.debug_log and terms is not None:
                self._debug_lines(epoch, terms, log_fn)
            rec: dict[str, Any] = {"epoch": epoch + 1, "steps": int(len(batches))}
            for i, d in enumerate(self.dimensions):
                row: dict[str, Any] = {}
                if terms is not None:
                    act = terms["active"][:, i]
                    row["steps"] = int(act.sum())
                    for name in ("loss", "ce", "margin_loss", "pos_sim", "max_neg_sim"):
                        row[name] = float(terms[name][act, i].mean()) if act.any() else float("nan")
                rec[d] = row
            for d, acc in self.evaluate(state, val_embeddings, val_labels).items():
                rec[d].update({f"val_{k2}": v for k2, v in acc.items()})
            history.append(rec)
            log_fn(json.dumps(rec))
            failpoints.hit("prototype_epoch")  # the fault tests' kill -9 point: computed, not saved
            if mngr is not None:
                self.metadata["history"] = history
                self.save(mngr, state, epoch + 1)
        if mngr is not None:
            mngr.close()
        return state, history
