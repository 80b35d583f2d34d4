"""Signals files: the original list JSON and top-k CSV, cgjax's keyed JSON, and conversions."""
import json

import numpy as np
import pytest

from cgjax import SCHEMA_VERSION
from cgjax.data import signals as S
from cgjax.data.records import read_dataset_json, write_dataset_json
from cgjax.data.schema import DataError, Record, Vocabulary

NAN = np.nan
STYLE = Vocabulary("style", ["Post_Impressionism", "Realism", "Impressionism"])


def _records():
    return [Record("van_gogh/v_0.jpg", {"artist": "vincent-van-gogh", "style": "Post_Impressionism", "genre": "still_life"}),
            Record("monet/m_0.jpg", {"artist": "claude-monet", "style": "Impressionism", "genre": None}),
            Record("monet/m_1.jpg", {"artist": "claude-monet", "style": "Impressionism", "genre": "landscape"})]


def _signals():
    s = np.array([[0.75, 0.25, 0.5], [NAN, NAN, NAN], [0.0, 1.0, 0.5]], np.float32)
    return S.Signals([r.image for r in _records()], {"style": STYLE}, {"style": s})


def test_original_json_exact_and_round_trip(tmp_path):
    p = tmp_path / "concept_signals_style.json"
    S.write_signals_json(p, _signals(), _records())
    # the original's json.dump: no indent, no final newline; a missing image is {dim: {}}
    assert p.read_text() == ('[{"style": {"0": [0.25, 0.75], "1": [0.75, 0.25], "2": [0.5, 0.5]}}, {"style": {}}, '
                             '{"style": {"0": [1.0, 0.0], "1": [0.0, 1.0], "2": [0.5, 0.5]}}]')
    back = S.read_signals_json(p, _records(), vocabs={"style": STYLE})
    np.testing.assert_array_equal(back.scores["style"], _signals().scores["style"])
    assert back.vocabs["style"] == STYLE and back.image_paths == [r.image for r in _records()]


def test_original_json_as_the_original_wrote_it(tmp_path):
    # export_signals: json.dump of float32 tensors' .tolist(); local indices only, no names
    x = np.float32(0.37)
    entries = [{"style": {"0": [float(np.float32(1) - x), float(x)], "1": [0.79, 0.21]}}, {}, {"style": {"1": [0.5, 0.5]}}]
    p = tmp_path / "concept_signals_style.json"
    p.write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"concept_signals_style\.json: list-format signals hold no concept names"):
        S.read_signals_json(p, _records())  # no index given and no vocab.json beside it
    index = {"style": Vocabulary("style", ["Realism", "Cubism"])}  # the prototypes' idx_to_concept
    sig = S.read_signals_json(p, _records(), vocabs=index)
    assert sig.vocabs["style"].names == ["Realism", "Cubism"]  # names from the index, none in the file
    assert sig.scores["style"][0, 0] == x and np.isnan(sig.scores["style"][1]).all()
    assert np.isnan(sig.scores["style"][2, 0]) and sig.scores["style"][2, 1] == np.float32(0.5)


