"""CLIP concept prototypes: head, trainer, calibration, files and the validate_signals report.

- ``head``: ``PrototypeSet`` (prototypes + concept index), ``build_prototypes``, ``PrototypeHead``
  (frozen open_clip tower converted to cgjax; jitted fixed-shape encoding).
- ``trainer``: ``PrototypeTrainer`` (one jitted step over all dimensions, orbax checkpoints, EMA).
- ``calibrate``: the original's signal post-processing and per-dimension temperature calibration.
- ``io``: the original's ``prototypes_<dim>_trained.pt`` both ways and cgjax checkpoints.
- ``export`` / ``validate_signals``: signal files and the gating report.
- ``run.train_prototypes(config, workdir)``: the stage behind ``scripts/train.py``.
"""
from cgjax.prototypes.calibrate import calibrate, fit_temperature, postprocess
from cgjax.prototypes.head import PrototypeHead, PrototypeSet, build_prototypes
from cgjax.prototypes.io import load_prototypes, save_checkpoint, save_pt
from cgjax.prototypes.trainer import PrototypeTrainer, TrainerConfig

__all__ = ["PrototypeHead", "PrototypeSet", "PrototypeTrainer", "TrainerConfig", "build_prototypes", "calibrate",
           "fit_temperature", "load_prototypes", "postprocess", "save_checkpoint", "save_pt"]
