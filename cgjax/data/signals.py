"""Concept signals: per image and dimension, a score s per concept (the original stores ``[1 - s, s]``).

Three file formats, all read and written here:

* the original ``concept_signals_<dim>.json``: a JSON list aligned 1:1 with the dataset records,
  each ``{dim: {"<local concept index>": [1 - s, s], ...}}``, ``{dim: {}}`` for a missing image.
  It holds no concept names: it is read against its concept index, the prototypes'
  ``idx_to_concept`` (a ``.pt``) or the ``vocab.json`` written beside it (``SIGNALS_INDEX_FILE``);
  a count that does not match, or two indices that disagree, is an error naming the file and the
  dimension;
* the original ``concept_signals_<dim>.csv``: ``image_path,<label columns>,<dim>_top1_name,
  <dim>_top1_score,...`` (scores ``%.6f``, empty strings past the available concepts);
* cgjax's keyed JSON (``format: cgjax.signals``): keyed by image path, carrying ``schema_version``,
  the dimensions and the concept names, so reordering a dataset cannot misalign signals.

In memory, :class:`Signals` holds per dimension a float32 matrix ``[n_images, n_concepts]`` of s
with NaN where there is no score (a missing image, or a concept outside a CSV's top-k).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from cgjax import persistence
from cgjax.data.schema import (DEFAULT_DIMENSIONS, SCHEMA_VERSION, UNKNOWN, DataError, Dataset, ProblemLog,
                               Record, Vocabulary, check_schema_version, input_dir, input_exists, read_input_bytes,
                               read_json, vocab_from_json, vocab_to_json)
from cgjax.data.records import normalize_image_path

KEYED_FORMAT = "cgjax.signals"
#: The concept index of the list-format signals files of a folder, written beside them.
SIGNALS_INDEX_FILE = "vocab.json"


@dataclasses.dataclass
class Signals:
    """Scores s per image (rows, ``image_paths``) and dimension (``scores[dim]: [N, K_dim]``)."""

    image_paths: list[str]
    vocabs: dict[str, Vocabulary]
    scores: dict[str, np.ndarray]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # "_problems": entries skipped on read

    def __post_init__(self):
        self.image_paths = list(self.image_paths)
        n = len(self.image_paths)
        if len(set(self.image_paths)) != n:
            raise ValueError("Signals: duplicate image paths")
        for d, v in self.vocabs.items():
            s = np.asarray(self.scores[d], np.float32)
            if s.shape != (n, len(v)):
                raise ValueError(f"Signals[{d!r}]: scores shape {s.shape} != ({n}, {len(v)})")
            self.scores[d] = s

    @property
    def dimensions(self) -> tuple[str, ...]:
        return tuple(self.vocabs)

    def __len__(self) -> int:
        return len(self.image_paths)

    def mask(self, dim: str) -> np.ndarray:
        """True where a score exists."""
        return ~np.isnan(self.scores[dim])

    def row(self, image_path: str) -> int:
        return self._index()[image_path]

    def _index(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.image_paths)}

    def align(self, image_paths: Sequence[str]) -> "Signals":
        """Rows reordered to ``image_paths``; an image without signals gets a NaN row."""
        index = self._index()
        rows = np.array([index.get(p, -1) for p in image_paths], np.int64)
        scores = {}
        for d, s in self.scores.items():
            padded = np.concatenate([s, np.full((1, s.shape[1]), np.nan, np.float32)])
            scores[d] = padded[rows]  # row -1 -> the NaN pad
        return Signals(list(image_paths), dict(self.vocabs), scores, dict(self.meta))

    def select(self, dims: Sequence[str]) -> "Signals":
        return Signals(self.image_paths, {d: self.vocabs[d] for d in dims},
                       {d: self.scores[d] for d in dims}, dict(self.meta))

    def merge(self, other: "Signals") -> "Signals":
        """Union of dimensions (``other`` wins on a shared one), over the union of image paths."""
        paths = list(self.image_paths) + [p for p in other.image_paths if p not in set(self.image_paths)]
        a, b = self.align(paths), other.align(paths)
        return Signals(paths, {**a.vocabs, **b.vocabs}, {**a.scores, **b.scores}, {**self.meta, **other.meta})

    def for_image(self, image_path: str) -> dict[str, np.ndarray]:
        i = self.row(image_path)
        return {d: s[i] for d, s in self.scores.items()}


def _image_paths_of(records: Dataset | Sequence[Record] | Sequence[str]) -> list[str]:
    if isinstance(records, Dataset):
        records = records.records
    return [r.image if isinstance(r, Record) else str(r) for r in records]


def _records_of(records) -> list[Record]:
    return list(records.records if isinstance(records, Dataset) else records)


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ------------------------------------------------------------------------------------------------
# the original list JSON


def signals_index_path(path: str | os.PathLike) -> str:
    """The ``vocab.json`` beside a signals file (a URL stays a URL)."""
    return f"{input_dir(path)}/{SIGNALS_INDEX_FILE}"


def read_signals_index(path: str | os.PathLike) -> dict[str, Vocabulary] | None:
    """The concept index written beside the signals file ``path`` (None when there is none)."""
    index_file = signals_index_path(path)
    if not input_exists(index_file):
        return None
    return vocab_from_json(read_json(index_file), index_file)


def write_signals_index(path: str | os.PathLike, vocabs: Mapping[str, Vocabulary]) -> str:
    """Records ``vocabs`` as the concept index of the signals file ``path``: the ``vocab.json``
    beside it, merged with the dimensions already there (a dimension written again is replaced)."""
    index_file = signals_index_path(path)
    merged: dict[str, Vocabulary] = {}
    extra: dict[str, Any] = {}
    if input_exists(index_file):
        old = read_json(index_file)
        merged = vocab_from_json(old, index_file)
        extra = {k: v for k, v in old.items() if k not in ("schema_version", "format", "dimensions", "concepts")}
    merged.update({d: Vocabulary(d, v.names) for d, v in vocabs.items()})
    persistence.write_json(index_file, vocab_to_json(merged, **extra))
    return index_file


def signals_concept_index(path: str | os.PathLike, index: Mapping[str, Vocabulary] | None = None,
                          index_source: str = "the given concept index"
                          ) -> tuple[dict[str, Vocabulary], dict[str, str]]:
    """``(index, where)``: the concept index a list-format signals file is read against, per
    dimension ``index``'s, else the ``vocab.json`` beside the file; ``where[dim]`` names its source.
    Neither is a ``DataError``; the two disagreeing on a dimension is one naming the file and it."""
    path = os.fspath(path)
    beside = read_signals_index(path) or {}
    index = dict(index or {})
    if not index and not beside:
        raise DataError(path, None, "list-format signals hold no concept names: give their concept index (the "
                                    f"prototypes .pt, data.signals_index) or write a {SIGNALS_INDEX_FILE} beside them")
    for d in set(index) & set(beside):
        if index[d].names != beside[d].names:
            raise DataError(path, f"dimension {d!r}", f"{index_source} lists {index[d].names} but "
                                                      f"{signals_index_path(path)} lists {beside[d].names}")
    where = {d: signals_index_path(path) for d in beside}
    where.update({d: index_source for d in index})
    return {**beside, **index}, where


def read_signals_json(path: str | os.PathLike, records: Dataset | Sequence[Record] | Sequence[str], *,
                      vocabs: Mapping[str, Vocabulary] | None = None, dimensions: Sequence[str] | None = None,
                      skip_bad: bool = False, index_source: str = "the given concept index") -> Signals:
    """Reads an original ``concept_signals_<dim>.json`` list aligned 1:1 with ``records``.

    The file holds no concept names: they come from its concept index, ``vocabs`` (the prototypes'
    ``idx_to_concept``) or else the ``vocab.json`` beside the file (:func:`signals_concept_index`).
    Every dimension of the file must be in the index with as many concepts as the file has (its
    largest concept index + 1); else a ``DataError`` names the file and the dimension.
    """
    path = os.fspath(path)
    paths = _image_paths_of(records)
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(path, None, f"expected a JSON list aligned with the dataset records, got {type(data).__name__}")
    if len(data) != len(paths):
        raise DataError(path, None, f"has {len(data)} entries but the dataset has {len(paths)} records "
                                    "(the list must align 1:1 with the dataset)")
    index, where = signals_concept_index(path, vocabs, index_source)
    problems = ProblemLog(skip_bad)
    dims: list[str] = []
    parsed: list[dict[str, dict[int, float]]] = []
    largest: dict[str, int] = {}
    for i, entry in enumerate(data):
        where_row = f"row {i} (image {paths[i]!r})"
        errs: list[DataError] = []
        row: dict[str, dict[int, float]] = {}
        if not isinstance(entry, dict):
            errs.append(DataError(path, where_row, f"entry is not a JSON object ({type(entry).__name__})"))
            entry = {}
        for dim, per in entry.items():
            if dimensions is not None and dim not in dimensions:
                continue
            if not isinstance(per, dict):
                errs.append(DataError(path, where_row, f"{dim!r}: expected an object of concept index -> [1-s, s]"))
                continue
            out = {}
            for key, pair in per.items():
                if not re.fullmatch(r"\d+", str(key)):
                    errs.append(DataError(path, where_row, f"{dim!r}: concept key {key!r} is not a non-negative "
                                                           "integer"))
                    continue
                if not (isinstance(pair, list) and len(pair) == 2 and all(map(_finite_number, pair))):
                    errs.append(DataError(path, where_row, f"{dim!r}[{key}]: expected [1 - s, s], got {pair!r}"))
                    continue
                out[int(key)] = float(pair[1])
            if dim not in dims:
                dims.append(dim)
            row[dim] = out
        good = problems.report(errs)
        parsed.append(row if good else {})
        for dim, out in row.items():
            largest[dim] = max(largest.get(dim, -1), max(out, default=-1))
    scores, vocs = {}, {}
    for dim in dims:
        if dim not in index:
            sources = ", ".join(sorted(set(where.values())))
            raise DataError(path, f"dimension {dim!r}", f"is not in its concept index ({sources}: {list(index)})")
        n_file, n_index = largest.get(dim, -1) + 1, len(index[dim])
        if n_file and n_file != n_index:
            raise DataError(path, f"dimension {dim!r}", f"{n_file} concepts (largest index {n_file - 1}) but its "
                                                        f"concept index {where[dim]} has {n_index}: {index[dim].names}")
        vocs[dim] = index[dim]
        s = np.full((len(paths), len(vocs[dim])), np.nan, np.float32)
        for i, r in enumerate(parsed):
            for k, v in r.get(dim, {}).items():
                s[i, k] = v
        scores[dim] = s
    sig = Signals(paths, vocs, scores)
    sig.meta["_problems"] = list(problems.problems)
    return sig


def signals_json_entries(signals: Signals, dims: Sequence[str] | None = None) -> list[dict]:
    """One original list entry per image: ``{dim: {"<k>": [1 - s, s]}}`` for every dimension, as the
    original's export writes it (an image without scores gets ``{dim: {}}``)."""
    dims = signals.dimensions if dims is None else tuple(dims)
    out = []
    for i in range(len(signals)):
        entry = {}
        for d in dims:
            row = signals.scores[d][i]
            entry[d] = {str(k): [float(np.float32(1.0) - row[k]), float(row[k])]
                        for k in range(row.shape[0]) if not np.isnan(row[k])}
        out.append(entry)
    return out


