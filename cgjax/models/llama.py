"""LLaMA decoder (HF ``LlamaForCausalLM`` layout) in Flax NNX.

RMSNorm, rotate-half RoPE (HF layout, no query pre-scaling), grouped-query attention, SwiGLU
MLP, tied or untied ``lm_head``. The decoder layers are ONE module created with ``nnx.vmap``
(leading ``layers`` axis) and run with ``jax.lax.scan``; the KV cache is carried through that
scan. Softmax and norms run in fp32; matmuls in the compute ``dtype`` (fp32 default).

Parameter layout (per layer, before the leading ``layers`` axis)::

    embed_tokens.embedding          [V, D]        (vocab, embed)
    layers.input_layernorm.weight   [D]           (embed,)
    layers.self_attn.q_proj.kernel  [D, H, hd]    (embed, heads, head_dim)
    layers.self_attn.k_proj.kernel  [D, KV, hd]   (embed, kv_heads, head_dim)
    layers.self_attn.v_proj.kernel  [D, KV, hd]   (embed, kv_heads, head_dim)
    layers.self_attn.o_proj.kernel  [H, hd, D]    (heads, head_dim, embed)
    layers.post_attention_layernorm.weight [D]
    layers.mlp.gate_proj.kernel     [D, F]        (embed, mlp)
    layers.mlp.up_proj.kernel       [D, F]        (embed, mlp)
    layers.mlp.down_proj.kernel     [F, D]        (mlp, embed)
    norm.weight                     [D]
    lm_head.kernel                  [D, V]        (embed, vocab)   -- absent when tied

Masks: ``attention_mask`` is either ``[B, T]`` per-position validity (1 = real token, 0 = a
padding / masked-out slot anywhere in the sequence; combined with the causal mask) or a full
``[B, T, S]`` boolean mask used exactly as given (the caller owns causality), where ``S`` is
``T`` without a cache and the cache length with one.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from cgjax import quantize, sharding
from cgjax.quantize import QuantConfig

F32 = jnp.float32

# HF config keys that describe the run, not the model: dropped by from_hf, never passed back.
EPHEMERAL_CONFIG_KEYS = {"transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype",
                   "output_attentions", "output_hidden_states", "return_dict", "use_cache",
                   "_attn_implementation_autoset", "_commit_hash", "chunk_size_feed_forward",
                   "is_encoder_decoder", "id2label", "label2id", "problem_type"}


def config_as_dict(cfg: Any) -> dict:
    return dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)


def _rope_theta(d: Mapping[str, Any]) -> float:
    """rope_theta from a transformers 5 ``rope_parameters`` or a legacy ``rope_theta``/``rope_scaling``."""
    params = d.get("rope_parameters")
    legacy = d.get("rope_scaling")
    theta = d.get("rope_theta")
    for p in (params, legacy):
        if p:
            kind = p.get("rope_type", p.get("type", "default"))
            if kind != "default":
                raise NotImplementedError(
                    f"rope type {kind!r} is not supported (only 'default' RoPE); config has {p}")
            theta = p.get("rope_theta", theta)
    return float(10000.0 if theta is None else theta)


@dataclasses.dataclass
class LlamaConfig:
    """LLaMA architecture. ``from_hf``/``to_hf`` convert to/from an HF ``LlamaConfig`` dict;
    HF keys this class does not model are kept in ``extra`` and passed back by ``to_hf``."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    def __hash__(self):  # static (graphdef) metadata must hash; configs are not mutated after use
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str))

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.hidden_act != "silu":
            raise NotImplementedError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any] | Any) -> "LlamaConfig":
        d = config_as_dict(hf)
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise NotImplementedError(f"LLaMA config with {flag}=True is not supported")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "rope_theta"}
        kw = {k: d[k] for k in names if k in d}
        kw["rope_theta"] = _rope_theta(d)
        skip = names | EPHEMERAL_CONFIG_KEYS | {"rope_theta", "rope_parameters", "rope_scaling", "model_type"}
        kw["extra"] = {k: v for k, v in d.items() if k not in skip}
        return cls(**kw)

    def to_hf(self) -> dict:
        d = dict(self.extra)
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("extra", "rope_theta")})
        d["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        d["model_type"] = "llama"
        return d


@struct.dataclass
class KVCache:
    """Per-layer keys/values ``[L, B, KV, S_max, hd]`` (head-major, as attention multiplies
    them), slot validity ``[B, S_max]`` and the number of slots already written (``index``,
    shared by all rows)."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


@struct.dataclass
class LayerKVCache:
    """:class:`KVCache` as one ``[B, KV, S_max, hd]`` array per layer (tuples ``k``, ``v``): the
    decode loop's layout, where each layer's cache is updated in place without slicing a stack."""

    k: tuple
    v: tuple
    valid: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=F32) -> KVCache:
    shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------------------------
# modules

def _normal(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return std * jax.random.normal(rngs.params(), shape, dtype)


class Kernel(nnx.Module):
    """A weight ``kernel [*in, *out]`` (the first ``n_in`` axes are the input), applied by
    ``kernel(x)``. With an enabled ``quant`` the weight is held quantized (``kernel`` int8/int4
    plus ``kernel_scale``, see :mod:`cgjax.quantize`)."""

    def __init__(self, shape, axes, *, param_dtype, rngs: nnx.Rngs, n_in: int = 1, quant: QuantConfig | None = None,
                 name: str = "kernel"):
        self.n_in = n_in
        self.quantized = quant is not None and quant.enabled
        if self.quantized:
            self.kernel = sharding.param(jnp.zeros(shape, quant.qtype), axes)
            self.kernel_scale = sharding.param(jnp.ones(quantize.scale_shape(shape, n_in, quant, name), F32),
                                               quantize.scale_axes(axes, n_in))
            self.activations = quant.activations
        else:
            self.kernel = sharding.param(_normal(rngs, shape, param_dtype), axes)
        self.packed = False

    def __call__(self, x):
        if self.packed:
            return quantize.packed_dot(x, (self.kernel_packed.get_value(), self.kernel_comp.get_value()),
                                       self.kernel_scale.get_value(), self.n_in)
        if self.quantized:
            return quantize.dot(x, self.kernel.get_value(), self.kernel_scale.get_value(), self.n_in, self.activations)
        return jnp.tensordot(x, self.kernel.get_value().astype(x.dtype), self.n_in)

    def pack(self) -> None:
        """An int8 weight with int8 activations, on a CPU with AVX512-VNNI: hold it in the layout of
        cgjax's own int8 matmul (:mod:`cgjax.kernels.int8_cpu`; :func:`quantize.pack`) instead of
        ``kernel``. Generation's laid-out layers use it; elsewhere (or where it cannot serve) a no-op."""
        if self.packed or not (self.quantized and self.activations):
            return
        packed = quantize.pack(self.kernel.get_value(), self.n_in)
        if packed is not None:
            self.kernel_packed, self.kernel_comp = packed
            del self.kernel
            self.packed = True

    @classmethod
    def concatenate(cls, parts: Sequence["Kernel"], axis: int = 0) -> "Kernel":
        """One kernel whose output is the ``parts``' outputs side by side along output axis ``axis``
        (0: the first output axis): projections of one input run as one matmul and, with int8
        activations, quantize that input once. The parts share ``n_in`` and quantization."""
        first = parts[0]
        ax = first.n_in + axis

        def joined(name):
            var = getattr(first, name)
            value = jnp.concatenate([getattr(p, name).get_value() for p in parts], ax)
            axes = tuple(var.get_metadata().get("out_sharding") or (None,) * value.ndim)
            return sharding.param(value, axes[len(axes) - value.ndim:])  # a layer sliced from the stack: no 'layers'

        kernel = joined("kernel")
        new = nnx.eval_shape(lambda: cls(kernel.get_value().shape, (None,) * kernel.get_value().ndim, param_dtype=F32,
                                          rngs=nnx.Rngs(0), n_in=first.n_in))
        new.kernel = kernel
        if first.quantized:
            new.quantized, new.activations = True, first.activations
            new.kernel_scale = joined("kernel_scale")
        return new


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, param_dtype, rngs: nnx.Rngs):
        self.embedding = sharding.param(_normal(rngs, (vocab, dim), param_dtype), ("vocab", "embed"))

    def __call__(self, ids, dtype):
        return jnp.take(self.embedding.get_value(), ids, axis=0).astype(dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype):
        self.weight = sharding.param(jnp.ones((dim,), param_dtype), ("embed",))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(F32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.weight.get_value().astype(F32) * y.astype(x.dtype).astype(F32)).astype(x.dtype)


