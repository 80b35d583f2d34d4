"""HF LLaVA (``LlavaForConditionalGeneration``) <-> cgjax :class:`~cgjax.models.llava.Llava`.

Key layouts read (detected from the keys; each is one rule table):

* ``hub``     -- llava-hf on the hub: ``language_model.model.*``, ``language_model.lm_head.*``,
  ``vision_tower.vision_model.*``, ``multi_modal_projector.*``;
* ``saved``   -- what transformers 5 ``save_pretrained`` writes: as ``hub`` but ``vision_tower.*``;
* ``live``    -- a live transformers 5 model's ``state_dict()``: ``model.language_model.*``,
  ``model.vision_tower.*``, ``model.multi_modal_projector.*``, ``lm_head.*``;
* ``live_v4`` -- transformers 4.5x checkpoints: as ``live`` but ``model.vision_tower.vision_model.*``.

``load(src)`` takes a checkpoint directory (single or sharded safetensors, ``.bin``), a
``.safetensors`` file next to its ``config.json``, or a live ``LlavaForConditionalGeneration``.
``save(model, out_dir)`` writes a directory ``LlavaForConditionalGeneration.from_pretrained``
loads (config.json, safetensors, and the tokenizer / processor files of the source directory).

CLI::

    python -m converters.hf_llava to-orbax SRC DST   # HF checkpoint -> orbax state + config.json
    python -m converters.hf_llava to-hf SRC DST      # orbax (from to-orbax) -> HF checkpoint
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cgjax import checkpoints, persistence, quantize, sharding as shd
from cgjax.data.schema import read_json
from cgjax.models.llama import LlamaConfig, LlamaForCausalLM
from cgjax.models.llava import Llava, LlavaConfig
from cgjax.quantize import QuantConfig
from converters import common as C
from converters.openclip import hf_clip_vision_rules

LAYOUTS: dict[str, tuple[str, str, str, str]] = {
    # name: (language model body, lm_head, vision tower, projector) torch prefixes
    "hub": ("language_model.model.", "language_model.lm_head.", "vision_tower.vision_model.", "multi_modal_projector."),
    "saved": ("language_model.model.", "language_model.lm_head.", "vision_tower.", "multi_modal_projector."),
    "live": ("model.language_model.", "lm_head.", "model.vision_tower.", "model.multi_modal_projector."),
    "live_v4": ("model.language_model.", "lm_head.", "model.vision_tower.vision_model.", "model.multi_modal_projector."),
}

# Files of a HF model directory that are not weights / config: copied by ``save``.
QUANTIZATION_FILE = "quantization.json"  # beside config.json in a quantized params-only orbax checkpoint
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "preprocessor_config.json",
                   "processor_config.json", "chat_template.json", "chat_template.jinja", "generation_config.json")


def _esc(prefix: str) -> str:
    return prefix.replace(".", r"\.")


def llama_rules(body_prefix: str = "model.", head_prefix: str = "lm_head.", nnx_prefix: str = "",
                tied: bool = False) -> list[C.Rule]:
    """HF ``LlamaForCausalLM`` keys (``{body_prefix}layers.N...``, ``{head_prefix}weight``) <->
    :class:`~cgjax.models.llama.LlamaForCausalLM` paths under ``nnx_prefix``. With ``tied``, a
    stored ``lm_head.weight`` (a copy of the embedding) is ignored and none is exported."""
    lin, lin2 = C.Linear(1), C.Linear(2)
    layer = r"layers\.(\d+)\."
    body = [
        (r"embed_tokens\.weight", "embed_tokens.embedding", C.IDENTITY),
        (layer + r"self_attn\.q_proj\.weight", "layers.self_attn.q_proj.kernel[{0}]", lin),
        (layer + r"self_attn\.k_proj\.weight", "layers.self_attn.k_proj.kernel[{0}]", lin),
        (layer + r"self_attn\.v_proj\.weight", "layers.self_attn.v_proj.kernel[{0}]", lin),
        (layer + r"self_attn\.o_proj\.weight", "layers.self_attn.o_proj.kernel[{0}]", lin2),
        (layer + r"mlp\.gate_proj\.weight", "layers.mlp.gate_proj.kernel[{0}]", lin),
        (layer + r"mlp\.up_proj\.weight", "layers.mlp.up_proj.kernel[{0}]", lin),
        (layer + r"mlp\.down_proj\.weight", "layers.mlp.down_proj.kernel[{0}]", lin),
        (layer + r"input_layernorm\.weight", "layers.input_layernorm.weight[{0}]", C.IDENTITY),
        (layer + r"post_attention_layernorm\.weight", "layers.post_attention_layernorm.weight[{0}]", C.IDENTITY),
        (r"norm\.weight", "norm.weight", C.IDENTITY),
    ]
    rules = [C.Rule(_esc(body_prefix) + t, nnx_prefix + n, tr) for t, n, tr in body]
    rules.append(C.Rule(_esc(body_prefix) + layer + r"self_attn\.rotary_emb\.inv_freq", None))  # old checkpoints
    head = _esc(head_prefix) + r"weight"
    rules.append(C.Rule(head, None) if tied else C.Rule(head, nnx_prefix + "lm_head.kernel", lin))
    return rules


def clip_vision_rules(torch_prefix: str, nnx_prefix: str = "vision_tower.") -> list[C.Rule]:
    """HF CLIP vision tower keys under ``torch_prefix`` -> the tower under ``nnx_prefix``."""
    return C.prefixed(hf_clip_vision_rules(torch_prefix), "", nnx_prefix)


def projector_rules(torch_prefix: str, nnx_prefix: str = "multi_modal_projector.") -> list[C.Rule]:
    p = _esc(torch_prefix)
    out = []
    for lin in ("linear_1", "linear_2"):
        out += [C.Rule(p + lin + r"\.weight", f"{nnx_prefix}{lin}.kernel", C.Linear(1)),
                C.Rule(p + lin + r"\.bias", f"{nnx_prefix}{lin}.bias")]
    return out


def llava_rules(layout: str = "saved", tied: bool = False) -> list[C.Rule]:
    """The full rule table of one key layout (see the module docstring)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown LLaVA key layout {layout!r}; expected one of {sorted(LAYOUTS)}")
    body, head, vision, proj = LAYOUTS[layout]
    return (llama_rules(body, head, "language_model.", tied) + clip_vision_rules(vision)
            + projector_rules(proj))