def signals_json_text(entries: Sequence[Mapping[str, Any]]) -> str:
    """The original list file's bytes: ``json.dump(entries, f)`` (no indent, no final newline)."""
    return json.dumps(list(entries))


def write_signals_json(path: str | os.PathLike, signals: Signals,
                       records: Dataset | Sequence[Record] | Sequence[str] | None = None,
                       dims: Sequence[str] | None = None) -> None:
    """Writes the original list JSON, aligned with ``records`` (by image path) when given, and its
    concept index into the ``vocab.json`` beside it (:func:`write_signals_index`).

    A record without signals gets ``{dim: {}}``. Pairs are ``[1 - s, s]`` computed in float32. The
    bytes are the original's ``json.dump`` (no indent, no final newline).
    """
    if records is not None:
        signals = signals.align(_image_paths_of(records))
    dims = signals.dimensions if dims is None else tuple(dims)
    persistence.write_text(path, signals_json_text(signals_json_entries(signals, dims)))
    write_signals_index(path, {d: signals.vocabs[d] for d in dims})


# ------------------------------------------------------------------------------------------------
# the original top-k CSV


def signals_csv_text(signals: Signals, dim: str, records: Dataset | Sequence[Record], *, topk: int = 3,
                     label_dimensions: Sequence[str] | None = None) -> str:
    recs = _records_of(records)
    if label_dimensions is None:
        label_dimensions = records.dimensions if isinstance(records, Dataset) else DEFAULT_DIMENSIONS
    topk = max(1, int(topk))
    aligned = signals.align([r.image for r in recs])
    vocab, scores = aligned.vocabs[dim], aligned.scores[dim]
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    header = ["image_path", *label_dimensions]
    for k in range(1, topk + 1):
        header += [f"{dim}_top{k}_name", f"{dim}_top{k}_score"]
    writer.writerow(header)
    for r, row in zip(recs, scores):
        valid = np.flatnonzero(~np.isnan(row))
        order = valid[np.argsort(-row[valid], kind="stable")][:topk]
        cells = [r.image, *[(r.labels.get(d) or UNKNOWN) for d in label_dimensions]]
        for j in range(topk):
            cells += [vocab.names[order[j]], "%.6f" % row[order[j]]] if j < len(order) else ["", ""]
        writer.writerow(cells)
    return buf.getvalue()


