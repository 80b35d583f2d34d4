"""Signal export: embeddings of the dataset's images -> post-processed signals -> files.

Writes the original formats (``concept_signals_<dim>.json`` aligned 1:1 with the dataset records,
with its concept index in the ``vocab.json`` beside it; the top-k CSV), cgjax's keyed format and
the validate_signals report, with the original's bugs left out: every record gets its signal even
when image paths repeat (the original filled only the last duplicate), CSV + zscore works for
several dimensions, and images are encoded in batches.
Readers and writers are ``cgjax.data``'s.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
from typing import Any, Sequence

import numpy as np

from cgjax import persistence
from cgjax.data.records import concept_dimensions, normalize_image_path, read_dataset_json
from cgjax.data.schema import DEFAULT_DIMENSIONS, Vocabulary, read_json
from cgjax.data.signals import (Signals, signals_csv_text, signals_json_entries, signals_json_text,
                                write_signals_index, write_signals_keyed)
from cgjax.prototypes.calibrate import postprocess
from cgjax.prototypes.head import PrototypeSet, record_paths
from cgjax.prototypes.validate_signals import validate_signals, write_json

log = logging.getLogger(__name__)


def read_aligned(dataset_json: str, images_root: str | None, dimensions: Sequence[str] | None = None):
    """``(dataset, row_images)``: the records (bad rows skipped and logged) and, for EVERY row of
    the JSON list, its normalised image path (None for a row without one), so outputs stay
    aligned 1:1 with the file even when rows repeat an image."""
    raw = read_json(dataset_json)
    # label columns: the original's CSV always carries artist/style/genre; another domain's data set
    # carries its own dimensions (the records' concepts keys), never the art ones
    own = concept_dimensions(raw)
    base = DEFAULT_DIMENSIONS if all(d in DEFAULT_DIMENSIONS for d in (dimensions or own)) else own
    dims = list(dict.fromkeys(list(base) + list(dimensions or [])))
    ds = read_dataset_json(dataset_json, images_root or None, dimensions=dims, skip_bad=True)
    row_images: list[str | None] = []
    for obj in raw:
        img = obj.get("image") if isinstance(obj, dict) else None
        row_images.append(normalize_image_path(img, ds.images_root) if isinstance(img, str) and img.strip() else None)
    for p in ds.skipped:
        log.warning("dataset row skipped: %s", p)
    return ds, row_images


def embed_records(head: Any, ds: Any) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings ``[n_records, D]`` (rows of missing images are zero) and the ``present`` mask."""
    paths = record_paths(ds)
    emb, kept = head.embed_paths(paths, missing="skip")
    row = {p: i for i, p in enumerate(kept)}
    out = np.zeros((len(paths), head.width), np.float32)
    present = np.zeros(len(paths), bool)
    for i, p in enumerate(paths):
        if p in row:
            out[i] = emb[row[p]]
            present[i] = True
    missing = [p for p, ok in zip(paths, present) if not ok]
    if missing:
        log.warning("%d image(s) missing, their signals are empty, e.g. %s", len(missing), missing[:3])
    return out, present


def make_signals(ps: PrototypeSet, ds: Any, embeddings: np.ndarray, present: np.ndarray, dims: Sequence[str],
                 normalize: str = "none", temperature: float = 1.0, clip: bool = True, **meta: Any):
    """``cgjax.data.signals.Signals`` of the post-processed scores x (NaN rows for missing images)."""
    scores, vocabs = {}, {}
    for d in dims:
        ps.require(d)
        x = np.full((len(ds.records), len(ps.idx_to_concept[d])), np.nan, np.float32)
        if present.any():
            x[present] = postprocess(ps.signals(embeddings[present], d), normalize, temperature, clip)
        scores[d] = x
        vocabs[d] = Vocabulary(d, ps.idx_to_concept[d])
    m = {"normalize": normalize, "temperature": float(temperature), "clip": bool(clip),
         "clip_model_name": ps.clip_model_name, "prototypes": ps.source, **meta}
    return Signals([r.image for r in ds.records], vocabs, scores, m)


