"""The concept dimensions of a data set, read from its files.

Three files can name the dimensions:

* the dataset JSON: its records' ``concepts`` keys (``records.concept_dimensions``);
* the targets CSV: the label columns of its header;
* a ``vocab.json``: its ``dimensions``.

When several of them do, they must name the same set of dimensions. A disagreement is a
``DataError`` that names both files. The order comes from the ``vocab.json``, else the CSV header,
else the records (records whose keys are exactly the original's ``artist, style, genre`` keep the
original's order). When no file names any dimension, the original's ``artist, style, genre`` is the
default. Dimensions passed explicitly (``--dimensions``, ``data.dimensions``) are taken as given.
"""
from __future__ import annotations

import csv
import io
import os
from typing import Mapping, Sequence

from cgjax.data.records import TARGET_COLUMNS, concept_dimensions
from cgjax.data.schema import DEFAULT_DIMENSIONS, DataError, Vocabulary, load_vocab, read_input_text, read_json


class DimensionsError(DataError):
    """Two files of a data set name different dimensions."""


def csv_dimensions(targets_csv: str | os.PathLike) -> tuple[str, ...]:
    """The label columns of a targets CSV's header (every column but ``image_path`` and the targets)."""
    path = os.fspath(targets_csv)
    text = read_input_text(path)
    try:
        header = next(csv.reader(io.StringIO(text, newline="")), [])
    except csv.Error as e:
        raise DataError(path, "header", f"CSV error: {e}") from None
    return tuple(h.strip() for h in header if h.strip() not in ("image_path",) + TARGET_COLUMNS)


def resolve_dimensions(dataset_json: str | os.PathLike, *, targets_csv: str | os.PathLike | None = None,
                       vocab: str | os.PathLike | Mapping[str, Vocabulary] | None = None,
                       dimensions: Sequence[str] | None = None) -> tuple[str, ...]:
    """The data set's dimensions (see the module docstring). ``dimensions`` given: those, as given.
    Raises :class:`DimensionsError` when the files disagree (a ``DataError`` for an unreadable one)."""
    if dimensions:
        return tuple(dimensions)
    found: list[tuple[str, tuple[str, ...]]] = []  # (where, dims), best order first
    if vocab is not None:
        vocabs = load_vocab(vocab) if isinstance(vocab, (str, os.PathLike)) else dict(vocab)
        where = f"{os.fspath(vocab)} ('dimensions')" if isinstance(vocab, (str, os.PathLike)) else "the vocabulary"
        found.append((where, tuple(vocabs)))
    if targets_csv is not None:
        dims = csv_dimensions(targets_csv)
        if dims:
            found.append((f"{os.fspath(targets_csv)} (header)", dims))
    data = read_json(dataset_json)
    dims = concept_dimensions(data) if isinstance(data, list) else ()
    if dims:
        found.append((f"{os.fspath(dataset_json)} (the records' 'concepts' keys)", dims))
    for where, dims in found[1:]:
        first, first_dims = found[0]
        if set(dims) != set(first_dims):
            raise DimensionsError(None, None, f"the dimensions disagree: {first} has {list(first_dims)} but {where} "
                                              f"has {list(dims)}; make them agree, or pass the dimensions explicitly")
    return found[0][1] if found else DEFAULT_DIMENSIONS
