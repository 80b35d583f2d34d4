"""Packs a data set (images root + dataset JSON [+ targets CSV, signals]) into tfds ArrayRecord splits.

No TensorFlow is needed: every feature is a ``tfds.features.Tensor`` (the encoded image file as
a bytes scalar, labels as int64, names/texts as strings, signals as float32 vectors). Layout::

    out_dir/vocab.json                      label vocabularies (+ signal concept names), schema_version
    out_dir/pack.json                       schema_version, splits and counts, sources, skipped rows
    out_dir/cgjax_dataset/1.0.0/...         the tfds data (dataset_info.json, *.array_record-*)

``pack`` builds everything in a temporary folder beside ``out_dir`` and renames it at the end.
``open_source(out_dir, split)`` (or ``tfds.data_source("cgjax_dataset", data_dir=out_dir)``)
reads it back as a random-access source for grain.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import shutil
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from cgjax import persistence
from cgjax.data.examples import LoadedData, load_data, make_example, read_image_bytes
from cgjax.data.schema import (DataError, ProblemLog, SCHEMA_VERSION, SPLITS, Vocabulary, log, normalize_split,
                               read_json, save_vocab, vocab_from_json)
from cgjax.data.splits import SplitPolicy

BUILDER_NAME = "cgjax_dataset"
BUILDER_VERSION = "1.0.0"


def features_for(dimensions: Sequence[str], signal_vocabs: Mapping[str, Vocabulary]) -> tfds.features.FeaturesDict:
    T = tfds.features.Tensor
    spec: dict[str, Any] = {
        "image": T(shape=(), dtype=np.object_),          # encoded image file bytes
        "image_path": T(shape=(), dtype=np.str_),
        "index": T(shape=(), dtype=np.int64),
        "labels": tfds.features.FeaturesDict({d: T(shape=(), dtype=np.int64) for d in dimensions}),
        "label_names": tfds.features.FeaturesDict({d: T(shape=(), dtype=np.str_) for d in dimensions}),
        "target_keys": T(shape=(), dtype=np.str_),
        "target_reason": T(shape=(), dtype=np.str_),
        "has_target": T(shape=(), dtype=np.int64),
    }
    if signal_vocabs:
        spec["signals"] = tfds.features.FeaturesDict(
            {d: T(shape=(len(v),), dtype=np.float32) for d, v in signal_vocabs.items()})
    return tfds.features.FeaturesDict(spec)


class CgjaxDataset(tfds.core.GeneratorBasedBuilder):
    """Any data set in the original formats; configured by ``pack`` (reading needs no configuration)."""

    VERSION = tfds.core.Version(BUILDER_VERSION)
    RELEASE_NOTES = {BUILDER_VERSION: f"cgjax data schema_version {SCHEMA_VERSION}."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # tfds' default resolves the module through ``importlib_resources`` (not installed here).
        return epath.Path(__file__)

    def __init__(self, *, pack_spec: "_PackSpec | None" = None, **kwargs):
        self._pack_spec = pack_spec
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        if self._pack_spec is None:  # reading: the features come from the prepared directory
            features = tfds.features.FeatureConnector.from_config(self._version_dir())
            return tfds.core.DatasetInfo(builder=self, features=features)
        spec = self._pack_spec
        return tfds.core.DatasetInfo(
            builder=self, features=features_for(spec.data.dimensions, spec.data.signal_vocabs),
            description="A cgjax data set (images + labels per concept dimension + targets + signals).",
            # the records' own order (not tfds' key-hash shuffle): a packed set feeds the trainer
            # the same batches as the image folder it came from
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(
                schema_version=SCHEMA_VERSION, dimensions=list(spec.data.dimensions),
                concepts={d: v.names for d, v in spec.data.vocabs.items()},
                signal_concepts={d: v.names for d, v in spec.data.signal_vocabs.items()}))

    def _version_dir(self) -> str:
        return os.path.join(os.fspath(self._data_dir_root), BUILDER_NAME, BUILDER_VERSION)

    def _split_generators(self, dl_manager):
        spec = self._pack_spec
        return {s: self._generate_examples(spec, idx) for s, idx in spec.splits.items() if idx}

    def _generate_examples(self, spec: "_PackSpec", indices: Sequence[int]):
        for i in indices:
            ex = spec.examples[i]
            yield ex["image_path"], ex


@dataclasses.dataclass
class _PackSpec:
    data: LoadedData
    examples: list[dict]
    splits: dict[str, list[int]]


def split_policy(split_fractions: Sequence[float], seed: int, splits_json: str = "") -> SplitPolicy:
    """The :class:`SplitPolicy` of ``split_fractions`` (train, validation, test; normalised) and ``seed``."""
    f = np.asarray(split_fractions, np.float64)
    if f.shape != (3,) or (f < 0).any() or f.sum() <= 0:
        raise ValueError(f"split_fractions must be three non-negative numbers, got {split_fractions}")
    f = f / f.sum()
    return SplitPolicy(splits_json=splits_json, val_fraction=float(f[1]), test_fraction=float(f[2]), seed=int(seed))


def _group_splits(data: LoadedData) -> dict[str, list[int]]:
    """Record indices per split (every record has one after ``SplitPolicy.apply``)."""
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i, r in enumerate(data.records):
        out[r.split or "train"].append(i)
    return out


def pack(dataset_json: str | os.PathLike, images_root: str | os.PathLike | None, out_dir: str | os.PathLike,
         targets_csv: str | os.PathLike | None = None, signals: Any = None, *,
         dimensions: Sequence[str] | None = None,
         vocab: str | os.PathLike | Mapping[str, Vocabulary] | None = None,
         split_fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0, splits_json: str = "",
         skip_bad: bool = False, overwrite: bool = False, verbose: bool = False) -> str:
    """Packs a data set into ``out_dir`` (tfds ArrayRecord, splits train/validation/test).

    Splits come from the records' ``split`` field, else from the data set's split file, the one
    every stage shares (:mod:`cgjax.data.splits`; ``splits_json``, default beside the dataset
    JSON); when it does not exist yet, it is made with ``seed`` and ``split_fractions``.
    Every image must exist and decode; a bad row raises a ``DataError`` naming its file and row, or
    with ``skip_bad`` is logged, skipped and listed in ``pack.json``. Returns ``out_dir``.
    ``verbose=False`` silences tfds' output (and turns its progress bars off, a global tfds setting).
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True to replace it)")
    data = load_data(dataset_json, images_root, targets_csv=targets_csv, signals=signals, dimensions=dimensions,
                     vocab=vocab, check_images=False, skip_bad=skip_bad,
                     splits=split_policy(split_fractions, seed, splits_json))
    problems = ProblemLog(skip_bad)
    problems.problems.extend(data.problems)
    examples, keep = [], []
    for i, r in enumerate(data.records):
        try:
            image_bytes = read_image_bytes(data.image_file(r), check=True)
        except DataError as e:
            problems.report([DataError(data.dataset.path, f"row {r.row} (image {r.image!r})", e.message)])
            continue
        keep.append(i)
        examples.append(make_example(data, i, image_bytes))
    if len(keep) != len(data.records):  # drop the records whose image failed
        data = dataclasses.replace(data, dataset=dataclasses.replace(
            data.dataset, records=[data.records[i] for i in keep]),
            signals=None if data.signals is None else data.signals.align([data.records[i].image for i in keep]))
    if not examples:
        raise DataError(dataset_json, None, "no usable records to pack")
    splits = _group_splits(data)
    with persistence.atomic_dir(out_dir) as tmp:
        if not verbose:
            tfds.disable_progress_bar()
        builder = CgjaxDataset(data_dir=tmp, file_format="array_record",
                               pack_spec=_PackSpec(data, examples, splits))
        with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                download_mode=tfds.download.GenerateMode.FORCE_REDOWNLOAD))
        shutil.rmtree(os.path.join(tmp, "downloads"), ignore_errors=True)
        save_vocab(os.path.join(tmp, "vocab.json"), data.vocabs,
                   signal_concepts={d: v.names for d, v in data.signal_vocabs.items()})
        persistence.write_json(os.path.join(tmp, "pack.json"), {
            "schema_version": SCHEMA_VERSION, "format": "cgjax.pack",
            "builder": BUILDER_NAME, "version": BUILDER_VERSION,
            "dimensions": list(data.dimensions), "signal_dimensions": list(data.signal_vocabs),
            "splits": {s: len(idx) for s, idx in splits.items()},
            "sources": {"dataset_json": os.path.abspath(os.fspath(dataset_json)),
                        "images_root": data.dataset.images_root,
                        "targets_csv": None if targets_csv is None else os.path.abspath(os.fspath(targets_csv))},
            "skipped": [str(p) for p in problems.problems]})
    if problems.problems:
        log.warning("packed %s with %d problem(s) skipped", out_dir, len(problems.problems))
    return out_dir


