"""open_clip / HF CLIP vision tower <-> :class:`cgjax.models.clip.CLIPVisionTransformer`.

Python API::

    vis = load("ViT-B-32", "open_clip_model.safetensors")       # or a live open_clip model
    model, pp = vis                                              # an OpenCLIPVision(model, preprocess)
    save(model, "visual.safetensors")                            # open_clip ``visual.*`` state dict

``model_name`` is anything open_clip knows (``open_clip.get_model_config``, including configs
registered with ``open_clip.add_model_config``), ``local-dir:PATH`` or ``hf-hub:ORG/NAME``
(an ``open_clip_config.json`` with ``model_cfg`` + ``preprocess_cfg`` next to the weights;
``hf-hub`` is resolved from the local HF cache only, never downloaded).

Only the image tower is converted: :func:`save` writes ``visual.*`` keys, so
``open_clip.create_model(name).load_state_dict(sd, strict=False)`` reports only text-tower
keys missing. :func:`hf_clip_vision_rules` gives the rule table for HF ``CLIPVisionModel`` keys
(``vision_model.*`` under any prefix), used by the LLaVA converter.

CLI::

    python -m converters.openclip to-orbax MODEL_NAME SRC DST   # torch checkpoint -> orbax
    python -m converters.openclip to-torch MODEL_NAME SRC DST   # orbax -> .safetensors / .pt

(``--add-config cfg.json`` registers a custom open_clip config first; ``SRC -`` takes the
weights shipped in a ``local-dir:`` / ``hf-hub:`` folder; ``--force`` overwrites ``DST``.)
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cgjax import checkpoints, persistence, sharding as shd
from cgjax.models.clip import CLIPVisionConfig, CLIPVisionTransformer
from cgjax.preprocess import PreprocessConfig
from cgjax.prototypes.head import PrototypeHead
from converters import common as C

# ----------------------------------------------------------------------------------- rules


def openclip_vision_rules(prefix: str = "visual.") -> list[C.Rule]:
    """Rule table for open_clip ``VisionTransformer`` keys (``prefix`` + ``conv1.weight`` ...)."""
    p = prefix.replace(".", r"\.")
    blk = p + r"transformer\.resblocks\.(\d+)\."
    return C.as_rules([
        (p + r"conv1\.weight", "patch_embed", C.Conv2d()),
        (p + r"class_embedding", "class_embedding"),
        (p + r"positional_embedding", "pos_embedding"),
        (p + r"ln_pre\.weight", "ln_pre.scale"),
        (p + r"ln_pre\.bias", "ln_pre.bias"),
        (blk + r"ln_1\.weight", "blocks.ln_1.scale[{0}]"),
        (blk + r"ln_1\.bias", "blocks.ln_1.bias[{0}]"),
        (blk + r"attn\.in_proj_weight", "blocks.attn.qkv_kernel[{0}]", C.Linear(1)),
        (blk + r"attn\.in_proj_bias", "blocks.attn.qkv_bias[{0}]", C.Reshape()),
        (blk + r"attn\.out_proj\.weight", "blocks.attn.out_kernel[{0}]", C.Linear(2)),
        (blk + r"attn\.out_proj\.bias", "blocks.attn.out_bias[{0}]"),
        (blk + r"ls_1\.gamma", "blocks.ls_1[{0}]"),
        (blk + r"ln_2\.weight", "blocks.ln_2.scale[{0}]"),
        (blk + r"ln_2\.bias", "blocks.ln_2.bias[{0}]"),
        (blk + r"mlp\.c_fc\.weight", "blocks.mlp.fc1_kernel[{0}]", C.Linear(1)),
        (blk + r"mlp\.c_fc\.bias", "blocks.mlp.fc1_bias[{0}]"),
        (blk + r"mlp\.c_proj\.weight", "blocks.mlp.fc2_kernel[{0}]", C.Linear(1)),
        (blk + r"mlp\.c_proj\.bias", "blocks.mlp.fc2_bias[{0}]"),
        (blk + r"ls_2\.gamma", "blocks.ls_2[{0}]"),
        (p + r"ln_post\.weight", "ln_post.scale"),
        (p + r"ln_post\.bias", "ln_post.bias"),
        (p + r"proj", "proj"),
    ])


def hf_clip_vision_rules(prefix: str = "vision_model.", projection_key: str | None = None) -> list[C.Rule]:
    """Rule table for HF ``CLIPVisionModel`` keys under ``prefix`` (``"vision_model."`` for a
    ``CLIPVisionModel``, ``"vision_tower.vision_model."`` / ``"model.vision_tower.vision_model."``
    inside LLaVA). ``projection_key``: e.g. ``"visual_projection.weight"`` for
    ``CLIPVisionModelWithProjection`` (maps to ``proj``). q/k/v are written into the fused
    ``qkv_kernel`` slots 0/1/2."""
    p = prefix.replace(".", r"\.")
    lay = p + r"encoder\.layers\.(\d+)\."
    rules = [
        (p + r"embeddings\.patch_embedding\.weight", "patch_embed", C.Conv2d()),
        (p + r"embeddings\.class_embedding", "class_embedding"),
        (p + r"embeddings\.position_embedding\.weight", "pos_embedding"),
        (p + r"embeddings\.position_ids", None),  # buffer saved by old transformers versions
        (p + r"pre_layrnorm\.weight", "ln_pre.scale"),
        (p + r"pre_layrnorm\.bias", "ln_pre.bias"),
        (lay + r"layer_norm1\.weight", "blocks.ln_1.scale[{0}]"),
        (lay + r"layer_norm1\.bias", "blocks.ln_1.bias[{0}]"),
    ]
    for slot, name in enumerate(("q", "k", "v")):
        rules += [
            (lay + rf"self_attn\.{name}_proj\.weight", f"blocks.attn.qkv_kernel[{{0}},:,{slot}]", C.Linear(1)),
            (lay + rf"self_attn\.{name}_proj\.bias", f"blocks.attn.qkv_bias[{{0}},{slot}]", C.Reshape()),
        ]
    rules += [
        (lay + r"self_attn\.out_proj\.weight", "blocks.attn.out_kernel[{0}]", C.Linear(2)),
        (lay + r"self_attn\.out_proj\.bias", "blocks.attn.out_bias[{0}]"),
        (lay + r"layer_norm2\.weight", "blocks.ln_2.scale[{0}]"),
        (lay + r"layer_norm2\.bias", "blocks.ln_2.bias[{0}]"),
        (lay + r"mlp\.fc1\.weight", "blocks.mlp.fc1_kernel[{0}]", C.Linear(1)),
        (lay + r"mlp\.fc1\.bias", "blocks.mlp.fc1_bias[{0}]"),
        (lay + r"mlp\.fc2\.weight", "blocks.mlp.fc2_kernel[{0}]", C.Linear(1)),
        (lay + r"mlp\.fc2\.bias", "blocks.mlp.fc2_bias[{0}]"),
        (p + r"post_layernorm\.weight", "ln_post.scale"),
        (p + r"post_layernorm\.bias", "ln_post.bias"),
    ]
    if projection_key:
        rules.append((projection_key.replace(".", r"\."), "proj", C.Linear(1)))
    return C.as_rules(rules)


# ----------------------------------------------------------------------------------- configs

_CKPT_NAMES = (
    "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth", "model.safetensors.index.json", "model.safetensors", "pytorch_model.bin",
    "pytorch_model.pth", "model.pth",
)


def _find_checkpoint(folder: str) -> str | None:
    for name in _CKPT_NAMES:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    return None


def _read_hub_config(folder: str, what: str) -> dict:
    path = os.path.join(folder, "open_clip_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: {path} does not exist")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    if "model_cfg" not in cfg:
        raise ValueError(f"{path}: no 'model_cfg' key")
    return cfg


def _hf_cache_folder(repo_id: str, cache_dir: str | None) -> str:
    from huggingface_hub import try_to_load_from_cache  # optional [torch] extra

    path = try_to_load_from_cache(repo_id, "open_clip_config.json", cache_dir=cache_dir)
    if not isinstance(path, str):
        raise FileNotFoundError(
            f"hf-hub:{repo_id} is not in the local Hugging Face cache ({cache_dir or 'default cache'}); "
            "download it first (this converter works offline only)")
    return os.path.dirname(path)


def resolve_model_name(model_name: str, cache_dir: str | None = None) -> tuple[dict, dict, str | None]:
    """``model_name`` -> ``(model_cfg, preprocess_cfg, default_checkpoint_or_None)`` as open_clip
    resolves them (``preprocess_cfg`` = open_clip defaults + the hub config, size = image size)."""
    import open_clip  # optional [torch] extra
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict  # optional [torch] extra

    pp = dataclasses.asdict(PreprocessCfg())
    ckpt = None
    if model_name.startswith("local-dir:"):
        folder = model_name[len("local-dir:"):]
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{model_name}: directory {folder!r} not found")
        cfg = _read_hub_config(folder, model_name)
        model_cfg, ckpt = cfg["model_cfg"], _find_checkpoint(folder)
        pp = merge_preprocess_dict(pp, cfg.get("preprocess_cfg", {}))
    elif model_name.startswith("hf-hub:"):
        folder = _hf_cache_folder(model_name[len("hf-hub:"):], cache_dir)
        cfg = _read_hub_config(folder, model_name)
        model_cfg, ckpt = cfg["model_cfg"], _find_checkpoint(folder)
        pp = merge_preprocess_dict(pp, cfg.get("preprocess_cfg", {}))
    else:
        model_cfg = open_clip.get_model_config(model_name.replace("/", "-"))
        if model_cfg is None:
            close = difflib.get_close_matches(model_name, open_clip.list_models(), n=5)
            raise ValueError(f"unknown open_clip model name {model_name!r}"
                             + (f"; did you mean {close}?" if close else
                                " (register custom configs with open_clip.add_model_config)"))
    image_size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
    pp["size"] = image_size
    return model_cfg, pp, ckpt


# ----------------------------------------------------------------------------------- load / save


class OpenCLIPVision(NamedTuple):
    """What :func:`load` returns: the image tower and its eval preprocessing."""

    model: CLIPVisionTransformer
    preprocess: PreprocessConfig


def _visual_prefix(tensors: C.TensorStore) -> str:
    if any(k.startswith("visual.") for k in tensors):
        return "visual."
    if "conv1.weight" in tensors:  # a bare VisionTransformer state dict
        return ""
    raise KeyError(f"{tensors.origin}: no open_clip vision tower keys (expected 'visual.conv1.weight', ...)")


def abstract_model(cfg: CLIPVisionConfig, dtype=jnp.float32, param_dtype=jnp.float32) -> CLIPVisionTransformer:
    """An abstract (shape-only) tower, for :func:`converters.common.load_state`."""
    return nnx.eval_shape(lambda: CLIPVisionTransformer(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))


def load(model_name: str, checkpoint_path_or_torch_model: Any = None, dtype=jnp.float32,
         mesh: jax.sharding.Mesh | None = None, *, param_dtype=jnp.float32,
         rules_table=None, cache_dir: str | None = None) -> OpenCLIPVision:
    """Build the cgjax image tower of open_clip model ``model_name`` and fill it from a
    checkpoint: a file / directory (see :func:`converters.common.read_tensors`), a state dict,
    or a live open_clip model (``CLIP`` or its ``.visual``). ``None``: the weights shipped in a
    ``local-dir:`` / ``hf-hub:`` folder. ``dtype``: compute dtype; params are ``param_dtype``.
    With ``mesh``, params are created directly in their shardings (``rules_table``).
    Returns ``OpenCLIPVision(model, preprocess)`` (a named tuple)."""
    model_cfg, pp, default_ckpt = resolve_model_name(model_name, cache_dir)
    src = checkpoint_path_or_torch_model if checkpoint_path_or_torch_model is not None else default_ckpt
    if src is None:
        raise ValueError(f"no checkpoint given for {model_name!r} and none found in its folder")
    live_pp = getattr(getattr(src, "visual", src), "preprocess_cfg", None)
    if isinstance(live_pp, dict):  # a live open_clip model knows its final preprocessing
        pp = {**pp, **live_pp}
    cfg = CLIPVisionConfig.from_open_clip(model_cfg)
    tensors = C.read_tensors(src)
    prefix = _visual_prefix(tensors)
    ignore = [r"(?!visual\.).*"] if prefix else []
    model = C.load_state(abstract_model(cfg, dtype, param_dtype), tensors, openclip_vision_rules(prefix),
                         param_dtype, mesh, rules_table, ignore=ignore)
    return OpenCLIPVision(model, PreprocessConfig.from_open_clip(pp))


def load_head(model_name: str, checkpoint: Any = None, batch_size: int = 32, dtype: Any = None,
              **kw) -> "PrototypeHead":
    """A prototype head (:class:`cgjax.prototypes.PrototypeHead`) over the converted image tower of
    ``model_name`` (see :func:`load`), with the preprocessing from the model's config."""
    kwargs = {} if dtype is None else {"dtype": dtype}
    model, pcfg = load(model_name, checkpoint, **kwargs)
    return PrototypeHead(model, pcfg, model_name, batch_size, **kw)


