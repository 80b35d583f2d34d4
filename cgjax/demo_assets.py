"""Demo assets, made when missing: the procedural data set, a tiny random LLaVA with a tokenizer
trained on the demo texts, label-derived stand-in signals (the ``demo`` stage preset, never outside
``config.demo.root``), and the prototype preset's data set and random CLIP tower."""
from __future__ import annotations

import csv
import json
import os
from typing import Any

from absl import logging

from cgjax import persistence, text
from cgjax.config import config_paths
from cgjax.data.demo_data import demo_paths, make_demo, write_label_signals
from cgjax.data.dimensions import csv_dimensions
from cgjax.data.schema import DataError, read_json
from cgjax.infer import structured_prompt
from cgjax.text_rows import parse_key_lines, structured_target
from converters import tiny_clip
from converters.tiny_llava import make_llava_checkpoint
from converters.tiny_tokenizer import train_tokenizer


def ensure_demo_assets(config) -> None:
    """For the ``demo`` preset: builds what is missing under ``config.demo.root`` -- the procedural
    data set, a tiny random LLaVA with a tokenizer trained on the demo texts, and stand-in
    signals derived from the labels (``scripts/demo.py`` uses prototype signals instead)."""
    d = config.demo
    root = os.path.realpath(str(d.root))
    missing = [(field, path) for field, path in
               [("data.dataset_json", config.data.dataset_json),
                ("llava_checkpoint", os.path.join(config.llava_checkpoint, "config.json")),
                *(("data.signals", p) for p in config_paths(config.data.signals))]
               if not os.path.exists(path)]
    outside = [(f, p) for f, p in missing if not os.path.realpath(p).startswith(root + os.sep)]
    if outside:
        field, path = outside[0]
        raise FileNotFoundError(f"config.{field}: {path} does not exist. The demo preset makes missing demo assets "
                                f"only under config.demo.root ({d.root}), never elsewhere: correct the path, or move "
                                "it under demo.root to have it generated")
    data_dir = os.path.dirname(os.path.abspath(config.data.dataset_json))
    if not os.path.exists(config.data.dataset_json):
        logging.info("demo: generating the data set in %s", data_dir)
        make_demo(data_dir, n_images=int(d.n_images), size=int(d.image_size))
    if not os.path.exists(os.path.join(config.llava_checkpoint, "config.json")):
        make_tiny_llava(config.llava_checkpoint, config.data.targets_csv, int(d.vocab_size), int(config.seed))
    for path in config_paths(config.data.signals):
        if not os.path.exists(path):
            write_label_signals(config.data.dataset_json, config.data.images_root or None, path,
                                dims=config.data.dimensions, seed=int(config.seed))


def tokenizer_corpus(targets_csv: str) -> list[str]:
    """Texts the demo tokenizer is trained on: prompts (over the CSV's dimensions), answers and
    reasons of the data set, and the structured (JSON) prompt with each answer written as its JSON."""
    dims = csv_dimensions(targets_csv)
    corpus = [text.SYSTEM, text.stage_a_prompt(dims), *text.stage_b_prompts(dims)]
    prompts: dict[str, None] = {}
    with open(targets_csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            dims = [line.partition(":")[0].strip() for line in row["target_keys"].splitlines() if ":" in line]
            prompts[structured_prompt(dims)] = None
            json_answer = "\n".join(structured_target(parse_key_lines(row["target_keys"], dims), dims,
                                                      row["target_reason"].strip()))
            corpus += [row["target_keys"], row["target_reason"], json_answer]
    return corpus + list(prompts)


def make_tiny_llava(out_dir: str, targets_csv: str, vocab_size: int = 1024, seed: int = 0, **size) -> str:
    """A tiny random HF LLaVA with a tokenizer trained on the data set's texts, saved with
    ``save_pretrained`` in ``out_dir``; ``size`` overrides the tiny preset's dimensions."""
    tok = train_tokenizer(tokenizer_corpus(targets_csv), vocab_size=vocab_size)
    logging.info("demo: tiny LLaVA (vocab %d) in %s", len(tok), out_dir)
    make_llava_checkpoint(out_dir, size="tiny", seed=seed, vocab_size=len(tok),
                          image_token_id=tok.convert_tokens_to_ids("<image>"), **size)
    tok.save_pretrained(out_dir)
    return out_dir


def prepare_prototype_demo(config: Any, workdir: str) -> None:
    """Fill in the demo data set and tiny CLIP tower (generated under ``workdir``) where unset."""
    if not config.data.dataset_json:
        out = os.path.join(workdir, "demo_data")
        paths = demo_paths(out)
        if not os.path.exists(paths["dataset_json"]):
            d = config.data.demo
            paths = make_demo(out, n_images=int(d.n_images), size=int(d.size), seed=int(d.seed))
        config.data.dataset_json = paths["dataset_json"]
        config.data.images_root = paths["images_root"]
    if not config.clip.checkpoint:
        config.clip.model_name, config.clip.checkpoint = make_demo_clip(config, os.path.join(workdir, "clip"))


def make_demo_clip(config: Any, out_dir: str) -> tuple[str, str]:
    """A random open_clip checkpoint for the demo: the tiny tower, or ``clip.model_name`` (e.g. ViT-B-32)."""
    marker = os.path.join(out_dir, "clip.json")
    if os.path.exists(marker):
        m = read_json(marker)  # a corrupt file: a DataError naming it
        if not isinstance(m, dict) or not {"model_name", "checkpoint"} <= set(m):
            raise DataError(marker, None, "expected {\"model_name\": ..., \"checkpoint\": ...}")
        if os.path.exists(m["checkpoint"]):
            return m["model_name"], m["checkpoint"]
    if config.clip.model_name in ("", "cgjax-tiny-clip"):
        t = config.clip.tiny
        name, ckpt = tiny_clip.make_openclip_checkpoint(out_dir, width=int(t.width), layers=int(t.layers),
                                                        heads=int(t.heads), patch=int(t.patch_size),
                                                        image_size=int(t.image_size), embed_dim=int(t.embed_dim))
        name = f"local-dir:{os.path.join(os.path.abspath(out_dir), name)}-hub"  # self-contained: no registration
    else:
        import open_clip  # optional [torch] extra
        import torch  # optional [torch] extra

        torch.manual_seed(0)
        model = open_clip.create_model(config.clip.model_name)
        os.makedirs(out_dir, exist_ok=True)
        ckpt = os.path.join(out_dir, "open_clip_random.pt")
        torch.save(model.state_dict(), ckpt)
        name = config.clip.model_name
    persistence.write_text(marker, json.dumps({"model_name": name, "checkpoint": ckpt}))
    return name, ckpt