def detect_layout(keys: Sequence[str], tied: bool = False) -> str:
    """The layout whose rules match the most keys (ties: the first in ``LAYOUTS``)."""
    best, best_n = None, -1
    for name in LAYOUTS:
        rules = llava_rules(name, tied)
        n = sum(any(r.match(k) is not None for r in rules) for k in keys)
        if n > best_n:
            best, best_n = name, n
    if best_n == 0:
        raise KeyError(f"no LLaVA key layout matches the checkpoint's keys (e.g. {list(keys)[:5]})")
    return best


# ----------------------------------------------------------------------------------------------
# load / save

def config_dict(src: Any) -> tuple[dict, str | None]:
    """(HF config dict, source directory or None)."""
    if hasattr(src, "config") and hasattr(src, "state_dict"):
        return src.config.to_dict(), None
    path = os.fspath(src)
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: no config.json next to the checkpoint {path!r}")

    return read_json(cfg_path), folder  # a corrupt config.json: a DataError naming it


def load(path_or_torch_model: Any, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None,
         rules: Sequence[Any] | None = None, *, compute_dtype=None, layout: str | None = None,
         rules_table=None, config: Any = None, quant: QuantConfig | None = None):
    """HF LLaVA checkpoint (directory / file / live model) -> :class:`Llava` with ``dtype``
    parameters (``compute_dtype`` defaults to ``dtype``). With ``mesh``, every parameter is
    created directly in its sharding (``rules_table``: logical-axis rules, default
    ``cgjax.sharding.DEFAULT_RULES``). ``rules`` overrides the conversion rule table; ``config``
    (a ``LlavaConfig`` or HF LLaVA config dict) the source's config (``source_dir`` is then None).
    ``quant``: the language model and projector weights quantized as they are placed
    (:mod:`cgjax.quantize`), one weight at a time: the full-precision model never exists."""
    if config is None:
        hf_cfg, folder = config_dict(path_or_torch_model)
        cfg = LlavaConfig.from_hf(hf_cfg)
    else:
        cfg, folder = (config if isinstance(config, LlavaConfig) else LlavaConfig.from_hf(config)), None
    tied = cfg.text_config.tie_word_embeddings
    tensors = C.read_tensors(path_or_torch_model)
    if layout is None:
        layout = detect_layout(list(tensors), tied)
    if rules is None:
        rules = llava_rules(layout, tied)
    cdt = dtype if compute_dtype is None else compute_dtype
    abstract = nnx.eval_shape(lambda: Llava(cfg, dtype=cdt, param_dtype=dtype, rngs=nnx.Rngs(0), quant=quant))
    model = C.load_state(abstract, tensors, rules, dtype=dtype, mesh=mesh, rules_table=rules_table)
    model.source_dir = folder
    model.source_layout = layout
    return model


