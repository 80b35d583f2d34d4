"""The compiled steps of a training stage, and their settings.

:class:`StepConfig` (``StepConfig.from_config``) holds the static settings; :func:`train_step`
(``jax.jit``, donating the train state ``{"params", "opt_state", "step", "rng"}``) and
:func:`eval_step` are plain functions over ``nnx.split`` state (the graphdef static). The trainer
(:mod:`cgjax.train`), the planner (:mod:`cgjax.plan`) and the benchmarks compile these same
functions.

Two exact shortcuts: with ``prefix_len`` (only the concept values train) the prefix before the
concept slots is encoded into a KV cache under ``stop_gradient`` and only the rest is
differentiated; with ``max_targets`` only the supervised positions are projected to logits. The
loss and the gradient equal a full forward's (tested).

A stage's length (:func:`stage_length`) is ``config.num_steps`` or ``config.num_epochs`` passes
over the training set, whichever is set (exactly one); the optimizer (:func:`make_optimizer`)
clips once per update (cgjax) or, as the original, the running sum after every micro-batch
(``optim.clip_mode``); :func:`carry_adam` hands AdamW's moments from Stage A to Stage B.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cgjax.concepts.model import ConceptLlava, attention_regulariser
from cgjax.generate import generate
from cgjax.losses import IGNORE_INDEX, SEGMENT_KEYS, SEGMENT_REASON, segment_weighted_loss, token_cross_entropy


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static (hashable) hyper-parameters of the compiled steps."""

    lr: float = 1.0
    weight_decay: float = 1e-4
    clip_norm: float = 0.05
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    schedule: str = "constant"
    warmup_updates: int = 0
    decay_updates: int = 0
    end_lr_fraction: float = 0.0
    grad_accum: int = 4
    clip_mode: str = "update"  # one of CLIP_MODES
    segment_weights: tuple[float, float, float] = (0.0, 1.0, 0.0)
    reg_lambda: float = 0.0075
    prefix_len: int = 0  # > 0: positions [0, prefix_len) are encoded without gradient (values-only training)
    max_targets: int = 0  # > 0: logits only at the (at most this many) supervised positions of each row
    use_concepts: bool = True

    @classmethod
    def from_config(cls, config, prefix_len: int = 0, num_steps: int | None = None) -> "StepConfig":
        """The steps' settings from a stage config (``configs/stage{A,B}.py``): used by the trainer,
        the planner and the benchmarks alike. ``prefix_len``: see :func:`prefix_length`;
        ``num_steps``: the stage's resolved length (:func:`stage_length`), which sizes a cosine
        schedule without ``optim.decay_updates``. ``None``: ``config.num_steps``; a stage given in
        epochs then needs it only for that schedule. The constant schedule has no length (0: the
        compiled step does not change with the stage's length)."""
        accum = max(1, int(config.grad_accum))
        decay = int(config.optim.decay_updates)
        if str(config.optim.schedule) == "constant":
            decay = 0
        elif not decay:
            if num_steps is None:
                check_stage_length(config)
                num_steps = int(config.num_steps)
            if not num_steps:
                raise ValueError(f"config.optim.schedule={str(config.optim.schedule)!r} with config.num_epochs: "
                                 f"the schedule's length needs the training set size (stage_length), or set "
                                 f"config.optim.decay_updates")
            decay = max(1, int(num_steps) // accum)
        return cls(
            lr=float(config.optim.lr), weight_decay=float(config.optim.weight_decay),
            clip_norm=float(config.optim.clip_norm), b1=float(config.optim.b1), b2=float(config.optim.b2),
            eps=float(config.optim.eps), schedule=str(config.optim.schedule),
            warmup_updates=int(config.optim.warmup_updates), decay_updates=decay,
            end_lr_fraction=float(config.optim.end_lr_fraction), grad_accum=int(config.grad_accum),
            clip_mode=str(config.optim.get("clip_mode", "update")),
            segment_weights=(0.0, float(config.loss.w_keys), float(config.loss.w_reason)),
            reg_lambda=float(config.loss.reg_lambda), prefix_len=int(prefix_len),
            max_targets=int(config.text.get("max_target_tokens", 0)),
            use_concepts=bool(config.gating.use_concepts))


SCHEDULES = ("constant", "warmup_cosine")
# "update": clip the averaged gradient once per optimizer update (cgjax); "original_micro": the
# original's clip_grad_norm_ after every micro-batch, on the running sum it accumulates
CLIP_MODES = ("update", "original_micro")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class StageLength:
    """A stage's length, resolved: ``steps`` batches of ``batch_size`` (``updates`` optimizer updates)."""

    steps: int
    updates: int
    num_epochs: int = 0  # > 0: the length was given in epochs
    n_train: int = 0  # the training set size it was resolved with (epochs only)
    batch_size: int = 0
    grad_accum: int = 1

    def describe(self) -> str:
        """One line for the log: how the steps were obtained."""
        if not self.num_epochs:
            return (f"{self.steps} steps (config.num_steps) of batch {self.batch_size}, {self.updates} optimizer "
                    f"updates (grad_accum {self.grad_accum})")
        per_epoch = -(-self.n_train // self.batch_size)
        return (f"{self.num_epochs} epochs (config.num_epochs) of {self.n_train} training examples at batch "
                f"{self.batch_size} ({per_epoch} batches each) = {self.steps} steps, {self.updates} optimizer "
                f"updates (grad_accum {self.grad_accum})")


def check_stage_length(config) -> None:
    """Exactly one of ``config.num_steps`` and ``config.num_epochs`` is set (> 0), the other 0;
    run before anything loads. Else a ``ValueError`` naming both fields and the fix."""
    steps, epochs = int(config.num_steps), int(config.get("num_epochs", 0))
    if steps < 0 or epochs < 0:
        raise ValueError(f"config.num_steps={steps} / config.num_epochs={epochs}: neither may be negative")
    if steps > 0 and epochs > 0:
        raise ValueError(f"config.num_steps={steps} and config.num_epochs={epochs} are both set: a stage's length "
                         f"is one or the other; set the one you do not want to 0 (e.g. --config.num_epochs=0 "
                         f"--config.num_steps={steps})")
    if steps == 0 and epochs == 0:
        raise ValueError("config.num_steps and config.num_epochs are both 0: set one of them (> 0)")


def stage_length(config, n_train: int | None = None) -> StageLength:
    """The stage's steps from ``config.num_steps``, or from ``config.num_epochs`` and ``n_train``
    (the training split's size): an epoch is ``ceil(n_train / batch_size)`` batches (the original's
    loader), and the total is rounded up to a multiple of ``grad_accum`` so the stage ends on an
    optimizer update. (The original also updated on each epoch's last, partial accumulation; where
    an epoch's batches divide by ``grad_accum``, as its 44 batches of 175 images at batch 4 by 4,
    the update counts are equal: 100 epochs = 4,400 steps = 1,100 updates.)"""
    check_stage_length(config)
    batch, accum, epochs = int(config.batch_size), max(1, int(config.grad_accum)), int(config.get("num_epochs", 0))
    if not epochs:
        steps = int(config.num_steps)
        return StageLength(steps, steps // accum, batch_size=batch, grad_accum=accum)
    if n_train is None:
        raise ValueError(f"config.num_epochs={epochs}: the step count needs the training set size")
    if n_train < 1:
        raise ValueError(f"config.num_epochs={epochs}: the training set is empty")
    steps = -(-epochs * -(-int(n_train) // batch) // accum) * accum
    return StageLength(steps, steps // accum, epochs, int(n_train), batch, accum)


def lr_schedule(sc: StepConfig) -> optax.Schedule:
    if sc.schedule == "constant":
        return optax.constant_schedule(sc.lr)
    if sc.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, sc.lr, max(sc.warmup_updates, 0),
                                                  max(sc.decay_updates, sc.warmup_updates + 1),
                                                  end_value=sc.lr * sc.end_lr_fraction)
    raise ValueError(f"unknown schedule {sc.schedule!r}; expected one of {', '.join(SCHEDULES)}")


def make_optimizer(sc: StepConfig) -> optax.GradientTransformation:
    """AdamW (torch semantics: decoupled decay scaled by the lr), one update every ``grad_accum``
    steps. ``clip_mode`` "update": ``MultiSteps(clip_by_global_norm -> AdamW)``, the gradients
    averaged over the steps, clipped once. "original_micro": :func:`accumulate_clipped`, the
    original's running sum clipped after every step, its sum (not the mean) fed to AdamW."""
    adamw = optax.adamw(lr_schedule(sc), b1=sc.b1, b2=sc.b2, eps=sc.eps, weight_decay=sc.weight_decay)
    if sc.clip_mode == "original_micro":
        return accumulate_clipped(adamw, max(1, sc.grad_accum), sc.clip_norm)
    if sc.clip_mode != "update":
        raise ValueError(f"unknown clip_mode {sc.clip_mode!r}; expected one of {', '.join(CLIP_MODES)}")
    inner = adamw
    if sc.clip_norm > 0:
        inner = optax.chain(optax.clip_by_global_norm(sc.clip_norm), inner)
    return optax.MultiSteps(inner, every_k_schedule=max(1, sc.grad_accum))


class AccumulateState(NamedTuple):
    mini_step: jax.Array  # steps accumulated since the last update
    acc_grads: Any  # the running (clipped) sum
    inner_opt_state: Any


def clip_like_torch(tree, max_norm: float):
    """``torch.nn.utils.clip_grad_norm_``: scaled by ``min(1, max_norm / (norm + 1e-6))``."""
    norm = optax.tree.norm(tree)
    coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: (g * coef).astype(g.dtype), tree)


def accumulate_clipped(inner: optax.GradientTransformation, every_k: int, max_norm: float
                       ) -> optax.GradientTransformation:
    """The original's accumulation (``loss.backward(); clip_grad_norm_(values, max_norm)`` per
    micro-batch, ``optimizer.step(); zero_grad()`` every ``every_k``): each step's gradient is added
    to a running sum, the sum is clipped (``max_norm`` > 0, :func:`clip_like_torch`), and every
    ``every_k``-th step ``inner`` is applied to that sum and the sum restarts at zero."""

    def init(params):
        return AccumulateState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params), inner.init(params))

    def update(grads, state, params=None):
        acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), state.acc_grads, grads)
        if max_norm > 0:
            acc = clip_like_torch(acc, max_norm)

        def apply(_):
            updates, inner_state = inner.update(acc, state.inner_opt_state, params)
            return updates, AccumulateState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, acc), inner_state)

        def hold(_):
            return jax.tree.map(jnp.zeros_like, acc), AccumulateState(state.mini_step + 1, acc, state.inner_opt_state)

        return jax.lax.cond(state.mini_step >= every_k - 1, apply, hold, None)

    return optax.GradientTransformation(init, update)


