"""Signals from a saved tiny open_clip model: cgjax (converted tower, export script) against
open_clip + the original's formulas; bad inputs give clear errors."""
import csv
import json
import os
import sys

import numpy as np
import pytest
from absl import flags
import torch
import torch.nn.functional as F
from PIL import Image

from .test_calibrate import original_postprocess

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
import export_signals  # noqa: E402

DIMS = ["artist", "style", "genre"]


def _root(demo):
    """The images root of the original default: the dataset JSON's folder."""
    return os.path.dirname(demo["dataset_json"])


@pytest.fixture(scope="module")
def torch_side(tiny_clip, demo):
    """open_clip embeddings of every demo image and the original-format .pt built from them in torch."""
    import open_clip

    name, ckpt, hub = tiny_clip
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    model.eval()
    recs = json.load(open(demo["dataset_json"]))
    with torch.no_grad():
        x = torch.stack([preprocess(Image.open(os.path.join(_root(demo), r["image"])).convert("RGB"))
                         for r in recs])
        f = F.normalize(model.encode_image(x).float(), dim=-1)
    protos, c2i, i2c = {}, {}, {}
    for d in DIMS:  # build_prototypes of the original, first appearance order
        groups = {}
        for i, r in enumerate(recs):
            groups.setdefault(r["concepts"][d], []).append(i)
        i2c[d] = list(groups)
        c2i[d] = {n: j for j, n in enumerate(i2c[d])}
        protos[d] = torch.stack([F.normalize(f[groups[n]].mean(0), dim=-1) for n in i2c[d]])
    return {"f": f.numpy(), "protos": protos, "c2i": c2i, "i2c": i2c, "recs": recs}


@pytest.fixture(scope="module")
def pt_file(torch_side, tiny_clip, tmp_path_factory):
    path = tmp_path_factory.mktemp("pt") / "prototypes_all_trained.pt"
    torch.save({"clip_model_name": tiny_clip[0], "prototypes": torch_side["protos"],
                "concept_to_idx": torch_side["c2i"], "idx_to_concept": torch_side["i2c"]}, path)
    return str(path)


def test_head_embeddings_and_prototypes(tiny_clip, demo, torch_side):
    from converters import openclip

    head = openclip.load_head(tiny_clip[0], tiny_clip[1], batch_size=16)  # 48 images: 3 batches
    paths = [os.path.join(_root(demo), r["image"]) for r in torch_side["recs"]]
    emb, kept = head.embed_paths(paths + ["/nonexistent.png"])
    assert kept == paths
    np.testing.assert_allclose(emb, torch_side["f"], atol=1e-5)
    cp = {d: {} for d in DIMS}
    for p, r in zip(paths, torch_side["recs"]):
        for d in DIMS:
            cp[d].setdefault(r["concepts"][d], []).append(p)
    cp["artist"]["ghost"] = ["/nonexistent.png"]  # no image: not indexed
    ps = head.build_prototypes(cp)
    assert ps.idx_to_concept == torch_side["i2c"]
    for d in DIMS:
        np.testing.assert_allclose(ps.prototypes[d], torch_side["protos"][d].numpy(), atol=1e-5)
    sig = head.extract_signal(paths[:2] + ["/nonexistent.png"], "style")
    s = torch_side["f"][0] @ torch_side["protos"]["style"].numpy().T
    np.testing.assert_allclose(sig[paths[0]][1], [1 - s[1], s[1]], atol=1e-5)
    assert sig["/nonexistent.png"] == {}


@pytest.mark.parametrize("mode,temperature", [("zscore", 0.8), ("none", 1.0), ("zero_one", 0.5)])
def test_export_json_equals_open_clip_plus_formulas(tmp_path, demo, tiny_clip, torch_side, pt_file, mode, temperature):
    out = tmp_path / "sig.json"
    export_signals.main(["--dataset_json", demo["dataset_json"],
                         "--ckpt", pt_file, "--dimensions", "style,genre", "--output", str(out),
                         "--normalize", mode, "--temperature", str(temperature),
                         "--clip_checkpoint", tiny_clip[1]])
    got = json.load(open(out))
    assert len(got) == len(torch_side["recs"])
    for d in ("style", "genre"):
        s = torch_side["f"] @ torch_side["protos"][d].numpy().T
        for i, entry in enumerate(got):
            x = original_postprocess(s[i], mode, temperature, True)
            assert sorted(entry[d], key=int) == [str(k) for k in range(len(x))]
            np.testing.assert_allclose([entry[d][str(k)] for k in range(len(x))],
                                       np.stack([1 - x, x], 1), atol=1e-4)
    keyed = json.load(open(tmp_path / "sig.keyed.json"))
    assert keyed["format"] == "cgjax.signals" and keyed["concepts"]["style"] == torch_side["i2c"]["style"]
    rep = json.load(open(tmp_path / "sig.validation.json"))
    assert rep["samples"] == len(got) and set(rep) >= {"style", "genre", "budget_hit_rate"}