def load_llama(path_or_torch_model: Any, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None, *,
               compute_dtype=None, rules_table=None):
    """HF ``LlamaForCausalLM`` checkpoint (``model.*``, ``lm_head.*``) or live model ->
    :class:`~cgjax.models.llama.LlamaForCausalLM` (text only)."""
    hf_cfg, _ = config_dict(path_or_torch_model)
    cfg = LlamaConfig.from_hf(hf_cfg)
    cdt = dtype if compute_dtype is None else compute_dtype
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, dtype=cdt, param_dtype=dtype, rngs=nnx.Rngs(0)))
    rules = llama_rules("model.", "lm_head.", "", cfg.tie_word_embeddings)
    return C.load_state(abstract, path_or_torch_model, rules, dtype=dtype, mesh=mesh, rules_table=rules_table)


def export_tensors(model, layout: str = "saved", dtype=None) -> dict[str, np.ndarray]:
    """``{torch_key: np.ndarray}`` of ``model`` in ``layout`` (cast to ``dtype`` if given)."""
    tensors = C.export_state(model, llava_rules(layout, model.config.text_config.tie_word_embeddings))
    if dtype is not None:
        dt = np.dtype(jnp.dtype(dtype))
        tensors = {k: v.astype(dt) for k, v in tensors.items()}
    return tensors


