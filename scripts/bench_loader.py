"""``python scripts/bench.py loader``: images/s of the grain image pipeline on the demo set.

Generates the demo set into a temporary folder (optionally packs it with tfds), then times
``--steps`` batches of ``cgjax.data.pipeline.image_dataset`` after ``--warmup`` batches.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Sequence

from absl import flags

from cgjax import commandline
from cgjax.data import pipeline, tfds_builder
from cgjax.data.demo_data import make_demo
from cgjax.preprocess import PreprocessConfig

PROG = "scripts/bench.py loader"


def define_flags(fv: flags.FlagValues, argv: Sequence[str] | None = None) -> None:
    """This benchmark's flags on ``fv`` (see :mod:`cgjax.commandline`)."""
    del argv  # no config file
    flags.DEFINE_integer("n_images", 240, "demo images generated", flag_values=fv)
    flags.DEFINE_integer("size", 64, "demo image side", flag_values=fv)
    flags.DEFINE_integer("image_size", 224, "model input side (CLIP: 224 / 336)", flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "images per batch", flag_values=fv)
    flags.DEFINE_integer("steps", 20, "timed batches", flag_values=fv)
    flags.DEFINE_integer("warmup", 2, "untimed batches first", flag_values=fv)
    flags.DEFINE_integer("workers", 0, "mp_prefetch processes (0: threads only)", flag_values=fv)
    flags.DEFINE_integer("read_threads", 2, "image read threads", flag_values=fv)
    flags.DEFINE_enum("source", "tfds", ["memory", "tfds"], "the image folder held in memory, or the set packed "
                      "with tfds", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> dict:
    """The benchmark in this process: ``main(["--steps", "5"])``; its figures."""
    return run(commandline.parse(define_flags, argv or (), PROG))


def run(args: flags.FlagValues) -> dict:
    """The benchmark from the parsed flags of :func:`define_flags`."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_demo(os.path.join(tmp, "demo"), n_images=args.n_images, size=args.size, seed=0)
        if args.source == "tfds":
            out = tfds_builder.pack(paths["dataset_json"], paths["images_root"], os.path.join(tmp, "packed"),
                                    targets_csv=paths["targets_csv"])
            source = tfds_builder.open_source(out, "train")
        else:
            source = pipeline.memory_source(paths["dataset_json"], paths["images_root"],
                                            targets_csv=paths["targets_csv"], split="train", preload=True)
        ds = pipeline.image_dataset(source, PreprocessConfig(size=args.image_size), args.batch_size, seed=0,
                                    shard_index=0, shard_count=1, worker_count=args.workers,
                                    read_threads=args.read_threads)
        it = iter(ds)
        for _ in range(args.warmup):
            next(it)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            batch = next(it)
        dt = time.perf_counter() - t0
        assert batch["pixel_values"].shape == (args.batch_size, 3, args.image_size, args.image_size)
        if hasattr(it, "close"):
            it.close()
    ips = args.steps * args.batch_size / dt
    print(f"loader ({args.source}, {args.size}px -> {args.image_size}px, batch {args.batch_size}, "
          f"workers {args.workers}, threads {args.read_threads}, {os.cpu_count()} CPUs): {ips:.1f} images/s")
    return {"cgjax": ips, "unit": "images/s"}


if __name__ == "__main__":
    commandline.run(define_flags, run)
