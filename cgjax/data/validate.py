"""Checks a data set in the original formats and reports EVERY problem with its file and row.

``python scripts/validate_data.py --dataset_json D --images_root R [--targets_csv C] [--signals S1 --signals S2 ...]``
prints one line per problem and exits 1 if there is any (0 otherwise; a usage error, such as a
mistyped flag, also exits 1 after a ``FATAL Flags parsing error`` line).
Problems: unreadable files, bad records/rows (missing fields or columns, labels not strings or
outside the vocabulary, duplicate image paths, malformed ``target_keys``), missing or unreadable
images, targets or signals for images the dataset does not have, signals lists of the wrong
length or with malformed entries, concept names that disagree with the vocabulary. Warnings
(exit code 0 unless ``--strict``): records without a target row or without signals, and
``target_keys`` values that differ from the row's label columns.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import numpy as np
from absl import flags

from cgjax import commandline
from cgjax.data.dimensions import DimensionsError, resolve_dimensions
from cgjax.data.records import parse_target_keys, raw_image_paths, read_dataset_json, read_targets_csv
from cgjax.data.schema import DataError, Vocabulary, load_vocab
from cgjax.data.signals import read_signals


@dataclasses.dataclass
class ValidationReport:
    problems: list[DataError] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    n_records: int = 0
    n_targets: int = 0
    n_signals: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        return [f"ERROR {p}" for p in self.problems] + [f"WARNING {w}" for w in self.warnings]


def validate_data(dataset_json: str | os.PathLike, images_root: str | os.PathLike | None = None,
                  targets_csv: str | os.PathLike | None = None, signals: Sequence[str | os.PathLike] = (), *,
                  dimensions: Sequence[str] | None = None,
                  vocab: str | os.PathLike | Mapping[str, Vocabulary] | None = None,
                  signals_index: Mapping[str, Vocabulary] | None = None,
                  check_images: bool = True, allow_outside_root: bool = False) -> ValidationReport:
    """Validates a data set; never raises for a data problem (they are all in the report).

    The dimensions are ``dimensions``, else the data's own (records, CSV header and ``vocab`` must
    agree). List-format signals are read against ``signals_index``, else the ``vocab.json`` beside them.
    """
    rep = ValidationReport()
    vocabs = None
    if vocab is not None:
        try:
            vocabs = load_vocab(vocab) if isinstance(vocab, (str, os.PathLike)) else dict(vocab)
        except DataError as e:
            rep.problems.append(e)
            return rep
    try:
        named_vocab = vocab if isinstance(vocab, (str, os.PathLike)) else vocabs  # a path names the file
        dimensions = resolve_dimensions(dataset_json, targets_csv=targets_csv, vocab=named_vocab,
                                        dimensions=dimensions)
    except DimensionsError as e:
        rep.problems.append(e)
        return rep
    except DataError:  # an unreadable file: its reader reports it below
        dimensions = dimensions or (tuple(vocabs) if vocabs else None)
    try:
        ds = read_dataset_json(dataset_json, images_root, dimensions=dimensions, vocabs=vocabs,
                               allow_outside_root=allow_outside_root,
                               check_images=check_images, skip_bad=True)
    except DataError as e:
        rep.problems.append(e)
        return rep
    rep.problems.extend(ds.skipped)
    rep.n_records = len(ds.records)
    if not ds.records:  # nothing to train or evaluate on is not a valid data set
        rep.problems.append(DataError(ds.path, None, "no usable records" + (" (every row has a problem above)"
                                                                            if ds.skipped else " (the file is empty)")))
    given_vocabs = vocabs
    if vocabs is None:
        vocabs = ds.vocabularies()
    labels_by_path = {r.image: r.labels for r in ds.records}
    try:  # every row's image path, bad rows included: their targets / signals are not reported again
        all_paths = set(raw_image_paths(ds.path, ds.images_root))
    except DataError:
        all_paths = set(labels_by_path)

    if targets_csv is not None:
        try:
            tg = read_targets_csv(targets_csv, ds.images_root, dimensions=ds.dimensions, vocabs=given_vocabs,
                                  check_images=False, skip_bad=True)
        except DataError as e:
            rep.problems.append(e)
        else:
            rep.problems.extend(tg.skipped)
            rep.n_targets = len(tg.rows)
            for row in tg.rows:
                where = f"row {row.row} (image {row.image_path!r})"
                if row.image_path not in labels_by_path:
                    if row.image_path not in all_paths:
                        rep.problems.append(DataError(tg.path, where, f"image_path is not a record of {ds.path}"))
                    continue
                for d in ds.dimensions:
                    want = labels_by_path[row.image_path].get(d)
                    if row.labels.get(d) != want:
                        rep.problems.append(DataError(tg.path, where, f"{d} {row.labels.get(d)!r} differs from the "
                                                                      f"dataset JSON's {want!r}"))
                keys = parse_target_keys(row.target_keys, ds.dimensions)
                for d, v in keys.items():
                    if (row.labels.get(d) or "Unknown") != v:
                        rep.warnings.append(f"{tg.path}: {where}: target_keys says {d}: {v!r} but the {d} "
                                            f"column is {row.labels.get(d)!r}")
            have = {r.image_path for r in tg.rows}
            missing = [p for p in labels_by_path if p not in have]
            if missing:
                rep.warnings.append(f"{tg.path}: {len(missing)} dataset record(s) have no target row "
                                    f"(first: {missing[0]!r})")

    raw = None
    for src in signals:
        src = os.fspath(src)
        try:
            raw = raw if raw is not None else raw_image_paths(ds.path, ds.images_root)
            # list signals carry their own concept index (the prototypes'), which may legitimately
            # differ from the label vocabulary built from the records; a given vocab.json must match
            sig = read_signals(src, raw, vocabs=given_vocabs, index=signals_index, images_root=ds.images_root,
                               skip_bad=True, index_source="--signals_index")
        except DataError as e:
            rep.problems.append(e)
            continue
        except (OSError, ValueError) as e:
            rep.problems.append(DataError(src, None, f"cannot read: {e}"))
            continue
        rep.problems.extend(sig.meta.get("_problems", []))
        rep.n_signals += 1
        raw_set = set(raw)
        for i, p in enumerate(sig.image_paths):
            has = any(not np.isnan(s[i]).all() for s in sig.scores.values())
            if p not in labels_by_path and p not in raw_set and has:
                rep.problems.append(DataError(src, f"image {p!r}", "has signals but is not a record of the dataset"))
        index = {p: i for i, p in enumerate(sig.image_paths)}
        without = [p for p in labels_by_path
                   if p not in index or all(np.isnan(s[index[p]]).all() for s in sig.scores.values())]
        if without:
            rep.warnings.append(f"{src}: {len(without)} dataset record(s) have no signals (first: {without[0]!r})")
        for d, v in sig.vocabs.items():
            if given_vocabs is not None and d in given_vocabs and v != given_vocabs[d]:
                rep.problems.append(DataError(src, f"dimension {d!r}", f"concept names {v.names} differ from the "
                                                                       f"vocabulary {given_vocabs[d].names}"))
    return rep


PROG = "scripts/validate_data.py"


def define_flags(fv: flags.FlagValues, argv: Sequence[str] | None = None) -> None:
    """``scripts/validate_data.py``'s flags on ``fv`` (see :mod:`cgjax.commandline`)."""
    del argv  # no config file
    flags.DEFINE_string("dataset_json", None, "the dataset JSON", flag_values=fv, required=True)
    flags.DEFINE_string("images_root", None, "default: the dataset JSON's folder", flag_values=fv)
    flags.DEFINE_string("targets_csv", None, "the targets CSV", flag_values=fv)
    flags.DEFINE_multi_string("signals", [], "a signals file (original JSON/CSV or cgjax keyed); repeat the flag "
                              "for several: --signals A --signals B", flag_values=fv)
    flags.DEFINE_string("dimensions", None, "comma list (default: the data's own: the records' concepts keys, the "
                        "targets CSV header, --vocab; else artist,style,genre)", flag_values=fv)
    flags.DEFINE_string("vocab", None, "a vocab.json fixing the label vocabularies", flag_values=fv)
    flags.DEFINE_string("signals_index", None, "the concept index of list-format signals, a vocab.json (default: "
                        "the vocab.json beside them)", flag_values=fv)
    flags.DEFINE_bool("no_image_check", False, "do not open the images", flag_values=fv)
    flags.DEFINE_bool("strict", False, "warnings count as problems", flag_values=fv)
    flags.DEFINE_bool("allow_outside_root", False, "accept image paths that are absolute or leave the images root "
                      "with '..'", flag_values=fv)