def carry_adam(saved, fresh):
    """The optimizer state a stage starts with when it carries the previous stage's (``saved``,
    restored into ``fresh``'s structure): AdamW's moments and step count from ``saved``; the rest
    (a partial accumulation, the schedule's count: this stage's schedule starts at 0) from ``fresh``."""
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    return jax.tree.map(lambda f, s: s if is_adam(f) else f, fresh, saved, is_leaf=is_adam)


def forward(model: ConceptLlava, batch, sc: StepConfig, with_reg: bool):
    """-> ``(logits [B, N, V], labels [B, N], segment_ids [B, N])`` already shifted (logits[:, i]
    predicts labels[:, i]), the attention rows (or None), the attention mask ``[B, T]`` and the
    selection. With ``sc.prefix_len`` the prefix is encoded into a KV cache without gradient; with
    ``sc.max_targets`` only the supervised positions are projected to logits."""
    ids, labels, seg = batch["input_ids"], batch["labels"], batch["segment_ids"]
    embeds, mask, sel = model.prepare(ids, batch["pixel_values"], batch["attention_mask"], batch["scores"],
                                      use_concepts=sc.use_concepts)
    lm = model.language_model
    rows = model.concept_rows(ids) if with_reg else None
    P = sc.prefix_len
    if P > 0:
        _, cache, _ = lm.hidden_states(jax.lax.stop_gradient(embeds[:, :P]), mask[:, :P], prefill_len=ids.shape[1],
                                       last=0)  # only the prefix's keys/values are needed
        cache = jax.lax.stop_gradient(cache)
        h, _, attn = lm.hidden_states(embeds[:, P:], mask[:, P:], None, cache,
                                      None if rows is None else rows - P)
        labels, seg = labels[:, P:], seg[:, P:]
    else:
        h, _, attn = lm.hidden_states(embeds, mask, None, None, rows)
    h, labels, seg = h[:, :-1], labels[:, 1:], seg[:, 1:]
    if sc.max_targets > 0:  # the text rows check that no row has more targets
        k = min(sc.max_targets, labels.shape[1])
        idx = jnp.argsort(labels == IGNORE_INDEX, axis=1, stable=True)[:, :k]  # supervised positions first
        h = jnp.take_along_axis(h, idx[..., None], axis=1)
        labels, seg = jnp.take_along_axis(labels, idx, axis=1), jnp.take_along_axis(seg, idx, axis=1)
    return lm.logits(h), labels, seg, attn, mask, sel


