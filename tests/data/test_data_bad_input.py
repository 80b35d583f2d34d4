"""Each bad input is an error naming file and row, or with skip_bad a logged and counted skip;
and the validate_data CLI reports every problem with a non-zero exit code."""
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
from absl import flags

from cgjax.data.examples import load_data
from cgjax.data.records import read_dataset_json, read_targets_csv, write_targets_csv
from cgjax.data.schema import DataError, TargetRow, Vocabulary
from cgjax.data import validate as V

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEADER = "image_path,artist,style,genre,target_keys,target_reason\n"


@pytest.fixture
def small(demo, tmp_path):
    """A copy of 4 demo records (images + dataset JSON) to break."""
    recs = json.loads(open(demo["dataset_json"]).read())[:4]
    for r in recs:
        dst = tmp_path / r["image"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(demo["dir"], r["image"]), dst)
    return tmp_path, recs


def _dump(path, obj):
    path.write_text(json.dumps(obj))
    return path


def _keys(r):
    c = r["concepts"]
    return f"artist: {c['artist']}\nstyle: {c['style']}\ngenre: {c['genre']}"


def _csv_row(r, keys=None, reason="Because."):
    c = r["concepts"]
    return TargetRow(r["image"], {d: c[d] for d in ("artist", "style", "genre")}, keys or _keys(r), reason)


def test_missing_and_unreadable_images(small, caplog):
    root, recs = small
    os.remove(root / recs[1]["image"])
    (root / recs[3]["image"]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    path = _dump(root / "d.json", recs)
    with pytest.raises(DataError, match=rf"d\.json: row 1 \(image '{recs[1]['image']}'\): image file not found"):
        read_dataset_json(path, check_images=True)
    with caplog.at_level(logging.WARNING, logger="cgjax.data"):
        ds = read_dataset_json(path, check_images=True, skip_bad=True)
    assert len(ds) == 2 and len(ds.skipped) == 2
    assert "row 3" in str(ds.skipped[1]) and "unreadable image" in str(ds.skipped[1])
    assert sum("skipping" in m for m in caplog.messages) == 2
    with pytest.raises(DataError, match="row 1"):
        load_data(path)


def test_missing_columns_in_targets_row(tmp_path, caplog):
    p = tmp_path / "t.csv"
    p.write_text(HEADER + 'a.png,x-y,S,g,"artist: x-y\nstyle: S\ngenre: g",ok\n' + "b.png,x-y,S\n")
    with pytest.raises(DataError, match=r"t\.csv: row 2 \(line 5\): row has 3 fields, the header has 6"):
        read_targets_csv(p)
    with caplog.at_level(logging.WARNING, logger="cgjax.data"):
        t = read_targets_csv(p, skip_bad=True)
    assert [r.image_path for r in t.rows] == ["a.png"] and len(t.skipped) == 1
    (tmp_path / "h.csv").write_text("image_path,artist,style,genre,target_reason\n")
    with pytest.raises(DataError, match=r"h\.csv: header: missing column\(s\) \['target_keys'\]"):
        read_targets_csv(tmp_path / "h.csv")


def test_label_outside_vocabulary(small):
    root, recs = small
    vocabs = {"artist": Vocabulary("artist", ["someone-else"]), "style": Vocabulary("style", []),
              "genre": Vocabulary("genre", [])}
    with pytest.raises(DataError, match=rf"row 0 .*label '{recs[0]['concepts']['artist']}' for 'artist' is not in the vocabulary"):
        read_dataset_json(_dump(root / "d.json", recs), vocabs=vocabs)
    rows = [_csv_row(r) for r in recs]
    rows[2].labels["style"] = "Not_A_Style"
    rows[2].target_keys = rows[2].target_keys.replace(recs[2]["concepts"]["style"], "Not_A_Style")
    write_targets_csv(root / "t.csv", rows)
    with pytest.raises(DataError, match=r"t\.csv: row 3 \(line \d+\): label 'Not_A_Style' for 'style' is not in"):
        load_data(root / "d.json", targets_csv=root / "t.csv")
    data = load_data(root / "d.json", targets_csv=root / "t.csv", skip_bad=True)
    assert len(data.targets) == 3 and len(data.problems) == 1


def test_duplicate_image_path(small):
    root, recs = small
    with pytest.raises(DataError, match=r"d\.json: row 4 .*duplicate image path .*first at row 1"):
        read_dataset_json(_dump(root / "d.json", recs + [dict(recs[1])]))
    rows = [_csv_row(r) for r in recs]
    write_targets_csv(root / "t.csv", rows + [rows[0]])
    with pytest.raises(DataError, match=r"t\.csv: row 5 \(line \d+\): duplicate image_path .*first at row 1"):
        read_targets_csv(root / "t.csv")
    assert len(read_targets_csv(root / "t.csv", skip_bad=True).skipped) == 1


@pytest.mark.parametrize("keys", ["artist: a\nstyle: b", "style: b\nartist: a\ngenre: c", "", "artist: a\nstyle: \ngenre: c"])
def test_malformed_target_keys(tmp_path, keys):
    write_targets_csv(tmp_path / "t.csv", [TargetRow("a.png", {"artist": "a", "style": "b", "genre": "c"},
                                                     "artist: a\nstyle: b\ngenre: c"),
                                           TargetRow("b.png", {"artist": "a", "style": "b", "genre": "c"}, keys)])
    with pytest.raises(DataError, match=r"t\.csv: row 2 \(line 5\): malformed target_keys"):
        read_targets_csv(tmp_path / "t.csv")
    assert len(read_targets_csv(tmp_path / "t.csv", skip_bad=True).rows) == 1


def test_record_shape_errors(tmp_path):
    bad = [{"image": "a.png", "concepts": {"artist": "x", "style": "s", "genre": "g"}},
           "not a record", {"concepts": {}}, {"image": "b.png", "concepts": {"artist": 3}},
           {"image": "c.png", "concepts": [], "split": "holdout"}]
    ds = read_dataset_json(_dump(tmp_path / "d.json", bad), skip_bad=True)
    msgs = [str(e) for e in ds.skipped]
    assert len(ds) == 1 and len(msgs) == 5
    assert "row 1: record is not a JSON object" in msgs[0] and "row 2: missing or empty 'image'" in msgs[1]
    assert "row 3" in msgs[2] and "not a string" in msgs[2]
    assert "row 4" in msgs[3] and "'concepts' is not a JSON object" in msgs[3] and "unknown split" in msgs[4]
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DataError, match=r"x\.json: line 1 column 2: invalid JSON"):
        read_dataset_json(tmp_path / "x.json")


