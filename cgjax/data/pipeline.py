"""grain input pipelines over a packed tfds source or the in-memory ``RecordSource``.

``image_dataset`` builds, on ``grain.MapDataset``::

    source -> seeded shuffle (a new permutation every epoch) -> per-host shard, disjoint within
    each epoch -> repeat -> map (PIL decode + ``cgjax.preprocess.preprocess_image``) -> [element_fn]
    -> batch (fixed shapes; ``collate_fn`` replaces the stacking) -> threads / ``mp_prefetch``

and returns a ``grain.IterDataset``. ``iter(ds)`` gives a ``grain.DatasetIterator`` whose
``get_state()`` / ``set_state()`` make a resumed run see exactly the same batches.

A batch (default collate) is a dict of numpy arrays::

    pixel_values float32 [B, 3, H, W]   labels {dim: int32 [B]} (-1 = missing)   index int32 [B]
    image_path str [B]   target_keys str [B]   target_reason str [B]   has_target int32 [B]
    signals {dim: float32 [B, K]} and signals_mask {dim: bool [B, K]}   (when the source has signals)
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import grain
import jax
import numpy as np
from absl import flags
from PIL import Image

from cgjax.data.examples import LoadedData, load_data, make_example
from cgjax.data.schema import DataError, Vocabulary, normalize_split, read_json
from cgjax.data.splits import SplitPolicy
from cgjax.data.tfds_builder import load_pack_info, localize_pack, open_source
from cgjax.preprocess import PreprocessConfig, preprocess_image

log = logging.getLogger(__name__)


class RecordSource:
    """A random-access source over records held in memory (images read from disk, or preloaded).

    Yields the same example dicts as the packed tfds source, so small runs need no packing.
    """

    def __init__(self, data: LoadedData, indices: Sequence[int] | None = None, preload: bool = False):
        self.data = data
        self.indices = list(range(len(data.records))) if indices is None else list(indices)
        self._cache: dict[int, bytes] | None = None
        if preload:
            self._cache = {}
            for i in self.indices:
                with open(data.image_file(data.records[i]), "rb") as f:
                    self._cache[i] = f.read()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = self.indices[k]
        return make_example(self.data, i, None if self._cache is None else self._cache[i])

    def __repr__(self) -> str:
        return f"RecordSource({self.data.dataset.path!r}, n={len(self)})"

    @property
    def vocabs(self) -> dict[str, Vocabulary]:
        return self.data.vocabs


@dataclasses.dataclass(frozen=True)
class PackedData:
    """What the trainer reads of a data set besides its examples (the ``LoadedData`` fields)."""

    dimensions: tuple[str, ...]
    vocabs: dict[str, Vocabulary]
    signal_vocabs: dict[str, Vocabulary]
    path: str


class PackedSource:
    """One split of a packed tfds ArrayRecord set (``cgjax.data.tfds_builder.pack``): random access
    from the files, nothing read at start-up beyond ``pack.json`` and ``vocab.json``. A set at a URL
    (``gs://``) is first copied to this host's disk, under ``cache_dir`` (``localize_pack``)."""

    def __init__(self, packed_dir: str | os.PathLike, split: str, cache_dir: str | os.PathLike | None = None):
        packed_dir = localize_pack(os.fspath(packed_dir), cache_dir)
        self.source = open_source(packed_dir, split)
        info, vocabs = load_pack_info(packed_dir)
        raw = read_json(os.path.join(os.fspath(packed_dir), "vocab.json"))
        sig = {d: Vocabulary(d, names) for d, names in (raw.get("signal_concepts") or {}).items()} or dict(vocabs)
        self.data = PackedData(tuple(info["dimensions"]), vocabs, sig, os.fspath(packed_dir))
        self.indices = list(range(len(self.source)))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, Any]:
        return self.source[self.indices[k]]

    def __repr__(self) -> str:
        return f"PackedSource({self.data.path!r}, n={len(self)})"

    @property
    def vocabs(self) -> dict[str, Vocabulary]:
        return self.data.vocabs


