"""The embedded demo data set: determinism, formats, and that its factors are real and learnable."""
import os
from collections import Counter

import numpy as np
from PIL import Image

from cgjax.data import demo_data
from cgjax.data.records import parse_target_keys, read_dataset_json, read_targets_csv
from cgjax.data.schema import load_vocab


def _files(d):
    out = {}
    for root, _, names in os.walk(d):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, d)] = f.read()
    return out


def test_same_seed_byte_identical_different_seed_differs(tmp_path):
    a = demo_data.make_demo(tmp_path / "a", n_images=16, size=32, seed=5)
    demo_data.make_demo(tmp_path / "b", n_images=16, size=32, seed=5)
    demo_data.make_demo(tmp_path / "c", n_images=16, size=32, seed=6)
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(fa) == 16 + 6 + 1 and fa == fb  # images, data files and cgjax's output marker
    assert fa["dataset.json"] != fc["dataset.json"]
    same_names = set(fa) & set(fc)
    assert sum(fa[k] != fc[k] for k in same_names if k.endswith(".png")) > 0
    # regenerating over an earlier demo set replaces it (atomically, nothing left behind)
    demo_data.make_demo(tmp_path / "a", n_images=16, size=32, seed=6)
    assert _files(tmp_path / "a") == fc
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "c"]
    assert a["images_root"] == str(tmp_path / "a" / "images")


def test_demo_formats(demo):
    for root in (demo["images_root"], demo["dir"]):  # "images/" prefix stripped under DIR/images
        ds = read_dataset_json(demo["dataset_json"], root, check_images=True)
        assert len(ds) == 48
    ds = read_dataset_json(demo["dataset_json"], demo["images_root"])
    assert ds.records[0].image.count("/") == 1
    vocabs = load_vocab(demo["vocab_json"])
    assert vocabs == ds.vocabularies()
    assert set(vocabs["style"].names) <= set(demo_data.STYLES) and set(vocabs["genre"].names) <= set(demo_data.GENRES)
    for a in vocabs["artist"].names:
        assert a == a.lower() and "-" in a and " " not in a
    assert Counter(r.split for r in ds.records) == {"train": 24, "validation": 12, "test": 12}
    for name, split in (("train_json", "train"), ("val_json", "validation"), ("test_json", "test")):
        sub = read_dataset_json(demo[name], demo["images_root"])
        assert [r.image for r in sub.records] == [r.image for r in ds.records if r.split == split]
    t = read_targets_csv(demo["targets_csv"], demo["images_root"], vocabs=vocabs, check_images=True)
    assert [r.image_path for r in t.rows] == [r.image for r in ds.records]
    for row, rec in zip(t.rows, ds.records):
        assert row.labels == rec.labels and parse_target_keys(row.target_keys) == rec.labels
        sentences = [s for s in row.target_reason.split(". ") if s]
        assert 2 <= len(sentences) <= 3, row.target_reason
        assert rec.labels["artist"] in row.target_reason and rec.labels["style"] in row.target_reason


def _features(path):
    im = np.asarray(Image.open(path).convert("RGB"), np.float32) / 255
    hist = np.concatenate([np.histogram(im[..., c], bins=6, range=(0, 1))[0] / im[..., 0].size for c in range(3)])
    grad = [np.abs(np.diff(im, axis=1)).mean(), np.abs(np.diff(im, axis=0)).mean(), im.std()]
    return np.concatenate([hist, grad])


def test_factors_are_learnable_but_not_trivial(tmp_path):
    paths = demo_data.make_demo(tmp_path / "d", n_images=150, size=32, seed=0)
    ds = read_dataset_json(paths["dataset_json"], paths["images_root"])
    x = np.stack([_features(os.path.join(paths["images_root"], r.image)) for r in ds.records])
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    train = np.array([r.split == "train" for r in ds.records])
    for dim in ("artist", "style"):
        y = np.array([r.labels[dim] for r in ds.records])
        d2 = ((x[~train][:, None] - x[train][None]) ** 2).sum(-1)
        nn = np.argsort(d2, 1)[:, :5]
        pred = np.array([Counter(y[train][n]).most_common(1)[0][0] for n in nn])
        acc = (pred == y[~train]).mean()
        chance = max(Counter(y[~train]).values()) / (~train).sum()
        assert acc > 1.6 * chance, (dim, acc, chance)  # simple colour / stroke statistics carry the factor
    # style is correlated with the artist but not determined by it
    by_artist = {}
    for r in ds.records:
        by_artist.setdefault(r.labels["artist"], Counter())[r.labels["style"]] += 1
    assert all(len(c) >= 2 for c in by_artist.values())
    assert all(c.most_common(1)[0][1] < sum(c.values()) for c in by_artist.values())


def test_genre_has_a_light_dark_layout():
    """Genre is composition, drawn in the artist's own colours by luminance rank: landscapes are lit
    from the top (light sky over dark ground), portraits in the centre (a lit face on a dark ground)."""
    top_lighter, centre_lighter = {}, {}
    for i in range(160):
        p = demo_data.render_painting(i, seed=3, size=64)
        lum = p.image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        border = np.concatenate([lum[:, :10].ravel(), lum[:, -10:].ravel()]).mean()
        top_lighter.setdefault(p.genre, []).append(lum[:16].mean() > lum[-16:].mean())
        centre_lighter.setdefault(p.genre, []).append(lum[16:40, 20:44].mean() > border)
    assert np.mean(top_lighter["landscape"]) > 0.7 and np.mean(top_lighter["portrait"]) < 0.3, top_lighter
    assert np.mean(centre_lighter["portrait"]) > 0.7, centre_lighter
    # the roles take distinct colours of the artist's own palette, in the genre's luminance ranks
    pal = demo_data._palette(demo_data.ARTISTS[0], np.random.default_rng(0))
    rank = np.argsort(np.argsort(pal @ np.array([0.299, 0.587, 0.114], np.float32)))
    for genre, ranks in demo_data.GENRE_ROLE_LUMINANCE.items():
        idx = demo_data._role_palette_index(genre, pal, len(ranks), np.random.default_rng(1))  # draws 0.51 < 0.8
        assert len(set(idx.tolist())) == len(ranks) and rank[idx].tolist() == list(ranks), genre


def test_cli(tmp_path):
    paths = demo_data.main(["--out", str(tmp_path / "cli"), "--n_images", "6", "--size", "24", "--split", "1,0,0",
                            "--format", "jpg"])
    ds = read_dataset_json(paths["dataset_json"], check_images=True)
    assert len(ds) == 6 and all(r.image.endswith(".jpg") and r.split == "train" for r in ds.records)
