"""Readers and writers for the original project's dataset JSON and targets CSV.

Dataset JSON: a list of ``{"image", "concepts": {dim: label, "media": str|[str], ...}, "title", "date"}``
(top-level ``dim`` keys, e.g. ``"artist"``, are a fallback for a missing ``concepts[dim]``; an image
path whose first component is the images root's folder name has it stripped). Targets CSV:
``image_path,<dims...>,target_keys,target_reason`` written by Python's ``csv`` module (multi-line
fields quoted). Row numbers in messages: dataset JSON rows are 0-based list indices (the index the
signals lists align with); CSV rows are 1-based data rows (the header is row 0).
"""
from __future__ import annotations

import csv
import io
import os
import posixpath
from typing import Any, Iterable, Mapping, Sequence

from PIL import Image

from cgjax import persistence
from cgjax.data.schema import (DEFAULT_DIMENSIONS, MISSING_LABELS, SCHEMA_VERSION, UNKNOWN, DataError, Dataset,
                               ProblemLog, Record, TargetRow, Targets, Vocabulary, normalize_label, input_dir,
                               input_exists, normalize_split, read_input_bytes, read_input_text, read_json)

TARGET_COLUMNS = ("target_keys", "target_reason")
_RECORD_KEYS = ("image", "concepts", "title", "date", "split", "schema_version")


# ------------------------------------------------------------------------------------------------
# paths and images


def normalize_image_path(image: str, images_root: str | os.PathLike | None = None) -> str:
    """The record's image path relative to the images root, as the original resolves it.

    Absolute paths are kept; a relative path whose first component equals the images root's
    folder name has that component stripped (``dataset/van_gogh/x.jpg`` under ``data/dataset``).
    """
    image = image.strip()
    if os.path.isabs(image):
        return image
    path = posixpath.normpath(image.replace(os.sep, "/"))
    if images_root is not None:
        root_name = os.path.basename(os.path.normpath(os.fspath(images_root)))
        head, _, rest = path.partition("/")
        if rest and head == root_name:
            path = rest
    return path


def leaves_root(image: str) -> bool:
    """Whether a record's image path is absolute or climbs out of the images root with ``..``."""
    norm = os.path.normpath(image.replace("\\", "/"))
    return os.path.isabs(image) or norm == ".." or norm.startswith("../")


def resolve_image(images_root: str | os.PathLike | None, image: str) -> str:
    if os.path.isabs(image) or images_root is None:
        return image
    return os.path.join(os.fspath(images_root), image)


def check_image_file(path: str, decode: bool = True) -> str | None:
    """None if ``path`` is a readable image (or, with ``decode=False``, an existing file), else a
    message saying what is wrong."""
    if not input_exists(path):
        return f"image file not found: {path}"
    if not decode:
        return None
    try:
        with Image.open(io.BytesIO(read_input_bytes(path))) as im:
            im.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return f"unreadable image {path}: {type(e).__name__}: {e}"
    return None


# ------------------------------------------------------------------------------------------------
# dataset JSON


def concept_dimensions(data: Any) -> tuple[str, ...]:
    """The dimensions a dataset JSON's records name: every ``concepts`` key with a non-empty string
    (``Unknown`` included) in at least one record (``media``, and keys that are always empty such as
    the original's ``art_movement: ""``, are not dimensions; a top-level ``artist``, ``style`` or
    ``genre``, the original's fallback, counts too), in order of first appearance; exactly the
    original's three in the original's order (artist, style, genre), whatever the JSON's key order."""
    seen: dict[str, None] = {}
    for obj in data if isinstance(data, list) else ():
        if not isinstance(obj, dict):
            continue
        concepts = obj.get("concepts") if isinstance(obj.get("concepts"), dict) else {}
        top = {k: obj[k] for k in DEFAULT_DIMENSIONS if k in obj}
        for k, v in [*concepts.items(), *top.items()]:
            if k != "media" and isinstance(v, str) and v.strip():
                seen.setdefault(k, None)
    return DEFAULT_DIMENSIONS if set(seen) == set(DEFAULT_DIMENSIONS) else tuple(seen)