def split_sources(dataset_json: str | os.PathLike, images_root: str | os.PathLike | None = None, *,
                  splits: Sequence[str | None], targets_csv: str | os.PathLike | None = None, signals: Any = None,
                  dimensions: Sequence[str] | None = None, vocab: Any = None, check_images: bool | str = "exists",
                  skip_bad: bool = False, preload: bool = False, allow_outside_root: bool = False,
                  signals_index: Any = None, split_policy: SplitPolicy | None = SplitPolicy()
                  ) -> list[RecordSource | None]:
    """One ``RecordSource`` per split name from ONE read of the data set (a split of "" or None:
    no source). ``check_images="exists"`` checks that each image file exists without decoding it
    (start-up stays flat in the number of images; ``scripts/validate_data.py`` decodes them all).
    Records without a ``split`` take theirs from the data set's split file (``split_policy``,
    :mod:`cgjax.data.splits`). A split with no records raises a ``DataError`` naming it and the
    splits there are."""
    data = load_data(dataset_json, images_root, targets_csv=targets_csv, signals=signals, dimensions=dimensions,
                     vocab=vocab, check_images=check_images, skip_bad=skip_bad, allow_outside_root=allow_outside_root,
                     signals_index=signals_index, splits=split_policy)
    out: list[RecordSource | None] = []
    for split in splits:
        if not split:
            out.append(None)
            continue
        split = normalize_split(split)
        indices = [i for i, r in enumerate(data.records) if r.split == split]
        if not indices:
            have = sorted({str(r.split) for r in data.records})
            raise DataError(dataset_json, None, f"no records with split {split!r} (the splits there: {have})")
        out.append(RecordSource(data, indices, preload=preload))
    return out


def memory_source(dataset_json: str | os.PathLike, images_root: str | os.PathLike | None = None, *,
                  split: str | None = None, targets_csv: str | os.PathLike | None = None, signals: Any = None,
                  dimensions: Sequence[str] | None = None, vocab: Any = None, check_images: bool = True,
                  skip_bad: bool = False, preload: bool = False,
                  split_policy: SplitPolicy | None = SplitPolicy()) -> RecordSource:
    """A ``RecordSource`` over a data set on disk; ``split`` selects records by their ``split`` field
    (else the data set's split file, ``split_policy``, when a split is asked for).

    The vocabularies are built from ALL records (or given by ``vocab``), so indices agree across splits.
    """
    data = load_data(dataset_json, images_root, targets_csv=targets_csv, signals=signals, dimensions=dimensions,
                     vocab=vocab, check_images=check_images, skip_bad=skip_bad,
                     splits=split_policy if split is not None else None)
    indices = None
    if split is not None:
        split = normalize_split(split)
        indices = [i for i, r in enumerate(data.records) if r.split == split]
        if not indices:
            raise DataError(dataset_json, None, f"no records with split {split!r}")
    return RecordSource(data, indices, preload=preload)


def _text(x: Any) -> str:
    if isinstance(x, np.ndarray):
        x = x.item()
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