def export(model: CLIPVisionTransformer, prefix: str = "visual.") -> dict[str, np.ndarray]:
    """open_clip state dict (``prefix`` + vision tower keys) as numpy arrays."""
    return C.export_state(model, openclip_vision_rules(prefix))


def save(model: CLIPVisionTransformer, path: str, prefix: str = "visual.") -> str:
    """Write the tower as an open_clip state dict (``visual.*`` keys only: the text tower is
    not included; load with ``open_clip_model.load_state_dict(sd, strict=False)``).
    ``path``: ``*.safetensors`` -> safetensors, a directory -> ``model.safetensors`` in it,
    anything else (``.pt``/``.bin``) -> ``torch.save``. Written atomically."""
    tensors = export(model, prefix)
    if path.endswith(".safetensors") or os.path.isdir(path):
        return C.save_safetensors(tensors, path)[0]
    import torch  # optional [torch] extra

    sd = {}
    for k, v in tensors.items():
        if v.dtype.name == "bfloat16":
            sd[k] = torch.from_numpy(v.view(np.int16).copy()).view(torch.bfloat16)
        else:
            sd[k] = torch.from_numpy(np.array(v))
    persistence.write_file(path, lambda tmp: torch.save(sd, tmp))
    return path


# ----------------------------------------------------------------------------------- orbax


