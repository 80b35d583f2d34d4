"""CLIP vision tower (ViT) in Flax NNX: open_clip ``VisionTransformer`` and HF ``CLIPVisionModel``.

One module serves both checkpoints (the converters map their keys onto it):

* patch embedding (a conv without bias, computed as a patch reshape + matmul), class token,
  learned positional embedding, optional ``ln_pre`` (HF ``pre_layrnorm``);
* ``layers`` pre-norm residual blocks, stored as ONE ``nnx.vmap``'d block (leading ``layers``
  axis) and run with ``jax.lax.scan``; attention with a fused ``[D, 3, H, hd]`` qkv kernel;
* ``ln_post`` (HF ``post_layernorm``), CLS (``tok``) or mean (``avg``) pooling, optional
  projection ``proj``.

Public API: :meth:`CLIPVisionTransformer.encode_image` (open_clip ``encode_image``),
:meth:`~CLIPVisionTransformer.hidden_states` (HF ``outputs.hidden_states[layer]``),
:meth:`~CLIPVisionTransformer.pooled` (HF ``pooler_output``). Params are fp32 by default;
``dtype`` is the compute dtype (LayerNorm and softmax always in fp32).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from cgjax.sharding import constrain, param


def _pair(x) -> tuple[int, int]:
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"expected an int or a pair, got {x}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


# open_clip vision_cfg keys we understand; anything else that is set to a non-default value is refused.
_OPEN_CLIP_DEFAULTS: dict[str, Any] = {
    "ls_init_value": None, "patch_dropout": 0.0, "attentional_pool": False, "attn_pooler_queries": 256,
    "attn_pooler_heads": 8, "no_ln_pre": False, "pos_embed_type": "learnable", "final_ln_after_pool": False,
    "pool_type": "tok", "output_tokens": False, "act_kwargs": None, "norm_kwargs": None, "block_type": None,
    "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
    "scale_attn": False, "scale_fc": False, "timm_model_name": None, "timm_model_pretrained": False,
    "timm_pool": "avg", "timm_proj": "linear", "timm_proj_bias": False, "timm_drop": 0.0, "timm_drop_path": None,
    "layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16, "image_size": 224,
}
_UNSUPPORTED = {
    "attentional_pool": "attentional pooler (CoCa)",
    "timm_model_name": "timm vision towers",
    "qk_norm": "qk_norm blocks",
    "scaled_cosine_attn": "scaled cosine attention",
    "scale_heads": "scale_heads blocks",
    "scale_attn_inner": "scale_attn_inner blocks",
    "scale_attn": "scale_attn blocks",
    "scale_fc": "scale_fc blocks",
    "act_kwargs": "activation kwargs",
}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """ViT vision tower hyper-parameters.

    ``output_dim=None``: no projection (HF ``CLIPVisionModel``). ``act``: ``quick_gelu`` |
    ``gelu`` (exact erf). ``pool``: ``tok`` (CLS) | ``avg`` (mean of patch tokens).
    ``final_ln_after_pool``: ``ln_post`` on the pooled vector instead of on every token.
    ``layer_scale``: LayerScale ``gamma`` after attention and MLP (open_clip ``ls_init_value``).
    """

    image_size: int | tuple[int, int] = 224
    patch_size: int | tuple[int, int] = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    output_dim: int | None = 512
    act: str = "gelu"
    layer_norm_eps: float = 1e-5
    pool: str = "tok"
    final_ln_after_pool: bool = False
    ln_pre: bool = True
    layer_scale: bool = False

    def __post_init__(self):
        object.__setattr__(self, "image_size", _pair(self.image_size))
        object.__setattr__(self, "patch_size", _pair(self.patch_size))
        if self.act not in ("quick_gelu", "gelu"):
            raise ValueError(f"act must be 'quick_gelu' or 'gelu', got {self.act!r}")
        if self.pool not in ("tok", "avg"):
            raise ValueError(f"pool must be 'tok' or 'avg', got {self.pool!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        for i in (0, 1):
            if self.image_size[i] % self.patch_size[i]:
                raise ValueError(f"image size {self.image_size} is not a multiple of patch size {self.patch_size}")

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1] + 1

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @classmethod
    def from_open_clip(cls, model_cfg: Mapping[str, Any]) -> "CLIPVisionConfig":
        """From an open_clip model config (``open_clip.get_model_config(name)`` or
        ``open_clip_config.json['model_cfg']``: ``embed_dim``, ``quick_gelu``, ``vision_cfg``)."""
        if "vision_cfg" not in model_cfg:
            raise ValueError("open_clip model config has no 'vision_cfg'")
        v = dict(model_cfg["vision_cfg"])
        unknown = sorted(set(v) - set(_OPEN_CLIP_DEFAULTS))
        if unknown:
            raise ValueError(f"unsupported open_clip vision_cfg key(s): {unknown}")
        if isinstance(v.get("layers", 12), (list, tuple)):
            raise ValueError("open_clip ModifiedResNet vision towers (layers given as a list) are not supported")
        for key, what in _UNSUPPORTED.items():
            if v.get(key, _OPEN_CLIP_DEFAULTS[key]) not in (None, False, {}):
                raise ValueError(f"unsupported open_clip vision tower feature: {what} ({key}={v[key]!r})")
        if v.get("block_type") not in (None, "default"):
            raise ValueError(f"unsupported open_clip block_type {v['block_type']!r}")
        if v.get("pos_embed_type", "learnable") not in ("learnable", "sin_cos_2d"):
            raise ValueError(f"unsupported open_clip pos_embed_type {v['pos_embed_type']!r}")
        pool = v.get("pool_type", "tok")
        if pool not in ("tok", "avg"):
            raise ValueError(f"unsupported open_clip pool_type {pool!r} (only 'tok' and 'avg')")
        norm_kwargs = dict(v.get("norm_kwargs") or {})
        eps = float(norm_kwargs.pop("eps", 1e-5))
        if norm_kwargs:
            raise ValueError(f"unsupported open_clip norm_kwargs {norm_kwargs}")
        width = int(v.get("width", 768))
        head_width = int(v.get("head_width", 64))
        return cls(
            image_size=v.get("image_size", 224),
            patch_size=v.get("patch_size", 16),
            width=width,
            layers=int(v.get("layers", 12)),
            heads=width // head_width,
            mlp_dim=int(width * float(v.get("mlp_ratio", 4.0))),
            output_dim=int(model_cfg["embed_dim"]),
            act="quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu",
            layer_norm_eps=eps,
            pool=pool,
            final_ln_after_pool=bool(v.get("final_ln_after_pool", False)),
            ln_pre=not v.get("no_ln_pre", False),
            layer_scale=v.get("ls_init_value") is not None,
        )

    @classmethod
    def from_hf(cls, hf_vision_config: Mapping[str, Any] | Any, with_projection: bool = False) -> "CLIPVisionConfig":
        """From an HF ``CLIPVisionConfig`` (object or dict). ``with_projection``: include
        ``visual_projection`` (``CLIPVisionModelWithProjection``; ``projection_dim``)."""
        c = hf_vision_config if isinstance(hf_vision_config, Mapping) else hf_vision_config.to_dict()
        if "vision_config" in c:  # a full CLIPConfig / LLaVA config
            c = c["vision_config"]
        act = c.get("hidden_act", "quick_gelu")
        if act not in ("quick_gelu", "gelu"):
            raise ValueError(f"unsupported HF CLIP hidden_act {act!r}")
        return cls(
            image_size=c.get("image_size", 224),
            patch_size=c.get("patch_size", 32),
            width=int(c.get("hidden_size", 768)),
            layers=int(c.get("num_hidden_layers", 12)),
            heads=int(c.get("num_attention_heads", 12)),
            mlp_dim=int(c.get("intermediate_size", 3072)),
            output_dim=int(c.get("projection_dim", 512)) if with_projection else None,
            act=act,
            layer_norm_eps=float(c.get("layer_norm_eps", 1e-5)),
            pool="tok",
            final_ln_after_pool=True,
            ln_pre=True,
            layer_scale=False,
        )


# ------------------------------------------------------------------------------------- layers


class LayerNorm(nnx.Module):
    """LayerNorm computed in fp32, cast back to the input dtype."""

    def __init__(self, dim: int, eps: float, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = param(jnp.ones((dim,), param_dtype), ("embed",))
        self.bias = param(jnp.zeros((dim,), param_dtype), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        xc = xf - mean
        var = jnp.mean(xc * xc, -1, keepdims=True)
        y = xc * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale.get_value().astype(jnp.float32) + self.bias.get_value().astype(jnp.float32)
        return y.astype(x.dtype)


def _init(rngs: nnx.Rngs, shape, std, dtype):
    return std * jax.random.normal(rngs.params(), shape, dtype)


class Attention(nnx.Module):
    """Multi-head self-attention, fused qkv kernel ``[D, 3, H, hd]``."""

    def __init__(self, cfg: CLIPVisionConfig, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        d, h, hd = cfg.width, cfg.heads, cfg.head_dim
        self.heads, self.head_dim, self.dtype = h, hd, dtype
        self.qkv_kernel = param(_init(rngs, (d, 3, h, hd), d**-0.5, param_dtype), ("embed", None, "heads", "head_dim"))
        self.qkv_bias = param(jnp.zeros((3, h, hd), param_dtype), (None, "heads", "head_dim"))
        self.out_kernel = param(_init(rngs, (h, hd, d), d**-0.5, param_dtype), ("heads", "head_dim", "embed"))
        self.out_bias = param(jnp.zeros((d,), param_dtype), ("embed",))

    def __call__(self, x: jax.Array, first_query_only: bool = False) -> jax.Array:
        """``[B, T, D] -> [B, T, D]``; ``first_query_only``: only token 0 attends (``[B, 1, D]``
        out), skipping the other queries' projections (the last block under CLS pooling)."""
        b, t, d = x.shape
        dt = self.dtype
        kernel = self.qkv_kernel.get_value().astype(dt)
        bias = self.qkv_bias.get_value().astype(dt)
        if first_query_only:
            kv = (x.astype(dt) @ kernel[:, 1:].reshape(d, -1) + bias[1:].reshape(-1)).reshape(b, t, 2, self.heads, self.head_dim)
            k, v = kv[:, :, 0], kv[:, :, 1]
            q = (x[:, :1].astype(dt) @ kernel[:, 0].reshape(d, -1) + bias[0].reshape(-1)).reshape(b, 1, self.heads, self.head_dim)
        else:
            qkv = (x.astype(dt) @ kernel.reshape(d, -1) + bias.reshape(-1)).reshape(b, t, 3, self.heads, self.head_dim)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, hd]
        # head-major batched matmuls ([B, H, T, hd]): XLA CPU runs them ~3x faster than the einsums
        q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q * jnp.asarray(self.head_dim**-0.5, dt), k, v))
        logits = jnp.matmul(q, jnp.swapaxes(k, -1, -2), preferred_element_type=jnp.float32)  # [B, H, Tq, T]
        probs = jax.nn.softmax(logits, axis=-1).astype(dt)
        o = jnp.swapaxes(jnp.matmul(probs, v), 1, 2)  # [B, Tq, H, hd]
        wo = self.out_kernel.get_value().astype(dt).reshape(-1, d)
        return o.reshape(b, q.shape[2], -1) @ wo + self.out_bias.get_value().astype(dt)


