"""HF LLaVA-NeXT (``LlavaNextForConditionalGeneration``, e.g. ``llava-hf/llava-v1.6-vicuna-7b-hf``)
-> cgjax :class:`~cgjax.models.llava.Llava` in **single-crop mode**.

The original project feeds 4-D ``[B, 3, 336, 336]`` pixels, so LLaVA-1.6 runs the plain path:
vision tower -> ``vision_feature_layer`` -> (``default``: drop CLS) -> projector -> one block of
``num_image_tokens`` (576) features at the image-token positions. That is exactly cgjax's
:class:`Llava`. AnyRes (5-D tiles, ``image_grid_pinpoints``, ``image_newline``) is **not**
supported: ``image_newline`` and ``image_grid_pinpoints`` are read and kept in
``model.llava_next`` (:class:`NextSource`) but unused. ``config.image_seq_length`` is set to the
single-crop token count.

Key layouts: those of :mod:`converters.hf_llava` (``hub``: ``language_model.model.*``,
``language_model.lm_head.*``, ``vision_tower.vision_model.*``, ``multi_modal_projector.*``;
``saved``: transformers 5 ``save_pretrained``, ``vision_tower.*``; ``live`` / ``live_v4``: a live
model's ``model.*`` / ``lm_head.*``) plus ``image_newline`` (``model.image_newline`` live).
A loaded model can be written as a plain HF LLaVA checkpoint with :func:`converters.hf_llava.save`.

CLI::

    python -m converters.llava_next to-orbax SRC DST   # -> orbax state + config.json (converters.hf_llava)
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cgjax import persistence
from cgjax.models.llava import LlavaConfig
from converters import common as C, hf_llava

NEWLINE_KEYS = ("image_newline", "model.image_newline")
_NEXT_ONLY = ("image_grid_pinpoints", "use_image_newline_parameter")


@dataclasses.dataclass(eq=False)  # identity hash: a static attribute of the NNX module
class NextSource:
    """LLaVA-NeXT parts that single-crop mode does not use (``model.llava_next``)."""

    image_newline: np.ndarray | None
    image_grid_pinpoints: Any
    config: dict  # the source LlavaNextConfig dict


def llava_config(hf_cfg: dict):
    """HF ``LlavaNextConfig`` dict -> :class:`LlavaConfig` of the single-crop model."""
    if hf_cfg.get("model_type", "llava_next") != "llava_next":
        raise ValueError(f"not a LLaVA-NeXT config: model_type={hf_cfg.get('model_type')!r}")
    d = {k: v for k, v in hf_cfg.items() if k not in _NEXT_ONLY}
    d["model_type"] = "llava"
    cfg = LlavaConfig.from_hf(d)
    return dataclasses.replace(cfg, image_seq_length=cfg.num_image_tokens)


def rules(layout: str, tied: bool = False) -> list[C.Rule]:
    """:func:`converters.hf_llava.llava_rules` of ``layout``, ``image_newline`` ignored."""
    return hf_llava.llava_rules(layout, tied) + [C.Rule(k.replace(".", r"\."), None) for k in NEWLINE_KEYS]


def load(path_or_torch_model: Any, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None, *,
         compute_dtype=None, layout: str | None = None, rules_table=None):
    """LLaVA-NeXT checkpoint (directory / file / live model) -> single-crop :class:`Llava`.
    Arguments as :func:`converters.hf_llava.load`."""
    hf_cfg, folder = hf_llava.config_dict(path_or_torch_model)
    cfg = llava_config(hf_cfg)
    tensors = C.read_tensors(path_or_torch_model)
    tied = cfg.text_config.tie_word_embeddings
    layout = layout or hf_llava.detect_layout(list(tensors), tied)
    model = hf_llava.load(tensors, dtype, mesh, rules(layout, tied), config=cfg, compute_dtype=compute_dtype,
                          layout=layout, rules_table=rules_table)
    newline = next((tensors.load(k) for k in NEWLINE_KEYS if k in tensors), None)
    model.source_dir = folder
    model.llava_next = NextSource(newline, hf_cfg.get("image_grid_pinpoints"), hf_cfg)
    return model


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m converters.llava_next", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-orbax", help="LLaVA-NeXT checkpoint -> orbax state + config.json (converters.hf_llava)")
    a.add_argument("src")
    a.add_argument("dst")
    a.add_argument("--dtype", default="float32")
    a.add_argument("--overwrite", action="store_true", help=persistence.OVERWRITE_HELP)
    args = ap.parse_args(argv)
    persistence.check_output_dir(args.dst, overwrite=args.overwrite, inputs=(args.src,))  # before the (long) load
    print(hf_llava.save_orbax(load(args.src, dtype=jnp.dtype(args.dtype)), args.dst,
                               overwrite=args.overwrite))


if __name__ == "__main__":
    main(sys.argv[1:])
