"""Property-based corruption of every file cgjax reads (hypothesis): a truncated, overwritten or
spliced dataset JSON, targets CSV, signals file (original list JSON, CSV, keyed JSON),
``reasoning.json`` or ``vocab.json`` either still reads or ends in cgjax's ``DataError`` naming
the file: never a raw traceback (``KeyError``, ``TypeError``, ``UnicodeDecodeError``, ...)."""
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cgjax.data.records import read_dataset_json, read_targets_csv
from cgjax.data.schema import DataError, load_vocab
from cgjax.persistence import write_json
from cgjax.data.signals import read_signals, write_signals
from cgjax.eval.cli import _read_reasoning
from cgjax.data.demo_data import write_label_signals

DIMS = ("artist", "style", "genre")


@pytest.fixture(scope="module")
def files(demo, tmp_path_factory):
    """One valid file of each kind (from the demo set) and how to read it."""
    from cgjax.data.examples import load_data

    d = str(tmp_path_factory.mktemp("fuzz_src"))
    keyed = os.path.join(d, "signals.keyed.json")
    write_label_signals(demo["dataset_json"], demo["images_root"], keyed, dims=DIMS)
    data = load_data(demo["dataset_json"], demo["images_root"], signals=keyed, dimensions=DIMS)
    listed = os.path.join(d, "concept_signals_style.json")
    write_signals(listed, data.signals, fmt="original_json", records=data.dataset, dim="style")
    csv_sig = os.path.join(d, "concept_signals_style.csv")
    write_signals(csv_sig, data.signals, fmt="csv", records=data.dataset, dim="style")
    reasoning = os.path.join(d, "reasoning.json")
    write_json(reasoning, {r.image: {"__meta__": {"activation": {}}, "prompt": "artist: x"}
                                  for r in data.records[:4]})
    root = demo["images_root"]
    return {
        "dataset_json": (demo["dataset_json"], lambda p: read_dataset_json(p, root)),
        "targets_csv": (demo["targets_csv"], lambda p: read_targets_csv(p, root)),
        "vocab_json": (demo["vocab_json"], load_vocab),
        "signals_keyed": (keyed, lambda p: read_signals(p, images_root=root)),
        "signals_list": (listed, lambda p: read_signals(p, data.dataset)),
        "signals_csv": (csv_sig, lambda p: read_signals(p, images_root=root)),
        "reasoning_json": (reasoning, _read_reasoning),
    }


corruption = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1), st.binary(max_size=0)),
    st.tuples(st.just("overwrite"), st.floats(0, 1), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.sampled_from([b"{", b"]", b'"', b",", b"null", b"\n", b"\xff"])),
)


@pytest.mark.parametrize("kind", ["dataset_json", "targets_csv", "vocab_json", "signals_keyed", "signals_list",
                                  "signals_csv", "reasoning_json"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(how=corruption)
def test_a_corrupt_file_reads_or_names_itself(files, tmp_path, kind, how):
    src, read = files[kind]
    op, where, junk = how
    raw = open(src, "rb").read()
    i = int(where * len(raw))
    if op == "truncate":
        bad = raw[:i]
    elif op == "overwrite":
        bad = raw[:i] + junk + raw[i + len(junk):]
    else:
        bad = raw[:i] + junk + raw[i:]
    path = os.path.join(str(tmp_path), os.path.basename(src))
    with open(path, "wb") as f:
        f.write(bad)
    try:
        read(path)
    except DataError as e:
        assert e.file == path or path in str(e), f"{type(e).__name__} does not name {path}: {e}"
    finally:
        shutil.rmtree(str(tmp_path), ignore_errors=True)
        os.makedirs(str(tmp_path), exist_ok=True)


def test_corrupt_sidecar_files_name_themselves(tmp_path):
    """concepts_stage*.json, a checkpoint's config.json and preprocessor_config.json, clip.json."""
    from converters import hf_llava
    from cgjax.preprocess import llava_preprocess_config
    from cgjax.demo_assets import make_demo_clip

    for name in ("config.json", "preprocessor_config.json", "clip.json"):
        (tmp_path / name).write_text('{"vision_config": ')
    with pytest.raises(DataError, match=f"{tmp_path / 'config.json'}: line 1 column"):
        hf_llava.config_dict(str(tmp_path))
    with pytest.raises(DataError, match="preprocessor_config.json: line 1"):
        llava_preprocess_config(str(tmp_path), 32)
    with pytest.raises(DataError, match="clip.json: line 1"):
        make_demo_clip(None, str(tmp_path))
