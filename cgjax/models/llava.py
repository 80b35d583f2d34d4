"""LLaVA (HF ``LlavaForConditionalGeneration``) in Flax NNX: CLIP vision tower -> 2-layer GELU
projector -> LLaMA, image features scattered into the image-token positions of the prompt.

The forward is split into small pieces that other layers (the concept tokens) reuse:
:meth:`Llava.get_image_features` (tower -> feature layer -> select strategy -> projector),
:meth:`Llava.merge_image_features` (transformers 5 ``masked_scatter`` semantics) and
``language_model`` (a :class:`~cgjax.models.llama.LlamaForCausalLM`).
"""
from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cgjax import quantize, sharding
from cgjax.models.clip import CLIPVisionConfig, CLIPVisionTransformer
from cgjax.models.llama import F32, LlamaConfig, LlamaForCausalLM, EPHEMERAL_CONFIG_KEYS, config_as_dict
from cgjax.quantize import QuantConfig

# HF CLIPVisionConfig keys modelled by CLIPVisionConfig (the rest is kept in ``vision_extra``).
_VISION_KEYS = {"hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
                "patch_size", "hidden_act", "layer_norm_eps", "model_type", "num_channels"}
_PROJECTOR_ACTS = ("gelu",)


def vision_config_to_hf(cfg: CLIPVisionConfig, extra: Mapping[str, Any] | None = None) -> dict:
    """HF ``CLIPVisionConfig`` dict of an HF-style CLIP tower (``CLIPVisionConfig.from_hf``'s inverse)."""
    def one(x):
        return x[0] if x[0] == x[1] else list(x)

    d = dict(extra or {})
    d.update(hidden_size=cfg.width, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
             intermediate_size=cfg.mlp_dim, image_size=one(cfg.image_size), patch_size=one(cfg.patch_size),
             hidden_act=cfg.act, layer_norm_eps=cfg.layer_norm_eps, num_channels=3, model_type="clip_vision_model")
    return d


