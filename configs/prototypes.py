"""Prototype head training: ``python scripts/train.py --config configs/prototypes.py[:preset=demo]``.

Presets (``:preset=NAME`` or ``get_config("demo")``):
- ``default``: the original's setting (DFN5B ViT-H-14-384, artist/style/genre, CLI defaults);
  set ``data.dataset_json``, ``data.images_root`` and ``clip.checkpoint`` (local open_clip weights).
- ``demo``: the embedded procedural demo set and a tiny random open_clip tower, both generated
  into the work directory when missing: runs anywhere, no download.
- ``demo_vitb32``: the demo set with an open_clip ViT-B-32 (random weights unless a checkpoint is given).

Override any field on the command line, e.g. ``--config.trainer.epochs=5``.
"""
from __future__ import annotations

import ml_collections

from cgjax.config import parse_preset


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = parse_preset(arg, ("default", "demo", "demo_vitb32"), "default")
    c = ml_collections.ConfigDict()
    c.task = "prototypes"
    c.preset = preset
    c.workdir = "runs/prototypes"
    c.compile_cache_dir = ""  # JAX's persistent compilation cache (local or gs://)

    # Frozen CLIP image tower (open_clip weights converted to cgjax).
    c.clip = ml_collections.ConfigDict()
    c.clip.model_name = "hf-hub:apple/DFN5B-CLIP-ViT-H-14-384"
    c.clip.checkpoint = ""  # local open_clip weights (file or local-dir); "" only for the demo presets
    c.clip.dtype = "float32"  # compute dtype of the tower: float32 | bfloat16
    c.clip.batch_size = 32  # fixed encode batch (the last batch is padded)
    c.clip.tiny = ml_collections.ConfigDict(dict(width=64, layers=2, heads=2, patch_size=8, image_size=32,
                                                 embed_dim=32))  # demo tower when no checkpoint

    c.data = ml_collections.ConfigDict()
    c.data.dataset_json = ""
    c.data.images_root = ""  # "" -> the JSON's folder (as the original)
    # () = the data's own (the records' concepts keys); artist, style, genre when they name none
    c.data.dimensions = ()
    # Records without a ``split`` (the original's dataset JSON) are split ONCE into a split file that
    # every stage reuses (cgjax.data.splits): "" = <dataset stem>.splits.json beside the dataset JSON.
    # Test records are never trained on.
    c.data.splits_json = ""
    c.data.val_fraction = 0.15  # used only when the split file is made
    c.data.test_fraction = 0.15
    c.data.split_seed = 0
    c.data.missing_images = "error"  # error | skip (the original skipped them silently)
    c.data.demo = ml_collections.ConfigDict(dict(n_images=240, size=64, seed=0))

    # Trainer: defaults of the original CLI (train_prototypes.py), plus EMA / checkpoints.
    c.trainer = ml_collections.ConfigDict()
    c.trainer.batch_size = 8
    c.trainer.lr = 5e-3
    c.trainer.epochs = 3
    c.trainer.temperature = 0.07
    c.trainer.negatives_k = "16"  # an integer or "max"
    c.trainer.hard_negatives = True
    c.trainer.margin = 0.1
    c.trainer.lambda_margin = 0.5
    c.trainer.drop_last = True
    c.trainer.ema_decay = 0.99
    c.trainer.seed = 0
    c.trainer.log_interval = 50
    c.trainer.debug_log = False
    c.trainer.max_to_keep = 3
    c.trainer.resume = True
    c.cache_embeddings = True  # CLIP is frozen and there is no augmentation: embed once
    c.augment = False  # True: random flip + resized crop every epoch (turns the cache off)

    c.calibration = ml_collections.ConfigDict(dict(enabled=True, n_bins=15))

    # Work directory layout (relative to workdir) and exports.
    c.layout = ml_collections.ConfigDict(dict(checkpoints="checkpoints", prototypes="prototypes",
                                              artifacts="artifacts", cache="cache"))
    c.export = ml_collections.ConfigDict()
    c.export.pt = True  # the original's prototypes_<dim>_trained.pt (one per dimension)
    c.export.use_ema = False  # export the EMA prototypes instead of the last ones
    c.export.signals = True  # concept_signals_<dim>.json for every record + keyed + validate report
    c.export.normalize = "zscore"  # export_all_signals defaults
    c.export.temperature = 0.8
    c.export.csv = False
    c.export.topk = 3

    if preset in ("demo", "demo_vitb32"):
        c.workdir = "runs/prototypes_demo"
        c.clip.model_name = "cgjax-tiny-clip" if preset == "demo" else "ViT-B-32"
        c.clip.batch_size = 32
        c.trainer.epochs = 3
    c.lock()  # a mistyped field (command line or override) is an error, not a new field
    return c
