"""Jit-compiled generation: prefill + KV-cache decode in one ``jax.lax.while_loop``.

Works for :class:`cgjax.models.llava.Llava` (with ``pixel_values``) and a text-only
:class:`cgjax.models.llama.LlamaForCausalLM` (``pixel_values=None``). Batches are left padded
(``attention_mask`` 0 on the padding); positions are ``cumsum(mask) - 1`` like HF ``generate``.

Shapes are static: the output buffer (and the cache's new-token part) is rounded up to a power
of two, so ``max_new_tokens`` values in the same bucket share one compiled function, and the
loop bound, ``temperature``, ``top_p`` and the EOS / pad ids are traced values.

The prefill and the decode loop run the decoder layers either unrolled on per-layer weights
(``layout="unrolled"``, the CPU default: ``generate`` slices them out of the stacked parameters
inside every call, a :class:`Generator` lays them out once for all its calls; each layer's q/k/v
and gate/up projections are joined into one matmul each) or as a scan over the stacked layers
(``"scanned"``, the accelerator default: compile time flat in depth).
"""
from __future__ import annotations

import functools
import sys
import types
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["generate", "decode", "Generator", "LAYOUTS", "default_layout", "greedy_argmax"]

#: How generation runs the decoder stack (see :func:`decode`).
LAYOUTS = ("unrolled", "scanned")


def default_layout() -> str:
    """``unrolled`` on a CPU (the layout cgjax's generation speed-ups over HF were measured with;
    ``scripts/bench.py generate --layout scanned`` compares), ``scanned`` on an accelerator, where a
    program flat in depth compiles in the same time at 4 and 32 layers (``scripts/bench.py compile``)."""
    return "unrolled" if jax.default_backend() == "cpu" else "scanned"


def _bucket(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (max(int(n), 1) - 1).bit_length())


def _language_model(model):
    return model.language_model if hasattr(model, "language_model") else model


