"""The original project's files as they are (a dataset JSON without ``split``, its targets CSV, the
list-format ``concept_signals_<dim>.json``) through the production presets on tiny models: the
prototype stage -> Stage A -> inference -> evaluation, one split file shared by all of them."""
import csv
import json
import os

from cgjax.config import load_config, override
from cgjax.eval.cli import evaluate_reasoning
from cgjax.infer import run_inference
from cgjax.prototypes.run import train_prototypes
from cgjax.testing import tiny_llava_with_tokenizer
from cgjax.train import train_stage

DIMS = ("artist", "style", "genre")


def _original_files(demo, out):
    """The demo set rewritten as the original writes it: images relative to the images root, no
    ``split`` / ``schema_version``, concepts in the original's key order (artist, genre, style) with
    ``media`` and an empty ``art_movement``; the targets CSV in the original's columns."""
    root = demo["images_root"]
    records = []
    for r in json.load(open(demo["dataset_json"])):
        c = r["concepts"]
        records.append({"image": os.path.relpath(os.path.join(os.path.dirname(demo["dataset_json"]), r["image"]), root),
                        "artist": c["artist"], "concepts": {"artist": c["artist"], "genre": c["genre"],
                                                            "style": c["style"], "media": [], "art_movement": ""},
                        "title": r["title"], "date": r["date"]})
    os.makedirs(out)
    dataset_json = os.path.join(out, "wikiart_5artists_dataset.json")
    json.dump(records, open(dataset_json, "w"), indent=2)
    targets_csv = os.path.join(out, "synth_targets.csv")
    with open(demo["targets_csv"], newline="") as f, open(targets_csv, "w", newline="") as g:
        w = csv.writer(g)
        w.writerow(["image_path", *DIMS, "target_keys", "target_reason"])
        for row in csv.DictReader(f):
            path = os.path.relpath(os.path.join(os.path.dirname(demo["targets_csv"]), row["image_path"]), root)
            w.writerow([path, *(row[d] for d in DIMS), row["target_keys"], row["target_reason"]])
    return dataset_json, targets_csv


def test_original_files_through_the_production_presets(tmp_path, demo, tiny_clip):
    dataset_json, targets_csv = _original_files(demo, str(tmp_path / "data"))
    root = demo["images_root"]
    data = {"data.dataset_json": dataset_json, "data.images_root": root}

    # prototypes (configs/prototypes.py, the default preset): writes the split file, trains on its train split
    c = override(load_config("prototypes.py"), **data, **{"clip.model_name": tiny_clip[0],
                 "clip.checkpoint": tiny_clip[1], "clip.batch_size": 16, "trainer.epochs": 1})
    m = train_prototypes(c, str(tmp_path / "prototypes"))
    splits_file = tmp_path / "data" / "wikiart_5artists_dataset.splits.json"  # beside the dataset JSON
    written_once = splits_file.read_bytes()
    splits = json.loads(written_once)["splits"]
    assert set(splits) == {r["image"] for r in json.load(open(dataset_json))}
    count = {s: sum(v == s for v in splits.values()) for s in ("train", "validation", "test")}
    assert (m["n_train"], m["n_val"]) == (count["train"], count["validation"]) and count["test"] > 0
    art = tmp_path / "prototypes" / "artifacts"
    signals = tuple(str(art / f"concept_signals_{d}.json") for d in DIMS)
    pts = ",".join(str(art / f"prototypes_{d}_trained.pt") for d in DIMS)
    assert json.load(open(art / "vocab.json"))["dimensions"] == list(DIMS)

    # Stage A (configs/stageA.py:preset=llava-1.5-7b) on a tiny LLaVA: the original's list signals,
    # named by the prototypes .pt (and the vocab.json beside them, which must agree)
    ckpt, _ = tiny_llava_with_tokenizer(str(tmp_path / "llava"), targets_csv)
    a = override(load_config("stageA.py:preset=llava-1.5-7b"), **data, **{
        "llava_checkpoint": ckpt, "data.targets_csv": targets_csv, "data.signals": signals,
        "data.signals_index": pts, "num_epochs": 0, "num_steps": 1, "mesh": "data=1", "text.max_text_tokens": 96,
        "dtype": "float32", "param_dtype": "float32",  # bf16 on XLA:CPU only costs compile time here
        "val.at_end": False, "log.progress_bar": False, "log.tensorboard": False, "checkpoint.async_save": False})
    out = train_stage(a, str(tmp_path / "stageA"))
    assert out["step"] == 1
    meta = json.load(open(out["pt_meta"]))
    assert meta["dims"] == list(DIMS)  # the CSV header's order, not the records' artist, genre, style
    names = json.load(open(art / "vocab.json"))["concepts"]
    assert meta["names"] == {d: names[d] for d in DIMS}  # the prototypes' concept index

    # inference (configs/infer.py:preset=llava-1.5-7b) on the test split of the same split file
    i = override(load_config("infer.py:preset=llava-1.5-7b"), **data, **{
        "llava_checkpoint": ckpt, "stage_workdir": str(tmp_path / "stageA"), "signals": signals, "mesh": "",
        "output_dir": str(tmp_path / "eval"), "generation.max_new_tokens": 2, "prompt.mode": "structured",
        "dtype": "float32", "baseline": False})
    written = run_inference(i)
    test = sorted(os.path.join(root, k) for k, v in splits.items() if v == "test")
    assert sorted(json.load(open(written["reasoning"]))) == test

    # evaluation reads the same split file
    metrics = evaluate_reasoning(written["reasoning"], dataset_json, str(tmp_path / "eval" / "metrics.json"),
                                 images_root=root, split="test")
    assert metrics["inputs"]["splits"] == {"test": count["test"]} and metrics["n_unmatched"] == 0
    assert splits_file.read_bytes() == written_once  # made once, by the first stage; every later one read it
