"""The house's one-way layers (docs/architecture.md), checked on the source: no module imports a layer
above its own, not even inside a function; function-level imports only for optional heavy packages,
each with a reason on its line; no import cycles; no private name used across modules; orbax only in
cgjax/checkpoints.py."""
from __future__ import annotations

import ast
import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent

# Bottom to top. A module belongs to the first layer with a matching prefix, read from the top down,
# so "cgjax.train" is an application although "cgjax" is the core.
LAYERS = {
    # The PyTorch files the export ships as they are (concept_tokens.py, example.py): they must run
    # without cgjax, so they sit below the core and may import nothing of it.
    "standalone": ("cgjax.torch_export",),
    "core": ("cgjax",),
    "converters": ("converters",),
    "applications": ("cgjax.train", "cgjax.infer", "cgjax.export", "cgjax.demo", "cgjax.plan",
                     "cgjax.doctor", "cgjax.demo_assets", "cgjax.prototypes.run", "cgjax.eval.cli", "cgjax.testing"),
    "scripts": ("scripts", "configs"),
}
ORDER = list(LAYERS)

# Packages a function may import late: optional extras (the PyTorch side) or slow to import for a
# command that rarely needs them. The import line must say why, in a comment.
LAZY_OK = {"torch", "torchvision", "transformers", "open_clip", "tokenizers", "huggingface_hub",
           "tensorflow_datasets", "matplotlib", "bitsandbytes", "nbformat", "nbclient", "safetensors.torch"}


def module_files() -> dict[str, pathlib.Path]:
    out = {}
    for top in ("cgjax", "converters", "scripts", "configs"):
        for p in sorted((REPO / top).rglob("*.py")):
            parts = list(p.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


MODULES = module_files()


def rel(path: pathlib.Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def layer_of(module: str) -> str | None:
    best, best_len = None, -1
    for layer, prefixes in LAYERS.items():
        for pre in prefixes:
            if (module == pre or module.startswith(pre + ".")) and len(pre) > best_len:
                best, best_len = layer, len(pre)
    return best


def resolve(module: str) -> str:
    """The longest known module that ``module`` names (``cgjax.data.schema.read_json`` -> ``cgjax.data.schema``)."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in MODULES:
            return cand
    return module


def imports(name: str, path: pathlib.Path):
    """``(target module, line, is_top_level, node)`` for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    top_level = {id(n) for n in tree.body}
    # imports under a module-level ``if``/``try`` still run at import time
    for n in tree.body:
        if isinstance(n, (ast.If, ast.Try)):
            top_level |= {id(x) for x in ast.walk(n) if not isinstance(x, (ast.FunctionDef, ast.ClassDef))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno, id(node) in top_level, node
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                yield (full if full in MODULES else base), node.lineno, id(node) in top_level, node


def test_layer_table_covers_every_module():
    missing = [m for m in MODULES if layer_of(m) is None]
    assert not missing
    for layer, prefixes in LAYERS.items():
        for pre in prefixes:
            assert any(m == pre or m.startswith(pre + ".") for m in MODULES), \
                f"layer {layer} names {pre}, which does not exist"


def test_no_upward_import():
    bad = []
    for name, path in MODULES.items():
        mine = ORDER.index(layer_of(name))
        for target, line, _, _ in imports(name, path):
            t = resolve(target)
            if t in MODULES and ORDER.index(layer_of(t)) > mine:
                bad.append(f"{rel(path)}:{line} ({layer_of(name)}) imports {t} ({layer_of(t)})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_function_level_imports_are_optional_packages_with_a_reason():
    bad = []
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        for target, line, top, node in imports(name, path):
            if top:
                continue
            end = getattr(node, "end_lineno", line)
            commented = any("#" in lines[i - 1] for i in range(line, end + 1))
            lazy_ok = target.split(".")[0] in LAZY_OK or any(target.startswith(p + ".") or target == p
                                                             for p in LAZY_OK if "." in p)
            if not lazy_ok or not commented:
                why = "not an optional package" if not lazy_ok else "no reason given"
                bad.append(f"{rel(path)}:{line} imports {target} inside a function ({why})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, _, top, _ in imports(name, path):
            t = resolve(target)
            if top and t in MODULES and t != name:
                graph[name].add(t)
    # Tarjan's strongly connected components
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


# The one module that talks to orbax: every checkpoint layout and manager lives there.
ORBAX_HOME = "cgjax.checkpoints"


def test_only_checkpoints_imports_orbax():
    bad = []
    for name, path in MODULES.items():
        if name == ORBAX_HOME:
            continue
        for target, line, _, _ in imports(name, path):
            if target == "orbax" or target.startswith("orbax."):
                bad.append(f"{rel(path)}:{line} imports {target}")
    assert not bad, f"orbax imported outside {ORBAX_HOME} (call its functions instead):\n" + "\n".join(bad)


@pytest.mark.parametrize("source", ["import orbax.checkpoint as ocp\n",
                                    "def f():\n    from orbax.checkpoint import args  # planted\n"])
def test_the_checker_sees_an_orbax_import(source, tmp_path, monkeypatch):
    """The orbax check fails on a planted import outside cgjax/checkpoints.py (a test must be able to fail)."""
    planted = tmp_path / "planted.py"
    planted.write_text(source)
    monkeypatch.setitem(MODULES, "converters.planted", planted)
    with pytest.raises(AssertionError, match="orbax imported outside"):
        test_only_checkpoints_imports_orbax()


def test_no_private_name_across_modules():
    bad = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for target, line, _, node in imports(name, path):
            if isinstance(node, ast.ImportFrom):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__") and resolve(target) != name:
                        bad.append(f"{rel(path)}:{line} imports private {a.name} from {target}")
                    if f"{node.module}.{a.name}" in MODULES or target in MODULES:
                        aliases[a.asname or a.name] = target
            else:
                for a in node.names:
                    aliases[a.asname or a.name.split(".")[0]] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and node.value.id in aliases
                    and resolve(aliases[node.value.id]) in MODULES):
                bad.append(f"{rel(path)}:{node.lineno} uses private {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("layer", ORDER)
def test_the_checker_sees_an_upward_import(layer, tmp_path, monkeypatch):
    """The checker itself fails on a planted upward import (a test must be able to fail)."""
    if layer == ORDER[-1]:
        pytest.skip("nothing sits above the top layer")
    above = next(m for m in MODULES if layer_of(m) == ORDER[ORDER.index(layer) + 1])
    below = next(m for m in MODULES if layer_of(m) == layer and MODULES[m].name != "__init__.py")
    planted = tmp_path / "planted.py"
    planted.write_text(f"def f():\n    import {above}  # lazy: planted\n")
    monkeypatch.setitem(MODULES, below, planted)
    with pytest.raises(AssertionError, match="upward imports"):
        test_no_upward_import()
    assert os.path.exists(planted)
