"""Prototype files: the original's ``prototypes_<dim>_trained.pt`` both ways, and cgjax's orbax checkpoints.

``.pt`` payload (``torch.save``): ``{"clip_model_name": str, "prototypes": {dim: float32 [K, D]
tensor}, "concept_to_idx": {dim: {name: i}}, "idx_to_concept": {dim: [names]}}``. It is read with
``torch.load(weights_only=True)`` (no pickled code runs) and written to a temporary file first.

cgjax checkpoints are orbax ``CheckpointManager`` directories with items ``state`` (a pytree
holding ``protos [n_dims, K_max, D]``, and for training checkpoints the optimizer state, EMA,
counters and RNG) and ``meta`` (JSON: dimensions, concept index, CLIP model name, temperatures).
"""
from __future__ import annotations

import io
import os
import tempfile
from typing import Any, Sequence

import numpy as np

from cgjax import checkpoints, persistence
from cgjax.data.schema import Vocabulary, load_vocab
from cgjax.prototypes.head import DEFAULT_CLIP_MODEL, PrototypeSet, l2_normalize

PT_SUFFIXES = (".pt", ".pth", ".bin")


# ----------------------------------------------------------------------------- .pt

def to_payload(ps: PrototypeSet, dimensions: Sequence[str] | None = None) -> dict[str, Any]:
    import torch  # optional [torch] extra

    dims = list(dimensions or ps.dimensions)
    for d in dims:
        ps.require(d)
    return {
        "clip_model_name": str(ps.clip_model_name),
        "prototypes": {d: torch.from_numpy(np.ascontiguousarray(ps.prototypes[d], np.float32)).clone() for d in dims},
        "concept_to_idx": {d: {str(k): int(v) for k, v in ps.concept_to_idx[d].items()} for d in dims},
        "idx_to_concept": {d: [str(n) for n in ps.idx_to_concept[d]] for d in dims},
    }


def save_pt(ps: PrototypeSet, path: str | os.PathLike, dimensions: Sequence[str] | None = None) -> str:
    """Write the original's payload (all dims, or ``dimensions``) atomically; returns the path."""
    import torch  # optional [torch] extra

    path = os.fspath(path)
    payload = to_payload(ps, dimensions)
    persistence.write_file(path, lambda tmp: torch.save(payload, tmp))
    return path


def from_payload(payload: Any, source: str = "<payload>") -> PrototypeSet:
    """A ``PrototypeSet`` from the original's dict (tensors or arrays), checked key by key."""
    if not isinstance(payload, dict):
        raise ValueError(f"{source}: expected a dict payload, got {type(payload).__name__}")
    if "prototypes" not in payload or not isinstance(payload["prototypes"], dict):
        raise ValueError(f"{source}: missing the 'prototypes' dict (keys found: {sorted(map(str, payload))})")
    protos: dict[str, np.ndarray] = {}
    for d, t in payload["prototypes"].items():
        arr = t.detach().cpu().float().numpy() if hasattr(t, "detach") else np.asarray(t, np.float32)
        if arr.ndim != 2:
            raise ValueError(f"{source}: prototypes[{d!r}] must be [K, D], got shape {tuple(arr.shape)}")
        protos[str(d)] = arr.astype(np.float32)
    i2c_raw = payload.get("idx_to_concept") or {}
    c2i_raw = payload.get("concept_to_idx") or {}
    i2c: dict[str, list[str]] = {}
    c2i: dict[str, dict[str, int]] = {}
    for d, p in protos.items():
        names = i2c_raw.get(d)
        if names is None and d in c2i_raw:
            inv = {int(i): str(n) for n, i in c2i_raw[d].items()}
            names = [inv.get(i) for i in range(p.shape[0])]
            if None in names:
                raise ValueError(f"{source}: concept_to_idx[{d!r}] does not cover 0..{p.shape[0] - 1}")
        if names is None:
            raise ValueError(f"{source}: no idx_to_concept / concept_to_idx for dimension {d!r}")
        i2c[d] = [str(n) for n in names]
        c2i[d] = {n: i for i, n in enumerate(i2c[d])}
        if d in c2i_raw and {str(k): int(v) for k, v in c2i_raw[d].items()} != c2i[d]:
            raise ValueError(f"{source}: concept_to_idx[{d!r}] disagrees with idx_to_concept[{d!r}]")
    name = payload.get("clip_model_name") or DEFAULT_CLIP_MODEL
    return PrototypeSet(str(name), protos, c2i, i2c, source=source)


def load_pt(path: str | os.PathLike) -> PrototypeSet:
    """Read an original ``.pt`` prototype file safely (``weights_only=True``)."""
    import torch  # optional [torch] extra

    path = persistence.resolve(path)
    if not persistence.exists(path) or persistence.isdir(path):
        raise FileNotFoundError(f"prototype checkpoint not found: {path}")
    try:
        src = io.BytesIO(persistence.Path(path).read_bytes()) if persistence.is_url(path) else path
        payload = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for unsafe content, RuntimeError for non-zip files
        raise ValueError(f"{path}: not a loadable prototype .pt file ({type(e).__name__}: {e})") from e
    return from_payload(payload, path)


# ----------------------------------------------------------------------------- orbax

def _is_manager_dir(path: str) -> bool:
    return any(p.name.isdigit() and p.is_dir() for p in persistence.Path(path).iterdir())


