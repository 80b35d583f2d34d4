"""``train_prototypes(config, workdir)`` end to end on the demo set with a tiny open_clip tower."""
import json
import os

import numpy as np
import pytest
import torch

from configs.prototypes import get_config
from cgjax.prototypes.run import train_prototypes


def _config(demo, tiny_clip, epochs, signals=False):
    c = get_config()
    c.data.dataset_json = demo["dataset_json"]
    c.data.images_root = demo["images_root"]
    c.clip.model_name, c.clip.checkpoint = tiny_clip[0], tiny_clip[1]
    c.clip.batch_size = 16
    c.trainer.epochs = epochs
    c.trainer.negatives_k = "max"
    c.export.signals = signals
    return c


@pytest.fixture(scope="module")
def full(tmp_path_factory, demo, tiny_clip):
    """2 epochs with the signal exports, in a local work dir: (work dir, metrics)."""
    wd = tmp_path_factory.mktemp("protos") / "full"
    return wd, train_prototypes(_config(demo, tiny_clip, 2, signals=True), str(wd))


def test_train_export_and_resume(tmp_path, demo, tiny_clip, full):
    full_dir, m = full
    assert m["epochs"] == 2 and m["n_train"] > 0 and m["n_val"] > 0
    assert [h["epoch"] for h in m["history"]] == [1, 2]
    for d in ("artist", "style", "genre"):
        assert {"val_top1", "val_top3", "val_ema_top1"} <= set(m["val"][d])
        assert m["calibration"][d]["nll_after"] <= m["calibration"][d]["nll_before"] + 1e-9
    art = full_dir / "artifacts"
    payload = torch.load(art / "prototypes_style_trained.pt")
    assert list(payload["prototypes"]) == ["style"] and payload["clip_model_name"] == tiny_clip[0]
    sig = json.load(open(art / "concept_signals_genre.json"))
    assert len(sig) == 48 and all(set(e) == {"genre"} for e in sig)
    assert json.load(open(art / "validation_metrics.json"))["samples"] == 48
    # the split is real: validation records are not trained on
    recs = json.load(open(demo["dataset_json"]))
    assert m["n_train"] == sum(r.get("split") == "train" for r in recs)

    # 1 epoch, then resume to 2 (same workdir): identical prototypes
    train_prototypes(_config(demo, tiny_clip, 1), str(tmp_path / "part"))
    m2 = train_prototypes(_config(demo, tiny_clip, 2), str(tmp_path / "part"))
    assert m2["steps"] == m["steps"]
    for d in ("artist", "style", "genre"):
        a = torch.load(art / f"prototypes_{d}_trained.pt")["prototypes"][d]
        b = torch.load(tmp_path / "part" / "artifacts" / f"prototypes_{d}_trained.pt")["prototypes"][d]
        assert torch.equal(a, b)
    assert m2["history"][0] == m["history"][0]


def test_a_work_dir_in_a_bucket(gcs, tmp_path, demo, tiny_clip, full, monkeypatch):
    """The same stage with ``gs://`` as its work dir (the local emulator): checkpoints, the .pt
    files, the signals and the prototypes checkpoint go to the bucket, equal to a local run's;
    later stages read the concept index from there; nothing lands in a local "gs:" folder."""
    from cgjax import persistence
    from cgjax.prototypes import io as pio

    monkeypatch.chdir(tmp_path)
    url = f"gs://{gcs.bucket}/protos"
    m = train_prototypes(_config(demo, tiny_clip, 2, signals=True), url)
    assert m["history"] == full[1]["history"]
    assert not os.listdir(tmp_path)
    art = f"{url}/artifacts"
    for name in ("concept_signals_genre.json", "vocab.json", "validation_metrics.json"):
        assert persistence.Path(f"{art}/{name}").read_bytes() == (full[0] / "artifacts" / name).read_bytes(), name
    for d in ("artist", "style", "genre"):
        got = pio.load_prototypes(f"{art}/prototypes_{d}_trained.pt")
        np.testing.assert_array_equal(got.prototypes[d], pio.load_prototypes(
            str(full[0] / "artifacts" / f"prototypes_{d}_trained.pt")).prototypes[d])
    assert pio.concept_index(url) == pio.concept_index(str(full[0]))  # the prototypes checkpoint, from the bucket
    assert persistence.Path(f"{url}/checkpoints").is_dir()


def test_missing_image_is_a_clear_error(tmp_path, demo, tiny_clip):
    recs = json.load(open(demo["dataset_json"]))[:10]
    recs[3] = dict(recs[3], image="images/nowhere/gone.png")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(recs))
    c = _config(demo, tiny_clip, 1)
    c.data.dataset_json = str(ds)
    c.data.images_root = os.path.dirname(demo["dataset_json"])
    with pytest.raises(FileNotFoundError, match=r"ds.json: 1 image\(s\) not found, e.g. row 3 -> .*gone.png"):
        train_prototypes(c, str(tmp_path / "w"))
    c.data.missing_images = "skip"
    m = train_prototypes(c, str(tmp_path / "w"))
    assert m["n_train"] + m["n_val"] == sum(r.get("split") in ("train", "val", "validation") for r in recs) - 1


def test_config_presets():
    assert get_config("preset=demo").clip.model_name == "cgjax-tiny-clip"
    assert get_config().trainer.margin == 0.1 and get_config().trainer.lambda_margin == 0.5
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("preset=huge")