def csv_text(signals: Any, ds: Any, dims: Sequence[str], row_images: Sequence[str | None], topk: int) -> str:
    """The original CSV with every requested dimension's top-k columns (``cgjax.data``'s writer
    per dimension, columns joined), one row per dataset row (repeated images repeated)."""
    tables = [list(csv.reader(io.StringIO(signals_csv_text(signals, d, ds, topk=topk,
                                                            label_dimensions=ds.dimensions), newline="")))
              for d in dims]
    n_label = 1 + len(ds.dimensions)
    joined = [list(parts[0]) + [c for t in parts[1:] for c in t[n_label:]] for parts in zip(*tables)]
    by_image = {row[0]: row for row in joined[1:]}
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(joined[0])
    for p in row_images:
        if p in by_image:
            w.writerow(by_image[p])
    return buf.getvalue()


def write_outputs(signals: Any, ds: Any, row_images: Sequence[str | None], dims: Sequence[str], output: str,
                  fmt: str = "json", topk: int = 3, keyed: str | None = "", report: str | None = "",
                  ps: PrototypeSet | None = None, validate_kw: dict | None = None) -> dict[str, Any]:
    """Write ``output`` (original JSON or CSV), the keyed JSON and the validate report.

    ``keyed`` / ``report``: a path, ``""`` for the default beside ``output``
    (``<stem>.keyed.json``, ``<stem>.validation.json``) or None to skip.
    """
    stem = os.path.splitext(output)[0]
    written: dict[str, Any] = {}
    by_image = dict(zip(signals.image_paths, signals_json_entries(signals, dims)))
    empty = {d: {} for d in dims}  # the original's entry for an image without signals
    entries = [by_image.get(p, empty) if p is not None else empty for p in row_images]
    if fmt == "json":
        persistence.write_text(output, signals_json_text(entries))
        # the list holds concept indices only: its concept index goes into the vocab.json beside it
        written["index"] = write_signals_index(output, {d: signals.vocabs[d] for d in dims})
    else:
        persistence.write_text(output, csv_text(signals, ds, dims, row_images, max(1, int(topk))))
    written["output"] = output
    if keyed is not None:
        keyed = keyed or f"{stem}.keyed.json"
        write_signals_keyed(keyed, signals)
        written["keyed"] = keyed
    if report is not None:
        report = report or f"{stem}.validation.json"
        recs = {r.image: r for r in ds.records}
        gt = {d: [(recs[p].labels.get(d) if p in recs else None) for p in row_images] for d in dims}
        names = {d: list(signals.vocabs[d].names) for d in dims}
        rep = validate_signals({d: [e.get(d, {}) for e in entries] for d in dims}, gt, names,
                               **(validate_kw or {}))
        rep["signals"] = {"normalize": signals.meta.get("normalize"), "temperature": signals.meta.get("temperature"),
                          "missing_images": int(sum(1 for e in entries if not any(e.values())))}
        write_json(report, rep)
        written["report"] = report
        written["validation"] = rep
    return written


def write_bulk(signals: Any, ds: Any, row_images: Sequence[str | None], dims: Sequence[str], out_dir: str,
               csv_too: bool = False, topk: int = 3, keyed: str | None = "", report: str | None = "",
               validate_kw: dict | None = None) -> dict[str, Any]:
    """``export_all_signals``: ``concept_signals_<dim>.json`` (and ``.csv``) per dimension in
    ``out_dir``, plus ONE keyed file and ONE report over all dimensions (the budget spans them)."""
    persistence.makedirs(out_dir)
    out: dict[str, Any] = {}
    for d in dims:
        one = signals.select([d])
        out[d] = write_outputs(one, ds, row_images, [d], persistence.join(out_dir, f"concept_signals_{d}.json"),
                               "json", keyed=None, report=None)["output"]
        if csv_too:
            out[d + "_csv"] = write_outputs(one, ds, row_images, [d],
                                            persistence.join(out_dir, f"concept_signals_{d}.csv"),
                                            "csv", topk, keyed=None, report=None)["output"]
    if keyed is not None:
        out["keyed"] = keyed or persistence.join(out_dir, "concept_signals.keyed.json")
        write_signals_keyed(out["keyed"], signals)
    if report is not None:
        with tempfile.TemporaryDirectory() as scratch:  # the all-dimensions list: only its report is kept
            w = write_outputs(signals, ds, row_images, dims, os.path.join(scratch, "all_signals.json"), "json",
                              keyed=None, report=report or persistence.join(out_dir, "validation_metrics.json"),
                              validate_kw=validate_kw)
        out["report"], out["validation"] = w["report"], w["validation"]
    return out


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=float)