def run(fv: flags.FlagValues) -> int:
    """:func:`validate_data` from the parsed flags of :func:`define_flags`: prints the report; the exit status."""
    dims = None if fv.dimensions is None else [d.strip() for d in fv.dimensions.split(",") if d.strip()]
    index = load_vocab(fv.signals_index) if fv.signals_index else None
    rep = validate_data(fv.dataset_json, fv.images_root, fv.targets_csv, fv.signals, dimensions=dims,
                        vocab=fv.vocab, signals_index=index, check_images=not fv.no_image_check,
                        allow_outside_root=fv.allow_outside_root)
    for line in rep.lines():
        print(line)
    bad = len(rep.problems) + (len(rep.warnings) if fv.strict else 0)
    print(f"{rep.n_records} good record(s), {rep.n_targets} target row(s), {rep.n_signals} signals file(s) read; "
          f"{len(rep.problems)} problem(s), {len(rep.warnings)} warning(s)")
    return 1 if bad else 0


def main(argv: Sequence[str]) -> int:
    """The command line, in this process: ``main(["--dataset_json", D])``; the exit status (bad flags
    raise ``absl.flags.Error``)."""
    return run(commandline.parse(define_flags, argv, PROG))


if __name__ == "__main__":
    commandline.run(define_flags, run)
