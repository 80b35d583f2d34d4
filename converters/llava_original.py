"""Original LLaVA repository checkpoints (haotian-liu/LLaVA ``LlavaLlamaForCausalLM``, e.g.
``liuhaotian/llava-v1.5-7b``, ``llava-v1.6-vicuna-7b``) <-> cgjax :class:`~cgjax.models.llava.Llava`.

Layout: ``config.json`` (a LlamaConfig plus ``mm_vision_tower``, ``mm_vision_select_layer``,
``mm_vision_select_feature``, ``mm_hidden_size``, ``mm_projector_type``, ...) and weights
(safetensors or ``pytorch_model-0000i-of-0000n.bin``, sharded with an index) with keys
``model.embed_tokens.weight``, ``model.layers.N.*``, ``model.norm.weight``, ``lm_head.weight``,
``model.mm_projector.{0,2}.{weight,bias}`` and, for 1.6, ``model.image_newline``.

The vision tower: 1.5 checkpoints do not hold it; it is the separate HF CLIP checkpoint named by
``mm_vision_tower`` (``CLIPVisionModel`` or ``CLIPModel``; keys ``vision_model.*``, or unprefixed
as transformers 5 ``CLIPVisionModel.save_pretrained`` writes them). 1.6 checkpoints were trained
with ``unfreeze_mm_vision_tower`` and hold the fine-tuned tower as
``model.vision_tower.vision_tower.vision_model.*``: as in the original code, those weights win and
the separate tower only supplies its config (known hub towers need nothing, see ``KNOWN_TOWERS``).

Mapping: ``mm_vision_select_layer`` -> ``vision_feature_layer``; ``mm_vision_select_feature``
``patch`` (drop CLS) / ``cls_patch`` (keep) -> ``default`` / ``full``; ``mm_projector_type``
must be ``mlp2x_gelu``. Only the single-crop path is modelled (4-D ``[B, 3, S, S]`` pixels, what
the original project feeds): anyres tiles (``image_aspect_ratio='anyres'``) and
``image_newline`` are not; ``image_newline`` is kept in ``model.llava_original`` and saved back.

Image tokens: the original splices the image features at ``IMAGE_TOKEN_INDEX = -200`` (one id
replaced by ``num_image_tokens`` rows); cgjax places them at ``num_image_tokens`` copies of
``config.image_token_id`` in ``input_ids``. ``load(image_token_index=...)`` sets that id (default:
the text ``vocab_size``, an id no tokenizer emits; its embedding is never used). Build ``input_ids``
as the original does (``tokenizer_image_token``, -200 at ``<image>``) and pass them through
:func:`expand_image_tokens`. Exported to HF (``hf_llava.save``), such a model gets its vocabulary
padded to cover that id, as HF's LLaVA conversion does (:func:`converters.hf_llava.pad_vocab_for_image_token`),
and the tokenizer copied alongside gets an ``<image>`` token at that id (:func:`converters.hf_llava.add_image_token`).

CLI::

    python -m converters.llava_original to-orbax SRC DST [--vision-tower PATH]  # -> hf_llava orbax
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cgjax import persistence
from cgjax.models.llava import LlavaConfig, vision_config_to_hf
from converters import common as C, hf_llava

IMAGE_TOKEN_INDEX = -200  # the original repo's placeholder id for ``<image>``
EMBEDDED_TOWER = "model.vision_tower.vision_tower.vision_model."  # 1.6 checkpoints
_SELECT = {"patch": "default", "cls_patch": "full"}

# Vision tower configs by hub name, used when the checkpoint holds the tower weights (1.6) and
# neither ``vision_tower=`` nor a local copy of ``mm_vision_tower`` gives the config.
_L14 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
        "num_attention_heads": 16, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5}
KNOWN_TOWERS = {"openai/clip-vit-large-patch14-336": dict(_L14, image_size=336),
                "openai/clip-vit-large-patch14": dict(_L14, image_size=224)}


@dataclasses.dataclass(eq=False)  # identity hash: a static attribute of the NNX module
class OriginalSource:
    """What :func:`load` keeps as ``model.llava_original`` for :func:`save`."""

    config: dict  # the source config.json
    image_newline: np.ndarray | None  # ``model.image_newline`` (1.6), unused in single-crop mode
    tower_embedded: bool  # the tower came from ``model.vision_tower.vision_tower.vision_model.*``
    vision_prefix: str  # key prefix of the separate tower checkpoint ("vision_model." or "")


def rules(tied: bool = False, vision_prefix: str = EMBEDDED_TOWER) -> list[C.Rule]:
    """Original-layout keys (tower keys under ``vision_prefix``) <-> :class:`Llava` paths."""
    proj = []
    for idx, lin in (("0", "linear_1"), ("2", "linear_2")):
        proj += [C.Rule(rf"model\.mm_projector\.{idx}\.weight", f"multi_modal_projector.{lin}.kernel", C.Linear(1)),
                 C.Rule(rf"model\.mm_projector\.{idx}\.bias", f"multi_modal_projector.{lin}.bias")]
    return (hf_llava.llama_rules("model.", "lm_head.", "language_model.", tied) + proj
            + hf_llava.clip_vision_rules(vision_prefix) + [C.Rule(r"model\.image_newline", None)])


def expand_image_tokens(input_ids: Sequence[int], config, marker: int = IMAGE_TOKEN_INDEX) -> np.ndarray:
    """Original-style ids (``marker`` at each image) -> cgjax ids (``config.num_image_tokens``
    copies of ``config.image_token_id`` per image). 1-D or ``[B, T]`` (rows must stay equal length)."""
    ids = np.asarray(input_ids)
    if ids.ndim == 2:
        return np.stack([expand_image_tokens(r, config, marker) for r in ids])
    out = []
    for t in ids.tolist():
        out += [config.image_token_id] * config.num_image_tokens if t == marker else [t]
    return np.asarray(out, ids.dtype)


# ----------------------------------------------------------------------------------------------
# config

def _read_config(src: str) -> tuple[dict, str]:
    folder = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no config.json in the original LLaVA checkpoint {src!r}")
    with open(path) as f:
        cfg = json.load(f)
    if "text_config" in cfg or "vision_config" in cfg:
        raise ValueError(f"{path} is a HF LLaVA config (text_config / vision_config): use converters.hf_llava "
                         "(or converters.llava_next)")
    return cfg, folder


def _hf_cached(name: str) -> str | None:
    """Folder of ``name`` in the local Hugging Face cache (never downloads), or None."""
    if not name or name.startswith((".", "/")) or name.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache  # optional [torch] extra

        path = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 (no hub library / bad name: not cached)
        return None
    return os.path.dirname(path) if isinstance(path, str) else None


def _tower(vision_tower: Any, src_cfg: dict, cfg_path: str, embedded: bool) -> tuple[dict, Any]:
    """-> (HF CLIP vision config dict, tower weights source or None)."""
    if vision_tower is None:
        name = src_cfg.get("mm_vision_tower", src_cfg.get("vision_tower"))
        local = name if isinstance(name, str) and os.path.isdir(name) else _hf_cached(name or "")
        if local is not None:
            vision_tower = local
        elif embedded and name in KNOWN_TOWERS:
            return dict(KNOWN_TOWERS[name]), None
        else:
            raise ValueError(
                f"{cfg_path}: 'mm_vision_tower' is {name!r}, which is not a local directory (nor in the local "
                "Hugging Face cache), and the checkpoint holds no vision tower weights; pass vision_tower=PATH "
                "(a CLIPVisionModel / CLIPModel checkpoint directory) or a live transformers CLIPVisionModel")
    hf_cfg, _ = hf_llava.config_dict(vision_tower)
    hf_cfg = hf_cfg.get("vision_config", hf_cfg)  # a full CLIPConfig
    return hf_cfg, (None if embedded else vision_tower)


def llava_config(src_cfg: dict, vision_cfg: dict, image_token_index: int | None = None):
    """Original ``config.json`` + the tower's HF CLIP vision config -> :class:`LlavaConfig`."""
    ptype = src_cfg.get("mm_projector_type", "linear")
    if ptype != "mlp2x_gelu":
        raise NotImplementedError(f"mm_projector_type {ptype!r} is not supported (only 'mlp2x_gelu')")
    feat = src_cfg.get("mm_vision_select_feature", "patch")
    if feat not in _SELECT:
        raise NotImplementedError(f"mm_vision_select_feature {feat!r} is not supported (only {sorted(_SELECT)})")
    width, mm_hidden = vision_cfg.get("hidden_size"), src_cfg.get("mm_hidden_size")
    if mm_hidden is not None and width is not None and int(mm_hidden) != int(width):
        raise ValueError(f"mm_hidden_size {mm_hidden} != the vision tower's hidden_size {width}")
    drop = {"model_type", "architectures", "image_aspect_ratio", "image_grid_pinpoints", "use_mm_proj",
            "tokenizer_model_max_length", "tokenizer_padding_side", "vision_tower"}
    text = {k: v for k, v in src_cfg.items()
            if k not in drop and not k.startswith(("mm_", "tune_mm_", "freeze_mm_", "unfreeze_mm_"))}
    text["model_type"] = "llama"
    vocab = int(text.get("vocab_size", 32000))
    cfg = LlavaConfig.from_hf({
        "model_type": "llava", "vision_config": vision_cfg, "text_config": text,
        "image_token_index": vocab if image_token_index is None else int(image_token_index),
        "vision_feature_layer": int(src_cfg.get("mm_vision_select_layer", -2)),
        "vision_feature_select_strategy": _SELECT[feat],
        "tie_word_embeddings": bool(src_cfg.get("tie_word_embeddings", False)),
    })
    return dataclasses.replace(cfg, image_seq_length=cfg.num_image_tokens)