def version_dir(out_dir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(out_dir), BUILDER_NAME, BUILDER_VERSION)


def localize_pack(url: str, cache_root: str | os.PathLike | None = None) -> str:
    """A packed set at a URL (``gs://``) copied once to this host's disk: ArrayRecord reads local
    files (it stalls on a bucket). ``cache_root`` (default: the temporary folder's ``cgjax-packs``)
    gets one folder per URL; a complete copy is reused, a partial one is never seen (the copy is
    renamed into place when whole). -> the local folder. A local path is returned as it is."""
    if not persistence.is_url(url):
        return os.fspath(url)
    root = os.fspath(cache_root) if cache_root else os.path.join(tempfile.gettempdir(), "cgjax-packs")
    local = os.path.join(root, hashlib.sha1(url.rstrip("/").encode()).hexdigest()[:16])
    if os.path.exists(os.path.join(local, "pack.json")):
        return local
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=".copy-")
    try:
        src = persistence.Path(url)
        if not (src / "pack.json").exists():
            raise FileNotFoundError(f"{url}: no pack.json (not a packed set written by cgjax.data.tfds_builder.pack)")
        todo = [(src, tmp)]
        while todo:  # a walk by listing (a recursive glob is refused on a bucket)
            folder, dest = todo.pop()
            for f in folder.iterdir():
                if f.is_dir():
                    os.makedirs(os.path.join(dest, f.name), exist_ok=True)
                    todo.append((f, os.path.join(dest, f.name)))
                else:
                    with open(os.path.join(dest, f.name), "wb") as out:
                        out.write(f.read_bytes())
        try:
            os.rename(tmp, local)
        except OSError:  # another process on this host finished first: use its copy
            if not os.path.exists(os.path.join(local, "pack.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("packed set %s copied to %s", url, local)
    return local


def open_source(out_dir: str | os.PathLike, split: str = "train"):
    """The packed ``split`` (``train | validation | test``) as a tfds random-access data source."""
    split = normalize_split(split)
    info = read_json(os.path.join(os.fspath(out_dir), "pack.json"))
    if not info.get("splits", {}).get(split):
        raise ValueError(f"{out_dir}: split {split!r} is empty or missing (splits: {info.get('splits')})")
    builder = tfds.builder_from_directory(version_dir(out_dir))
    return builder.as_data_source(split=split)


def load_pack_info(out_dir: str | os.PathLike) -> tuple[dict, dict[str, Vocabulary]]:
    """``(pack.json contents, vocabularies)`` of a packed data set."""
    d = os.fspath(out_dir)
    info = read_json(os.path.join(d, "pack.json"))
    return info, vocab_from_json(read_json(os.path.join(d, "vocab.json")), os.path.join(d, "vocab.json"))