def shifted_loss(logits, labels, seg, weights):
    """:func:`cgjax.losses.segment_weighted_loss` on already shifted arrays (one ignored column prepended)."""
    B = labels.shape[0]
    logits = jnp.concatenate([logits, jnp.zeros_like(logits[:, :1])], axis=1)
    labels = jnp.concatenate([jnp.full((B, 1), IGNORE_INDEX, labels.dtype), labels], axis=1)
    seg = jnp.concatenate([jnp.zeros((B, 1), seg.dtype), seg], axis=1)
    return segment_weighted_loss(logits, labels, seg, weights)


def loss_fn(params, graphdef, frozen, batch, sc: StepConfig, with_reg: bool, step, nan_at):
    model = nnx.merge(graphdef, params, frozen)
    logits, labels, seg, attn, mask, sel = forward(model, batch, sc, with_reg)
    lm_loss, per_seg = shifted_loss(logits, labels, seg, sc.segment_weights)
    reg = jnp.zeros((), jnp.float32)
    if with_reg:
        reg = sc.reg_lambda * attention_regulariser(attn, sel.token_mask(model.gating.k_max), mask)
    loss = lm_loss + reg
    loss = loss + jnp.where(step == nan_at[0], jnp.nan, 0.0)  # fault injection (config.debug.nan_at_step)
    n_sel = jnp.sum(sel.valid, axis=1).astype(jnp.float32)
    return loss, {"lm_loss": lm_loss, "reg": reg, **per_seg, "concepts_per_sample": jnp.mean(n_sel)}


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(4,))
def train_step(graphdef, sc: StepConfig, with_reg: bool, shardings: tuple, state, frozen, batch, nan_at):
    tx = make_optimizer(sc)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, aux), grads = grad_fn(state["params"], graphdef, frozen, batch, sc, with_reg, state["step"], nan_at)
    # fault injection (config.debug.nan_grad_at_step): one gradient element of this step becomes NaN
    grads = jax.tree.map(lambda g: g.at[(0,) * g.ndim].add(jnp.where(state["step"] == nan_at[1], jnp.nan, 0.0)),
                         grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
           "step": state["step"] + 1, "rng": jax.random.fold_in(state["rng"], state["step"])}
    # a non-finite loss or gradient leaves the state (and the accumulated gradients) as they were;
    # the host then stops the run
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
    leaves, treedef = jax.tree.flatten(new)
    new = jax.tree.unflatten(treedef, [jax.lax.with_sharding_constraint(x, s) for x, s in zip(leaves, shardings)])
    return new, {"loss": loss, **aux, "grad_norm": grad_norm}