def read_dataset_json(path: str | os.PathLike, images_root: str | os.PathLike | None = None, *,
                      dimensions: Sequence[str] | None = None,
                      vocabs: Mapping[str, Vocabulary] | None = None,
                      check_images: bool = False, skip_bad: bool = False,
                      missing_labels: Iterable[str] = MISSING_LABELS, allow_outside_root: bool = False) -> Dataset:
    """Reads a dataset JSON in the original format.

    ``images_root`` defaults to the JSON's folder (as the original). ``dimensions`` defaults to
    the records' ``concepts`` keys (:func:`concept_dimensions`; the original's order when they are
    artist/style/genre), else artist/style/genre. With ``vocabs``, a label outside its vocabulary is an error. With
    ``check_images``, each image must exist and decode (``"exists"``: exist only, no read: a decode
    error then surfaces in the loader, naming the file). Each bad record raises a ``DataError``
    naming the file and row, or with ``skip_bad`` is logged, skipped and listed in ``.skipped``.
    """
    path = os.fspath(path)
    images_root = input_dir(path) if images_root is None else os.fspath(images_root)
    missing = frozenset(missing_labels)
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(path, None, f"expected a JSON list of records, got {type(data).__name__}")
    if dimensions:
        dims = tuple(dimensions)
    else:
        dims = concept_dimensions(data) or DEFAULT_DIMENSIONS
    problems = ProblemLog(skip_bad)
    records: list[Record] = []
    first_row: dict[str, int] = {}
    for i, obj in enumerate(data):
        record, errs = _parse_record(obj, i, path, images_root, dims, vocabs, missing, allow_outside_root)
        if record is not None:
            where = f"row {i} (image {record.image!r})"
            if record.image in first_row:
                errs.append(DataError(path, where, f"duplicate image path (first at row {first_row[record.image]})"))
            else:
                first_row[record.image] = i
            if check_images:
                msg = check_image_file(resolve_image(images_root, record.image), decode=check_images != "exists")
                if msg:
                    errs.append(DataError(path, where, msg))
        if problems.report(errs):
            records.append(record)
    return Dataset(records, dims, path, images_root, problems.problems)


def raw_image_paths(path: str | os.PathLike, images_root: str | os.PathLike | None = None) -> list[str]:
    """The image path of every row of a dataset JSON, bad rows included (``"<row i>"`` when absent or a duplicate).

    The original signals lists align with these rows, so they are read against this list even when
    bad records are skipped.
    """
    path = os.fspath(path)
    images_root = input_dir(path) if images_root is None else os.fspath(images_root)
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(path, None, f"expected a JSON list of records, got {type(data).__name__}")
    out, seen = [], set()
    for i, obj in enumerate(data):
        image = obj.get("image") if isinstance(obj, dict) else None
        image = normalize_image_path(image, images_root) if isinstance(image, str) and image.strip() else None
        out.append(image if image is not None and image not in seen else f"<row {i}>")
        seen.add(image)
    return out


def _parse_record(obj: Any, i: int, file: str, images_root: str, dims: Sequence[str],
                  vocabs: Mapping[str, Vocabulary] | None, missing: frozenset[str], allow_outside_root: bool = False):
    where = f"row {i}"
    errs: list[DataError] = []
    if not isinstance(obj, dict):
        return None, [DataError(file, where, f"record is not a JSON object ({type(obj).__name__})")]
    image = obj.get("image")
    if not isinstance(image, str) or not image.strip():
        return None, [DataError(file, where, "missing or empty 'image' path")]
    image = normalize_image_path(image, images_root)
    where = f"row {i} (image {image!r})"
    if not allow_outside_root and leaves_root(image):
        return None, [DataError(file, where, f"image path leaves the images root {images_root} (absolute or '..'): "
                                             "refused unless --allow_outside_root (config.data.allow_outside_root)")]
    concepts = obj.get("concepts", {})
    if concepts is None:
        concepts = {}
    if not isinstance(concepts, dict):
        errs.append(DataError(file, where, "'concepts' is not a JSON object"))
        concepts = {}
    labels: dict[str, str | None] = {}
    for d in dims:
        value = concepts.get(d)
        if value is None:
            value = obj.get(d)  # top-level fallback (the original's record["artist"])
        if value is not None and not isinstance(value, str):
            errs.append(DataError(file, where, f"label for {d!r} is not a string: {value!r}"))
            value = None
        label = normalize_label(value, missing)
        if label is not None and vocabs is not None and d in vocabs and label not in vocabs[d]:
            errs.append(DataError(file, where, f"label {label!r} for {d!r} is not in the vocabulary"))
        labels[d] = label
    media = concepts.get("media", [])
    if media is None:
        media = []
    if isinstance(media, str):
        media = [media] if media else []
    if not isinstance(media, list) or not all(isinstance(m, str) for m in media):
        errs.append(DataError(file, where, f"'media' is not a string or a list of strings: {media!r}"))
        media = []
    try:
        split = normalize_split(obj.get("split"))
    except ValueError as e:
        errs.append(DataError(file, where, str(e)))
        split = None
    record = Record(
        image=image, labels=labels, media=list(media),
        title="" if obj.get("title") is None else str(obj.get("title")),
        date="" if obj.get("date") is None else str(obj.get("date")),
        split=split,
        extra_concepts={k: v for k, v in concepts.items() if k not in dims and k != "media"},
        extra={k: v for k, v in obj.items() if k not in _RECORD_KEYS and k not in dims},
        row=i)
    return record, errs


