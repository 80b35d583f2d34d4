"""Stage B: keys + 2-3 reasoning sentences (w_keys 1, w_reason 0.2), starting from Stage A.

``init_from`` names Stage A's work directory: its latest checkpoint gives the initial values and
(``init_optimizer``, the default) AdamW's moments.

``python scripts/train.py --config configs/stageB.py[:preset=demo|llava-1.5-7b]`` (see
``configs/common.py`` for the presets and every field); override fields on the command line,
e.g. ``--config.batch_size=8 --config.num_epochs=50`` (or, in steps,
``--config.num_epochs=0 --config.num_steps=400``).
"""
from __future__ import annotations

import os

from cgjax.config import load_module


def get_config(arg: str | None = None):
    common = load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py"))
    return common.base_config("B", arg)
