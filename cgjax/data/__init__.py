"""cgjax data layer: one versioned schema (``docs/schema.md``), readers/writers of the original
project's files, the embedded demo data set, tfds ArrayRecord packing and grain pipelines.

Light modules are imported here; ``tfds_builder`` (tensorflow_datasets) and ``pipeline`` (grain,
jax) are imported on first use: ``from cgjax.data import pipeline, tfds_builder``.
"""
from cgjax.data.schema import (DEFAULT_DIMENSIONS, MISSING_LABELS, SCHEMA_VERSION, SPLITS, DataError, Dataset,
                               Record, TargetRow, Targets, Vocabulary, load_vocab, save_vocab)
from cgjax.data.records import (format_target_keys, normalize_image_path, parse_target_keys, raw_image_paths,
                                read_dataset_json, read_targets_csv, write_dataset_json, write_targets_csv)
from cgjax.data.signals import (Signals, convert_signals, load_signals_dir, read_signals, read_signals_csv,
                                read_signals_json, read_signals_keyed, write_signals, write_signals_csv,
                                write_signals_json, write_signals_keyed)
from cgjax.data.dimensions import resolve_dimensions
from cgjax.data.splits import SplitPolicy
from cgjax.data.examples import LoadedData, load_data, make_example

__all__ = [
    "DEFAULT_DIMENSIONS", "MISSING_LABELS", "SCHEMA_VERSION", "SPLITS", "DataError", "Dataset", "Record",
    "TargetRow", "Targets", "Vocabulary", "load_vocab", "save_vocab",
    "format_target_keys", "normalize_image_path", "parse_target_keys", "raw_image_paths", "read_dataset_json",
    "read_targets_csv", "write_dataset_json", "write_targets_csv",
    "Signals", "convert_signals", "load_signals_dir", "read_signals", "read_signals_csv", "read_signals_json",
    "read_signals_keyed", "write_signals", "write_signals_csv", "write_signals_json", "write_signals_keyed",
    "resolve_dimensions", "SplitPolicy", "LoadedData", "load_data", "make_example",
]