def write_signals_csv(path: str | os.PathLike, signals: Signals, dim: str, records: Dataset | Sequence[Record], *,
                      topk: int = 3, label_dimensions: Sequence[str] | None = None) -> None:
    """Writes the original ``concept_signals_<dim>.csv`` (one row per record, top-k concepts by s)."""
    persistence.write_text(path, signals_csv_text(signals, dim, records, topk=topk,
                                                  label_dimensions=label_dimensions))


_TOP_RE = re.compile(r"^(?P<dim>.+)_top(?P<k>\d+)_(?P<kind>name|score)$")


def read_signals_csv(path: str | os.PathLike, *, vocab: Vocabulary | None = None,
                     images_root: str | os.PathLike | None = None, skip_bad: bool = False) -> Signals:
    """Reads an original top-k signals CSV. Concepts outside a row's top-k get NaN.

    Without ``vocab`` the concept order is the order of first appearance in the file (the CSV
    does not carry the prototype indices).
    """
    path = os.fspath(path)
    try:
        rows = list(csv.reader(io.StringIO(read_input_bytes(path).decode("utf-8-sig"), newline="")))
    except FileNotFoundError:
        raise DataError(path, None, "file not found") from None
    except csv.Error as e:
        raise DataError(path, None, f"CSV error: {e}") from None
    except UnicodeDecodeError as e:
        raise DataError(path, None, f"not UTF-8 text: {e}") from None
    if not rows:
        raise DataError(path, "header", "empty file (no header)")
    header = [h.strip() for h in rows[0]]
    if "image_path" not in header:
        raise DataError(path, "header", f"missing column 'image_path'; header is {header}")
    tops = [(_TOP_RE.match(h), j) for j, h in enumerate(header)]
    tops = [(m, j) for m, j in tops if m]
    dims = {m["dim"] for m, _ in tops}
    if len(dims) != 1:
        raise DataError(path, "header", f"expected <dim>_top<k>_name/_score columns of one dimension, got {sorted(dims)}")
    dim = dims.pop()
    name_cols = {int(m["k"]): j for m, j in tops if m["kind"] == "name"}
    score_cols = {int(m["k"]): j for m, j in tops if m["kind"] == "score"}
    if sorted(name_cols) != sorted(score_cols):
        raise DataError(path, "header", f"unpaired {dim}_top<k>_name/_score columns")
    ks = sorted(name_cols)
    problems = ProblemLog(skip_bad)
    names: list[str] = list(vocab.names) if vocab is not None else []
    index = {n: i for i, n in enumerate(names)}
    paths: list[str] = []
    entries: list[dict[int, float]] = []
    first_row: dict[str, int] = {}
    for n, fields in enumerate(rows[1:], start=1):
        if not fields:
            continue
        where = f"row {n}"
        if len(fields) != len(header):
            problems.report([DataError(path, where, f"row has {len(fields)} fields, the header has {len(header)}")])
            continue
        image = normalize_image_path(fields[header.index("image_path")], images_root)
        where = f"row {n} (image {image!r})"
        errs: list[DataError] = []
        if image in first_row:
            errs.append(DataError(path, where, f"duplicate image_path (first at row {first_row[image]})"))
        entry: dict[int, float] = {}
        for k in ks:
            name, score = fields[name_cols[k]].strip(), fields[score_cols[k]].strip()
            if not name and not score:
                continue
            try:
                value = float(score)
                if not math.isfinite(value):
                    raise ValueError
            except ValueError:
                errs.append(DataError(path, where, f"{dim}_top{k}_score is not a number: {score!r}"))
                continue
            if name not in index:
                if vocab is not None:
                    errs.append(DataError(path, where, f"{dim}_top{k}_name {name!r} is not in the vocabulary"))
                    continue
                index[name] = len(names)
                names.append(name)
            entry[index[name]] = value
        if problems.report(errs):
            first_row[image] = n
            paths.append(image)
            entries.append(entry)
    voc = vocab if vocab is not None else Vocabulary(dim, names)
    s = np.full((len(paths), len(voc)), np.nan, np.float32)
    for i, e in enumerate(entries):
        for k, v in e.items():
            s[i, k] = v
    sig = Signals(paths, {dim: voc}, {dim: s})
    sig.meta["_problems"] = list(problems.problems)
    return sig