def save_orbax(model: CLIPVisionTransformer, preprocess: PreprocessConfig, dst: str, model_name: str = "",
               force: bool = False) -> str:
    """Orbax checkpoint of the NNX state plus a JSON with the configs (written atomically by orbax)."""
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not force:
        raise FileExistsError(f"{dst} already exists (pass force=True / --force to overwrite)")
    meta = {"model_name": model_name, "vision_config": dataclasses.asdict(model.config),
            "preprocess": dataclasses.asdict(preprocess)}
    # the old folder stays until the new one is complete, then is replaced whole
    with persistence.atomic_dir(dst, overwrite=force) as tmp:
        checkpoints.save_items(tmp, nnx.state(model, nnx.Param), meta)
    return dst


def load_orbax(src: str, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None, rules_table=None) -> OpenCLIPVision:
    """Inverse of :func:`save_orbax` (params restored directly into their shardings with ``mesh``)."""
    src = os.path.abspath(src)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"orbax checkpoint {src} does not exist")
    meta = checkpoints.read_items_meta(src)
    vc = dict(meta["vision_config"])
    cfg = CLIPVisionConfig(**vc)
    model = abstract_model(cfg, dtype)
    abstract = nnx.state(model, nnx.Param)
    if mesh is not None:
        shardings = shd.state_shardings(abstract, mesh, rules_table or shd.DEFAULT_RULES)
        target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), abstract, shardings)
    else:
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=dev), abstract)
    state = checkpoints.restore_items_state(src, target)
    nnx.update(model, state)
    pp = dict(meta["preprocess"])
    pp["size"] = tuple(pp["size"])
    return OpenCLIPVision(model, PreprocessConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in pp.items()}))