_SPLIT_OUT = {"train": "train", "validation": "val", "test": "test"}


def record_to_json(record: Record, dimensions: Sequence[str], *, schema_version: bool = True) -> dict:
    out: dict[str, Any] = {"image": record.image}
    if "artist" in dimensions:  # the original files carry the artist at the top level too
        out["artist"] = record.labels.get("artist") or UNKNOWN
    concepts = {d: (record.labels.get(d) or UNKNOWN) for d in dimensions}
    concepts["media"] = list(record.media)
    concepts.update(record.extra_concepts)
    out["concepts"] = concepts
    out["title"] = record.title
    out["date"] = record.date
    if record.split is not None:
        out["split"] = _SPLIT_OUT[record.split]
    out.update(record.extra)
    if schema_version:
        out["schema_version"] = SCHEMA_VERSION
    return out


def write_dataset_json(path: str | os.PathLike, records: Sequence[Record],
                       dimensions: Sequence[str] = DEFAULT_DIMENSIONS, *, schema_version: bool = True) -> None:
    """Writes records in the original format (+ ``split`` and ``schema_version`` per record), atomically."""
    persistence.write_json(path, [record_to_json(r, dimensions, schema_version=schema_version) for r in records])


# ------------------------------------------------------------------------------------------------
# targets CSV


def format_target_keys(labels: Mapping[str, str | None], dimensions: Sequence[str] = DEFAULT_DIMENSIONS) -> str:
    """``"artist: a\\nstyle: s\\ngenre: g"`` (the original's ``build_target``); missing -> ``Unknown``."""
    return "\n".join(f"{d}: {labels.get(d) or UNKNOWN}" for d in dimensions)


def parse_target_keys(text: str, dimensions: Sequence[str] = DEFAULT_DIMENSIONS) -> dict[str, str]:
    """Parses a ``target_keys`` block: exactly one ``<dim>: <value>`` line per dimension, in order.

    Raises ValueError describing what is malformed.
    """
    if text is None or not text.strip():
        raise ValueError("empty target_keys block")
    lines = text.strip().replace("\r\n", "\n").split("\n")
    if len(lines) != len(dimensions):
        raise ValueError(f"target_keys has {len(lines)} lines, expected {len(dimensions)} "
                         f"({', '.join(d + ': ...' for d in dimensions)}): {text!r}")
    out = {}
    for k, (line, d) in enumerate(zip(lines, dimensions)):
        key, sep, value = line.partition(":")
        if not sep or key.strip().lower() != d.lower():
            raise ValueError(f"target_keys line {k + 1} should start with '{d}:', got {line!r}")
        if not value.strip():
            raise ValueError(f"target_keys line {k + 1} has no value for {d!r}")
        out[d] = value.strip()
    return out