@dataclasses.dataclass(frozen=True)
class DecodeAndPreprocess(grain.transforms.Map):
    """Map stage: decodes the image bytes with PIL (RGB, as the original) and preprocesses them.

    An image that does not decode is a ``DataError`` naming it; with ``skip_undecodable`` it is
    logged and its element kept with zero pixels and ``skipped = 1`` (the text rows then carry no
    loss and validation does not count it), so every host keeps the same number of batches."""

    cfg: PreprocessConfig
    skip_undecodable: bool = False

    def map(self, ex: Mapping[str, Any]) -> dict[str, Any]:
        path = _text(ex["image_path"])
        raw = ex["image"]
        raw = raw.item() if isinstance(raw, np.ndarray) else raw
        skipped = 0
        try:
            with Image.open(io.BytesIO(raw)) as im:
                pixels = preprocess_image(im.convert("RGB"), self.cfg)
        except Exception as e:
            if not self.skip_undecodable:
                raise DataError(None, f"image {path!r}", f"cannot decode: {type(e).__name__}: {e}") from e
            log.warning("image %r cannot be decoded (%s: %s): skipped (data.skip_undecodable)", path,
                        type(e).__name__, e)
            pixels, skipped = np.zeros_like(preprocess_image(Image.new("RGB", (8, 8)), self.cfg)), 1
        out = {
            "pixel_values": pixels,
            "skipped": np.int32(skipped),
            "labels": {d: np.int32(v) for d, v in ex["labels"].items()},
            "index": np.int32(ex["index"]),
            "image_path": path,
            "target_keys": _text(ex["target_keys"]),
            "target_reason": _text(ex["target_reason"]),
            "has_target": np.int32(ex["has_target"]),
        }
        if "signals" in ex:
            sig = {d: np.asarray(v, np.float32) for d, v in ex["signals"].items()}
            out["signals"] = {d: np.nan_to_num(v, nan=0.0) for d, v in sig.items()}
            out["signals_mask"] = {d: ~np.isnan(v) for d, v in sig.items()}
        return out


@dataclasses.dataclass(frozen=True)
class _Apply(grain.transforms.Map):
    fn: Callable[[Any], Any]

    def map(self, x):
        return self.fn(x)


def _ensure_absl_flags() -> None:
    """grain's multiprocessing reads absl flags; outside ``absl.app`` they are never parsed."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _as_cfg(cfg: PreprocessConfig | Mapping[str, Any]) -> PreprocessConfig:
    return cfg if isinstance(cfg, PreprocessConfig) else PreprocessConfig(**dict(cfg))


def image_dataset(source, preprocess_cfg: PreprocessConfig | Mapping[str, Any], batch_size: int, seed: int = 0, *,
                  shuffle: bool = True, num_epochs: int | None = None,
                  shard_index: int | None = None, shard_count: int | None = None,
                  drop_remainder: bool = True, worker_count: int = 0, worker_buffer_size: int = 2,
                  read_threads: int = 2, prefetch_batches: int = 2, skip_undecodable: bool = False,
                  element_fn: Callable[[dict], dict] | None = None,
                  collate_fn: Callable[[Sequence[dict]], Any] | None = None) -> grain.IterDataset:
    """The image pipeline (see the module docstring) over ``source`` (tfds source or ``RecordSource``).

    shard_index / shard_count default to ``jax.process_index()`` / ``jax.process_count()``. Each
    epoch is shuffled with ``seed`` (+ epoch) and host ``shard_index`` takes positions
    ``shard_index, shard_index + shard_count, ...`` of it; with ``drop_remainder`` every host gets
    ``len(source) // shard_count`` elements per epoch and partial batches are dropped.
    ``num_epochs=None`` repeats forever. ``element_fn`` (per decoded element) and ``collate_fn``
    (list of elements -> batch) are the hooks for text collation; both must pickle when
    ``worker_count > 0`` (``mp_prefetch`` with that many processes). ``skip_undecodable``: see
    :class:`DecodeAndPreprocess`.
    """
    if shard_index is None or shard_count is None:
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} outside [0, {shard_count})")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    n = len(source)
    per_host = n // shard_count if drop_remainder else -(-(n - shard_index) // shard_count)
    if per_host < (batch_size if drop_remainder else 1):
        raise ValueError(f"{n} examples over {shard_count} host(s) leave {per_host} per host per epoch, "
                         f"fewer than batch_size {batch_size}")
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=int(seed) % 2**32)
    # an epoch-aware slice: index j >= len maps into epoch j // len of the (re)shuffled parent
    stop = per_host * shard_count if drop_remainder else n
    ds = ds[shard_index:stop:shard_count]
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.map(DecodeAndPreprocess(_as_cfg(preprocess_cfg), bool(skip_undecodable)))
    if element_fn is not None:
        ds = ds.map(_Apply(element_fn))
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=collate_fn)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches))
    if worker_count > 0:
        _ensure_absl_flags()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                         per_worker_buffer_size=worker_buffer_size))
    return it