def test_validate_reports_every_problem(small):
    root, recs = small
    os.remove(root / recs[0]["image"])                              # missing image
    recs = recs + [dict(recs[2])]                                   # duplicate image path (row 4)
    _dump(root / "d.json", recs)
    rows = [_csv_row(r) for r in recs[:4]]
    rows[1].target_keys = "artist: x"                               # malformed keys (row 2)
    rows.append(TargetRow("ghost.png", rows[2].labels, rows[2].target_keys, ""))  # not in the dataset (row 5)
    write_targets_csv(root / "t.csv", rows)
    with open(root / "t.csv", "a") as f:
        f.write("only,three,fields\n")                              # missing columns (row 6)
    (root / "concept_signals_style.json").write_text("[{}]")         # wrong length
    rep = V.validate_data(root / "d.json", root, root / "t.csv", [root / "concept_signals_style.json"])
    text = "\n".join(rep.lines())
    assert len(rep.problems) == 6, text
    for needle in ("d.json: row 0", "image file not found", "d.json: row 4", "duplicate image path",
                   "t.csv: row 2", "malformed target_keys", "t.csv: row 5", "ghost.png", "t.csv: row 6",
                   "fields", "concept_signals_style.json", "1 entries but the dataset has 5"):
        assert needle in text, needle


def test_validate_cli_exit_codes(demo, small, capsys):
    good = [sys.executable, os.path.join(REPO, "scripts", "validate_data.py"), "--dataset_json", demo["dataset_json"],
            "--images_root", demo["images_root"], "--targets_csv", demo["targets_csv"]]
    r = subprocess.run(good, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 problem(s)" in r.stdout
    root, recs = small
    os.remove(root / recs[2]["image"])
    _dump(root / "d.json", recs)
    assert V.main(["--dataset_json", str(root / "d.json"), "--images_root", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"ERROR {root / 'd.json'}: row 2 (image '{recs[2]['image']}'): image file not found" in out
    with pytest.raises(flags.IllegalFlagValueError, match="--dataset_json"):
        V.main(["--images_root", str(root)])
    # absl flags: a mistyped flag is an error naming it; --signals is repeated for several files
    with pytest.raises(flags.UnrecognizedFlagError, match="images_rot"):
        V.main(["--dataset_json", str(root / "d.json"), "--images_rot", str(root)])
    with pytest.raises(flags.Error, match="--signals A --signals B"):
        V.main(["--dataset_json", str(root / "d.json"), "--signals", "a.json", "b.json"])


def test_an_empty_data_set_fails_validation(tmp_path):
    (tmp_path / "d.json").write_text("[]")
    rep = V.validate_data(tmp_path / "d.json", tmp_path)
    assert [str(p) for p in rep.problems] == [f"{tmp_path / 'd.json'}: no usable records (the file is empty)"]
    out = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "validate_data.py"), "--dataset_json",
                          str(tmp_path / "d.json")], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "no usable records" in out.stdout + out.stderr


@pytest.mark.parametrize("image", ["../secret.png", "/etc/passwd", "a/../../x.png"])
def test_image_paths_that_leave_the_root_are_refused(tmp_path, image):
    (tmp_path / "d.json").write_text(json.dumps([{"image": image, "concepts": {"artist": "a"}}]))
    with pytest.raises(DataError, match=r"row 0 .*leaves the images root .*--allow_outside_root"):
        read_dataset_json(tmp_path / "d.json", tmp_path)
    ds = read_dataset_json(tmp_path / "d.json", tmp_path, allow_outside_root=True)
    assert len(ds.records) == 1