# ------------------------------------------------------------------------------------------------
# cgjax's keyed JSON


def signals_to_keyed(signals: Signals) -> dict[str, Any]:
    body = {}
    for i, p in enumerate(signals.image_paths):
        entry = {}
        for d, s in signals.scores.items():
            row = s[i]
            if np.isnan(row).all():
                continue
            entry[d] = [None if np.isnan(x) else float(x) for x in row]
        body[p] = entry
    return {"schema_version": SCHEMA_VERSION, "format": KEYED_FORMAT,
            "dimensions": list(signals.dimensions),
            "concepts": {d: list(v.names) for d, v in signals.vocabs.items()},
            "meta": {k: v for k, v in signals.meta.items() if not k.startswith("_")},
            "signals": body}


def write_signals_keyed(path: str | os.PathLike, signals: Signals) -> None:
    """Writes cgjax's keyed signals JSON (see ``docs/schema.md``), atomically."""
    persistence.write_json(path, signals_to_keyed(signals), indent=None)


def read_signals_keyed(path: str | os.PathLike, *, vocabs: Mapping[str, Vocabulary] | None = None,
                       images_root: str | os.PathLike | None = None, skip_bad: bool = False) -> Signals:
    """Reads cgjax's keyed signals JSON. With ``vocabs``, the concept names must match them.

    With ``images_root``, keys are normalised like dataset image paths (root-folder prefix stripped).
    """
    path = os.fspath(path)
    obj = read_json(path)
    return _keyed_from_obj(obj, path, vocabs, skip_bad, images_root)


