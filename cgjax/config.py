"""Loading ``ml_collections`` config files (``configs/*.py``) outside of absl flags."""
from __future__ import annotations

import importlib.util
import os

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_module(path: str):
    """Import a Python config file by path (``configs/`` is not a package)."""
    name = "cgjax_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load_config(spec: str):
    """``"configs/stageA.py:preset=demo"`` -> the ConfigDict its ``get_config(arg)`` returns.

    A bare file name (``"stageA.py:preset=demo"``) is looked up in the repository's ``configs/``.
    """
    path, _, arg = spec.partition(":")
    if not os.path.exists(path) and os.path.exists(os.path.join(CONFIG_DIR, path)):
        path = os.path.join(CONFIG_DIR, path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} not found (also looked in {CONFIG_DIR})")
    return load_module(path).get_config(arg or None)


def override(config, **dotted):
    """Set fields by dotted name: ``override(c, **{"optim.lr": 1e-3, "num_steps": 10})``."""
    for key, value in dotted.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config
