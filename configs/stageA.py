"""Stage A: concept values trained on the key lines only.

``python scripts/train.py --config configs/stageA.py[:preset=demo|llava-1.5-7b]`` (see
``configs/common.py`` for the presets and every field); override fields on the command line,
e.g. ``--config.batch_size=8 --config.num_epochs=50`` (or, in steps,
``--config.num_epochs=0 --config.num_steps=400``).
"""
from __future__ import annotations

import os

from cgjax.config import load_module


def get_config(arg: str | None = None):
    common = load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py"))
    return common.base_config("A", arg)