def _keyed_from_obj(obj, path, vocabs, skip_bad, images_root=None) -> Signals:
    if not isinstance(obj, dict) or obj.get("format") != KEYED_FORMAT:
        raise DataError(path, None, f"not a cgjax keyed signals file (expects format {KEYED_FORMAT!r})")
    check_schema_version(obj, path)
    concepts, body = obj.get("concepts"), obj.get("signals")
    if not isinstance(concepts, dict) or not isinstance(body, dict):
        raise DataError(path, None, "'concepts' and 'signals' must be JSON objects")
    dims = obj.get("dimensions", list(concepts))
    vocs = {}
    for d in dims:
        if not isinstance(concepts.get(d), list):
            raise DataError(path, f"concepts[{d!r}]", "missing or not a list of names")
        vocs[d] = Vocabulary(d, [str(n) for n in concepts[d]])
        if vocabs is not None and d in vocabs and vocabs[d] != vocs[d]:
            raise DataError(path, f"concepts[{d!r}]", f"concept names {vocs[d].names} differ from the "
                                                       f"vocabulary {vocabs[d].names}")
    problems = ProblemLog(skip_bad)
    paths, rows, seen = [], [], set()
    for p, entry in body.items():
        p = normalize_image_path(p, images_root) if images_root is not None else p
        errs = []
        if p in seen:
            errs.append(DataError(path, f"image {p!r}", "duplicate image path"))
        seen.add(p)
        if not isinstance(entry, dict):
            errs.append(DataError(path, f"image {p!r}", "entry is not a JSON object"))
            entry = {}
        row = {}
        for d, values in entry.items():
            if d not in vocs:
                errs.append(DataError(path, f"image {p!r}", f"unknown dimension {d!r}"))
            elif values is None:
                continue
            elif not (isinstance(values, list) and len(values) == len(vocs[d])
                      and all(v is None or _finite_number(v) for v in values)):
                errs.append(DataError(path, f"image {p!r}", f"{d!r}: expected {len(vocs[d])} scores or nulls"))
            else:
                row[d] = values
        if problems.report(errs):
            paths.append(p)
            rows.append(row)
    scores = {}
    for d, v in vocs.items():
        s = np.full((len(paths), len(v)), np.nan, np.float32)
        for i, r in enumerate(rows):
            if d in r:
                s[i] = [np.nan if x is None else x for x in r[d]]
        scores[d] = s
    sig = Signals(paths, vocs, scores, dict(obj.get("meta") or {}))
    sig.meta["_problems"] = list(problems.problems)
    return sig