@dataclasses.dataclass
class LlavaConfig:
    """LLaVA architecture. ``from_hf``/``to_hf`` convert to/from an HF ``LlavaConfig`` dict.

    ``vision_feature_layer``: an int index into the tower's hidden states (-2: LLaVA-1.5; -1:
    last). ``vision_feature_select_strategy``: ``default`` drops the CLS token, ``full`` keeps it.
    """

    vision_config: CLIPVisionConfig
    text_config: LlamaConfig
    image_token_id: int = 32000
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    image_seq_length: int = 576
    tie_word_embeddings: bool = False
    extra: dict = dataclasses.field(default_factory=dict)
    vision_extra: dict = dataclasses.field(default_factory=dict)

    def __hash__(self):  # static (graphdef) metadata must hash; configs are not mutated after use
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str))

    def __post_init__(self):
        if isinstance(self.vision_feature_layer, (list, tuple)):
            raise NotImplementedError("a list of vision_feature_layer values is not supported (only an int)")
        self.vision_feature_layer = int(self.vision_feature_layer)
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', "
                             f"got {self.vision_feature_select_strategy!r}")
        if self.projector_hidden_act not in _PROJECTOR_ACTS:
            raise NotImplementedError(f"projector_hidden_act {self.projector_hidden_act!r} is not supported "
                                      f"(only {_PROJECTOR_ACTS})")
        if self.vision_config.output_dim is not None:
            raise ValueError("LLaVA's vision tower has no projection (vision_config.output_dim must be None)")

    @property
    def num_image_tokens(self) -> int:
        n = self.vision_config.grid[0] * self.vision_config.grid[1]
        return n if self.vision_feature_select_strategy == "default" else n + 1

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any] | Any) -> "LlavaConfig":
        d = copy.deepcopy(config_as_dict(hf))
        if d.get("model_type", "llava") != "llava":
            raise ValueError(f"not a LLaVA config: model_type={d.get('model_type')!r}")
        v = dict(d.pop("vision_config", None) or {})
        if v.get("model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
            raise NotImplementedError(f"vision tower {v.get('model_type')!r} is not supported (only CLIP)")
        t = dict(d.pop("text_config", None) or {})
        if t.get("model_type", "llama") != "llama":
            raise NotImplementedError(f"language model {t.get('model_type')!r} is not supported (only llama)")
        text = LlamaConfig.from_hf(t)
        tok = d.pop("image_token_id", None)
        legacy = d.pop("image_token_index", None)
        tok = legacy if tok is None else tok
        kw = dict(
            vision_config=CLIPVisionConfig.from_hf(v),
            text_config=text,
            image_token_id=int(32000 if tok is None else tok),
            vision_feature_layer=d.pop("vision_feature_layer", -2),
            vision_feature_select_strategy=d.pop("vision_feature_select_strategy", "default"),
            projector_hidden_act=d.pop("projector_hidden_act", "gelu"),
            multimodal_projector_bias=bool(d.pop("multimodal_projector_bias", True)),
            image_seq_length=int(d.pop("image_seq_length", 576)),
            tie_word_embeddings=bool(d.pop("tie_word_embeddings", text.tie_word_embeddings)),
        )
        d.pop("model_type", None)
        kw["extra"] = {k: val for k, val in d.items() if k not in EPHEMERAL_CONFIG_KEYS}
        kw["vision_extra"] = {k: val for k, val in v.items() if k not in _VISION_KEYS | EPHEMERAL_CONFIG_KEYS}
        return cls(**kw)

    def to_hf(self) -> dict:
        d = dict(self.extra)
        d.update(
            model_type="llava",
            architectures=["LlavaForConditionalGeneration"],
            vision_config=vision_config_to_hf(self.vision_config, self.vision_extra),
            text_config=self.text_config.to_hf(),
            image_token_index=self.image_token_id,
            vision_feature_layer=self.vision_feature_layer,
            vision_feature_select_strategy=self.vision_feature_select_strategy,
            projector_hidden_act=self.projector_hidden_act,
            multimodal_projector_bias=self.multimodal_projector_bias,
            image_seq_length=self.image_seq_length,
            tie_word_embeddings=self.tie_word_embeddings,
        )
        return d


# The llava-hf config.json values (CLIP ViT-L/14-336 + Vicuna v1.5 / Llama-2-13b; text and
# top-level vocab 32064 in both llava-1.5-7b-hf and llava-1.5-13b-hf): 7,063,427,072 and
# 13,351,494,656 parameters.
_CLIP_L14_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                 "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                 "projection_dim": 768, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


def _llava_15(hidden, ffn, layers, heads) -> dict:
    return {
        "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
        "image_token_index": 32000, "pad_token_id": 32001, "ignore_index": -100,
        "projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "image_seq_length": 576, "tie_word_embeddings": False, "vocab_size": 32064,
        "vision_config": dict(_CLIP_L14_336),
        "text_config": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32064,
                        "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
                        "num_attention_heads": heads, "num_key_value_heads": heads,
                        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                        "hidden_act": "silu", "tie_word_embeddings": False, "pad_token_id": 0,
                        "bos_token_id": 1, "eos_token_id": 2},
    }


LLAVA_PRESETS: dict[str, dict] = {
    "llava-1.5-7b": _llava_15(4096, 11008, 32, 32),
    "llava-1.5-13b": _llava_15(5120, 13824, 40, 40),
}


# ----------------------------------------------------------------------------------------------

class Dense(nnx.Module):
    """``x @ kernel + bias``; the kernel quantized with an enabled ``quant`` (:mod:`cgjax.quantize`)."""

    def __init__(self, din: int, dout: int, axes, *, bias: bool, param_dtype, rngs: nnx.Rngs,
                 quant: QuantConfig | None = None, name: str = "linear"):
        self.quantized = quant is not None and quant.enabled
        if self.quantized:
            self.kernel = sharding.param(jnp.zeros((din, dout), quant.qtype), axes)
            self.kernel_scale = sharding.param(jnp.ones(quantize.scale_shape((din, dout), 1, quant, name), F32),
                                               quantize.scale_axes(axes, 1))
            self.activations = quant.activations
        else:
            self.kernel = sharding.param(0.02 * jax.random.normal(rngs.params(), (din, dout), param_dtype), axes)
        self.bias = sharding.param(jnp.zeros((dout,), param_dtype), axes[1:]) if bias else None

    def __call__(self, x):
        if self.quantized:
            y = quantize.dot(x, self.kernel.get_value(), self.kernel_scale.get_value(), 1, self.activations)
        else:
            y = x @ self.kernel.get_value().astype(x.dtype)
        return y if self.bias is None else y + self.bias.get_value().astype(x.dtype)


