"""Dataset JSON / targets CSV / vocabulary readers and writers, against the original formats."""
import csv
import json
import os

import pytest

from cgjax import SCHEMA_VERSION
from cgjax.data import records as R
from cgjax.data.schema import LEGACY_MISSING_LABELS, Record, TargetRow, Vocabulary, load_vocab, save_vocab

ORIGINAL_RECORDS = [  # as in data/dataset/wikiart_5artists_dataset.json (+ variants the readers accept)
    {"image": "van_gogh/van_gogh_8.jpg", "artist": "vincent-van-gogh",
     "concepts": {"artist": "vincent-van-gogh", "genre": "landscape", "style": "Post_Impressionism",
                  "media": [], "art_movement": ""}, "title": "", "date": ""},
    {"image": "dataset/monet/monet_1.jpg", "artist": "claude-monet",  # root folder prefix, artist only top-level
     "concepts": {"genre": "Unknown Genre", "style": "Impressionism", "media": "oil"},
     "title": "Water Lilies", "date": "1906"},
    {"image": "/abs/path/rembrandt_0.jpg", "concepts": {"artist": "rembrandt", "style": "Baroque",
                                                         "genre": "portrait"}},
]


def _write(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    return str(path)


def test_read_original_dataset_json(tmp_path):
    root = tmp_path / "dataset"
    root.mkdir()
    with pytest.raises(R.DataError, match=r"row 2 .*/abs/path/rembrandt_0.jpg.*leaves the images root"):
        R.read_dataset_json(_write(root / "d.json", ORIGINAL_RECORDS), root)  # the absolute path: refused
    ds = R.read_dataset_json(_write(root / "d.json", ORIGINAL_RECORDS), root, allow_outside_root=True)
    assert ds.dimensions == ("artist", "style", "genre")
    assert [r.image for r in ds.records] == ["van_gogh/van_gogh_8.jpg", "monet/monet_1.jpg",
                                            "/abs/path/rembrandt_0.jpg"]
    assert ds.records[0].labels == {"artist": "vincent-van-gogh", "style": "Post_Impressionism", "genre": "landscape"}
    # WikiArt's "Unknown Genre" is a class, as in the original's metrics and validate_signals
    assert ds.records[1].labels == {"artist": "claude-monet", "style": "Impressionism", "genre": "Unknown Genre"}
    assert ds.records[1].media == ["oil"] and ds.records[1].title == "Water Lilies" and ds.records[1].date == "1906"
    assert ds.records[0].extra_concepts == {"art_movement": ""}
    assert ds.records[2].title == "" and ds.records[2].split is None
    v = ds.vocabularies()
    assert v["artist"].names == ["vincent-van-gogh", "claude-monet", "rembrandt"]
    assert v["genre"].names == ["landscape", "Unknown Genre", "portrait"]
    legacy = R.read_dataset_json(root / "d.json", root, allow_outside_root=True, missing_labels=LEGACY_MISSING_LABELS)
    assert legacy.records[1].labels["genre"] is None  # cgjax's earlier rule, on request


def test_images_root_defaults_to_json_folder(tmp_path):
    ds = R.read_dataset_json(_write(tmp_path / "d.json", ORIGINAL_RECORDS[:1]))
    assert ds.images_root == str(tmp_path)


def test_normalize_image_path():
    assert R.normalize_image_path("dataset/a/b.jpg", "data/dataset") == "a/b.jpg"
    assert R.normalize_image_path("dataset/a/b.jpg", "data/dataset/") == "a/b.jpg"
    assert R.normalize_image_path("other/a/b.jpg", "data/dataset") == "other/a/b.jpg"
    assert R.normalize_image_path("./a//b.jpg", "x") == "a/b.jpg"
    assert R.normalize_image_path("dataset", "data/dataset") == "dataset"  # a bare file name is kept
    assert R.normalize_image_path("/abs/dataset/a.jpg", "dataset") == "/abs/dataset/a.jpg"


def test_dataset_json_round_trip_and_exact_record(tmp_path):
    recs = [Record("a/x.png", {"artist": "ann-b", "style": "Cubism", "genre": None}, media=["oil"],
                   title="T", date="1900", split="validation", extra_concepts={"art_movement": ""},
                   extra={"source": "s"})]
    p = tmp_path / "out.json"
    R.write_dataset_json(p, recs)
    obj = json.loads(p.read_text())
    assert obj == [{"image": "a/x.png", "artist": "ann-b",
                    "concepts": {"artist": "ann-b", "style": "Cubism", "genre": "Unknown", "media": ["oil"],
                                 "art_movement": ""},
                    "title": "T", "date": "1900", "split": "val", "source": "s", "schema_version": SCHEMA_VERSION}]
    back = R.read_dataset_json(p, tmp_path).records[0]
    assert (back.image, back.labels, back.media, back.title, back.date, back.split, back.extra_concepts, back.extra) == \
        ("a/x.png", recs[0].labels, ["oil"], "T", "1900", "validation", {"art_movement": ""}, {"source": "s"})
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_targets_csv_exact_original_format(tmp_path):
    keys = "artist: vincent-van-gogh\nstyle: Post_Impressionism\ngenre: still_life"
    reason = 'The image depicts a pair of worn leather boots, "heavy" and dark.\nA second line.'
    rows = [TargetRow("van_gogh/van_gogh_0.jpg",
                      {"artist": "vincent-van-gogh", "style": "Post_Impressionism", "genre": "still_life"}, keys, reason),
            TargetRow("monet/monet_0.jpg", {"artist": "claude-monet", "style": "Impressionism", "genre": None},
                      "artist: claude-monet\nstyle: Impressionism\ngenre: Unknown", "")]
    p = tmp_path / "synth_targets.csv"
    R.write_targets_csv(p, rows)
    assert p.read_bytes().decode() == (
        "image_path,artist,style,genre,target_keys,target_reason\r\n"
        'van_gogh/van_gogh_0.jpg,vincent-van-gogh,Post_Impressionism,still_life,'
        '"artist: vincent-van-gogh\nstyle: Post_Impressionism\ngenre: still_life",'
        '"The image depicts a pair of worn leather boots, ""heavy"" and dark.\nA second line."\r\n'
        'monet/monet_0.jpg,claude-monet,Impressionism,Unknown,'
        '"artist: claude-monet\nstyle: Impressionism\ngenre: Unknown",\r\n')
    # the original reader (csv.DictReader) sees the same values
    with open(p, newline="", encoding="utf-8") as f:
        orig = list(csv.DictReader(f))
    assert orig[0]["target_keys"] == keys and orig[0]["target_reason"] == reason
    back = R.read_targets_csv(p, tmp_path)
    assert back.dimensions == ("artist", "style", "genre")
    assert [(r.image_path, r.labels, r.target_keys, r.target_reason, r.row) for r in back.rows] == \
        [(r.image_path, r.labels, r.target_keys, r.target_reason, i + 1) for i, r in enumerate(rows)]


def test_targets_csv_written_by_dictwriter_like_the_original(tmp_path):
    p = tmp_path / "t.csv"
    with open(p, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "artist", "style", "genre", "target_keys", "target_reason"])
        w.writerow(["a.jpg", "x-y", "Realism", "Unknown Genre", "artist: x-y\nstyle: Realism\ngenre: Unknown Genre",
                    "Two. Sentences."])
    t = R.read_targets_csv(p)
    assert t.rows[0].labels == {"artist": "x-y", "style": "Realism", "genre": "Unknown Genre"}
    assert R.parse_target_keys(t.rows[0].target_keys)["genre"] == "Unknown Genre"


