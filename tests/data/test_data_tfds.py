"""tfds ArrayRecord packing: round trip, splits, signals, atomic writes."""
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cgjax import SCHEMA_VERSION
from cgjax.data import tfds_builder as TB
from cgjax.data.records import read_dataset_json, read_targets_csv, write_dataset_json
from cgjax.data.schema import DataError, Vocabulary, load_vocab
from cgjax.data.signals import Signals, write_signals_keyed


def _all(source):
    return [source[i] for i in range(len(source))]


def test_round_trip(demo, packed):
    ds = read_dataset_json(demo["dataset_json"], demo["images_root"])
    targets = read_targets_csv(demo["targets_csv"], demo["images_root"]).by_path()
    vocabs = load_vocab(os.path.join(packed, "vocab.json"))
    assert vocabs == ds.vocabularies()
    info, _ = TB.load_pack_info(packed)
    assert info["schema_version"] == SCHEMA_VERSION and info["skipped"] == []
    by_path = {r.image: r for r in ds.records}
    seen = []
    for split in ("train", "validation", "test"):
        exs = _all(TB.open_source(packed, split))
        assert len(exs) == info["splits"][split] == sum(r.split == split for r in ds.records)
        for ex in exs:
            path = ex["image_path"].decode()
            r = by_path[path]
            assert r.split == split
            with open(os.path.join(demo["images_root"], path), "rb") as f:
                assert ex["image"] == f.read()
            assert ex["index"] == r.row
            for d in ds.dimensions:
                assert ex["labels"][d] == vocabs[d].index(r.labels[d])
                assert ex["label_names"][d].decode() == r.labels[d]
            assert ex["target_keys"].decode() == targets[path].target_keys
            assert ex["target_reason"].decode() == targets[path].target_reason and ex["has_target"] == 1
            assert "signals" not in ex
            seen.append(path)
    assert sorted(seen) == sorted(by_path)
    # tfds' own entry point reads it back too
    src = tfds.data_source(TB.BUILDER_NAME, data_dir=packed, split="test")
    assert sorted(e["image_path"] for e in _all(src)) == sorted(e["image_path"] for e in _all(TB.open_source(packed, "test")))
    # nothing temporary left beside the output
    assert [n for n in os.listdir(os.path.dirname(packed)) if n.startswith(".")] == []


def test_seeded_split_signals_and_overwrite(demo, tmp_path):
    ds = read_dataset_json(demo["dataset_json"], demo["dir"])  # paths "images/<folder>/<file>"
    for r in ds.records:
        r.split = None
    write_dataset_json(tmp_path / "nosplit.json", ds.records)
    rng = np.random.default_rng(0)
    sig = Signals(ds.image_paths, {"style": ds.vocabularies()["style"], "extra": Vocabulary("extra", ["e0", "e1"])},
        {"style": rng.uniform(0, 1, (len(ds), len(ds.vocabularies()["style"]))).astype(np.float32),
         "extra": rng.uniform(0, 1, (len(ds), 2)).astype(np.float32)})
    sig.scores["extra"][3] = np.nan
    write_signals_keyed(tmp_path / "signals.json", sig)
    kw = dict(signals=tmp_path / "signals.json", split_fractions=(0.5, 0.25, 0.25), seed=3)
    a = TB.pack(tmp_path / "nosplit.json", demo["images_root"], tmp_path / "a", **kw)
    b = TB.pack(tmp_path / "nosplit.json", demo["images_root"], tmp_path / "b", **kw)
    assert TB.load_pack_info(a)[0]["splits"] == {"train": 24, "validation": 12, "test": 12}
    for split in ("train", "validation", "test"):
        pa = sorted(e["image_path"] for e in _all(TB.open_source(a, split)))
        assert pa == sorted(e["image_path"] for e in _all(TB.open_source(b, split)))
    for ex in _all(TB.open_source(a, "train")) + _all(TB.open_source(a, "test")):
        i = sig.row("images/" + ex["image_path"].decode())  # keyed paths normalised under the images root
        np.testing.assert_array_equal(ex["signals"]["style"], sig.scores["style"][i])
        np.testing.assert_array_equal(ex["signals"]["extra"], sig.scores["extra"][i])
    with pytest.raises(FileExistsError):
        TB.pack(tmp_path / "nosplit.json", demo["images_root"], a)
    TB.pack(tmp_path / "nosplit.json", demo["images_root"], a, overwrite=True, seed=4)
    assert "signals" not in TB.open_source(a, "train")[0]
    # the split is the data set's split file, made by the first pack, shared with every stage (seed 4 read it)
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "nosplit.json", "nosplit.splits.json", "signals.json"]
    filed = json.load(open(tmp_path / "nosplit.splits.json"))["splits"]
    assert sorted(e["image_path"].decode() for e in _all(TB.open_source(a, "test"))) == \
        sorted(k.removeprefix("images/") for k, v in filed.items() if v == "test")


def test_bad_image_raises_or_is_skipped(demo, tmp_path):
    recs = read_dataset_json(demo["dataset_json"], demo["images_root"]).records[:6]
    for r in recs:
        r.split = "train"
    (tmp_path / "img").mkdir()
    for r in recs:
        os.makedirs(tmp_path / "img" / os.path.dirname(r.image), exist_ok=True)
        with open(os.path.join(demo["images_root"], r.image), "rb") as f:
            (tmp_path / "img" / r.image).write_bytes(f.read())
    (tmp_path / "img" / recs[2].image).write_bytes(b"not an image")
    write_dataset_json(tmp_path / "d.json", recs)
    with pytest.raises(DataError, match=rf"d\.json: row 2 \(image '{recs[2].image}'\): unreadable image"):
        TB.pack(tmp_path / "d.json", tmp_path / "img", tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")
    out = TB.pack(tmp_path / "d.json", tmp_path / "img", tmp_path / "out", skip_bad=True)
    info = json.loads((tmp_path / "out" / "pack.json").read_text())
    assert info["splits"]["train"] == 5 and len(info["skipped"]) == 1 and "row 2" in info["skipped"][0]
    assert recs[2].image not in [e["image_path"].decode() for e in _all(TB.open_source(out, "train"))]
    with pytest.raises(ValueError, match="empty"):
        TB.open_source(out, "test")