def test_list_signals_are_read_against_their_concept_index(tmp_path):
    """The writer puts the concept index in the vocab.json beside the list; a reader with no index
    uses it; a count or an order that does not match is an error naming the file and the dimension."""
    p = tmp_path / "concept_signals_style.json"
    S.write_signals_json(p, _signals(), _records())
    S.write_signals_json(tmp_path / "concept_signals_genre.json",
                         S.Signals(["monet/m_1.jpg"], {"genre": Vocabulary("genre", ["landscape"])},
                                   {"genre": np.float32([[0.5]])}), _records())
    beside = json.loads((tmp_path / "vocab.json").read_text())
    assert beside["concepts"] == {"style": STYLE.names, "genre": ["landscape"]}  # merged, one folder
    back = S.read_signals(p, _records())
    assert back.vocabs["style"] == STYLE
    np.testing.assert_array_equal(back.scores["style"], _signals().scores["style"])
    # the index given (the prototypes .pt) agrees with the vocab.json: fine
    assert S.read_signals(p, _records(), index={"style": STYLE}).vocabs["style"] == STYLE
    reordered = Vocabulary("style", ["Realism", "Post_Impressionism", "Impressionism"])
    with pytest.raises(DataError, match=r"concept_signals_style\.json: dimension 'style': prototypes_style\.pt "
                                        r"lists \['Realism', .* but .*vocab\.json lists \['Post_Impressionism'"):
        S.read_signals(p, _records(), index={"style": reordered}, index_source="prototypes_style.pt")
    (tmp_path / "vocab.json").unlink()
    short = Vocabulary("style", ["Post_Impressionism", "Realism"])
    with pytest.raises(DataError, match=r"concept_signals_style\.json: dimension 'style': 3 concepts \(largest "
                                        r"index 2\) but its concept index prototypes_style\.pt has 2"):
        S.read_signals(p, _records(), index={"style": short}, index_source="prototypes_style.pt")
    with pytest.raises(DataError, match=r"concept_signals_style\.json: dimension 'style': is not in its concept "
                                        r"index"):
        S.read_signals(p, _records(), index={"genre": Vocabulary("genre", ["landscape"])})
    # a label vocabulary the signals must match (data.vocab_json), in another order: an error too
    with pytest.raises(DataError, match=r"concept_signals_style\.json: dimension 'style': concept names .* differ "
                                        r"from the vocabulary"):
        S.read_signals(p, _records(), index={"style": STYLE}, vocabs={"style": reordered})


def test_original_csv_exact_and_read(tmp_path):
    p = tmp_path / "concept_signals_style.csv"
    S.write_signals_csv(p, _signals(), "style", _records(), topk=4)
    assert p.read_bytes().decode() == (
        "image_path,artist,style,genre,style_top1_name,style_top1_score,style_top2_name,style_top2_score,"
        "style_top3_name,style_top3_score,style_top4_name,style_top4_score\r\n"
        "van_gogh/v_0.jpg,vincent-van-gogh,Post_Impressionism,still_life,Post_Impressionism,0.750000,"
        "Impressionism,0.500000,Realism,0.250000,,\r\n"
        "monet/m_0.jpg,claude-monet,Impressionism,Unknown,,,,,,,,\r\n"
        "monet/m_1.jpg,claude-monet,Impressionism,landscape,Realism,1.000000,Impressionism,0.500000,"
        "Post_Impressionism,0.000000,,\r\n")
    back = S.read_signals_csv(p, vocab=STYLE)
    np.testing.assert_array_equal(back.scores["style"], _signals().scores["style"])
    # top-k only: concepts past k are unknown (NaN); without a vocab names follow first appearance
    S.write_signals_csv(p, _signals(), "style", _records(), topk=1)
    back = S.read_signals_csv(p)
    assert back.vocabs["style"].names == ["Post_Impressionism", "Realism"]
    np.testing.assert_array_equal(back.scores["style"], [[0.75, NAN], [NAN, NAN], [NAN, 1.0]])


def test_keyed_round_trip_and_content(tmp_path):
    sig = _signals().merge(S.Signals(["monet/m_1.jpg"], {"artist": Vocabulary("artist", ["claude-monet"])},
                                     {"artist": np.array([[0.9]], np.float32)}))
    sig.meta["calibration"] = "zscore, T=0.8"
    p = tmp_path / "signals.json"
    S.write_signals_keyed(p, sig)
    obj = json.loads(p.read_text())
    assert obj["schema_version"] == SCHEMA_VERSION and obj["format"] == "cgjax.signals"
    assert obj["dimensions"] == ["style", "artist"]
    assert obj["concepts"] == {"style": STYLE.names, "artist": ["claude-monet"]}
    assert obj["signals"]["monet/m_0.jpg"] == {}
    assert obj["signals"]["monet/m_1.jpg"] == {"style": [0.0, 1.0, 0.5], "artist": [pytest.approx(0.9)]}
    back = S.read_signals_keyed(p)
    assert back.image_paths == sig.image_paths and back.meta["calibration"] == "zscore, T=0.8"
    for d in sig.dimensions:
        np.testing.assert_array_equal(back.scores[d], sig.scores[d])
    with pytest.raises(DataError, match="differ from the vocabulary"):
        S.read_signals_keyed(p, vocabs={"style": Vocabulary("style", ["Realism", "Post_Impressionism", "Impressionism"])})