class MLP(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        d, m = cfg.width, cfg.mlp_dim
        self.act, self.dtype = cfg.act, dtype
        self.fc1_kernel = param(_init(rngs, (d, m), d**-0.5, param_dtype), ("embed", "mlp"))
        self.fc1_bias = param(jnp.zeros((m,), param_dtype), ("mlp",))
        self.fc2_kernel = param(_init(rngs, (m, d), m**-0.5, param_dtype), ("mlp", "embed"))
        self.fc2_bias = param(jnp.zeros((d,), param_dtype), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        h = x.astype(dt) @ self.fc1_kernel.get_value().astype(dt) + self.fc1_bias.get_value().astype(dt)
        if self.act == "quick_gelu":
            h = h * jax.nn.sigmoid(jnp.asarray(1.702, dt) * h)
        else:
            h = jax.nn.gelu(h, approximate=False)
        return h @ self.fc2_kernel.get_value().astype(dt) + self.fc2_bias.get_value().astype(dt)


class Block(nnx.Module):
    """Pre-norm residual block: ``x + ls1 * attn(ln_1(x))``, ``x + ls2 * mlp(ln_2(x))``."""

    def __init__(self, cfg: CLIPVisionConfig, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.ln_1 = LayerNorm(cfg.width, cfg.layer_norm_eps, param_dtype)
        self.attn = Attention(cfg, rngs, dtype, param_dtype)
        self.ln_2 = LayerNorm(cfg.width, cfg.layer_norm_eps, param_dtype)
        self.mlp = MLP(cfg, rngs, dtype, param_dtype)
        if cfg.layer_scale:
            self.ls_1 = param(jnp.ones((cfg.width,), param_dtype), ("embed",))
            self.ls_2 = param(jnp.ones((cfg.width,), param_dtype), ("embed",))
        else:
            self.ls_1 = self.ls_2 = None

    def __call__(self, x: jax.Array, first_token_only: bool = False) -> jax.Array:
        """``[B, T, D] -> [B, T, D]`` (``[B, 1, D]``, token 0 only, with ``first_token_only``)."""
        a = self.attn(self.ln_1(x), first_query_only=first_token_only)
        if self.ls_1 is not None:
            a = a * self.ls_1.get_value().astype(a.dtype)
        x = (x[:, :1] if first_token_only else x) + a.astype(x.dtype)
        m = self.mlp(self.ln_2(x))
        if self.ls_2 is not None:
            m = m * self.ls_2.get_value().astype(m.dtype)
        return x + m.astype(x.dtype)


# ------------------------------------------------------------------------------------- tower


@functools.lru_cache(maxsize=64)
def _scan_body(graphdef):
    """One scan body per block graphdef, so eager (un-jitted) calls reuse jax's trace cache. It
    carries the whole stacked state and indexes block ``i`` out of it: scanning over a slice of
    the stack instead would copy that slice of the weights on every call."""

    def body(carry, i):
        h, state = carry
        layer_state = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), state)
        return (constrain(nnx.merge(graphdef, layer_state)(h), ("batch", None, None)), state), None

    return body


class CLIPVisionTransformer(nnx.Module):
    """CLIP ViT image tower (open_clip ``VisionTransformer`` / HF ``CLIPVisionModel``).

    ``pixels`` are ``[B, 3, H, W]`` (already normalised, see :mod:`cgjax.preprocess`).
    """

    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs | None = None, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config, self.dtype = cfg, dtype
        d = cfg.width
        ph, pw = cfg.patch_size
        self.patch_embed = param(_init(rngs, (ph, pw, 3, d), (3 * ph * pw) ** -0.5, param_dtype),
                                 ("patch", "patch", "channels", "embed"))
        self.class_embedding = param(_init(rngs, (d,), d**-0.5, param_dtype), ("embed",))
        self.pos_embedding = param(_init(rngs, (cfg.num_tokens, d), d**-0.5, param_dtype), ("positions", "embed"))
        self.ln_pre = LayerNorm(d, cfg.layer_norm_eps, param_dtype) if cfg.ln_pre else None

        @nnx.split_rngs(splits=cfg.layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(r):
            return Block(cfg, r, dtype, param_dtype)

        self.blocks = make_blocks(rngs)
        self.ln_post = LayerNorm(d, cfg.layer_norm_eps, param_dtype)
        self.proj = (param(_init(rngs, (d, cfg.output_dim), d**-0.5, param_dtype), ("embed", "proj"))
                     if cfg.output_dim is not None else None)

    # ---- pieces

    def patch_embeddings(self, pixels: jax.Array) -> jax.Array:
        """``[B, 3, H, W]`` -> ``[B, gh*gw, D]``: the stride-``patch`` conv (open_clip ``conv1``,
        HF ``patch_embedding``) as a patch reshape + one matmul, patches in row-major order."""
        cfg, dt = self.config, self.dtype
        b, c, h, w = pixels.shape
        if c != 3 or (h, w) != cfg.image_size:
            raise ValueError(f"pixels must be [B, 3, {cfg.image_size[0]}, {cfg.image_size[1]}], got {tuple(pixels.shape)}")
        (ph, pw), (gh, gw) = cfg.patch_size, cfg.grid
        x = pixels.astype(dt).reshape(b, 3, gh, ph, gw, pw)
        return jnp.einsum("bcyhxw,hwcd->byxd", x, self.patch_embed.get_value().astype(dt)).reshape(b, gh * gw, -1)

    def embed(self, pixels: jax.Array) -> jax.Array:
        """Patch + class + position embeddings, then ``ln_pre``: HF ``hidden_states[0]``."""
        cfg, dt = self.config, self.dtype
        x = self.patch_embeddings(pixels)
        b = x.shape[0]
        cls = jnp.broadcast_to(self.class_embedding.get_value().astype(dt), (b, 1, cfg.width))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embedding.get_value().astype(dt)
        return self.ln_pre(x) if self.ln_pre is not None else x

    def run_blocks(self, x: jax.Array, start: int = 0, stop: int | None = None) -> jax.Array:
        """Apply blocks ``start .. stop-1`` (a scan over those indices of the stacked params)."""
        stop = self.config.layers if stop is None else stop
        if not 0 <= start <= stop <= self.config.layers:
            raise ValueError(f"block range [{start}, {stop}) is outside 0..{self.config.layers}")
        if start == stop:
            return x
        graphdef, state = nnx.split(self.blocks)
        (x, _), _ = jax.lax.scan(_scan_body(graphdef), (x, state), jnp.arange(start, stop))
        return x

    def _hidden_index(self, layer: int) -> int:
        n = self.config.layers
        idx = layer + n + 1 if layer < 0 else layer
        if not 0 <= idx <= n:
            raise ValueError(f"hidden state index {layer} is out of range for {n} layers (valid: {-n - 1}..{n})")
        return idx

    # ---- public API

    def hidden_states(self, pixels: jax.Array, layer: int = -2) -> jax.Array:
        """``[B, T, D]`` exactly as HF ``outputs.hidden_states[layer]``: 0 = embeddings after
        ``ln_pre``, ``i`` = output of block ``i-1``; negative indices count from the end
        (``-1`` = last block, ``-2`` = LLaVA's feature layer). Only the blocks needed are run."""
        return self.run_blocks(self.embed(pixels), 0, self._hidden_index(layer))

    def pool(self, x: jax.Array) -> jax.Array:
        """Final tokens ``[B, T, D]`` -> pooled ``[B, D]`` with ``ln_post`` (HF ``pooler_output``)."""
        if self.config.final_ln_after_pool:
            pooled = x[:, 0] if self.config.pool == "tok" else x[:, 1:].mean(axis=1)
            return self.ln_post(pooled)
        x = self.ln_post(x)
        return x[:, 0] if self.config.pool == "tok" else x[:, 1:].mean(axis=1)

    def pooled(self, pixels: jax.Array) -> jax.Array:
        """Pooled, ``ln_post``-normalised features ``[B, D]`` (before ``proj``). With CLS
        pooling the last block is computed for the CLS token only (same values, fewer FLOPs)."""
        x = self.embed(pixels)
        n = self.config.layers
        if self.config.pool != "tok" or n == 0:
            return self.pool(self.run_blocks(x))
        x = self.run_blocks(x, 0, n - 1)
        graphdef, state = nnx.split(self.blocks)
        last = nnx.merge(graphdef, jax.tree.map(lambda a: a[n - 1], state))
        return self.pool(last(x, first_token_only=True))

    def encode_image(self, pixels: jax.Array, normalize: bool = False) -> jax.Array:
        """Image embedding ``[B, output_dim]`` (``[B, width]`` without ``proj``), as open_clip's
        ``encode_image``; ``normalize=True`` divides by the L2 norm (computed in fp32)."""
        pooled = self.pooled(pixels)
        out = pooled if self.proj is None else pooled @ self.proj.get_value().astype(pooled.dtype)
        if normalize:
            of = out.astype(jnp.float32)
            out = (of / jnp.linalg.norm(of, axis=-1, keepdims=True)).astype(out.dtype)
        return out

    __call__ = encode_image