def test_export_csv_several_dims_zscore(tmp_path, demo, tiny_clip, torch_side, pt_file):
    """The original crashed here (its path variable was clobbered inside the zscore branch)."""
    out = tmp_path / "sig.csv"
    export_signals.main(["--dataset_json", demo["dataset_json"],
                         "--ckpt", pt_file, "--output", str(out), "--format", "csv", "--topk", "2",
                         "--normalize", "zscore", "--temperature", "0.8", "--clip_checkpoint", tiny_clip[1],
                         "--keyed", "none", "--report", "none"])
    rows = list(csv.reader(open(out)))
    assert rows[0][:4] == ["image_path", "artist", "style", "genre"]
    assert rows[0][4:] == [f"{d}_top{k}_{w}" for d in DIMS for k in (1, 2) for w in ("name", "score")]
    assert len(rows) == 1 + len(torch_side["recs"])
    for i, row in enumerate(rows[1:]):
        assert row[0] == torch_side["recs"][i]["image"]
        for j, d in enumerate(DIMS):
            x = original_postprocess(torch_side["f"][i] @ torch_side["protos"][d].numpy().T, "zscore", 0.8, True)
            order = np.argsort(-x, kind="stable")
            assert row[4 + 4 * j] == torch_side["i2c"][d][order[0]]
            assert abs(float(row[5 + 4 * j]) - x[order[0]]) < 2e-6 + 1e-4
    assert not os.path.exists(tmp_path / "sig.keyed.json")


def test_export_missing_and_duplicate_images(tmp_path, demo, tiny_clip, pt_file):
    recs = json.load(open(demo["dataset_json"]))[:4]
    recs.append(dict(recs[1]))  # a repeated image: the original filled only the last copy
    recs.append(dict(recs[0], image="nowhere/missing.png"))
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(recs))
    export_signals.main(["--all", "--dataset_json", str(ds), "--images_root", _root(demo),
                         "--ckpt", pt_file, "--output_dir", str(tmp_path / "out"), "--clip_checkpoint", tiny_clip[1]])
    for d in DIMS:
        raw = (tmp_path / "out" / f"concept_signals_{d}.json").read_text()
        got = json.loads(raw)
        assert raw == json.dumps(got)  # the original's json.dump bytes: no indent, no final newline
        assert len(got) == 6
        assert got[4] == got[1] and got[1][d]  # both copies filled
        assert got[5] == {d: {}}  # missing image -> {dim: {}}, as the original's export
        assert all(got[i][d] for i in range(5))
    rep = json.load(open(tmp_path / "out" / "validation_metrics.json"))
    assert rep["samples"] == 6 and rep["signals"]["missing_images"] == 1


def test_bad_inputs(tmp_path, demo, tiny_clip, pt_file):
    base = ["--dataset_json", demo["dataset_json"],
            "--clip_checkpoint", tiny_clip[1], "--output", str(tmp_path / "o.json")]
    with pytest.raises(ValueError, match=r"unknown dimension 'media'.*\['artist', 'style', 'genre'\]"):
        export_signals.main(base + ["--ckpt", pt_file, "--dimensions", "media"])
    wide = tmp_path / "wide.pt"
    torch.save({"clip_model_name": "ViT-B-32", "prototypes": {"style": torch.randn(3, 512)},
                "idx_to_concept": {"style": ["a", "b", "c"]}, "concept_to_idx": {"style": {"a": 0, "b": 1, "c": 2}}},
               wide)
    with pytest.raises(ValueError, match=r"512-wide prototypes .*'ViT-B-32'.* embeds to 32"):
        export_signals.main(base + ["--ckpt", str(wide), "--clip_model", tiny_clip[0]])
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        export_signals.main(base + ["--ckpt", str(tmp_path / "nothing.pt")])
    with pytest.raises(flags.IllegalFlagValueError, match="--normalize=softmax"):
        export_signals.main(base + ["--ckpt", pt_file, "--normalize", "softmax"])
    with pytest.raises(flags.Error, match="--output is required"):
        export_signals.main(["--dataset_json", demo["dataset_json"], "--ckpt", pt_file])
    with pytest.raises(flags.Error, match="--ckpt_for expects DIM=PATH"):
        export_signals.main(base + ["--ckpt_for", pt_file])