def pad_vocab_for_image_token(tensors: dict, hf_config: dict, layout: str, multiple: int = 64) -> bool:
    """HF LLaVA looks the image token up in the text embedding, so its id must be a row of it.
    A model whose ``image_token_index`` lies past the vocabulary (the original LLaVA format's
    default, see :mod:`converters.llava_original`) gets its embedding and ``lm_head`` padded to the
    next multiple of ``multiple`` covering that id, as HF's own LLaVA conversion does: new rows
    are the mean of the existing ones. The image rows' embeddings are replaced by image features,
    and a mean ``lm_head`` row never beats the best existing one, so greedy outputs are unchanged.
    Edits ``tensors`` and ``hf_config`` in place; returns whether it padded."""
    text = hf_config["text_config"]
    vocab, image_id = int(text["vocab_size"]), int(hf_config["image_token_index"])
    if image_id < vocab:
        return False
    new_vocab = -(-(image_id + 1) // multiple) * multiple
    body, head, _, _ = LAYOUTS[layout]
    for key in (body + "embed_tokens.weight", head + "weight"):
        if key not in tensors:  # a tied head has no tensor of its own
            continue
        w = tensors[key]
        if w.shape[0] != vocab:
            raise ValueError(f"{key} has {w.shape[0]} rows, the config's vocab_size is {vocab}")
        mean = w.astype(np.float32).mean(0, keepdims=True).astype(w.dtype)
        tensors[key] = np.concatenate([w, np.repeat(mean, new_vocab - vocab, axis=0)], axis=0)
    text["vocab_size"] = new_vocab
    return True


def save(model, out_dir: str, *, dtype=None, layout: str | None = None, tokenizer_from: str | None = None,
         max_shard_bytes: int | None = None, overwrite: bool = False) -> str:
    """Write ``model`` as a HF LLaVA checkpoint directory (atomic: temp dir, then rename).

    ``layout``: key layout (default: the source's file layout, else ``saved``, what
    transformers 5 writes). An image token id past the vocabulary is made a row of it
    (:func:`pad_vocab_for_image_token`). ``dtype``: tensor dtype (default: the parameters'). Tokenizer /
    processor / generation-config files are copied from ``tokenizer_from`` (default: the
    directory the model was loaded from, if any)."""
    if layout is None:
        src = getattr(model, "source_layout", None)
        layout = src if src in ("hub", "saved") else "saved"
    tensors = export_tensors(model, layout, dtype)
    hf = model.config.to_hf()
    padded = pad_vocab_for_image_token(tensors, hf, layout)
    first = next(iter(tensors.values()))
    hf["dtype"] = str(first.dtype) if first.dtype.name != "bfloat16" else "bfloat16"
    src_dir = tokenizer_from if tokenizer_from is not None else getattr(model, "source_dir", None)
    return write_checkpoint_dir(out_dir, tensors, hf, src_dir, max_shard_bytes,
                                image_token_id=int(hf["image_token_index"]) if padded else None,
                                overwrite=overwrite, inputs=(getattr(model, "source_dir", None),))


def write_checkpoint_dir(out_dir: str, tensors: dict, config: dict, copy_from: str | None = None,
                         max_shard_bytes: int | None = None, image_token_id: int | None = None, *,
                         overwrite: bool = False, inputs: Sequence[str | None] = ()) -> str:
    """A checkpoint directory: safetensors (sharded past ``max_shard_bytes``), ``config.json`` and
    the :data:`TOKENIZER_FILES` found in ``copy_from``; written to a temporary directory beside
    ``out_dir`` and renamed into place (nothing half-written is left on failure). With
    ``image_token_id``, the copied tokenizer gets ``<image>`` there (:func:`add_image_token`).
    An existing ``out_dir`` that cgjax did not write is refused unless ``overwrite``
    (:func:`cgjax.persistence.check_output_dir`), and never when it holds ``copy_from`` or ``inputs``."""
    out_dir = os.path.abspath(out_dir)
    with persistence.atomic_dir(out_dir, overwrite=overwrite, inputs=(copy_from, *inputs)) as tmp:
        C.save_safetensors(tensors, tmp, max_shard_bytes=max_shard_bytes)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True, default=str)
        for name in TOKENIZER_FILES if copy_from else ():
            if os.path.exists(os.path.join(copy_from, name)):
                shutil.copy2(os.path.join(copy_from, name), os.path.join(tmp, name))
        if image_token_id is not None:
            add_image_token(tmp, image_token_id, source=copy_from)
    return out_dir


def add_image_token(tokenizer_dir: str, image_token_id: int, source: str | None = None) -> bool:
    """Give the tokenizer saved in ``tokenizer_dir`` an ``<image>`` special token at
    ``image_token_id``, as HF's LLaVA conversion does for the original format's tokenizer (which
    has none: the original splices images at the placeholder id -200). Appended only when the
    tokenizer has exactly ``image_token_id`` tokens, so the id it gets is that one; otherwise
    (or with no loadable tokenizer) it warns and changes nothing; warnings name ``source`` (where
    the tokenizer was copied from, default ``tokenizer_dir``). Returns whether it changed."""
    name = source or tokenizer_dir
    if not any(os.path.exists(os.path.join(tokenizer_dir, n)) for n in ("tokenizer.json", "tokenizer.model")):
        return False
    from transformers import AddedToken, AutoTokenizer  # optional [torch] extra

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception as e:  # a tokenizer transformers cannot load is copied as it was
        warnings.warn(f"{name}: tokenizer not loadable ({e}); <image> not added", stacklevel=3)
        return False
    have = tok.convert_tokens_to_ids("<image>") if "<image>" in tok.get_vocab() else None
    if have is not None or len(tok) != image_token_id:
        if have != image_token_id:
            where = f"has <image> at id {have}" if have is not None else f"has {len(tok)} tokens"
            warnings.warn(f"{name}: the tokenizer {where}, but the model's image token id is "
                          f"{image_token_id}; the tokenizer is left as it was", stacklevel=3)
        return False
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tok.save_pretrained(tokenizer_dir)
    return True


