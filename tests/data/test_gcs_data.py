"""A data set in a bucket (``gs://``, on the local GCS-compatible server): the dataset JSON, targets
CSV, signals and images read from it give the same records, examples and batches as the folder."""
import os

import numpy as np

from cgjax import persistence
from cgjax.data.examples import load_data, make_example
from cgjax.data.pipeline import image_dataset, split_sources
from cgjax.data.schema import DataError
from cgjax.data.demo_data import write_label_signals

DIMS = ("artist", "style", "genre")


def test_a_data_set_in_a_bucket_reads_like_the_folder(demo, gcs, tmp_path):

    signals = str(tmp_path / "signals.keyed.json")
    write_label_signals(demo["dataset_json"], demo["images_root"], signals, dims=DIMS)
    url = f"gs://{gcs.bucket}/data/demo"
    persistence.upload_tree(demo["dir"], url)
    persistence.upload_tree(str(tmp_path), url + "/sig")
    rel = os.path.relpath(demo["dataset_json"], demo["dir"])
    root_rel = os.path.relpath(demo["images_root"], demo["dir"])
    kw = dict(dimensions=DIMS)
    local = load_data(demo["dataset_json"], demo["images_root"], targets_csv=demo["targets_csv"], signals=signals, **kw)
    remote = load_data(f"{url}/{rel}", f"{url}/{root_rel}", targets_csv=f"{url}/{os.path.basename(demo['targets_csv'])}",
                       signals=url + "/sig/signals.keyed.json", **kw)
    assert [r.image for r in remote.records] == [r.image for r in local.records]
    assert remote.targets == local.targets
    np.testing.assert_array_equal(remote.signals.scores["artist"], local.signals.scores["artist"])
    for i in (0, 5):
        a, b = make_example(local, i), make_example(remote, i)
        assert a["image"] == b["image"] and a["labels"] == b["labels"]
    src_l, = split_sources(demo["dataset_json"], demo["images_root"], splits=("train",), **kw)
    src_r, = split_sources(f"{url}/{rel}", f"{url}/{root_rel}", splits=("train",), **kw)
    from cgjax.preprocess import PreprocessConfig

    cfg = PreprocessConfig(size=32)
    bl = next(iter(image_dataset(src_l, cfg, 4, shuffle=False, shard_index=0, shard_count=1)))
    br = next(iter(image_dataset(src_r, cfg, 4, shuffle=False, shard_index=0, shard_count=1)))
    np.testing.assert_array_equal(bl["pixel_values"], br["pixel_values"])


def test_a_missing_object_is_named(gcs):
    url = f"gs://{gcs.bucket}/nothing/dataset.json"
    try:
        load_data(url, dimensions=DIMS)
    except DataError as e:
        assert url in str(e) and "not found" in str(e)
    else:
        raise AssertionError("no error for a missing object")


def test_a_packed_set_in_a_bucket_is_copied_once_and_reads_like_the_folder(packed, gcs, tmp_path, monkeypatch):
    """ArrayRecord reads local files: a packed set at a gs:// URL is copied to the host's cache once
    (renamed into place when whole) and then gives the folder's elements; a second open reuses it."""
    from cgjax.data.pipeline import PackedSource

    url = f"gs://{gcs.bucket}/packs/demo"
    persistence.upload_tree(packed, url)
    cache = tmp_path / "cache"
    local, remote = PackedSource(packed, "train"), PackedSource(url, "train", cache_dir=str(cache))
    assert len(remote) == len(local) > 0
    for i in (0, len(local) - 1):
        a, b = local[i], remote[i]
        assert a["image_path"] == b["image_path"] and a["image"] == b["image"]
    copies = os.listdir(cache)
    assert len(copies) == 1 and not copies[0].startswith(".")  # no partial copy left beside it
    monkeypatch.setattr(persistence.Path(url).__class__, "read_bytes",
                        lambda self: (_ for _ in ()).throw(AssertionError("downloaded again")))
    assert len(PackedSource(url, "validation", cache_dir=str(cache))) == len(PackedSource(packed, "validation"))
    try:
        PackedSource(f"gs://{gcs.bucket}/packs/nothing", "train", cache_dir=str(cache))
    except FileNotFoundError as e:
        assert "packs/nothing: no pack.json" in str(e)
    else:
        raise AssertionError("a URL without a pack must be an error")