# ------------------------------------------------------------------------------------------------
# dispatch and conversion


def signals_format(path: str | os.PathLike) -> str:
    """``"csv"``, ``"original_json"`` or ``"keyed"`` (sniffs the JSON's top level)."""
    path = os.fspath(path)
    if path.lower().endswith(".csv"):
        return "csv"
    try:
        head = read_input_bytes(path)[:4096].lstrip()
    except FileNotFoundError:
        raise DataError(path, None, "file not found") from None
    return "keyed" if head.startswith(b"{") else "original_json"


def read_signals(path: str | os.PathLike, records: Dataset | Sequence[Record] | Sequence[str] | None = None, *,
                 vocabs: Mapping[str, Vocabulary] | None = None, index: Mapping[str, Vocabulary] | None = None,
                 images_root: str | os.PathLike | None = None, skip_bad: bool = False,
                 index_source: str = "the given concept index") -> Signals:
    """Reads any signals file; the original list JSON needs ``records`` to know its image paths.

    ``vocabs``: concept names the file's must equal (a CSV is read in their order). ``index``: the
    concept index (e.g. a prototypes ``.pt``'s ``idx_to_concept``, described by ``index_source``)
    that names the concepts of a list JSON, else the ``vocab.json`` beside it; a keyed file must
    agree with it too. ``images_root`` (default: the ``Dataset``'s) normalises the image paths of
    CSV / keyed files.
    """
    path = os.fspath(path)
    if not input_exists(path):
        raise DataError(path, None, "file not found")
    fmt = signals_format(path)
    root = images_root if images_root is not None else (records.images_root if isinstance(records, Dataset) else None)
    if fmt == "csv":
        sig = read_signals_csv(path, skip_bad=skip_bad, images_root=root)
        dim = sig.dimensions[0]
        if vocabs is not None and dim in vocabs:
            sig = read_signals_csv(path, vocab=vocabs[dim], skip_bad=skip_bad, images_root=root)
        return sig
    if fmt == "keyed":
        sig = read_signals_keyed(path, vocabs=vocabs, images_root=root, skip_bad=skip_bad)
        for d, v in sig.vocabs.items():
            if index is not None and d in index and index[d].names != v.names:
                raise DataError(path, f"dimension {d!r}", f"concept names {v.names} differ from {index_source} "
                                                          f"{index[d].names}")
        return sig
    if records is None:
        raise DataError(path, None, "the original signals list JSON needs the dataset records it aligns with")
    sig = read_signals_json(path, records, vocabs=index, skip_bad=skip_bad, index_source=index_source)
    for d, v in sig.vocabs.items():
        if vocabs is not None and d in vocabs and vocabs[d].names != v.names:
            raise DataError(path, f"dimension {d!r}", f"concept names {v.names} (its concept index) differ from the "
                                                      f"vocabulary {vocabs[d].names}")
    return sig


