"""The original's prototypes_<dim>_trained.pt both ways, and cgjax's orbax checkpoints."""
import numpy as np
import pytest
import torch

from cgjax.prototypes import io as pio
from cgjax.prototypes.head import PrototypeSet, build_prototypes


def _set():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(12, 8))
    labels = {"artist": ["x", "y", "x", None, "z", "y", "x", "y", "z", "q", "x", "y"],
              "style": ["s1", "s2"] * 6}
    present = [True] * 9 + [False] + [True] * 2  # "q" has only a missing image: not indexed
    return build_prototypes(emb, labels, "ViT-B-32", present=present), emb, labels, present


def test_build_prototypes_matches_formula():
    ps, emb, labels, present = _set()
    assert ps.idx_to_concept == {"artist": ["x", "y", "z"], "style": ["s1", "s2"]}  # first appearance
    assert ps.concept_to_idx["artist"] == {"x": 0, "y": 1, "z": 2}
    f = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    rows = [i for i, lab in enumerate(labels["artist"]) if lab == "y"]
    m = f[rows].mean(0)
    np.testing.assert_allclose(ps.prototypes["artist"][1], m / np.linalg.norm(m), atol=1e-6)
    assert ps.prototypes["artist"].dtype == np.float32


def test_pt_written_is_the_original_format(tmp_path):
    ps, *_ = _set()
    path = pio.save_pt(ps, tmp_path / "prototypes_artist_trained.pt", ["artist"])
    payload = torch.load(path)  # plain torch.load, as the original code does
    assert set(payload) == {"clip_model_name", "prototypes", "concept_to_idx", "idx_to_concept"}
    assert payload["clip_model_name"] == "ViT-B-32"
    t = payload["prototypes"]["artist"]
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and tuple(t.shape) == (3, 8)
    np.testing.assert_array_equal(t.numpy(), ps.prototypes["artist"])
    assert payload["concept_to_idx"] == {"artist": {"x": 0, "y": 1, "z": 2}}
    assert payload["idx_to_concept"] == {"artist": ["x", "y", "z"]}
    assert list(tmp_path.iterdir()) == [tmp_path / "prototypes_artist_trained.pt"]  # no temp file left


def test_pt_read_from_original_torch_save(tmp_path):
    P = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    payload = {"clip_model_name": "hf-hub:apple/DFN5B-CLIP-ViT-H-14-384", "prototypes": {"genre": P},
               "concept_to_idx": {"genre": {"landscape": 0, "portrait": 1, "still_life": 2, "cityscape": 3}},
               "idx_to_concept": {"genre": ["landscape", "portrait", "still_life", "cityscape"]}}
    torch.save(payload, tmp_path / "p.pt")
    ps = pio.load_prototypes(tmp_path / "p.pt")
    assert ps.dimensions == ["genre"] and ps.width == 16
    np.testing.assert_array_equal(ps.prototypes["genre"], P.numpy())
    assert ps.idx_to_concept["genre"][2] == "still_life"
    # and back: bitwise the same tensors
    pio.save_pt(ps, tmp_path / "q.pt")
    assert torch.equal(torch.load(tmp_path / "q.pt")["prototypes"]["genre"], P)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pt_bad_inputs(tmp_path):
    torch.save({"prototypes": {"a": torch.zeros(2, 4)}, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not a loadable prototype"):
        pio.load_pt(tmp_path / "evil.pt")  # weights_only refuses to run pickled code
    torch.save({"idx_to_concept": {}}, tmp_path / "nokey.pt")
    with pytest.raises(ValueError, match="missing the 'prototypes'"):
        pio.load_pt(tmp_path / "nokey.pt")
    torch.save({"prototypes": {"a": torch.zeros(2, 4)}, "idx_to_concept": {"a": ["u"]}}, tmp_path / "short.pt")
    with pytest.raises(ValueError, match="1 names for 2 prototypes"):
        pio.load_pt(tmp_path / "short.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ValueError, match="text.pt"):
        pio.load_pt(tmp_path / "text.pt")
    with pytest.raises(FileNotFoundError):
        pio.load_prototypes(tmp_path / "nothing.pt")
    ps, *_ = _set()
    with pytest.raises(ValueError, match="unknown dimension 'genre'"):
        ps.signals(np.ones((1, 8)), "genre")
    with pytest.raises(ValueError, match="another CLIP model"):
        ps.signals(np.ones((1, 16)), "artist")


def test_orbax_roundtrip(tmp_path):
    ps, *_ = _set()
    ps.temperatures = {"artist": 0.05}
    pio.save_checkpoint(ps, tmp_path / "ck")
    back = pio.load_prototypes(tmp_path / "ck")
    assert back.idx_to_concept == ps.idx_to_concept and back.temperatures == {"artist": 0.05}
    for d in ps.dimensions:
        np.testing.assert_array_equal(back.prototypes[d], ps.prototypes[d])
    # a step folder works too; anything else is a clear error
    assert pio.load_prototypes(tmp_path / "ck" / "0").dimensions == ps.dimensions
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a cgjax checkpoint"):
        pio.load_prototypes(tmp_path / "empty")


def test_trainer_checkpoint_readable(tmp_path):
    from cgjax.prototypes.trainer import PrototypeTrainer, TrainerConfig

    ps, emb, labels, _ = _set()
    p0, mask = ps.padded()
    meta = {"clip_model_name": ps.clip_model_name, "concept_to_idx": ps.concept_to_idx,
            "idx_to_concept": ps.idx_to_concept}
    tr = PrototypeTrainer(TrainerConfig(epochs=1, batch_size=4, ema_decay=0.5), ps.dimensions, p0, mask, meta)
    y = ps.label_indices(labels)
    state, _ = tr.train(emb.astype(np.float32), y, ckpt_dir=str(tmp_path / "ck"))
    got = pio.load_prototypes(tmp_path / "ck")
    np.testing.assert_array_equal(got.prototypes["style"], np.asarray(state["protos"])[1, :2])
    ema = pio.load_prototypes(tmp_path / "ck", ema=True)
    e = np.asarray(state["ema"])[0, :3]
    np.testing.assert_allclose(ema.prototypes["artist"], e / np.linalg.norm(e, axis=1, keepdims=True), atol=1e-6)
    assert isinstance(got, PrototypeSet) and got.clip_model_name == "ViT-B-32"