# ----------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m converters.openclip",
                                 description="Convert open_clip vision towers to / from cgjax (orbax) checkpoints.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-orbax", help="open_clip checkpoint -> orbax checkpoint of the cgjax image tower")
    a.add_argument("model_name", help="open_clip model name, local-dir:PATH or hf-hub:ORG/NAME")
    a.add_argument("src", help="checkpoint file / folder ('-' = the weights in a local-dir:/hf-hub: folder)")
    a.add_argument("dst", help="orbax checkpoint directory (must not exist unless --force)")
    a.add_argument("--force", action="store_true")
    b = sub.add_parser("to-torch", help="orbax checkpoint -> open_clip visual.* state dict")
    b.add_argument("model_name")
    b.add_argument("src", help="orbax checkpoint directory written by to-orbax")
    b.add_argument("dst", help="*.safetensors, *.pt / *.bin")
    b.add_argument("--force", action="store_true")
    for p in (a, b):
        p.add_argument("--add-config", action="append", default=[], metavar="PATH",
                       help="register an open_clip model config file / folder first (open_clip.add_model_config)")
    args = ap.parse_args(argv)
    try:
        for path in args.add_config:
            if not os.path.exists(path):
                raise FileNotFoundError(f"--add-config {path}: no such file or folder")
            import open_clip  # optional [torch] extra

            open_clip.add_model_config(path)
        if args.cmd == "to-orbax":
            model, pp = load(args.model_name, None if args.src == "-" else args.src)
            out = save_orbax(model, pp, args.dst, args.model_name, force=args.force)
        else:
            if os.path.exists(args.dst) and not args.force:
                raise FileExistsError(f"{args.dst} already exists (pass --force to overwrite)")
            model, pp = load_orbax(args.src)
            want = CLIPVisionConfig.from_open_clip(resolve_model_name(args.model_name)[0])
            if want != model.config:
                raise ValueError(f"{args.src} holds a tower with config {model.config}, not {args.model_name} ({want})")
            out = save(model, args.dst)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