# ----------------------------------------------------------------------------------------------
# load / save

def load(llava_dir: str, vision_tower: Any = None, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None, *,
         image_token_index: int | None = None, compute_dtype=None, rules_table=None):
    """Original LLaVA checkpoint directory -> :class:`Llava` (``dtype`` parameters).

    ``vision_tower``: a CLIP checkpoint directory or a live ``CLIPVisionModel`` (default: the
    config's ``mm_vision_tower`` if it is a local directory or in the local HF cache). Tower
    weights held by the checkpoint itself (1.6) take precedence. ``image_token_index``: the
    cgjax image token id (default ``vocab_size``; see the module docstring). ``mesh`` /
    ``rules_table`` / ``compute_dtype``: as :func:`converters.hf_llava.load`."""
    llava_dir = os.fspath(llava_dir)
    src_cfg, folder = _read_config(llava_dir)
    main = C.read_tensors(llava_dir)
    embedded = any(k.startswith(EMBEDDED_TOWER) for k in main)
    vision_cfg, tower_src = _tower(vision_tower, src_cfg, os.path.join(folder, "config.json"), embedded)
    cfg = llava_config(src_cfg, vision_cfg, image_token_index)
    entries = {k: main[k] for k in main}
    prefix = EMBEDDED_TOWER
    if tower_src is not None:
        tower = C.read_tensors(tower_src)
        prefix = "vision_model." if any(k.startswith("vision_model.") for k in tower) else ""
        for k in tower:  # a CLIPModel checkpoint also holds the text tower: skip it
            if k.startswith(prefix) and not k.startswith(("text_model.", "text_projection", "visual_projection",
                                                          "logit_scale")):
                if k in entries:
                    raise KeyError(f"tower key {k!r} also occurs in the LLaVA checkpoint {llava_dir!r}")
                entries[k] = tower[k]
    tied = cfg.text_config.tie_word_embeddings
    model = hf_llava.load(C.TensorStore(entries, llava_dir), dtype, mesh, rules(tied, prefix), config=cfg,
                          compute_dtype=compute_dtype, layout="original", rules_table=rules_table)
    newline = main.load("model.image_newline") if "model.image_newline" in main else None
    model.source_dir = folder
    model.llava_original = OriginalSource(src_cfg, newline, embedded, "vision_model." if embedded else prefix)
    return model