def test_custom_dimensions_round_trip(tmp_path):
    dims = ("artist", "technique")
    recs = [Record("a.png", {"artist": "p-q", "technique": "etching"}),
            Record("b.png", {"artist": "r-s", "technique": "fresco"})]
    R.write_dataset_json(tmp_path / "d.json", recs, dims)
    ds = R.read_dataset_json(tmp_path / "d.json", dimensions=dims)
    assert [r.labels for r in ds.records] == [r.labels for r in recs]
    rows = [TargetRow(r.image, r.labels, R.format_target_keys(r.labels, dims), "Because.") for r in recs]
    assert rows[0].target_keys == "artist: p-q\ntechnique: etching"
    R.write_targets_csv(tmp_path / "t.csv", rows, dims)
    assert (tmp_path / "t.csv").read_text().splitlines()[0] == "image_path,artist,technique,target_keys,target_reason"
    t = R.read_targets_csv(tmp_path / "t.csv")
    assert t.dimensions == dims and [r.labels for r in t.rows] == [r.labels for r in recs]


def test_parse_target_keys():
    assert R.parse_target_keys("artist: a\nstyle: b\ngenre: c\n") == {"artist": "a", "style": "b", "genre": "c"}
    for bad in ("", "artist: a\nstyle: b", "artist: a\ngenre: c\nstyle: b", "artist: a\nstyle:\ngenre: c",
                "artist a\nstyle: b\ngenre: c", "artist: a\nstyle: b\ngenre: c\nmedia: d"):
        with pytest.raises(ValueError):
            R.parse_target_keys(bad)


def test_vocabulary_order_and_file(tmp_path):
    v = Vocabulary.build("style", ["B", None, "A", "B", "C"])
    assert v.names == ["B", "A", "C"] and v.index("A") == 1 and v.index(None) == -1 and v.name(2) == "C"
    assert "A" in v and "Z" not in v and len(v) == 3
    with pytest.raises(KeyError, match="not in the 'style' vocabulary"):
        v.index("Z")
    save_vocab(tmp_path / "vocab.json", {"style": v, "genre": Vocabulary("genre", ["g"])})
    obj = json.loads((tmp_path / "vocab.json").read_text())
    assert obj["schema_version"] == SCHEMA_VERSION and obj["dimensions"] == ["style", "genre"]
    assert load_vocab(tmp_path / "vocab.json") == {"style": v, "genre": Vocabulary("genre", ["g"])}


def test_atomic_dir_replaces_whole_or_leaves_the_old(tmp_path):
    from cgjax.persistence import OUTPUT_MARKER, atomic_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (out / OUTPUT_MARKER).write_text("{}")  # an earlier cgjax output: replaced without asking
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp_path / "x").write_text("")  # outside: untouched
            open(os.path.join(tmp, "half.txt"), "w").write("half")
            raise RuntimeError("fails mid-write")
    assert sorted(os.listdir(out)) == sorted([OUTPUT_MARKER, "old.txt"])
    assert sorted(os.listdir(tmp_path)) == ["out", "x"]  # no temporary folder left behind
    with atomic_dir(out) as tmp:
        open(os.path.join(tmp, "new.txt"), "w").write("new")
    assert sorted(os.listdir(out)) == sorted([OUTPUT_MARKER, "new.txt"])
    assert sorted(os.listdir(tmp_path)) == ["out", "x"]
