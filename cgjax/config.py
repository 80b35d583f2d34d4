"""Loading ``ml_collections`` config files (``configs/*.py``, installed with cgjax as the ``configs``
package) outside of absl flags."""
from __future__ import annotations

import difflib
import importlib.util
import os

from cgjax import persistence


def load_module(path: str):
    """Import a Python config file by path, as absl's ``--config FILE`` does (``configs/stageA.py``
    loads the ``common.py`` next to it this way, so a config file always goes with its own folder)."""
    name = "cgjax_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def configs_dir() -> str | None:
    """The folder of the installed ``configs`` package (shipped with cgjax), found without importing it;
    ``None`` when there is none."""
    spec = importlib.util.find_spec("configs")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return locations[0] if locations else None


def load_config(spec: str):
    """``"configs/stageA.py:preset=demo"`` -> the ConfigDict its ``get_config(arg)`` returns.

    A path that does not exist from here, given as a bare file name (``"stageA.py:preset=demo"``) or
    as ``configs/NAME``, is looked up in the installed ``configs`` package.
    """
    path, _, arg = spec.partition(":")
    if not os.path.exists(path) and os.path.dirname(path) in ("", "configs"):
        installed = configs_dir()
        if installed is not None and os.path.exists(os.path.join(installed, os.path.basename(path))):
            path = os.path.join(installed, os.path.basename(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} not found (also looked in the configs package: "
                                f"{configs_dir() or 'not installed'})")
    return load_module(path).get_config(arg or None)


def _nearest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_preset(arg: str | None, presets, default: str) -> str:
    """The preset named by a config argument (``"preset=demo"`` or a bare ``"demo"``); any other
    key, or an unknown preset, is an error that names the nearest valid one."""
    preset = default
    for part in (arg or "").split(","):
        key, sep, value = (x.strip() for x in part.partition("="))
        if not key:
            continue
        if sep and key != "preset":
            raise ValueError(f"unknown config argument {key!r}{_nearest(key, ['preset'])}: the only key is "
                             f"preset=NAME (one of {', '.join(presets)})")
        preset = value if sep else key
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}{_nearest(preset, presets)}; expected one of {', '.join(presets)}")
    return preset


def override(config, **dotted):
    """Set existing fields by dotted name: ``override(c, **{"optim.lr": 1e-3, "num_steps": 10})``.
    An unknown name is a ``KeyError`` that suggests the nearest field."""
    for key, value in dotted.items():
        node = config
        *parents, leaf = key.split(".")
        for i, part in enumerate(parents + [leaf]):
            if part not in node:
                where = ".".join(parents[:i]) or "the config"
                raise KeyError(f"config has no field {key!r}: {where} has no {part!r}{_nearest(part, node.keys())}")
            if i < len(parents):
                node = node[part]
        node[leaf] = value
    return config


def config_paths(x) -> list[str]:
    """A path field as a list: a path, a comma-separated string or a sequence of paths
    (ml_collections references resolved); empty for None."""
    if x is None:
        return []
    if isinstance(x, str):
        return [p.strip() for p in x.split(",") if p.strip()]
    out = [str(p.get() if hasattr(p, "get") and not isinstance(p, str) else p).strip() for p in x]
    return [p for p in out if p]


def check_choices(config, choices) -> None:
    """Every enumerated field holds one of its values: ``choices`` maps a dotted field name to the
    allowed values (a field the config lacks is skipped). Else a ``ValueError`` naming the field,
    its value, the nearest choice and all of them; run before anything is loaded or compiled."""
    for key, allowed in choices.items():
        node = config
        for part in key.split("."):
            if node is None or part not in node:
                node = None
                break
            node = node[part]
        if node is None:
            continue
        if str(node) not in allowed:
            raise ValueError(f"config.{key}={node!r}{_nearest(str(node), allowed)}: expected one of "
                             f"{', '.join(repr(a) for a in allowed)}")


def _field(config, key: str):
    node = config
    for part in key.split("."):
        if node is None or part not in node:
            return None
        node = node[part]
    return node


def check_input_paths(config, fields) -> None:
    """Every path in the given dotted ``fields`` (a path, a comma-separated list or a sequence;
    empty fields skipped) exists, locally or at its URL. Else one ``FileNotFoundError`` naming every
    field and path that is missing; run before a model is loaded or anything compiled."""
    missing = []
    for key in fields:
        for path in config_paths(_field(config, key)):
            if not persistence.exists(path):
                missing.append(f"config.{key}: {path}")
    if missing:
        raise FileNotFoundError("not found (checked before loading anything): " + "; ".join(missing))
