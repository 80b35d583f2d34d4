"""``python scripts/bench.py loader``: images/s of the grain image pipeline on the demo set.

Generates the demo set into a temporary folder (optionally packs it with tfds), then times
``--steps`` batches of ``cgjax.data.pipeline.image_dataset`` after ``--warmup`` batches.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from cgjax.data import pipeline, tfds_builder
from cgjax.data.demo_data import make_demo
from cgjax.preprocess import PreprocessConfig



def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n_images", type=int, default=240)
    ap.add_argument("--size", type=int, default=64, help="demo image side")
    ap.add_argument("--image_size", type=int, default=224, help="model input side (CLIP: 224 / 336)")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="mp_prefetch processes (0: threads only)")
    ap.add_argument("--read_threads", type=int, default=2)
    ap.add_argument("--source", choices=("memory", "tfds"), default="tfds")
    args = ap.parse_args(argv)


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
    main(sys.argv[1:])