def write_signals(path: str | os.PathLike, signals: Signals, *, fmt: str = "keyed",
                  records: Dataset | Sequence[Record] | None = None, dim: str | None = None, topk: int = 3) -> None:
    """Writes ``signals`` as ``keyed``, ``original_json`` (aligned to ``records``) or ``csv`` (one ``dim``)."""
    if fmt == "keyed":
        write_signals_keyed(path, signals)
    elif fmt == "original_json":
        write_signals_json(path, signals, records, dims=None if dim is None else [dim])
    elif fmt == "csv":
        if records is None:
            raise ValueError("the signals CSV needs the dataset records (for its label columns)")
        write_signals_csv(path, signals, dim or signals.dimensions[0], records, topk=topk)
    else:
        raise ValueError(f"unknown signals format {fmt!r}")


def convert_signals(sources: Sequence[str | os.PathLike], output: str | os.PathLike, *, fmt: str = "keyed",
                    records: Dataset | Sequence[Record] | None = None,
                    vocabs: Mapping[str, Vocabulary] | None = None, dim: str | None = None, topk: int = 3) -> Signals:
    """Reads and merges ``sources`` (any formats, e.g. one original JSON per dimension; ``vocabs``
    is their concept index) and writes ``output``."""
    merged = None
    for src in sources:
        sig = read_signals(src, records, vocabs=vocabs, index=vocabs)
        merged = sig if merged is None else merged.merge(sig)
    if merged is None:
        raise ValueError("no signals files given")
    write_signals(output, merged, fmt=fmt, records=records, dim=dim, topk=topk)
    return merged


def original_signals_filename(dim: str, fmt: str = "json") -> str:
    return f"concept_signals_{dim}.{fmt}"


def load_signals_dir(directory: str | os.PathLike, records: Dataset | Sequence[Record],
                     dims: Sequence[str] = DEFAULT_DIMENSIONS,
                     vocabs: Mapping[str, Vocabulary] | None = None) -> Signals:
    """Reads ``concept_signals_<dim>.json`` for each dim in ``directory`` (the original artifact set)
    against their concept index ``vocabs`` (else the ``vocab.json`` in ``directory``)."""
    merged = None
    for d in dims:
        sig = read_signals_json(os.path.join(os.fspath(directory), original_signals_filename(d)), records,
                                vocabs=None if vocabs is None else {d: vocabs[d]}, dimensions=[d])
        merged = sig if merged is None else merged.merge(sig)
    return merged