def test_keyed_survives_dataset_reordering(tmp_path):
    recs = _records()
    S.write_signals_keyed(tmp_path / "k.json", _signals())
    reordered = [recs[2], recs[0], recs[1]]
    write_dataset_json(tmp_path / "d2.json", reordered)
    ds2 = read_dataset_json(tmp_path / "d2.json", tmp_path)
    S.convert_signals([tmp_path / "k.json"], tmp_path / "concept_signals_style.json", fmt="original_json", records=ds2)
    entries = json.loads((tmp_path / "concept_signals_style.json").read_text())
    assert entries[0]["style"]["1"] == [0.0, 1.0]          # monet/m_1 now first
    assert entries[2] == {"style": {}}                     # monet/m_0 (missing) now last
    back = S.read_signals(tmp_path / "concept_signals_style.json", ds2, vocabs={"style": STYLE})
    for p in ds2.image_paths:
        np.testing.assert_array_equal(back.for_image(p)["style"], _signals().for_image(p)["style"])


def test_convert_per_dimension_originals_to_keyed_and_back(tmp_path):
    recs = _records()
    rng = np.random.default_rng(0)
    vocabs = {"artist": Vocabulary("artist", ["vincent-van-gogh", "claude-monet"]), "style": STYLE,
              "genre": Vocabulary("genre", ["still_life", "landscape"])}
    for d, v in vocabs.items():
        s = rng.uniform(0, 1, (3, len(v))).astype(np.float32)
        s[1] = NAN
        S.write_signals_json(tmp_path / f"concept_signals_{d}.json", S.Signals([r.image for r in recs], {d: v}, {d: s}), recs)
    merged = S.load_signals_dir(tmp_path, recs, vocabs=vocabs)
    assert merged.dimensions == ("artist", "style", "genre")
    srcs = [tmp_path / f"concept_signals_{d}.json" for d in vocabs]
    S.convert_signals(srcs, tmp_path / "all.json", records=recs, vocabs=vocabs)
    keyed = S.read_signals(tmp_path / "all.json")
    for d in vocabs:
        S.write_signals(tmp_path / f"again_{d}.json", keyed, fmt="original_json", records=recs, dim=d)
        assert (tmp_path / f"again_{d}.json").read_bytes() == (tmp_path / f"concept_signals_{d}.json").read_bytes()
    assert S.signals_format(tmp_path / "all.json") == "keyed"
    assert S.signals_format(srcs[0]) == "original_json"


def test_signals_json_length_must_match_dataset(tmp_path):
    p = tmp_path / "concept_signals_style.json"
    p.write_text("[{}, {}]")
    with pytest.raises(DataError, match=r"concept_signals_style\.json.*2 entries but the dataset has 3"):
        S.read_signals_json(p, _records())


def test_malformed_signal_entries_name_row(tmp_path):
    p = tmp_path / "concept_signals_style.json"
    good = {"style": {"0": [0.5, 0.5], "1": [0.5, 0.5], "2": [0.5, 0.5]}}
    p.write_text(json.dumps([{"style": {"0": [0.5]}}, {"style": {"x": [0.5, 0.5]}}, good]))
    with pytest.raises(DataError, match=r"row 0 \(image 'van_gogh/v_0.jpg'\).*expected \[1 - s, s\]"):
        S.read_signals_json(p, _records(), vocabs={"style": STYLE})
    sig = S.read_signals_json(p, _records(), vocabs={"style": STYLE}, skip_bad=True)
    msgs = [str(e) for e in sig.meta["_problems"]]
    assert len(msgs) == 2 and "row 1" in msgs[1] and "not a non-negative integer" in msgs[1]
    # a concept index past the index's names is a mismatch of the whole file, even with skip_bad
    p.write_text(json.dumps([good, {}, {"style": {"7": [0.5, 0.5]}}]))
    with pytest.raises(DataError, match=r"concept_signals_style\.json: dimension 'style': 8 concepts"):
        S.read_signals_json(p, _records(), vocabs={"style": STYLE}, skip_bad=True)
