"""One example per image, the same for the tfds packer and the in-memory source.

``load_data`` reads a data set (images root + dataset JSON, optional targets CSV and signals),
checks it (bad rows raise, or are skipped with ``skip_bad``) and ``make_example`` turns one record
into the flat dict both sources yield::

    image: bytes (the encoded file)   image_path: str   index: int (row in the dataset JSON)
    labels: {dim: int (-1 = missing)}  label_names: {dim: str ("" = missing)}
    target_keys: str  target_reason: str  has_target: int
    signals: {dim: float32 [K_dim] (NaN = no score)}   (only when the data set has signals)
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np

from cgjax.data.dimensions import resolve_dimensions
from cgjax.data.records import (check_image_file, raw_image_paths, read_dataset_json, read_targets_csv,
                                resolve_image)
from cgjax.data.schema import (DataError, Dataset, ProblemLog, Record, TargetRow, Vocabulary, load_vocab,
                               log, read_input_bytes)
from cgjax.data.signals import Signals, read_signals, signals_format
from cgjax.data.splits import SplitPolicy


@dataclasses.dataclass
class LoadedData:
    """A checked data set: good records, their vocabularies, targets and signals (aligned to records)."""

    dataset: Dataset
    vocabs: dict[str, Vocabulary]
    targets: dict[str, TargetRow]
    signals: Signals | None
    problems: list[DataError]  # everything skipped (skip_bad=True)

    @property
    def records(self) -> list[Record]:
        return self.dataset.records

    @property
    def dimensions(self) -> tuple[str, ...]:
        return self.dataset.dimensions

    @property
    def signal_vocabs(self) -> dict[str, Vocabulary]:
        return {} if self.signals is None else dict(self.signals.vocabs)

    def image_file(self, record: Record) -> str:
        return resolve_image(self.dataset.images_root, record.image)


def _as_vocabs(vocab) -> dict[str, Vocabulary] | None:
    if vocab is None:
        return None
    if isinstance(vocab, (str, os.PathLike)):
        return load_vocab(vocab)
    return dict(vocab)


def load_data(dataset_json: str | os.PathLike, images_root: str | os.PathLike | None = None, *,
              targets_csv: str | os.PathLike | None = None, signals: Any = None,
              dimensions: Sequence[str] | None = None,
              vocab: str | os.PathLike | Mapping[str, Vocabulary] | None = None,
              signals_index: Mapping[str, Vocabulary] | None = None, splits: SplitPolicy | None = None,
              check_images: bool = True, skip_bad: bool = False, allow_outside_root: bool = False) -> LoadedData:
    """Reads and cross-checks a data set.

    The dimensions are ``dimensions`` if given, else the data's own
    (:func:`cgjax.data.dimensions.resolve_dimensions`: the records' ``concepts`` keys, the targets
    CSV header and ``vocab`` must agree). With ``splits``, records without a ``split`` take theirs
    from the data set's split file (:mod:`cgjax.data.splits`; written on first use).
    ``vocab`` (a ``vocab.json`` path or ``{dim: Vocabulary}``) fixes the label indices; labels
    outside it are errors. Without it the vocabularies are built from the records (first
    appearance). ``signals``: file path(s) in any signals format, or a ``Signals``. A target row or
    keyed signal for an image not in the dataset is an error; a record without a target gets empty
    texts and ``has_target = 0``. Keyed signals carry their own concept names, which may differ from
    the label vocabulary (prototypes indexed on a training split); with an explicit ``vocab`` they
    must match it. List-format signals (``concept_signals_<dim>.json``) are read against their
    concept index: ``signals_index`` (e.g. a prototypes ``.pt``'s ``idx_to_concept``) or the
    ``vocab.json`` beside them (:func:`cgjax.data.signals.read_signals`).
    """
    vocabs = _as_vocabs(vocab)
    explicit_vocab = vocabs is not None
    named_vocab = vocab if isinstance(vocab, (str, os.PathLike)) else vocabs  # a path names the file in errors
    dimensions = resolve_dimensions(dataset_json, targets_csv=targets_csv, vocab=named_vocab, dimensions=dimensions)
    ds = read_dataset_json(dataset_json, images_root, dimensions=dimensions, vocabs=vocabs,
                           allow_outside_root=allow_outside_root,
                           check_images=check_images, skip_bad=skip_bad)
    if splits is not None:
        ds = splits.apply(ds)
    problems = ProblemLog(skip_bad)
    problems.problems.extend(ds.skipped)
    if vocabs is None:
        vocabs = ds.vocabularies()
    targets: dict[str, TargetRow] = {}
    if targets_csv is not None:
        tg = read_targets_csv(targets_csv, ds.images_root, dimensions=ds.dimensions, vocabs=vocabs,
                              skip_bad=skip_bad)
        problems.problems.extend(tg.skipped)
        known = {r.image for r in ds.records}
        for row in tg.rows:
            if row.image_path not in known:
                problems.report([DataError(tg.path, f"row {row.row}", f"image_path {row.image_path!r} is not "
                                                                      "a (good) record of the dataset JSON")])
                continue
            targets[row.image_path] = row
    sig = None
    if signals is not None:
        if isinstance(signals, Signals):
            sources = [signals]
        elif isinstance(signals, (str, os.PathLike)):
            sources = [signals]
        else:
            sources = list(signals)
        raw = None
        known = {r.image for r in ds.records}
        for src in sources:
            name = "signals"
            if not isinstance(src, Signals):
                name = os.fspath(src)
                raw = raw if raw is not None else raw_image_paths(ds.path, ds.images_root)
                # keyed signals name their concepts, list signals take them from their concept index:
                # the concept index is theirs (e.g. prototypes built on the training split) unless a
                # vocabulary was given explicitly; a top-k CSV is read in the index's (or the labels') order
                csv_file = signals_format(name) == "csv"
                named = (not csv_file or signals_index is not None) and not explicit_vocab
                names = (signals_index or vocabs) if csv_file else (None if named else vocabs)
                src = read_signals(src, raw, vocabs=names, index=signals_index, images_root=ds.images_root,
                                   skip_bad=skip_bad)
                problems.problems.extend(src.meta.get("_problems", []))
            else:
                named = not explicit_vocab
            for d, v in src.vocabs.items():
                if not named and d in vocabs and v != vocabs[d]:
                    raise DataError(name, f"dimension {d!r}",
                                    f"concept names {v.names} differ from the vocabulary {vocabs[d].names}")
            raw_set = set(raw or ())
            for row, p in enumerate(src.image_paths):
                if p in known or p in raw_set or all(np.isnan(s[row]).all() for s in src.scores.values()):
                    continue
                problems.report([DataError(name, f"image {p!r}", "has signals but is not a record of the dataset")])
            sig = src if sig is None else sig.merge(src)
        sig = sig.align([r.image for r in ds.records])
    if problems.problems:
        log.warning("%d problem(s) skipped while loading %s", len(problems.problems), ds.path)
    return LoadedData(ds, vocabs, targets, sig, problems.problems)


def read_image_bytes(path: str, check: bool = True) -> bytes:
    if check:
        msg = check_image_file(path)
        if msg:
            raise DataError(path, None, msg)
    return read_input_bytes(path)  # a local file or a URL (gs://)


def make_example(data: LoadedData, i: int, image_bytes: bytes | None = None) -> dict[str, Any]:
    """The example of ``data.records[i]`` (reads the image file unless ``image_bytes`` is given)."""
    r = data.records[i]
    if image_bytes is None:
        image_bytes = read_image_bytes(data.image_file(r), check=False)
    t = data.targets.get(r.image)
    ex: dict[str, Any] = {
        "image": image_bytes,
        "image_path": r.image,
        "index": int(r.row if r.row is not None else i),
        "labels": {d: int(data.vocabs[d].index(r.labels.get(d))) if d in data.vocabs else -1
                   for d in data.dimensions},
        "label_names": {d: r.labels.get(d) or "" for d in data.dimensions},
        "target_keys": "" if t is None else t.target_keys,
        "target_reason": "" if t is None else t.target_reason,
        "has_target": int(t is not None),
    }
    if data.signals is not None:
        ex["signals"] = {d: np.asarray(s[i], np.float32) for d, s in data.signals.scores.items()}
    return ex
