"""The demo preset's assets, made when missing (never outside ``config.demo.root``): the procedural
data set, a tiny random LLaVA with a tokenizer trained on the demo texts, stand-in signals."""
from __future__ import annotations

import csv
import os

from absl import logging

from cgjax import text
from cgjax.config import config_paths
from cgjax.data.demo_data import make_demo, write_label_signals
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
        with open(config.data.targets_csv, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        corpus = [text.SYSTEM, text.STAGE_A_PROMPT, *text.STAGE_B_PROMPTS]
        corpus += [r.get("target_keys", "") for r in rows] + [r.get("target_reason", "") for r in rows]
        tok = train_tokenizer(corpus, vocab_size=int(d.vocab_size))
        logging.info("demo: tiny LLaVA (vocab %d) in %s", len(tok), config.llava_checkpoint)
        make_llava_checkpoint(config.llava_checkpoint, "tiny", seed=int(config.seed), vocab_size=len(tok),
                              image_token_id=tok.convert_tokens_to_ids("<image>"))
        tok.save_pretrained(config.llava_checkpoint)
    for path in config_paths(config.data.signals):
        if not os.path.exists(path):
            write_label_signals(config.data.dataset_json, config.data.images_root or None, path,
                                dims=config.data.dimensions, seed=int(config.seed))