@functools.partial(jax.jit, static_argnums=(0, 1))
def eval_step(graphdef, sc: StepConfig, params, frozen, batch):
    """Teacher-forced sums per segment over the valid rows."""
    model = nnx.merge(graphdef, params, frozen)
    logits, labels, seg, _, _, _ = forward(model, batch, sc, False)
    ce = token_cross_entropy(logits, labels)
    valid = (labels != IGNORE_INDEX) & (batch["valid"][:, None] > 0)
    w = jnp.asarray(sc.segment_weights, jnp.float32)[seg] * valid
    out = {"wce": jnp.sum(w * ce), "w": jnp.sum(w)}
    for k, name in ((SEGMENT_KEYS, "keys"), (SEGMENT_REASON, "reason")):
        m = (valid & (seg == k)).astype(jnp.float32)
        out[f"ce_{name}"], out[f"n_{name}"] = jnp.sum(m * ce), jnp.sum(m)
    return out


def greedy_generate(model: ConceptLlava, input_ids, pixel_values, attention_mask, scores, max_new_tokens: int,
                    eos_token_id: int, pad_token_id: int = 0, use_concepts: bool = True) -> jax.Array:
    """Greedy decoding for a :class:`ConceptLlava` (left-padded prompts): prefill of the
    concept-augmented ``inputs_embeds`` into a KV cache, then one token at a time until EOS."""
    return generate(model, input_ids, pixel_values, attention_mask, max_new_tokens=int(max_new_tokens),
                    eos_token_id=eos_token_id, pad_token_id=pad_token_id, concept_scores=scores,
                    use_concepts=use_concepts)


def dtype_from_name(name: str):
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` -> the jnp dtype."""
    return DTYPES[str(name)]


def path_str(path) -> str:
    """An nnx state path as ``"a/b/0/c"`` (what ``config.trainable`` regexes match)."""
    return "/".join(str(getattr(p, "key", p)) for p in path)


def trainable_filter(patterns: Sequence[str]) -> Callable:
    """nnx filter: a ``Param`` whose "/"-joined path fully matches one of ``patterns``."""
    regexes = [re.compile(p) for p in patterns]

    def f(path, value) -> bool:
        return isinstance(value, nnx.Param) and any(r.fullmatch(path_str(path)) for r in regexes)

    return f


def prefix_length(trainable_paths: Sequence[str], n_head: int, n_image_tokens: int) -> int:
    """The no-gradient prefix of :func:`forward`: when only the concept values train, the prompt head
    (``n_head`` tokens before ``<image>``) and the image tokens cannot depend on them; else 0."""
    values_only = all(p.startswith("concepts/") for p in trainable_paths)
    return n_head + n_image_tokens if values_only else 0