# ----------------------------------------------------------------------------------------------
# orbax

def save_orbax(model, out_dir: str, *, overwrite: bool = False) -> str:
    """NNX parameter state (orbax, ``state/``) + ``config.json`` (HF form) in ``out_dir`` (atomic;
    an existing folder cgjax did not write is refused unless ``overwrite``)."""
    out_dir = os.path.abspath(out_dir)
    with persistence.atomic_dir(out_dir, overwrite=overwrite, inputs=(getattr(model, "source_dir", None),)) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(model.config.to_hf(), f, indent=2, sort_keys=True, default=str)
        quant = getattr(model, "quant", None)
        if quant is not None and quant.enabled:  # a restart loads it as it is, without quantizing again
            with open(os.path.join(tmp, QUANTIZATION_FILE), "w") as f:
                json.dump(quant.to_json(), f, indent=2)
        checkpoints.save_tree(os.path.join(tmp, "state"), nnx.state(model, nnx.Param).to_pure_dict())
        src = getattr(model, "source_dir", None)  # tokenizer + preprocessing travel with the weights
        for name in TOKENIZER_FILES if src else ():
            if os.path.exists(os.path.join(src, name)):
                shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))
    return out_dir


def is_orbax_dir(path: Any) -> bool:
    """Whether ``path`` (a folder or a URL) is a params-only orbax checkpoint written by :func:`save_orbax`."""
    return isinstance(path, (str, os.PathLike)) and persistence.isdir(persistence.join(path, "state")) \
        and persistence.exists(persistence.join(path, "config.json"))


def load_any(path: str, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None, *, compute_dtype=None,
             rules_table=None, quant: QuantConfig | None = None):
    """A HF checkpoint (:func:`load`) or a params-only orbax checkpoint (:func:`load_orbax`: on a
    pod each host reads only the shards of its own devices)."""
    if is_orbax_dir(path):
        return load_orbax(path, dtype, mesh, rules_table, compute_dtype=compute_dtype, quant=quant)
    return load(path, dtype, mesh, compute_dtype=compute_dtype, rules_table=rules_table, quant=quant)