def rope_cos_sin(position_ids, head_dim: int, theta: float, n_positions: int | None = None):
    """HF default RoPE tables for ``position_ids [B, T]`` -> cos, sin ``[B, T, hd]`` (fp32).

    ``n_positions``: a static bound on the positions (every id in ``[0, n_positions)``); the
    tables are then computed for ``arange(n_positions)`` and gathered, the same numbers. That is
    the fast form: XLA fuses ``cos``/``sin`` of the ids themselves into every rotation that reads
    them, recomputing both per element of every layer's queries and keys (on XLA:CPU 2-3 ms per
    rotation at 4 x 212 x 8 x 64; the prefill of the small benchmark LLaVA ran 30% slower), while
    a gather keeps the small table computed once."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=F32) / head_dim))
    at = jnp.asarray(position_ids) if n_positions is None else jnp.arange(n_positions)
    freqs = at.astype(F32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if n_positions is None:
        return cos, sin
    ids = jnp.asarray(position_ids, jnp.int32)
    return jnp.take(cos, ids, axis=0, mode="clip"), jnp.take(sin, ids, axis=0, mode="clip")


def apply_rope(x, cos, sin):
    """Rotate-half RoPE on ``x [B, T, heads, hd]``."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rot * sin


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, param_dtype, rngs: nnx.Rngs, quant: QuantConfig | None = None):
        D, H, KV, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(param_dtype=param_dtype, rngs=rngs, quant=quant)
        self.q_proj = Kernel((D, H, hd), ("embed", "heads", "head_dim"), name="self_attn.q_proj", **kw)
        self.k_proj = Kernel((D, KV, hd), ("embed", "kv_heads", "head_dim"), name="self_attn.k_proj", **kw)
        self.v_proj = Kernel((D, KV, hd), ("embed", "kv_heads", "head_dim"), name="self_attn.v_proj", **kw)
        self.o_proj = Kernel((H, hd, D), ("heads", "head_dim", "embed"), n_in=2, name="self_attn.o_proj", **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = H, KV, hd
        self.fused = False

    def fuse(self) -> None:
        """Hold ``q_proj``, ``k_proj`` and ``v_proj`` as one ``qkv_proj`` (their heads stacked): one
        matmul per call instead of three. Generation's laid-out layers use it (see
        :meth:`LlamaForCausalLM.unstacked_layers`); the model's own parameters stay separate."""
        if not self.fused:
            self.qkv_proj = Kernel.concatenate([self.q_proj, self.k_proj, self.v_proj])
            del self.q_proj, self.k_proj, self.v_proj
            self.fused = True

    def __call__(self, x, cos, sin, mask, kv_store, attn_rows, last: int | None = None):
        """``x [B,T,D]``, ``mask [B,1,1,T,S]`` bool; ``kv_store(k, v) -> (keys, values, store)``
        stores the new keys/values ``[B, KV, T, hd]`` (cache) and returns the ones to attend over
        (``[B, KV, S, hd]``). ``last``: queries (and the output) only for the last ``last``
        positions; keys and values are still computed for all ``T``."""
        dt = x.dtype
        q = None
        if self.fused:
            q, k, v = jnp.split(self.qkv_proj(x), [self.num_heads, self.num_heads + self.num_kv_heads], axis=2)
        else:
            k, v = self.k_proj(x), self.v_proj(x)
        k = apply_rope(k, cos, sin)
        if last is not None:
            x, cos, sin, mask = x[:, x.shape[1] - last:], cos[:, cos.shape[1] - last:], sin[:, sin.shape[1] - last:], \
                mask[..., mask.shape[-2] - last:, :]
            q = None if q is None else q[:, q.shape[1] - last:]
        keys, values, store = kv_store(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
        if x.shape[1] == 0:  # last=0: the keys/values are all that is needed
            return jnp.zeros(x.shape, dt), store, None
        q = apply_rope(self.q_proj(x) if q is None else q, cos, sin)
        B, T = q.shape[:2]
        KV, hd = self.num_kv_heads, self.head_dim
        G = self.num_heads // KV
        # Head-major operands, each KV head's G query heads stacked along the rows: on XLA CPU the
        # batched matmuls then run about 3x faster than the same einsums on [B, T, heads, hd].
        qh = q.reshape(B, T, KV, G, hd).transpose(0, 2, 3, 1, 4).reshape(B, KV, G * T, hd)
        scores = jnp.matmul(qh, jnp.swapaxes(keys.astype(dt), -1, -2), preferred_element_type=F32)
        scores = scores.reshape(B, KV, G, T, -1)
        scores = scores.astype(F32) * (1.0 / np.sqrt(hd))
        scores = jnp.where(mask, scores, jnp.finfo(F32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.matmul(probs.astype(dt).reshape(B, KV, G * T, -1), values.astype(dt))  # [B, KV, G*T, hd]
        out = out.reshape(B, KV, G, T, hd).transpose(0, 3, 1, 2, 4).reshape(B, T, self.num_heads, hd)
        y = self.o_proj(out)
        rows = None
        if attn_rows is not None:  # [B, H, R, S]
            rows = jnp.take(probs.reshape(B, self.num_heads, T, -1), attn_rows, axis=2)
        return y, store, rows


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, param_dtype, rngs: nnx.Rngs, quant: QuantConfig | None = None):
        D, Fd = cfg.hidden_size, cfg.intermediate_size
        kw = dict(param_dtype=param_dtype, rngs=rngs, quant=quant)
        self.gate_proj = Kernel((D, Fd), ("embed", "mlp"), name="mlp.gate_proj", **kw)
        self.up_proj = Kernel((D, Fd), ("embed", "mlp"), name="mlp.up_proj", **kw)
        self.down_proj = Kernel((Fd, D), ("mlp", "embed"), name="mlp.down_proj", **kw)
        self.fused = False

    def fuse(self) -> None:
        """Hold ``gate_proj`` and ``up_proj`` as one ``gate_up_proj``: one matmul per call
        (generation's laid-out layers; see :meth:`LlamaAttention.fuse`)."""
        if not self.fused:
            self.gate_up_proj = Kernel.concatenate([self.gate_proj, self.up_proj])
            del self.gate_proj, self.up_proj
            self.fused = True

    def __call__(self, x):
        if self.fused:
            gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(jax.nn.silu(gate) * up)


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, param_dtype, rngs: nnx.Rngs, quant: QuantConfig | None = None):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = LlamaAttention(cfg, param_dtype=param_dtype, rngs=rngs, quant=quant)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = LlamaMLP(cfg, param_dtype=param_dtype, rngs=rngs, quant=quant)

    def __call__(self, h, cos, sin, mask, kv_store, attn_rows=None, last: int | None = None):
        """``last``: the layer's output only for the last ``last`` positions (``[B, last, D]``);
        its keys/values still cover every position (see :class:`LlamaAttention`)."""
        a, store, rows = self.self_attn(self.input_layernorm(h), cos, sin, mask, kv_store, attn_rows, last)
        h = (h if last is None else h[:, h.shape[1] - last:]) + a
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, store, rows


def _pack_kernels(module: nnx.Module) -> None:
    kernels = [node for _, node in nnx.iter_graph(module) if isinstance(node, Kernel)]  # before any changes
    for kernel in kernels:
        kernel.pack()


def _stacked_layers(cfg: LlamaConfig, param_dtype, rngs: nnx.Rngs, quant: QuantConfig | None = None) -> LlamaDecoderLayer:
    @nnx.split_rngs(splits=cfg.num_hidden_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return LlamaDecoderLayer(cfg, param_dtype=param_dtype, rngs=r, quant=quant)

    return make(rngs)


def _to_mask_and_positions(attention_mask, position_ids, B, T, cache: KVCache | None):
    """-> (mask [B,1,1,T,S] bool, position_ids [B,T], validity of the new tokens [B,T],
    validity of every key slot [B,S]). With a 3-D mask, a slot counts as valid (for positions and
    for later cached steps) iff it attends to itself."""
    if attention_mask is None:
        new_valid = jnp.ones((B, T), bool)
        full = None
    else:
        attention_mask = jnp.asarray(attention_mask)
        if attention_mask.ndim == 2:
            if attention_mask.shape != (B, T):
                raise ValueError(f"attention_mask shape {attention_mask.shape} != (batch, seq) {(B, T)}")
            new_valid, full = attention_mask.astype(bool), None
        elif attention_mask.ndim == 3:
            full = attention_mask.astype(bool)
            S = T if cache is None else cache.max_len
            if full.shape != (B, T, S):
                raise ValueError(f"3-D attention_mask shape {full.shape} != (batch, seq, keys) {(B, T, S)}")
            offset = 0 if cache is None else cache.index
            diag_idx = offset + jnp.arange(T)
            new_valid = jnp.take_along_axis(full, jnp.broadcast_to(diag_idx[None, :, None], (B, T, 1)), axis=2)[..., 0]
        else:
            raise ValueError(f"attention_mask must be [B, T] or [B, T, S], got shape {attention_mask.shape}")

    if cache is None:
        past = jnp.zeros((B,), jnp.int32)
        key_valid = new_valid
        q_slot, k_slot = jnp.arange(T), jnp.arange(T)
    else:
        past = cache.valid.sum(-1).astype(jnp.int32)
        key_valid = jax.lax.dynamic_update_slice(cache.valid, new_valid, (0, cache.index))
        q_slot, k_slot = cache.index + jnp.arange(T), jnp.arange(cache.max_len)

    if position_ids is None:
        position_ids = past[:, None] + jnp.cumsum(new_valid.astype(jnp.int32), axis=-1) - 1
        position_ids = jnp.maximum(position_ids, 0)
    position_ids = jnp.broadcast_to(jnp.asarray(position_ids, jnp.int32), (B, T))

    if full is None:
        full = (k_slot[None, :] <= q_slot[:, None])[None] & key_valid[:, None, :]
    return full[:, None, None], position_ids, new_valid, key_valid


def _n_positions(T: int, cache) -> int:
    """The bound on the positions :func:`_to_mask_and_positions` derives (no ``position_ids``
    given): one per key slot, ``T`` without a cache, else the cache's length."""
    return T if cache is None else int(cache.max_len)


class LlamaForCausalLM(nnx.Module):
    """HF ``LlamaForCausalLM`` in NNX. ``__call__ -> (logits fp32 [B,T,V], cache)``."""

    def __init__(self, config: LlamaConfig, *, dtype=F32, param_dtype=F32, rngs: nnx.Rngs | None = None,
                 quant: QuantConfig | None = None):
        """``quant``: the linear weights held quantized -- the decoder layers' and an untied
        ``lm_head`` (the embeddings and norms stay in ``param_dtype``; a tied head is the embedding)."""
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, param_dtype=param_dtype, rngs=rngs)
        self.layers = _stacked_layers(config, param_dtype, rngs, quant)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
        if not config.tie_word_embeddings:
            self.lm_head = Kernel((config.hidden_size, config.vocab_size), ("embed", "vocab"),
                                  param_dtype=param_dtype, rngs=rngs, quant=quant, name="lm_head")

    # -- pieces --------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        return init_cache(self.config, batch, max_len, self.dtype if dtype is None else dtype)

    def embed(self, input_ids) -> jax.Array:
        return self.embed_tokens(jnp.asarray(input_ids), self.dtype)

    def logits(self, hidden, head: Kernel | None = None) -> jax.Array:
        """Final-normed hidden ``[..., D]`` -> fp32 logits ``[..., V]``; ``head``: a laid-out copy of
        ``lm_head`` to use instead (:meth:`packed_head`)."""
        if head is not None:
            return head(hidden).astype(F32)
        if self.config.tie_word_embeddings:
            w = self.embed_tokens.embedding.get_value().T
            return (hidden @ w.astype(hidden.dtype)).astype(F32)
        return self.lm_head(hidden).astype(F32)

    def hidden_states(self, inputs_embeds, attention_mask=None, position_ids=None,
                      cache: KVCache | None = None, return_attn_rows=None, prefill_len: int | None = None,
                      last: int | None = None):
        """Decoder stack + final norm. -> (hidden [B,T,D], cache, attn) where ``attn`` is
        ``[L, B, H, R, S]`` fp32 attention probabilities of the query rows ``return_attn_rows``
        (``[R]`` indices into T) or None.

        Without a ``cache``: ``prefill_len`` returns a new cache of that length holding the
        prompt's keys/values (attention runs over the prompt only, not over the empty slots of a
        preallocated cache: the same numbers, less work). ``last``: the final layer computes its
        output only for the last ``last`` positions (its keys/values for all of them, so the cache
        is complete) and ``hidden`` is ``[B, last, D]``: a prompt whose next token is all that is
        needed (``last=1``), or whose hidden states are not needed at all (``last=0``), skips most
        of the final layer."""
        h = jnp.asarray(inputs_embeds).astype(self.dtype)
        B, T = h.shape[:2]
        if prefill_len is not None and (cache is not None or prefill_len < T):
            raise ValueError(f"prefill_len={prefill_len} needs no cache and at least the prompt's {T} slots")
        if last is not None and (cache is not None or return_attn_rows is not None or not 0 <= last <= T):
            raise ValueError(f"last={last} needs no cache, no return_attn_rows and 0 <= last <= {T} (the prompt)")
        cfg = self.config
        mask, pos, new_valid, key_valid = _to_mask_and_positions(attention_mask, position_ids, B, T, cache)
        cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta,
                                None if position_ids is not None else _n_positions(T, cache))
        rows = None if return_attn_rows is None else jnp.asarray(return_attn_rows, jnp.int32)
        graphdef, state = nnx.split(self.layers)

        def run(h, layer_state, kv_store, last=None):
            h, store, attn = nnx.merge(graphdef, layer_state)(h, cos, sin, mask, kv_store, rows, last)
            return sharding.constrain(h, ("batch", None, None)), store, attn

        if cache is None and (prefill_len is not None or last is not None):
            h, cache, attn = self._prefill(h, state, run, key_valid, prefill_len, last)
            return self.norm(h), cache, attn

        index = None if cache is None else cache.index

        # The scan carries h; each layer gets its cache slice as an input and emits only its
        # new keys/values, written into the [L, ...] cache with one update after the scan
        # (cheaper than carrying the whole cache through every layer).
        def body(h, xs):
            layer_state, k_old, v_old = xs

            def kv_store(k, v):
                if cache is None:
                    return k, v, None
                k, v = k.astype(k_old.dtype), v.astype(v_old.dtype)
                keys = jax.lax.dynamic_update_slice(k_old, k, (0, 0, index, 0))
                values = jax.lax.dynamic_update_slice(v_old, v, (0, 0, index, 0))
                return keys, values, (k, v)

            h, new_kv, attn = run(h, layer_state, kv_store)
            return h, (new_kv, attn)

        xs = (state, None, None) if cache is None else (state, cache.k, cache.v)
        h, (new_kv, attn) = jax.lax.scan(body, h, xs)
        h = self.norm(h)
        if cache is not None:
            k_new, v_new = new_kv  # [L, B, KV, T, hd]
            cache = KVCache(k=jax.lax.dynamic_update_slice(cache.k, k_new, (0, 0, 0, index, 0)),
                            v=jax.lax.dynamic_update_slice(cache.v, v_new, (0, 0, 0, index, 0)),
                            valid=key_valid, index=cache.index + T)
        return h, cache, attn

    def _prefill(self, h, state, run, key_valid, prefill_len: int | None, last: int | None):
        """The no-cache stack of :meth:`hidden_states` with ``prefill_len`` and/or ``last``: a scan
        over the first ``L - 1`` layers (all ``L`` without ``last``) that writes each layer's
        keys/values into the ``[L, B, KV, prefill_len, hd]`` cache it carries (updated in place),
        then the final layer trimmed to the last ``last`` positions. -> (h, cache, attn)"""
        cfg = self.config
        L, (B, T) = cfg.num_hidden_layers, h.shape[:2]
        n_scan = L if last is None else L - 1
        layer = lambda i: jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), state)  # noqa: E731
        keep = lambda k, v: (k, v, (k, v))  # noqa: E731
        if prefill_len is None:
            bufs = None
        else:
            shape = (L, B, cfg.num_key_value_heads, prefill_len, cfg.head_dim)
            bufs = (jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))

        def write(bufs, i, kv):
            if bufs is None:
                return None
            return tuple(jax.lax.dynamic_update_slice(buf, x[None].astype(buf.dtype), (i, 0, 0, 0, 0))
                         for buf, x in zip(bufs, kv))

        def body(carry, i):
            h, bufs = carry
            h, kv, attn = run(h, layer(i), keep)
            return (h, write(bufs, i, kv)), attn

        (h, bufs), attn = jax.lax.scan(body, (h, bufs), jnp.arange(n_scan))
        if last is not None:
            h, kv, _ = run(h, layer(L - 1), keep, last)
            bufs = write(bufs, L - 1, kv)
        cache = None
        if bufs is not None:
            valid = jnp.pad(key_valid, ((0, 0), (0, prefill_len - T)))
            cache = KVCache(k=bufs[0], v=bufs[1], valid=valid, index=jnp.int32(T))
        return h, cache, attn

    def unstacked_layers(self, fused: bool = True, packed: bool = True) -> list[LlamaDecoderLayer]:
        """The decoder layers as separate modules (per-layer parameter slices, taken once): the
        decode loop runs them unrolled, so no step slices the stacked weights again. ``fused``: each
        layer's q/k/v and gate/up projections joined into one matmul each (:meth:`LlamaAttention.fuse`);
        ``packed``: int8 weights with int8 activations laid out for cgjax's CPU int8 matmul where it
        serves (:meth:`Kernel.pack`). For inference only: that matmul has no gradient."""
        graphdef, state = nnx.split(self.layers)
        layers = [nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state))
                  for i in range(self.config.num_hidden_layers)]
        for layer in layers:
            if fused:
                layer.self_attn.fuse()
                layer.mlp.fuse()
            if packed:
                _pack_kernels(layer)
        return layers

    def packed_head(self) -> Kernel | None:
        """A copy of ``lm_head`` laid out for cgjax's CPU int8 matmul (:meth:`Kernel.pack`), for a
        decode loop's :meth:`logits`; None for a tied head or where that matmul does not serve."""
        if self.config.tie_word_embeddings or not self.lm_head.quantized:
            return None
        head = nnx.merge(*nnx.split(self.lm_head))
        head.pack()
        return head if head.packed else None

    def prefill(self, inputs_embeds, attention_mask, layers: Sequence[LlamaDecoderLayer], max_len: int,
                last: int = 1):
        """A prompt through ``layers`` (:meth:`unstacked_layers`, run unrolled) into a
        :class:`LayerKVCache` of ``max_len`` slots; the final layer runs only for the last ``last``
        positions. -> (final-normed hidden ``[B, last, D]``, cache). The same numbers as
        :meth:`hidden_states` with ``prefill_len`` and ``last``; each layer's cache is written
        directly, with no stacked cache to split for :meth:`decode_step`."""
        h = jnp.asarray(inputs_embeds).astype(self.dtype)
        B, T = h.shape[:2]
        if max_len < T or not 0 <= last <= T:
            raise ValueError(f"prefill needs max_len >= {T} (the prompt) and 0 <= last <= {T}; "
                             f"got max_len={max_len}, last={last}")
        cfg = self.config
        mask, pos, _, key_valid = _to_mask_and_positions(attention_mask, None, B, T, None)
        cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, _n_positions(T, None))
        pad = ((0, 0), (0, 0), (0, max_len - T), (0, 0))
        keep = lambda k, v: (k, v, (jnp.pad(k, pad), jnp.pad(v, pad)))  # noqa: E731
        ks, vs = [], []
        for i, layer in enumerate(layers):
            h, (k, v), _ = layer(h, cos, sin, mask, keep, None, last if i == len(layers) - 1 else None)
            h = sharding.constrain(h, ("batch", None, None))
            ks.append(k)
            vs.append(v)
        valid = jnp.pad(key_valid, ((0, 0), (0, max_len - T)))
        return self.norm(h), LayerKVCache(k=tuple(ks), v=tuple(vs), valid=valid, index=jnp.int32(T))

    def decode_step(self, inputs_embeds, layers: Sequence[LlamaDecoderLayer], cache: LayerKVCache):
        """One cached step over ``inputs_embeds [B, T, D]`` with :meth:`unstacked_layers` and a
        :class:`LayerKVCache` (every position valid) -> (final-normed hidden ``[B, T, D]``, cache).
        Same numbers as :meth:`hidden_states` with the stacked cache."""
        h = jnp.asarray(inputs_embeds).astype(self.dtype)
        B, T = h.shape[:2]
        cfg = self.config
        mask, pos, _, key_valid = _to_mask_and_positions(None, None, B, T, cache)
        cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, _n_positions(T, cache))
        ks, vs = [], []
        for layer, k_old, v_old in zip(layers, cache.k, cache.v):
            def kv_store(k, v, k_old=k_old, v_old=v_old):
                keys = jax.lax.dynamic_update_slice(k_old, k.astype(k_old.dtype), (0, 0, cache.index, 0))
                values = jax.lax.dynamic_update_slice(v_old, v.astype(v_old.dtype), (0, 0, cache.index, 0))
                return keys, values, (keys, values)

            h, (k_new, v_new), _ = layer(h, cos, sin, mask, kv_store)
            h = sharding.constrain(h, ("batch", None, None))
            ks.append(k_new)
            vs.append(v_new)
        cache = LayerKVCache(k=tuple(ks), v=tuple(vs), valid=key_valid, index=cache.index + T)
        return self.norm(h), cache

    def __call__(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                 cache: KVCache | None = None, return_attn_rows=None):
        """-> ``(logits, cache)``, or ``(logits, cache, attn)`` when ``return_attn_rows`` is given."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        h, cache, attn = self.hidden_states(inputs_embeds, attention_mask, position_ids, cache, return_attn_rows)
        logits = self.logits(h)
        if return_attn_rows is not None:
            return logits, cache, attn
        return logits, cache
