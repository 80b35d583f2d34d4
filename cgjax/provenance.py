"""What a work dir was trained on: its stage, the base checkpoint's and the data set's fingerprints
and the resolved config, in ``WORK/provenance.json``.

Resume and ``init_from`` refuse a work dir trained on another base or data set (and resume another
stage); inference and export refuse a base other than the one the values were trained on. Each
refusal names both sides; ``config.accept_mismatch=True`` (or ``--accept_mismatch``) accepts it.

A base fingerprint hashes its ``config.json`` and the names and sizes of its weight files (the
weights themselves are not read: a 14 GB hash at every start would be a slow start); a data
fingerprint hashes the dataset JSON, its split file (when its records carry no split), targets CSV,
vocab and signals files (not the images).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable

from cgjax import persistence
from cgjax.data.schema import read_input_bytes
from cgjax.data.splits import SplitPolicy

FILE = "provenance.json"


class ProvenanceError(ValueError):
    """A hand-off between two things that were not made for each other."""


def _hash_files(paths: Iterable[str], h) -> None:
    for p in paths:
        h.update(os.path.basename(p).encode())
        h.update(read_input_bytes(p))


def _walk(path, rel: str = ""):
    """``(relative name, size)`` of every file under an epath folder (``rglob`` is not on GCS)."""
    for p in sorted(path.iterdir(), key=lambda q: q.name):
        name = f"{rel}{p.name}"
        if p.is_dir():
            yield from _walk(p, name + "/")
        else:
            yield name, p.stat().length


def base_fingerprint(checkpoint: str) -> str:
    """``sha256(config.json + [(weight file, size)])`` of an HF or params-only orbax checkpoint."""
    h = hashlib.sha256()
    root = persistence.Path(checkpoint)
    cfg = root / "config.json"
    h.update(cfg.read_bytes() if cfg.exists() else b"")
    entries = []
    for p in sorted(root.iterdir(), key=lambda q: q.name) if root.exists() else ():
        if p.is_dir() and p.name == "state":  # a params-only orbax checkpoint
            entries += [(f"state/{n}", size) for n, size in _walk(p)]
        elif p.name.endswith((".safetensors", ".bin", ".index.json")):
            entries.append((p.name, p.stat().length))
    h.update(json.dumps(entries).encode())
    return h.hexdigest()[:16]


def data_fingerprint(config: Any) -> str:
    d = config.data
    files = [x for x in (d.get("dataset_json"), d.get("targets_csv"), d.get("vocab_json")) if x]
    if d.get("dataset_json"):  # the split every stage shares (cgjax.data.splits), where the records carry none
        files.append(SplitPolicy.from_config(d).path(d.dataset_json))
    sig = d.get("signals") or ()
    files += [s.strip() for s in sig.split(",")] if isinstance(sig, str) else [str(s) for s in sig]
    if d.get("packed_dir"):
        files += [os.path.join(d.packed_dir, "pack.json"), os.path.join(d.packed_dir, "vocab.json")]
    h = hashlib.sha256()
    _hash_files([f for f in files if persistence.exists(f)], h)
    return h.hexdigest()[:16]


def record(config: Any, stage: str) -> dict[str, Any]:
    """The provenance of a run of ``config`` (stage ``A``/``B``)."""
    return {"format": "cgjax.provenance", "stage": stage,
            "base": {"checkpoint": persistence.resolve(config.llava_checkpoint),
                     "fingerprint": base_fingerprint(config.llava_checkpoint)},
            "data": {"dataset_json": str(config.data.get("dataset_json") or config.data.get("packed_dir")),
                     "fingerprint": data_fingerprint(config)},
            "config": json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else {}}


def write(workdir: str, prov: dict[str, Any]) -> None:
    persistence.write_text(persistence.join(workdir, FILE), json.dumps(prov, indent=2) + "\n")


def read(workdir: str) -> dict[str, Any] | None:
    """The provenance of ``workdir`` (or of the work dir above a ``checkpoints/`` folder); None if it
    has none (written before cgjax recorded it). A corrupt file is an error naming it."""
    for d in (workdir, os.path.dirname(workdir.rstrip("/"))):
        path = persistence.join(d, FILE)
        if persistence.exists(path):
            try:
                return json.loads(persistence.read_text(path))
            except ValueError as e:
                raise ProvenanceError(f"{path}: not valid JSON ({e})") from e
    return None


def check(theirs: dict[str, Any] | None, mine: dict[str, Any], what: str, *, keys=("base", "data"),
          accept: bool = False) -> list[str]:
    """Compare the recorded provenance ``theirs`` of ``what`` with this run's ``mine`` on ``keys``;
    raise a ``ProvenanceError`` naming both sides (or, with ``accept``, return the differences)."""
    if theirs is None:
        return []
    diffs = []
    for key in keys:
        if key == "stage":
            if theirs.get("stage") != mine.get("stage"):
                diffs.append(f"stage: {what} is Stage {theirs.get('stage')}, this run is Stage {mine.get('stage')}")
            continue
        a, b = theirs.get(key) or {}, mine.get(key) or {}
        if a.get("fingerprint") and a.get("fingerprint") != b.get("fingerprint"):
            name = "base checkpoint" if key == "base" else "data set"
            src = "checkpoint" if key == "base" else "dataset_json"
            diffs.append(f"{name}: {what} was trained on {a.get(src)} (fingerprint {a.get('fingerprint')}), this "
                         f"run has {b.get(src)} (fingerprint {b.get('fingerprint')})")
    if diffs and not accept:
        raise ProvenanceError("; ".join(diffs) + ". Pass --config.accept_mismatch=True to accept it")
    return diffs
