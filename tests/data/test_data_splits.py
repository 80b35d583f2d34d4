"""One split policy (cgjax.data.splits): a dataset JSON without ``split`` is split once into a split
file beside it, which every later read reuses; a file that does not fit the data set is an error."""
import json
import os

import pytest

from cgjax.data import pipeline as P
from cgjax.data.records import read_dataset_json
from cgjax.data.schema import DataError
from cgjax.data.splits import SplitPolicy, default_splits_path


def _unsplit(demo, tmp_path, n=None):
    """The demo records as the original writes them (no ``split``, no ``schema_version``), in tmp_path."""
    recs = json.load(open(demo["dataset_json"]))[:n]
    for r in recs:
        r.pop("split"), r.pop("schema_version")
    path = tmp_path / "wikiart.json"
    path.write_text(json.dumps(recs))
    return str(path), recs


def test_split_file_written_once_and_reused(demo, tmp_path):
    path, recs = _unsplit(demo, tmp_path)
    splits_file = tmp_path / "wikiart.splits.json"
    assert default_splits_path(path) == str(splits_file)
    ds = SplitPolicy(val_fraction=0.25, test_fraction=0.25, seed=3).apply(read_dataset_json(path, demo["dir"]))
    obj = json.loads(splits_file.read_text())
    assert obj["format"] == "cgjax.splits" and obj["seed"] == 3
    assert set(obj["splits"]) == {r["image"] for r in recs}  # keyed by the image as the JSON writes it
    assert obj["counts"] == {"train": 24, "validation": 12, "test": 12}
    assert {r.image: r.split for r in ds.records} == obj["splits"]
    # reused as it is: other settings do not re-split, and the file is not rewritten
    before = splits_file.read_bytes()
    again = SplitPolicy(val_fraction=0.5, seed=9).apply(read_dataset_json(path, demo["dir"]))
    assert [r.split for r in again.records] == [r.split for r in ds.records] and splits_file.read_bytes() == before
    # Stage A/B's reader takes the same file: train / validation sources from the production split names
    train, val = P.split_sources(path, demo["dir"], splits=("train", "validation"), targets_csv=demo["targets_csv"])
    assert sorted(train.data.records[i].image for i in train.indices) == \
        sorted(k for k, v in obj["splits"].items() if v == "train")
    assert len(val) == 12
    # another seed, another split (the seed is used); a record's own split is kept, only the others are filed
    other = SplitPolicy(splits_json=str(tmp_path / "s2.json"), val_fraction=0.25, test_fraction=0.25, seed=4)
    assert [r.split for r in other.apply(read_dataset_json(path, demo["dir"])).records] != \
        [r.split for r in ds.records]
    recs[0]["split"] = "test"
    (tmp_path / "mixed.json").write_text(json.dumps(recs))
    mixed = SplitPolicy().apply(read_dataset_json(tmp_path / "mixed.json", demo["dir"]))
    assert mixed.records[0].split == "test" and recs[0]["image"] not in json.load(
        open(tmp_path / "mixed.splits.json"))["splits"]


def test_split_file_that_does_not_fit_the_data_set(demo, tmp_path):
    path, recs = _unsplit(demo, tmp_path, 6)
    splits_file = tmp_path / "wikiart.splits.json"
    SplitPolicy().apply(read_dataset_json(path, demo["dir"]))
    obj = json.loads(splits_file.read_text())
    obj["splits"]["images/gone/a.png"] = "train"
    obj["splits"]["images/gone/b.png"] = "test"
    splits_file.write_text(json.dumps(obj))
    with pytest.raises(DataError, match=r"wikiart\.splits\.json: names 2 image\(s\) missing from the data set "
                                        r".*wikiart\.json: 'images/gone/a.png', 'images/gone/b.png'"):
        SplitPolicy().apply(read_dataset_json(path, demo["dir"]))
    del obj["splits"]["images/gone/a.png"], obj["splits"]["images/gone/b.png"], obj["splits"][recs[2]["image"]]
    splits_file.write_text(json.dumps(obj))
    with pytest.raises(DataError, match=rf"wikiart\.splits\.json: lacks 1 image\(s\) .*'{recs[2]['image']}'"):
        SplitPolicy().apply(read_dataset_json(path, demo["dir"]))
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    with pytest.raises(DataError, match=r"cannot write the split file .*a_file/s\.json \(data\.splits_json\)"):
        SplitPolicy(splits_json=str(blocked / "s.json")).apply(read_dataset_json(path, demo["dir"]))
    assert not os.path.exists(blocked / "s.json")