def read_targets_csv(path: str | os.PathLike, images_root: str | os.PathLike | None = None, *,
                     dimensions: Sequence[str] | None = None,
                     vocabs: Mapping[str, Vocabulary] | None = None,
                     check_images: bool = False, skip_bad: bool = False,
                     missing_labels: Iterable[str] = MISSING_LABELS) -> Targets:
    """Reads a targets CSV (``image_path,<dims...>,target_keys,target_reason``).

    ``images_root`` defaults to the CSV's folder. The dimensions are the label columns of the header
    unless given. Each row must have as many
    fields as the header, a non-empty unique ``image_path``, labels inside ``vocabs`` (if given)
    and a well-formed ``target_keys`` block; ``target_reason`` may be empty or absent.
    """
    path = os.fspath(path)
    images_root = input_dir(path) if images_root is None else os.fspath(images_root)
    text = read_input_text(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(path, "header", "empty file (no header)") from None
    except csv.Error as e:
        raise DataError(path, "header", f"CSV error: {e}") from None
    header = [h.strip() for h in header]
    missing_cols = [c for c in ("image_path", "target_keys") if c not in header]
    if missing_cols:
        raise DataError(path, "header", f"missing column(s) {missing_cols}; header is {header}")
    label_cols = [h for h in header if h not in ("image_path",) + TARGET_COLUMNS]
    dims = tuple(label_cols if dimensions is None else dimensions)
    absent = [d for d in dims if d not in header]
    if absent:
        raise DataError(path, "header", f"missing label column(s) {absent}; header is {header}")
    missing = frozenset(missing_labels)
    problems = ProblemLog(skip_bad)
    rows: list[TargetRow] = []
    first_row: dict[str, int] = {}
    n = 0
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            problems.report([DataError(path, f"row {n + 1} (line {start})", f"CSV error: {e}")])
            break
        if not fields:  # blank line
            continue
        n += 1
        row, errs = _parse_target_row(fields, header, dims, n, start, path, images_root, vocabs, missing)
        if row is not None:
            if row.image_path in first_row:
                errs.append(DataError(path, f"row {n} (line {start})", f"duplicate image_path {row.image_path!r} "
                                                                      f"(first at row {first_row[row.image_path]})"))
            else:
                first_row[row.image_path] = n
            if check_images:
                msg = check_image_file(resolve_image(images_root, row.image_path), decode=check_images != "exists")
                if msg:
                    errs.append(DataError(path, f"row {n} (line {start})", msg))
        if problems.report(errs):
            rows.append(row)
    return Targets(rows, dims, path, problems.problems)


def _parse_target_row(fields, header, dims, n, line, file, images_root, vocabs, missing):
    where = f"row {n} (line {line})"
    if len(fields) != len(header):
        return None, [DataError(file, where, f"row has {len(fields)} fields, the header has {len(header)} "
                                             f"({','.join(header)})")]
    values = dict(zip(header, fields))
    image = values["image_path"].strip()
    if not image:
        return None, [DataError(file, where, "empty image_path")]
    image = normalize_image_path(image, images_root)
    errs = []
    labels = {}
    for d in dims:
        label = normalize_label(values[d], missing)
        if label is not None and vocabs is not None and d in vocabs and label not in vocabs[d]:
            errs.append(DataError(file, where, f"label {label!r} for {d!r} is not in the vocabulary"))
        labels[d] = label
    keys = values["target_keys"]
    try:
        parse_target_keys(keys, dims)
    except ValueError as e:
        errs.append(DataError(file, where, f"malformed target_keys: {e}"))
    return TargetRow(image, labels, keys, values.get("target_reason", "") or "", row=n), errs


def targets_csv_text(rows: Sequence[TargetRow], dimensions: Sequence[str] = DEFAULT_DIMENSIONS) -> str:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)  # the original's dialect: excel, QUOTE_MINIMAL, "\r\n"
    writer.writerow(["image_path", *dimensions, *TARGET_COLUMNS])
    for r in rows:
        writer.writerow([r.image_path, *[(r.labels.get(d) or UNKNOWN) for d in dimensions],
                         r.target_keys, r.target_reason])
    return buf.getvalue()


def write_targets_csv(path: str | os.PathLike, rows: Sequence[TargetRow],
                      dimensions: Sequence[str] = DEFAULT_DIMENSIONS) -> None:
    """Writes the original ``synth_targets.csv`` format, atomically."""
    persistence.write_text(path, targets_csv_text(rows, dimensions))
