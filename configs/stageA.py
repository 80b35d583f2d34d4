"""Stage A: concept values trained on the key lines only.

``python scripts/train.py --config configs/stageA.py[:preset=demo|llava-1.5-7b]`` (see
``configs/common.py`` for the presets and every field); override fields on the command line,
e.g. ``--config.batch_size=8 --config.num_steps=400``.
"""
from __future__ import annotations

import importlib.util
import os


def _common():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py")
    spec = importlib.util.spec_from_file_location("cgjax_configs_common", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def get_config(arg: str | None = None):
    return _common().base_config("A", arg)