def _config_for_save(model, vision_tower_name: str | None) -> dict:
    info = getattr(model, "llava_original", None)
    cfg = model.config
    if info is not None:
        out = dict(info.config)
    else:
        out = cfg.text_config.to_hf()
        out.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama",
                   rope_theta=cfg.text_config.rope_theta, mm_projector_type="mlp2x_gelu",
                   mm_use_im_start_end=False, mm_use_im_patch_token=False, image_aspect_ratio="pad", use_mm_proj=True)
    out.update(mm_vision_select_layer=cfg.vision_feature_layer, mm_hidden_size=cfg.vision_config.width,
               mm_vision_select_feature={v: k for k, v in _SELECT.items()}[cfg.vision_feature_select_strategy],
               tie_word_embeddings=cfg.tie_word_embeddings)
    if vision_tower_name is not None:
        out["mm_vision_tower"] = vision_tower_name
    return out


def save(model, out_dir: str, vision_out_dir: str | None = None, *, embed_vision_tower: bool | None = None,
         vision_tower_name: str | None = None, dtype=None, max_shard_bytes: int | None = None) -> str:
    """Write ``model`` in the original layout (safetensors; each directory atomically).

    The tower goes into the checkpoint as ``model.vision_tower.vision_tower.vision_model.*`` when
    ``embed_vision_tower`` (default: as the source was; False for other sources) and/or into
    ``vision_out_dir`` as a ``CLIPVisionModel`` directory (keys with the source tower's prefix,
    default ``vision_model.``); one of the two is required. ``config.json`` is the source's
    (else synthesised from ``model.config``); ``vision_tower_name`` sets ``mm_vision_tower``
    (default: the source's, else ``vision_out_dir``). ``model.image_newline`` is written back if
    the source had it. ``dtype``: tensor dtype (default: the parameters')."""
    info = getattr(model, "llava_original", None)
    embed = (info.tower_embedded if info is not None else False) if embed_vision_tower is None else embed_vision_tower
    if not embed and vision_out_dir is None:
        raise ValueError("the vision tower would not be saved: pass vision_out_dir= or embed_vision_tower=True")
    if vision_tower_name is None and (info is None or "mm_vision_tower" not in info.config):
        vision_tower_name = os.path.abspath(vision_out_dir) if vision_out_dir else None
    tensors = C.export_state(model, rules(model.config.text_config.tie_word_embeddings))
    if dtype is not None:
        tensors = {k: v.astype(np.dtype(jnp.dtype(dtype))) for k, v in tensors.items()}
    first = next(iter(tensors.values())).dtype
    if info is not None and info.image_newline is not None:
        tensors["model.image_newline"] = info.image_newline.astype(first)
    tower = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(EMBEDDED_TOWER)]}
    if vision_out_dir is not None:
        prefix = info.vision_prefix if info is not None else "vision_model."
        vcfg = dict(vision_config_to_hf(model.config.vision_config, model.config.vision_extra),
                    architectures=["CLIPVisionModel"])
        vision = {prefix + k[len(EMBEDDED_TOWER):]: v for k, v in tower.items()}
        hf_llava.write_checkpoint_dir(vision_out_dir, vision, vcfg, None, max_shard_bytes)
    if embed:
        tensors.update(tower)
    config = _config_for_save(model, vision_tower_name)
    return hf_llava.write_checkpoint_dir(out_dir, tensors, config, getattr(model, "source_dir", None),
                                         max_shard_bytes)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m converters.llava_original", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-orbax", help="original LLaVA checkpoint -> orbax state + config.json (converters.hf_llava)")
    a.add_argument("src")
    a.add_argument("dst")
    a.add_argument("--vision-tower", default=None, help="CLIP checkpoint directory (default: mm_vision_tower)")
    a.add_argument("--image-token-index", type=int, default=None, help="cgjax image token id (default: vocab_size)")
    a.add_argument("--dtype", default="float32")
    a.add_argument("--overwrite", action="store_true", help=persistence.OVERWRITE_HELP)
    args = ap.parse_args(argv)
    persistence.check_output_dir(args.dst, overwrite=args.overwrite, inputs=(args.src,))  # before the (long) load
    model = load(args.src, args.vision_tower, dtype=jnp.dtype(args.dtype), image_token_index=args.image_token_index)
    print(hf_llava.save_orbax(model, args.dst, overwrite=args.overwrite))


if __name__ == "__main__":
    main(sys.argv[1:])
