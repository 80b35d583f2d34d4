"""One split policy for every stage: a record's own ``split``, else the data set's split file.

The original's dataset JSON has no ``split`` field. Its records are split once, at random with a
seed, into ``train / validation / test``, and the split is written to a split file. The prototype
stage, Stage A/B, inference and evaluation all read that file, so every stage sees the same split.

* **Where.** By default the file sits beside the dataset JSON as ``<stem>.splits.json``, e.g.
  ``wikiart_5artists_dataset.splits.json``. The name carries the stem because one folder may hold
  several dataset JSONs, as the original's ``data/dataset`` does. ``data.splits_json`` names
  another place, for a dataset folder that cannot be written to. Every stage must then be given
  the same path.
* **When.** The first stage that reads the data set writes the file, atomically. Every later
  stage reads it as it is. If the file's seed or fractions differ from the config, the file still
  wins (a warning says so). Delete the file to split the data set again.
* **What.** ``{"schema_version", "format": "cgjax.splits", "dataset_json", "seed",
  "val_fraction", "test_fraction", "counts", "splits": {image: "train" | "validation" | "test"}}``.
  ``image`` is the record's ``image`` string as written in the dataset JSON, so the file does not
  depend on the images root a stage was given.
* **Checks.** A file that names an image missing from the data set is a ``DataError`` listing
  those images. So is a record that carries no ``split`` and is missing from the file.

A record that carries its own ``split`` keeps it. The file covers only the records that carry none.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
from typing import Any, Mapping

import numpy as np

from cgjax import persistence
from cgjax.data.schema import (SCHEMA_VERSION, SPLITS, DataError, Dataset, check_schema_version, input_exists,
                               normalize_split, read_json)

SPLITS_FORMAT = "cgjax.splits"
DEFAULT_VAL_FRACTION = 0.15
DEFAULT_TEST_FRACTION = 0.15

log = logging.getLogger("cgjax.data")


def default_splits_path(dataset_json: str | os.PathLike) -> str:
    """``<folder>/<stem>.splits.json`` beside the dataset JSON (a URL stays a URL)."""
    path = os.fspath(dataset_json)
    stem = path[:-len(".json")] if path.lower().endswith(".json") else path
    return stem + ".splits.json"


def _key(image: str) -> str:
    return posixpath.normpath(image.strip().replace("\\", "/"))


def _listing(paths, n: int = 10) -> str:
    paths = sorted(paths)
    more = f" ... and {len(paths) - n} more" if len(paths) > n else ""
    return ", ".join(repr(p) for p in paths[:n]) + more


def assign(images, val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """``{image: split}``: a seeded permutation of the sorted images, with ``round(fraction * n)``
    images in validation and in test (at least one for a fraction > 0), and the rest in train."""
    vf, tf = float(val_fraction), float(test_fraction)
    if vf < 0 or tf < 0 or vf + tf >= 1:
        raise ValueError(f"val_fraction {vf} and test_fraction {tf} must be >= 0 and sum to less than 1")
    images = sorted(set(images))
    n = len(images)
    n_val = max(int(round(vf * n)), 1 if vf > 0 else 0)
    n_test = max(int(round(tf * n)), 1 if tf > 0 else 0)
    if n and n - n_val - n_test < 1:
        raise ValueError(f"{n} image(s) split with val_fraction {vf} and test_fraction {tf} leave none to train on")
    order = np.random.default_rng([int(seed), 2024]).permutation(n)
    out = {}
    for rank, i in enumerate(order):
        out[images[i]] = "validation" if rank < n_val else ("test" if rank < n_val + n_test else "train")
    return out


@dataclasses.dataclass(frozen=True)
class SplitPolicy:
    """Which split file to use, and how to make it when it does not exist yet."""

    splits_json: str = ""  # "" -> beside the dataset JSON (default_splits_path)
    val_fraction: float = DEFAULT_VAL_FRACTION
    test_fraction: float = DEFAULT_TEST_FRACTION
    seed: int = 0

    @classmethod
    def from_config(cls, data: Any) -> "SplitPolicy":
        """The policy of a config's ``data`` block (``splits_json``, ``val_fraction``, ``test_fraction``,
        ``split_seed``; absent fields take the defaults)."""
        get = data.get if hasattr(data, "get") else (lambda k, d=None: getattr(data, k, d))
        return cls(str(get("splits_json", "") or ""), float(get("val_fraction", DEFAULT_VAL_FRACTION)),
                   float(get("test_fraction", DEFAULT_TEST_FRACTION)), int(get("split_seed", 0)))

    def path(self, dataset_json: str | os.PathLike) -> str:
        return self.splits_json or default_splits_path(dataset_json)

    def apply(self, dataset: Dataset, *, create: bool = True) -> Dataset:
        """``dataset`` with every record's split set: its own, else the split file's. The file is
        written first when it is missing and ``create`` is set. Without it (``create=False``), the
        records are returned as they are. Records that all carry a split need no file."""
        if dataset.path is None:
            raise ValueError("SplitPolicy.apply needs a Dataset read from a file (dataset.path)")
        raw = read_json(dataset.path)
        row_image = {i: _key(o["image"]) for i, o in enumerate(raw)
                     if isinstance(o, dict) and isinstance(o.get("image"), str) and o["image"].strip()}
        unsplit = {row_image[i] for i, o in enumerate(raw) if i in row_image and not _has_split(o)}
        if not unsplit:
            return dataset
        path = self.path(dataset.path)
        if input_exists(path):
            splits = self._read(path, dataset.path, set(row_image.values()), unsplit)
        elif create:
            splits = assign(unsplit, self.val_fraction, self.test_fraction, self.seed)
            self._write(path, dataset.path, splits)
        else:
            return dataset
        records = [r if r.split is not None or r.row not in row_image
                   else dataclasses.replace(r, split=splits[row_image[r.row]]) for r in dataset.records]
        return dataclasses.replace(dataset, records=records)

    def _write(self, path: str, dataset_json: str, splits: Mapping[str, str]) -> None:
        obj = {"schema_version": SCHEMA_VERSION, "format": SPLITS_FORMAT,
               "dataset_json": os.path.basename(dataset_json), "seed": self.seed,
               "val_fraction": self.val_fraction, "test_fraction": self.test_fraction,
               "counts": {s: sum(v == s for v in splits.values()) for s in SPLITS},
               "splits": dict(sorted(splits.items()))}
        try:
            persistence.write_json(path, obj)
        except OSError as e:
            where = "beside the dataset JSON" if not self.splits_json else "(data.splits_json)"
            raise DataError(dataset_json, None, f"cannot write the split file {path} {where}: {e}. Set "
                                                "data.splits_json to a writable path, the same for every stage"
                            ) from None
        log.info("split %d image(s) of %s into %s (seed %d): written to %s", len(splits), dataset_json,
                 obj["counts"], self.seed, path)

    def _read(self, path: str, dataset_json: str, images: set[str], unsplit: set[str]) -> dict[str, str]:
        obj = read_json(path)
        if not isinstance(obj, dict) or obj.get("format") != SPLITS_FORMAT or not isinstance(obj.get("splits"), dict):
            raise DataError(path, None, f"not a cgjax split file (expects format {SPLITS_FORMAT!r} and a "
                                        "'splits' object {image: split})")
        check_schema_version(obj, path)
        splits: dict[str, str] = {}
        for image, name in obj["splits"].items():
            try:
                split = normalize_split(name)
            except ValueError as e:
                raise DataError(path, f"image {image!r}", str(e)) from None
            if split is None:
                raise DataError(path, f"image {image!r}", "no split named")
            splits[_key(image)] = split
        gone = set(splits) - images
        if gone:
            raise DataError(path, None, f"names {len(gone)} image(s) missing from the data set {dataset_json}: "
                                        f"{_listing(gone)}. Delete {path} to split the data set again")
        lacking = unsplit - set(splits)
        if lacking:
            raise DataError(path, None, f"lacks {len(lacking)} image(s) of the data set {dataset_json} that carry no "
                                        f"split: {_listing(lacking)}. Delete {path} to split the data set again")
        settings = (obj.get("seed"), obj.get("val_fraction"), obj.get("test_fraction"))
        if settings != (self.seed, self.val_fraction, self.test_fraction):
            log.warning("%s was made with seed/val_fraction/test_fraction %s; the config says %s: the file wins "
                        "(delete it to split again)", path, settings, (self.seed, self.val_fraction,
                                                                      self.test_fraction))
        return splits


def _has_split(obj: Mapping[str, Any]) -> bool:
    try:
        return normalize_split(obj.get("split")) is not None
    except ValueError:
        return True  # an unknown split name is the record reader's error, not a record to split here
