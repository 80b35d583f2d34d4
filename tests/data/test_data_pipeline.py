"""grain pipelines: content, epochs, per-host sharding, resume-exact iteration, hooks, mp_prefetch."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from cgjax.data import pipeline as P
from cgjax.data import tfds_builder as TB
from cgjax.data.records import read_dataset_json
from cgjax.data.signals import Signals, write_signals_keyed
from cgjax.preprocess import PreprocessConfig, preprocess_image

CFG = PreprocessConfig(size=24, interpolation="bilinear")


def _paths(batches):
    return [p for b in batches for p in b["image_path"].tolist()]


def _take(it, k):
    return [next(it) for _ in range(k)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], dict):
                for d in x[k]:
                    np.testing.assert_array_equal(x[k][d], y[k][d])
            else:
                np.testing.assert_array_equal(x[k], y[k])


def test_batch_content_memory_source(demo):
    src = P.memory_source(demo["dataset_json"], demo["images_root"], targets_csv=demo["targets_csv"], split="train")
    assert len(src) == 24
    vocabs = src.vocabs
    ds = read_dataset_json(demo["dataset_json"], demo["images_root"])
    by_path = {r.image: r for r in ds.records}
    b = next(iter(P.image_dataset(src, CFG, batch_size=5, seed=0, shard_index=0, shard_count=1)))
    assert b["pixel_values"].shape == (5, 3, 24, 24) and b["pixel_values"].dtype == np.float32
    for i, path in enumerate(b["image_path"].tolist()):
        r = by_path[path]
        with Image.open(os.path.join(demo["images_root"], path)) as im:
            np.testing.assert_array_equal(b["pixel_values"][i], preprocess_image(im.convert("RGB"), CFG))
        for d in ds.dimensions:
            assert b["labels"][d][i] == vocabs[d].index(r.labels[d])
        assert b["index"][i] == r.row and b["has_target"][i] == 1
        assert b["target_keys"][i] == f"artist: {r.labels['artist']}\nstyle: {r.labels['style']}\ngenre: {r.labels['genre']}"


@pytest.mark.parametrize("skip", [False, True])
def test_an_undecodable_image_is_named_or_skipped(demo, tmp_path, skip):
    """A truncated image: a DataError naming it, or (skip_undecodable) one element with zero pixels
    and ``skipped = 1`` while the others decode as before."""
    import shutil

    from cgjax.data.schema import DataError

    root = str(tmp_path / "images")
    shutil.copytree(demo["images_root"], root)
    src = P.memory_source(demo["dataset_json"], root, targets_csv=demo["targets_csv"], split="train")
    bad = src.data.records[int(src.indices[3])].image
    with open(os.path.join(root, bad), "r+b") as f:
        f.truncate(20)
    it = P.image_dataset(src, CFG, batch_size=len(src), seed=0, shard_index=0, shard_count=1, shuffle=False,
                         num_epochs=1, skip_undecodable=skip)
    if not skip:
        with pytest.raises(DataError, match=bad.replace(".", r"\.")):
            next(iter(it))
        return
    b = next(iter(it))
    flags = b["skipped"].tolist()
    assert flags.count(1) == 1 and b["image_path"][flags.index(1)] == bad
    assert not b["pixel_values"][flags.index(1)].any()
    ok = flags.index(0)
    with Image.open(os.path.join(root, b["image_path"][ok])) as im:
        np.testing.assert_array_equal(b["pixel_values"][ok], preprocess_image(im.convert("RGB"), CFG))


def test_tfds_and_memory_sources_agree(demo, packed):
    mem = P.memory_source(demo["dataset_json"], demo["images_root"], targets_csv=demo["targets_csv"], split="validation")
    tf = TB.open_source(packed, "validation")
    kw = dict(batch_size=4, shuffle=False, num_epochs=1, shard_index=0, shard_count=1)
    out = {}
    for name, src in (("mem", mem), ("tfds", tf)):
        out[name] = {p: (b["pixel_values"][i], {d: b["labels"][d][i] for d in b["labels"]}, b["target_reason"][i])
                     for b in P.image_dataset(src, CFG, **kw) for i, p in enumerate(b["image_path"].tolist())}
    assert sorted(out["mem"]) == sorted(out["tfds"]) and len(out["mem"]) == 12
    for p, (px, labels, reason) in out["mem"].items():
        np.testing.assert_array_equal(px, out["tfds"][p][0])
        assert labels == out["tfds"][p][1] and reason == out["tfds"][p][2]


def test_epochs_are_permutations_reshuffled_each_epoch(packed):
    src = TB.open_source(packed, "train")  # 24 examples
    it = iter(P.image_dataset(src, CFG, batch_size=6, seed=7, shard_index=0, shard_count=1))
    e1, e2 = _paths(_take(it, 4)), _paths(_take(it, 4))
    assert len(set(e1)) == len(set(e2)) == 24 and set(e1) == set(e2)
    assert e1 != e2
    again = _paths(_take(iter(P.image_dataset(src, CFG, batch_size=6, seed=7, shard_index=0, shard_count=1)), 4))
    assert again == e1
    other = _paths(_take(iter(P.image_dataset(src, CFG, batch_size=6, seed=8, shard_index=0, shard_count=1)), 4))
    assert other != e1
    finite = list(P.image_dataset(src, CFG, batch_size=5, seed=7, num_epochs=2, shard_index=0, shard_count=1))
    assert len(finite) == 48 // 5  # partial batch dropped


def test_shards_are_disjoint_per_epoch(packed):
    src = TB.open_source(packed, "train")  # 24 examples; 3 hosts x 8 per epoch
    hosts = [iter(P.image_dataset(src, CFG, batch_size=4, seed=1, shard_index=h, shard_count=3)) for h in range(3)]
    for epoch in range(2):
        per_host = [_paths(_take(it, 2)) for it in hosts]
        flat = [p for ps in per_host for p in ps]
        assert len(flat) == len(set(flat)) == 24, f"epoch {epoch}: hosts overlap"
    two = [set(_paths(P.image_dataset(TB.open_source(packed, "test"), CFG, batch_size=2, seed=1, num_epochs=1,
                                      shard_index=h, shard_count=2))) for h in range(2)]
    assert not two[0] & two[1] and len(two[0]) == len(two[1]) == 6
    with pytest.raises(ValueError, match="shard_index"):
        P.image_dataset(src, CFG, batch_size=4, shard_index=2, shard_count=2)


def test_resume_exact(packed):
    src = TB.open_source(packed, "train")
    ds = P.image_dataset(src, CFG, batch_size=5, seed=11, shard_index=1, shard_count=2)  # 12 per host: epoch = 2.4 batches
    it = iter(ds)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # checkpointable as JSON
    expected = _take(it, 4)
    resumed = iter(ds)
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 4), expected)
    fresh = iter(P.image_dataset(src, CFG, batch_size=5, seed=11, shard_index=1, shard_count=2))
    _assert_same_batches(_take(fresh, 7)[3:], expected)


def test_hooks_and_signals(demo, tmp_path):
    ds = read_dataset_json(demo["dataset_json"], demo["images_root"])
    v = ds.vocabularies()["style"]
    s = np.random.default_rng(0).uniform(0, 1, (len(ds), len(v))).astype(np.float32)
    s[0] = np.nan
    write_signals_keyed(tmp_path / "sig.json", Signals(ds.image_paths, {"style": v}, {"style": s}))
    src = P.memory_source(demo["dataset_json"], demo["images_root"], signals=tmp_path / "sig.json", preload=True)

    def collate(elements):
        return {"n": len(elements), "paths": [e["image_path"] for e in elements], "lens": [e["n_chars"] for e in elements],
                "signals": np.stack([e["signals"]["style"] for e in elements]),
                "mask": np.stack([e["signals_mask"]["style"] for e in elements])}

    it = P.image_dataset(src, CFG, batch_size=48, shuffle=False, num_epochs=1, shard_index=0, shard_count=1,
                         element_fn=lambda e: {**e, "n_chars": len(e["target_reason"])}, collate_fn=collate)
    b = next(iter(it))
    assert b["n"] == 48 and b["paths"] == ds.image_paths and b["lens"] == [0] * 48  # no targets given
    np.testing.assert_array_equal(b["signals"], np.nan_to_num(s, nan=0.0))
    np.testing.assert_array_equal(b["mask"], ~np.isnan(s))


def test_mp_prefetch_matches_and_resumes(packed):
    src = TB.open_source(packed, "train")
    kw = dict(batch_size=4, seed=2, shard_index=0, shard_count=1)
    expected = _take(iter(P.image_dataset(src, CFG, **kw)), 8)
    ds = P.image_dataset(src, CFG, worker_count=2, **kw)
    it = iter(ds)
    try:
        got = _take(it, 5)
        state = it.get_state()
        got += _take(it, 3)
    finally:
        it.close()
    _assert_same_batches(got, expected)
    it = iter(ds)
    try:
        it.set_state(state)
        _assert_same_batches(_take(it, 3), expected[5:])
    finally:
        it.close()
