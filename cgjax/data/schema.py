"""The versioned data schema: record types, concept vocabularies and the error type.

Every file cgjax writes in its own formats carries ``schema_version`` (= ``cgjax.SCHEMA_VERSION``);
the field-by-field description lives in ``docs/schema.md``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Iterable, Mapping, Sequence

import cgjax
from cgjax import persistence

SCHEMA_VERSION: int = cgjax.SCHEMA_VERSION

#: The dimensions of the original project. Dimensions are data: any names/number are accepted.
DEFAULT_DIMENSIONS: tuple[str, ...] = ("artist", "style", "genre")

#: Label strings that mean "no label" (the original's default ``Unknown``). WikiArt's ``Unknown Genre``
#: is a real class, as in the original's metrics, ``validate_signals`` and Stage B prompt hash.
MISSING_LABELS: frozenset[str] = frozenset({"", "Unknown"})
#: cgjax's earlier rule, ``Unknown Genre`` missing too: pass it as ``missing_labels=`` to the readers.
LEGACY_MISSING_LABELS: frozenset[str] = MISSING_LABELS | {"Unknown Genre"}

#: The literal written for a missing label in CSV columns and ``target_keys`` lines.
UNKNOWN = "Unknown"

#: Split names accepted in a record's ``split`` field, mapped to the tfds split names.
SPLIT_ALIASES: dict[str, str] = {
    "train": "train", "training": "train",
    "val": "validation", "valid": "validation", "validation": "validation", "dev": "validation",
    "test": "test", "testing": "test",
}
SPLITS: tuple[str, ...] = ("train", "validation", "test")

log = logging.getLogger("cgjax.data")


class DataError(ValueError):
    """A problem in an input file, located by file and row (or image path / key)."""

    def __init__(self, file: str | os.PathLike | None, where: str | None, message: str):
        self.file = None if file is None else str(file)
        self.where = where
        self.message = message
        loc = ": ".join(x for x in (self.file, where) if x)
        super().__init__(f"{loc}: {message}" if loc else message)


class ProblemLog:
    """Collects record-level problems: raises the first one, or (``skip_bad``) logs and counts them."""

    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad
        self.problems: list[DataError] = []

    def report(self, problems: Sequence[DataError]) -> bool:
        """Returns True if the item is good; raises or logs otherwise."""
        if not problems:
            return True
        if not self.skip_bad:
            raise problems[0]
        for p in problems:
            log.warning("skipping: %s", p)
        self.problems.extend(problems)
        return False


def normalize_label(value: Any, missing_labels: Iterable[str] = MISSING_LABELS) -> str | None:
    """A label string, or None when missing (None, empty, ``Unknown``...)."""
    if value is None:
        return None
    value = str(value).strip()
    return None if value in missing_labels else value


def normalize_split(value: Any) -> str | None:
    if value is None or value == "":
        return None
    try:
        return SPLIT_ALIASES[str(value).strip().lower()]
    except KeyError:
        raise ValueError(f"unknown split {value!r} (expected one of {sorted(SPLIT_ALIASES)})") from None


@dataclasses.dataclass
class Record:
    """One dataset JSON record (the original format plus cgjax's ``split`` extension).

    ``image`` is the path relative to the images root (root-folder prefix stripped; absolute paths
    kept). ``labels`` maps every dimension to its label or None. ``extra_concepts`` and ``extra``
    keep any other fields so that writing a record back loses nothing.
    """

    image: str
    labels: dict[str, str | None]
    media: list[str] = dataclasses.field(default_factory=list)
    title: str = ""
    date: str = ""
    split: str | None = None
    extra_concepts: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    row: int | None = None  # index in the file it came from (for messages)


@dataclasses.dataclass
class TargetRow:
    """One targets CSV row: labels per dimension (None = missing) plus the target texts."""

    image_path: str
    labels: dict[str, str | None]
    target_keys: str
    target_reason: str = ""
    row: int | None = None  # 1-based data row number in the file


@dataclasses.dataclass
class Dataset:
    """A dataset JSON read from ``path``: records, dimensions, and the records skipped as bad."""

    records: list[Record]
    dimensions: tuple[str, ...]
    path: str | None = None
    images_root: str | None = None
    skipped: list[DataError] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def image_paths(self) -> list[str]:
        return [r.image for r in self.records]

    def vocabularies(self) -> dict[str, "Vocabulary"]:
        return {d: Vocabulary.build(d, (r.labels.get(d) for r in self.records)) for d in self.dimensions}

    def split(self, name: str) -> list[Record]:
        name = normalize_split(name)
        return [r for r in self.records if r.split == name]


@dataclasses.dataclass
class Targets:
    """A targets CSV read from ``path``."""

    rows: list[TargetRow]
    dimensions: tuple[str, ...]
    path: str | None = None
    skipped: list[DataError] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def by_path(self) -> dict[str, TargetRow]:
        return {r.image_path: r for r in self.rows}


class Vocabulary:
    """Concept names of one dimension <-> indices; order = first appearance (as the original)."""

    def __init__(self, dimension: str, names: Iterable[str]):
        self.dimension = dimension
        self.names: list[str] = list(names)
        self._index = {n: i for i, n in enumerate(self.names)}
        if len(self._index) != len(self.names):
            dup = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ValueError(f"vocabulary {dimension!r} has duplicate names {dup}")

    @classmethod
    def build(cls, dimension: str, labels: Iterable[str | None]) -> "Vocabulary":
        seen: dict[str, None] = {}
        for label in labels:
            if label is not None and label not in seen:
                seen[label] = None
        return cls(dimension, seen)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __iter__(self):
        return iter(self.names)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and (self.dimension, self.names) == (other.dimension, other.names)

    def __repr__(self) -> str:
        return f"Vocabulary({self.dimension!r}, {self.names!r})"

    def index(self, name: str | None) -> int:
        """Index of ``name``; -1 for a missing label; KeyError for a name outside the vocabulary."""
        if name is None:
            return -1
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"{name!r} is not in the {self.dimension!r} vocabulary") from None

    def name(self, index: int) -> str | None:
        return None if index < 0 else self.names[index]


def vocab_to_json(vocabs: Mapping[str, Vocabulary], **extra: Any) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "format": "cgjax.vocab",
            "dimensions": list(vocabs), "concepts": {d: list(v.names) for d, v in vocabs.items()}, **extra}


def vocab_from_json(obj: Any, file: str | None = None) -> dict[str, Vocabulary]:
    if not isinstance(obj, dict) or "concepts" not in obj:
        raise DataError(file, None, "not a cgjax vocabulary file (expects an object with 'concepts')")
    check_schema_version(obj, file)
    concepts = obj["concepts"]
    dims = obj.get("dimensions", list(concepts))
    out = {}
    for d in dims:
        if d not in concepts or not isinstance(concepts[d], list):
            raise DataError(file, f"dimension {d!r}", "missing or not a list of names")
        try:
            out[d] = Vocabulary(d, [str(n) for n in concepts[d]])
        except ValueError as e:
            raise DataError(file, f"dimension {d!r}", str(e)) from None
    return out


def save_vocab(path: str | os.PathLike, vocabs: Mapping[str, Vocabulary], **extra: Any) -> None:
    """Writes ``{"schema_version", "format": "cgjax.vocab", "dimensions", "concepts": {dim: [names]}}``."""
    persistence.write_json(path, vocab_to_json(vocabs, **extra))


def load_vocab(path: str | os.PathLike) -> dict[str, Vocabulary]:
    return vocab_from_json(read_json(path), str(path))


def check_schema_version(obj: Mapping[str, Any], file: str | None) -> None:
    version = obj.get("schema_version")
    if version is None:
        raise DataError(file, None, "missing 'schema_version'")
    if not isinstance(version, int) or version > SCHEMA_VERSION or version < 1:
        raise DataError(file, None, f"unsupported schema_version {version!r} (this cgjax reads <= {SCHEMA_VERSION})")


# ------------------------------------------------------------------------------------------------
# file helpers


def read_input_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of an input file on a local disk or at a URL (``gs://...``, through etils.epath)."""
    path = os.fspath(path)
    if "://" in path:
        return persistence.Path(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def read_input_text(path: str | os.PathLike) -> str:
    """The UTF-8 text (a BOM allowed) of an input file; missing or not UTF-8: a ``DataError`` naming it."""
    path = os.fspath(path)
    try:
        return read_input_bytes(path).decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError(path, None, "file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(path, None, f"not UTF-8 text: {e}") from None


def input_exists(path: str | os.PathLike) -> bool:
    path = os.fspath(path)
    if "://" in path:
        return persistence.exists(path)
    return os.path.exists(path)


def input_dir(path: str | os.PathLike) -> str:
    """The folder of an input file (its URL prefix for ``gs://...``): the default images root."""
    path = os.fspath(path)
    return path.rsplit("/", 1)[0] if "://" in path else os.path.dirname(os.path.abspath(path))


def read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(read_input_bytes(path).decode("utf-8"))
    except FileNotFoundError:
        raise DataError(path, None, "file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(path, f"line {e.lineno} column {e.colno}", f"invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(path, None, f"not UTF-8 text: {e}") from None