def load_orbax(path: str, dtype=None, mesh: jax.sharding.Mesh | None = None, rules_table=None, *,
               compute_dtype=None, quant: QuantConfig | None = None):
    """Inverse of :func:`save_orbax` -> :class:`Llava` (parameters in ``dtype`` if given, else as saved;
    ``compute_dtype`` defaults to ``dtype``). With ``mesh`` the parameters are restored directly
    into their shardings. ``quant``: a quantized checkpoint must have been saved with the same
    settings; an unquantized one is quantized after the restore (the float model is held once)."""
    path = persistence.resolve(path)  # a local folder or a URL (gs://): orbax reads either
    cfg_path = persistence.join(path, "config.json")
    if not persistence.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: not an orbax checkpoint written by converters.hf_llava")
    cfg = LlavaConfig.from_hf(json.loads(persistence.read_text(cfg_path)))
    q_path = persistence.join(path, QUANTIZATION_FILE)
    saved = QuantConfig(**json.loads(persistence.read_text(q_path))) if persistence.exists(q_path) else QuantConfig()
    quant = quant if quant is not None else QuantConfig()
    if saved.enabled and saved != quant:
        raise ValueError(f"{path} holds a base quantized with quantize={saved.mode} (group size {saved.group_size}, "
                         f"activations {saved.activations}); this run asks quantize={quant.mode} (group size "
                         f"{quant.group_size}, activations {quant.activations}): use the same settings, or the "
                         "unquantized checkpoint")
    pdt = jnp.float32 if dtype is None else dtype
    cdt = pdt if compute_dtype is None else compute_dtype
    if quant.enabled and not saved.enabled:  # an unquantized checkpoint: restored, then quantized weight by weight
        model = load_orbax(path, dtype, mesh, rules_table, compute_dtype=compute_dtype)
        abstract = nnx.eval_shape(lambda: Llava(cfg, dtype=cdt, param_dtype=pdt, rngs=nnx.Rngs(0), quant=quant))
        quantize.quantize_model(model, abstract, mesh, rules_table)
        abstract.source_dir, abstract.source_layout = path, "saved"
        return abstract
    abstract = nnx.eval_shape(lambda: Llava(cfg, dtype=cdt, param_dtype=pdt, rngs=nnx.Rngs(0), quant=quant))
    state = nnx.state(abstract, nnx.Param)
    if mesh is not None:
        shardings = shd.state_shardings(state, mesh, rules_table or shd.DEFAULT_RULES)
        target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                              state.to_pure_dict(), shardings.to_pure_dict())
    elif quant.enabled:  # restored as saved (a dtype would cast the integer weights)
        target = state.to_pure_dict()
    else:
        target = state.to_pure_dict()
    restored = checkpoints.restore_tree(persistence.join(path, "state"),
                                        None if dtype is None and mesh is None else target)
    want = dict(jax.tree_util.tree_flatten_with_path(state.to_pure_dict())[0])
    got = dict(jax.tree_util.tree_flatten_with_path(restored)[0])
    bad = [(jax.tree_util.keystr(k), tuple(np.shape(got[k])) if k in got else None, tuple(v.shape))
           for k, v in want.items() if k not in got or tuple(np.shape(got[k])) != tuple(v.shape)]
    bad += [(jax.tree_util.keystr(k), tuple(np.shape(v)), None) for k, v in got.items() if k not in want]
    if bad:
        shown = "; ".join(f"{k}: {s} in the state, {w} by config.json" for k, s, w in bad[:5])
        raise ValueError(f"{cfg_path} does not match the saved state in {persistence.join(path, 'state')} "
                         f"({len(bad)} parameter(s)): {shown}")
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(abstract, state)
    abstract.source_dir = path
    abstract.source_layout = "saved"
    return abstract


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m converters.hf_llava", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-orbax", help="HF checkpoint -> orbax state + config.json")
    a.add_argument("src")
    a.add_argument("dst")
    a.add_argument("--dtype", default="float32")
    a.add_argument("--quantize", default="none", choices=quantize.MODES,
                   help="save the language model and projector quantized (weight-only; cgjax.quantize)")
    a.add_argument("--quantize-group-size", type=int, default=128, help="int4: inputs per scale")
    b = sub.add_parser("to-hf", help="orbax checkpoint (from to-orbax) -> HF checkpoint")
    b.add_argument("src")
    b.add_argument("dst")
    b.add_argument("--dtype", default=None, help="tensor dtype of the written files (default: as stored)")
    b.add_argument("--tokenizer-from", default=None, help="copy tokenizer/processor files from this directory")
    for p in (a, b):
        p.add_argument("--overwrite", action="store_true", help=persistence.OVERWRITE_HELP)
    args = ap.parse_args(argv)
    persistence.check_output_dir(args.dst, overwrite=args.overwrite, inputs=(args.src,))  # before the (long) load
    if args.cmd == "to-orbax":
        model = load(args.src, dtype=jnp.dtype(args.dtype),
                     quant=QuantConfig(args.quantize, args.quantize_group_size))
        print(save_orbax(model, args.dst, overwrite=args.overwrite))
    else:
        model = load_orbax(args.src)
        print(save(model, args.dst, dtype=args.dtype, tokenizer_from=args.tokenizer_from, overwrite=args.overwrite))


if __name__ == "__main__":
    main(sys.argv[1:])