def greedy_argmax(logits) -> jax.Array:
    """``jnp.argmax(logits, -1)`` (the first index of the maximum; a NaN counts as the maximum) as
    two plain reductions, which XLA:CPU runs about 4x faster than its variadic argmax reduce over a
    32k vocabulary (0.11 vs 0.42 ms at ``[4, 32064]``: a decode step's token choice)."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    hit = (logits == top) | jnp.isnan(logits)
    return jnp.min(jnp.where(hit, index, logits.shape[-1]), axis=-1)


def _select(logits, key, do_sample: bool, temperature, top_p):
    """Greedy argmax, or temperature + nucleus (top-p) sampling. ``logits [B, V]`` fp32."""
    if not do_sample:
        return greedy_argmax(logits)
    logits = logits / temperature
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    keep = before < top_p
    keep = keep.at[:, 0].set(True)
    n_keep = keep.sum(-1, keepdims=True)
    threshold = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
    masked = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)


def decode(lm, inputs_embeds, attention_mask, n_new, temperature, top_p, eos_ids, pad_id, rng, *,
           do_sample: bool, n_buf: int, layers=None, head=None, layout: str = "unrolled") -> jax.Array:
    """Prefill ``inputs_embeds [B, T, D]`` into a KV cache, then decode up to ``n_new`` tokens
    in one ``while_loop`` (traceable: call it inside ``jit``). -> ``[B, n_buf]`` int32 token ids.

    ``layout="unrolled"`` runs the decoder layers one by one on per-layer weights and caches
    (``layers``, default ``lm.unstacked_layers()``, and ``head``, the logits' laid-out
    ``lm.packed_head()`` if any, taken with the default layers): no slicing of stacked weights
    inside the bandwidth-bound loop, but a program that grows with depth. ``"scanned"`` runs both phases as a
    ``lax.scan`` over the stacked layers and ``[L, ...]`` cache: compile time flat in depth."""
    B, T = inputs_embeds.shape[:2]
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "scanned":
        h, cache, _ = lm.hidden_states(inputs_embeds, attention_mask, prefill_len=T + n_buf, last=1)

        def step(tok, cache):
            h, cache, _ = lm.hidden_states(lm.embed(tok[:, None]), None, cache=cache)
            return h, cache
    else:
        if layers is None:
            layers, head = lm.unstacked_layers(), lm.packed_head()
        h, cache = lm.prefill(inputs_embeds, attention_mask, layers, T + n_buf, last=1)

        def step(tok, cache):
            return lm.decode_step(lm.embed(tok[:, None]), layers, cache)
    tok = _select(lm.logits(h[:, -1], head), jax.random.fold_in(rng, 0), do_sample, temperature, top_p)
    out = jnp.full((B, n_buf), pad_id, jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, eos_ids)

    def cond(c):
        i, _, done, _, _ = c
        return (i < n_new) & ~jnp.all(done)

    def body(c):
        i, tok, done, cache, out = c
        h, cache = step(tok, cache)
        nxt = _select(lm.logits(h[:, 0], head), jax.random.fold_in(rng, i), do_sample, temperature, top_p)
        nxt = jnp.where(done, pad_id, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        return i + 1, nxt, done | jnp.isin(nxt, eos_ids), cache, out

    _, _, _, _, out = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, done, cache, out))
    return out


@functools.partial(jax.jit, static_argnames=("graphdef", "layers_def", "do_sample", "n_buf", "use_concepts", "layout"))
def _run(graphdef, state, layers_def, layers_state, input_ids, pixel_values, attention_mask, scores, n_new,
         temperature, top_p, eos_ids, pad_id, rng, *, do_sample: bool, n_buf: int, use_concepts: bool, layout: str):
    model = nnx.merge(graphdef, state)
    lm = _language_model(model)
    if scores is not None:  # a ConceptLlava: image block = image features + gated concept slots
        embeds, attention_mask, _ = model.prepare(input_ids, pixel_values, attention_mask, scores,
                                                  use_concepts=use_concepts)
    elif pixel_values is not None:
        embeds = model.merge_image_features(input_ids, model.get_image_features(pixel_values))
    else:
        embeds = lm.embed(input_ids)
    layers, head = (None, None) if layers_def is None else nnx.merge(layers_def, layers_state)
    return decode(lm, embeds, attention_mask, n_new, temperature, top_p, eos_ids, pad_id, rng,
                  do_sample=do_sample, n_buf=n_buf, layers=layers, head=head, layout=layout)


def generate(model, input_ids, pixel_values=None, attention_mask=None, max_new_tokens: int = 32,
             temperature: float = 0.0, top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
             rng: jax.Array | None = None, pad_token_id: int | None = None, concept_scores=None,
             use_concepts: bool = True, layout: str | None = None) -> jax.Array:
    """New token ids ``[B, max_new_tokens]`` (int32).

    ``input_ids [B, T]`` left padded with ``attention_mask [B, T]`` (default: all ones);
    ``pixel_values [B, 3, H, W]`` for LLaVA, ``None`` for text only. ``temperature == 0``:
    greedy; otherwise temperature + nucleus ``top_p`` sampling from ``rng`` (default
    ``PRNGKey(0)``). After a row emits an ``eos_token_id`` (an int or several), every later
    position of that row holds ``pad_token_id`` (default: the first EOS id, as HF does);
    decoding stops early once every row is done. The first call per shape bucket compiles.

    For a :class:`cgjax.concepts.model.ConceptLlava`, ``concept_scores [B, n_concepts]`` (the
    signals ``s``) select the concept tokens; ``use_concepts=False`` is the no-concept baseline.
    For many calls on one model, :class:`Generator` saves each call the layout of its layers.
    ``layout``: ``"unrolled"`` or ``"scanned"`` decoder stack (:func:`decode`; default
    :func:`default_layout`).
    """
    return Generator(model, unstack_once=False, layout=layout)(
        input_ids, pixel_values, attention_mask, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, eos_token_id=eos_token_id, rng=rng, pad_token_id=pad_token_id,
        concept_scores=concept_scores, use_concepts=use_concepts)


class Generator:
    """:func:`generate` bound to one model: ``Generator(model)(input_ids, ...)`` takes
    :func:`generate`'s arguments after ``model`` and returns the same ids.

    It works on a snapshot of the model's weights taken here; make a new one after the weights
    change. With ``unstack_once`` it also lays the decoder layers out as per-layer weights once,
    instead of slicing them out of the stacked parameters inside every call, and holds that copy
    (the decoder's size again; with w8a8 weights on a VNNI CPU, packed for cgjax's int8 matmul, with a
    packed copy of ``lm_head``) for as long as it lives. The default is to do so on a CPU, where XLA
    copies the slices in every call anyway (a few percent of a call), and not on an accelerator,
    where memory is the scarcer resource.

    ``layout`` (default :func:`default_layout`): ``"scanned"`` runs the stacked layers in a scan,
    flat in depth to compile, and never lays them out (``unstack_once`` does not apply)."""

    def __init__(self, model, *, unstack_once: bool | None = None, layout: str | None = None):
        self.layout = default_layout() if layout is None else layout
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        self.model = model
        self._graphdef, state = nnx.split(model)
        self._state = jax.tree.map(lambda x: x, state)  # detached from the model's Variables: a snapshot
        self._layers_def = self._layers_state = None
        if unstack_once is None:
            unstack_once = jax.default_backend() == "cpu"
        if unstack_once and self.layout == "unrolled":
            graphdef, defs = self._graphdef, []

            def unstack(s):  # traced once; the layers' graphdef is static, kept from the trace
                lm = _language_model(nnx.merge(graphdef, s))
                layers_def, layers_state = nnx.split((lm.unstacked_layers(), lm.packed_head()))
                defs.append(layers_def)
                return layers_state

            self._layers_state = jax.jit(unstack)(self._state)
            self._layers_def = defs[0]

    def __call__(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens: int = 32,
                 temperature: float = 0.0, top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
                 rng: jax.Array | None = None, pad_token_id: int | None = None, concept_scores=None,
                 use_concepts: bool = True) -> jax.Array:
        model = self.model
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        attention_mask = (jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None
                          else jnp.asarray(attention_mask, jnp.int32))
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
        if concept_scores is not None:
            if not hasattr(model, "prepare") or pixel_values is None:
                raise ValueError("concept_scores need a ConceptLlava and pixel_values")
            concept_scores = jnp.asarray(concept_scores, jnp.float32)
        if pixel_values is not None:
            if not hasattr(model, "get_image_features") and not hasattr(model, "prepare"):
                raise ValueError(f"{type(model).__name__} takes no pixel_values (text-only model)")
            pixel_values = jnp.asarray(pixel_values)
        eos = [] if eos_token_id is None else list(np.atleast_1d(eos_token_id).tolist())
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
        eos_ids = jnp.asarray(eos or [-1], jnp.int32)
        do_sample = float(temperature) > 0.0
        if do_sample and not 0.0 < float(top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        rng = jax.random.PRNGKey(0) if rng is None else rng
        n_buf = _bucket(max_new_tokens)
        out = _run(self._graphdef, self._state, self._layers_def, self._layers_state, input_ids, pixel_values,
                   attention_mask, concept_scores, jnp.int32(max_new_tokens),
                   jnp.float32(max(float(temperature), 1e-6)), jnp.float32(top_p), eos_ids, jnp.int32(pad_token_id),
                   rng, do_sample=do_sample, n_buf=n_buf, use_concepts=bool(use_concepts), layout=self.layout)
        return out[:, :max_new_tokens]


class _CallableModule(types.ModuleType):
    """Importing the submodule ``cgjax.generate`` rebinds the package attribute of the same
    name to this module; making it callable keeps ``cgjax.generate(...)`` working either way."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