class LlavaMultiModalProjector(nnx.Module):
    """``linear_2(gelu(linear_1(x)))`` (exact erf GELU, HF ``ACT2FN['gelu']``)."""

    def __init__(self, config: LlavaConfig, *, param_dtype, rngs: nnx.Rngs, quant: QuantConfig | None = None):
        dv, dt = config.vision_config.width, config.text_config.hidden_size
        b = config.multimodal_projector_bias
        kw = dict(bias=b, param_dtype=param_dtype, rngs=rngs, quant=quant)
        self.linear_1 = Dense(dv, dt, ("proj", "mlp"), name="multi_modal_projector.linear_1", **kw)
        self.linear_2 = Dense(dt, dt, ("mlp", "embed"), name="multi_modal_projector.linear_2", **kw)

    def __call__(self, x):
        return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=False))


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


class Llava(nnx.Module):
    """HF ``LlavaForConditionalGeneration`` in NNX (``vision_tower``, ``multi_modal_projector``,
    ``language_model``). ``dtype`` is the compute dtype (fp32 default)."""

    def __init__(self, config: LlavaConfig, *, dtype=F32, param_dtype=F32, rngs: nnx.Rngs | None = None,
                 quant: QuantConfig | None = None):
        """``quant``: the language model's linear weights (decoder layers, untied ``lm_head``) and
        the projector held quantized (:mod:`cgjax.quantize`); the vision tower and the embeddings are not."""
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.vision_tower = CLIPVisionTransformer(config.vision_config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.multi_modal_projector = LlavaMultiModalProjector(config, param_dtype=param_dtype, rngs=rngs, quant=quant)
        self.language_model = LlamaForCausalLM(config.text_config, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                               quant=quant)
        self.quant = quant if quant is not None else QuantConfig()

    def get_image_features(self, pixel_values) -> jax.Array:
        """``pixel_values [B, 3, H, W]`` -> projected features ``[B, n_img, D_text]``."""
        h = self.vision_tower.hidden_states(jnp.asarray(pixel_values), layer=self.config.vision_feature_layer)
        if self.config.vision_feature_select_strategy == "default":
            h = h[:, 1:]
        return self.multi_modal_projector(h.astype(self.dtype))

    def merge_image_features(self, input_ids, image_features, inputs_embeds=None) -> jax.Array:
        """Token embeddings of ``input_ids [B, T]`` with the image features placed at the
        image-token positions: the k-th image token of the batch (row-major) gets the k-th row of
        ``image_features`` flattened to ``[N, D]`` (transformers 5 ``masked_scatter``)."""
        input_ids = jnp.asarray(input_ids)
        if inputs_embeds is None:
            inputs_embeds = self.language_model.embed(input_ids)
        feats = jnp.asarray(image_features).reshape(-1, inputs_embeds.shape[-1]).astype(inputs_embeds.dtype)
        is_img = input_ids == self.config.image_token_id
        if _is_concrete(is_img):
            n_tok = int(np.asarray(is_img).sum())
            if n_tok != feats.shape[0]:
                raise ValueError(f"image features and image tokens do not match: {n_tok} image tokens "
                                 f"(id {self.config.image_token_id}) in input_ids, {feats.shape[0]} feature rows")
        k = jnp.cumsum(is_img.reshape(-1).astype(jnp.int32)) - 1
        gathered = jnp.take(feats, jnp.clip(k, 0, max(feats.shape[0] - 1, 0)), axis=0).reshape(inputs_embeds.shape)
        return jnp.where(is_img[..., None], gathered, inputs_embeds)

    def embed_inputs(self, input_ids, pixel_values=None) -> jax.Array:
        """``inputs_embeds`` of a prompt: token embeddings, image features merged in if given."""
        if pixel_values is None:
            return self.language_model.embed(input_ids)
        return self.merge_image_features(input_ids, self.get_image_features(pixel_values))

    def __call__(self, input_ids, pixel_values=None, attention_mask=None, position_ids=None, cache=None,
                 return_attn_rows=None):
        """fp32 logits ``[B, T, V]``; ``(logits, cache)`` when a ``cache`` is given;
        ``return_attn_rows`` appends the per-layer attention rows (see ``LlamaForCausalLM``)."""
        embeds = self.embed_inputs(input_ids, pixel_values)
        out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                  cache=cache, return_attn_rows=return_attn_rows)
        if cache is None and return_attn_rows is None:
            return out[0]
        return out
