"""Dimensions come from the data (cgjax.data.dimensions): the records' ``concepts`` keys, the targets
CSV header and a vocab.json; when they disagree, the error names both files."""
import json

import pytest

from cgjax.data.dimensions import DimensionsError, resolve_dimensions
from cgjax.data.examples import load_data
from cgjax.data.records import read_dataset_json
from cgjax.data.schema import Vocabulary, save_vocab
from cgjax.data import validate as V

BIRDS = [{"image": f"b{i}.png", "concepts": {"species": s, "habitat": h, "season": t, "media": []}}
         for i, (s, h, t) in enumerate([("wren", "forest", "spring"), ("gull", "coast", "winter")])]


def _dump(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def test_dimensions_from_the_records(tmp_path):
    ds = read_dataset_json(_dump(tmp_path / "birds.json", BIRDS))
    assert ds.dimensions == ("species", "habitat", "season")
    assert ds.records[1].labels == {"species": "gull", "habitat": "coast", "season": "winter"}
    # the original's records: keys in the order artist, genre, style plus an always-empty art_movement
    original = [{"image": "v.jpg", "artist": "vincent-van-gogh",
                 "concepts": {"artist": "vincent-van-gogh", "genre": "landscape", "style": "Post_Impressionism",
                              "media": [], "art_movement": ""}}]
    assert read_dataset_json(_dump(tmp_path / "o.json", original)).dimensions == ("artist", "style", "genre")
    # nothing names a dimension: the original's three
    assert read_dataset_json(_dump(tmp_path / "n.json", [{"image": "x.png"}])).dimensions == \
        ("artist", "style", "genre")


def test_the_csv_header_or_vocab_sets_the_order(tmp_path):
    path = _dump(tmp_path / "birds.json", BIRDS)
    csv = tmp_path / "t.csv"
    csv.write_text("image_path,season,species,habitat,target_keys,target_reason\n")
    assert resolve_dimensions(path, targets_csv=csv) == ("season", "species", "habitat")
    save_vocab(tmp_path / "vocab.json", {d: Vocabulary(d, []) for d in ("habitat", "species", "season")})
    assert resolve_dimensions(path, targets_csv=csv, vocab=tmp_path / "vocab.json") == \
        ("habitat", "species", "season")
    assert resolve_dimensions(path, targets_csv=csv, dimensions=["species"]) == ("species",)  # explicit wins


def test_disagreeing_dimensions_name_both_files(tmp_path):
    path = _dump(tmp_path / "birds.json", BIRDS)
    csv = tmp_path / "t.csv"
    csv.write_text("image_path,artist,style,genre,target_keys,target_reason\n")
    want = r"birds\.json \(the records' 'concepts' keys\) has \['species', 'habitat', 'season'\]"
    with pytest.raises(DimensionsError, match=r"t\.csv \(header\) has \['artist', 'style', 'genre'\] but .*" + want):
        load_data(path, targets_csv=csv, check_images=False)
    save_vocab(tmp_path / "vocab.json", {d: Vocabulary(d, []) for d in ("species", "habitat")})
    with pytest.raises(DimensionsError,
                       match=r"vocab\.json \('dimensions'\) has \['species', 'habitat'\] but .*" + want):
        load_data(path, vocab=str(tmp_path / "vocab.json"), check_images=False)
    rep = V.validate_data(path, tmp_path, csv, check_images=False)
    assert len(rep.problems) == 1 and "t.csv (header)" in str(rep.problems[0]) and "birds.json" in str(rep.problems[0])