def load_checkpoint(path: str | os.PathLike, step: int | None = None, ema: bool = False) -> PrototypeSet:
    """Prototypes from a cgjax orbax checkpoint: a ``CheckpointManager`` directory (latest step,
    or ``step``) or one step directory. ``ema=True`` takes the EMA prototypes (renormalised)."""
    path = persistence.resolve(path)
    if not persistence.isdir(path):
        raise FileNotFoundError(f"cgjax checkpoint directory not found: {path}")
    if not _is_manager_dir(path):
        parent, name = path.rstrip("/").rsplit("/", 1)
        if not name.isdigit():
            raise ValueError(f"{path}: not a cgjax checkpoint (no numbered step directories, "
                             f"and not a step directory itself)")
        path, step = parent, int(name)
    mngr = checkpoints.plain_manager(path, create=False)
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
        raise ValueError(f"{path}: no checkpoint step {step} (steps: {list(mngr.all_steps())})")
    meta = checkpoints.read_meta(mngr, step)
    state = checkpoints.restore_state(mngr, step, None)
    mngr.close()
    src = f"{path} (step {step})"
    for key in ("dimensions", "idx_to_concept"):
        if key not in meta:
            raise ValueError(f"{src}: metadata lacks {key!r}; not a prototype checkpoint")
    if ema and "ema" not in state:
        raise ValueError(f"{src}: holds no EMA prototypes")
    padded = np.asarray(state["ema"] if ema else state["protos"], np.float32)
    if ema:
        padded = l2_normalize(padded)
    dims = list(meta["dimensions"])
    if padded.ndim != 3 or padded.shape[0] != len(dims):
        raise ValueError(f"{src}: prototypes of shape {padded.shape} for dimensions {dims}")
    protos = {d: padded[i, : len(meta["idx_to_concept"][d])] for i, d in enumerate(dims)}
    i2c = {d: list(meta["idx_to_concept"][d]) for d in dims}
    c2i = {d: {n: i for i, n in enumerate(i2c[d])} for d in dims}
    temps = {d: float(t) for d, t in (meta.get("temperatures") or {}).items()}
    return PrototypeSet(meta.get("clip_model_name") or DEFAULT_CLIP_MODEL, protos, c2i, i2c, temps, source=src)


def save_checkpoint(ps: PrototypeSet, path: str | os.PathLike, step: int = 0, **meta: Any) -> str:
    """Write a prototypes-only cgjax checkpoint (``state = {"protos"}``, ``meta`` with the index).

    Written into a temporary folder that replaces ``path`` at the end (an older one is replaced); a
    URL (``gs://``) gets the finished folder uploaded."""
    path = persistence.resolve(path)
    if persistence.is_url(path):
        with tempfile.TemporaryDirectory() as local:
            save_checkpoint(ps, os.path.join(local, "prototypes"), step, **meta)
            persistence.upload_tree(os.path.join(local, "prototypes"), path)
        return path
    padded, _ = ps.padded()
    m = {"dimensions": ps.dimensions, "n_concepts": [len(ps.idx_to_concept[d]) for d in ps.dimensions],
         "clip_model_name": ps.clip_model_name, "concept_to_idx": ps.concept_to_idx,
         "idx_to_concept": ps.idx_to_concept, "temperatures": ps.temperatures, **meta}
    with persistence.atomic_dir(path) as tmp:
        # one process writes this small replicated checkpoint (the others do not take part)
        mngr = checkpoints.plain_manager(tmp, create=False, this_process_only=True)
        checkpoints.save_step(mngr, step, {"protos": padded}, m)
        mngr.wait_until_finished()
        mngr.close()
    return path


# ----------------------------------------------------------------------------- dispatch

def load_prototypes(path: str | os.PathLike | PrototypeSet, ema: bool = False) -> PrototypeSet:
    """An original ``.pt`` file or a cgjax checkpoint directory (or a ``PrototypeSet``)."""
    if isinstance(path, PrototypeSet):
        return path
    path = persistence.resolve(path)
    if persistence.isdir(path):
        return load_checkpoint(path, ema=ema)
    if not persistence.exists(path):
        raise FileNotFoundError(f"prototype checkpoint not found: {path}")
    return load_pt(path)


def load_many(paths: Sequence[str | os.PathLike]) -> PrototypeSet:
    """Merge several checkpoints (e.g. one ``prototypes_<dim>_trained.pt`` per dimension)."""
    if not paths:
        raise ValueError("no prototype checkpoint given")
    out = load_prototypes(paths[0])
    for p in paths[1:]:
        out = out.merged(load_prototypes(p))
    return out


def concept_index(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, Vocabulary]:
    """The concept index ``{dim: Vocabulary(idx_to_concept[dim])}`` of list-format signals, from
    prototype files (an original ``.pt``, a cgjax checkpoint directory, a prototypes work dir) or
    ``vocab.json`` files; a comma-separated string or a list (e.g. one ``.pt`` per dimension).
    Two files that give one dimension different names are an error naming both."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [p.strip() for p in os.fspath(paths).split(",") if p.strip()]
    out: dict[str, Vocabulary] = {}
    source: dict[str, str] = {}
    for p in map(os.fspath, paths):
        if p.endswith(".json"):
            vocabs = load_vocab(p)
        else:
            work_dir = persistence.join(p, "prototypes")
            ps = load_prototypes(work_dir if persistence.isdir(work_dir) else p)
            vocabs = {d: Vocabulary(d, ps.idx_to_concept[d]) for d in ps.dimensions}
        for d, v in vocabs.items():
            if d in out and out[d] != v:
                raise ValueError(f"concept index: {p} names the {d!r} concepts {v.names} but {source[d]} names "
                                 f"them {out[d].names}")
            out[d], source[d] = v, p
    return out
