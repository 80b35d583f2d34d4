"""Signal extraction from image files: cgjax's export path vs the original's procedure (open_clip).

``python scripts/bench.py signals [--model ViT-B-32] [--n_images 96] [--batch 32] [--size 256]``

Both sides start from the same JPEG files on disk (the demo generator at ``--size`` px), the same
open_clip weights (random, converted for cgjax) and the same prototypes, and end with the raw
cosine scores of every image against every concept of the three dimensions:

* cgjax (``scripts/export_signals.py``'s path): ``PrototypeHead.embed_paths`` (threaded PIL
  decode + preprocessing, jitted ``encode_image`` in batches of ``--batch``), then the scores of all
  dimensions from the one set of embeddings;
* original (``concept_graph/prototypes`` + ``export_all_signals.py``): one pass per dimension
  (``export_all_signals`` runs ``export_signals`` once per dimension, and each pass re-encodes every
  image), each pass PIL-decoding and preprocessing with open_clip's transform in the main thread
  and ``model.encode_image`` in batches of ``--batch`` (``torch.inference_mode``), then L2-normalise
  and the cosine with that dimension's prototypes. Model creation is not timed on either side.

Two figures are printed: images/s for the original's artifact set (all three dimensions) and
for a single dimension (one pass each: the like-for-like encode comparison). Timings alternate
between the two sides over ``--rounds`` rounds; medians are reported.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Sequence

import numpy as np
from absl import flags
from PIL import Image

from cgjax import commandline, flops
from cgjax.data.demo_data import make_demo
from cgjax.prototypes.export import embed_records, read_aligned
from cgjax.prototypes.head import PrototypeSet, l2_normalize, record_paths
from converters import openclip

PROG = "scripts/bench.py signals"
DIMS = ("artist", "style", "genre")


def define_flags(fv: flags.FlagValues, argv: Sequence[str] | None = None) -> None:
    """This benchmark's flags on ``fv`` (see :mod:`cgjax.commandline`)."""
    del argv  # no config file
    flags.DEFINE_string("model", "ViT-B-32", "open_clip model name (random weights)", flag_values=fv)
    flags.DEFINE_integer("n_images", 96, "demo images generated", flag_values=fv)
    flags.DEFINE_integer("batch", 32, "images per encode call, both sides", flag_values=fv)
    flags.DEFINE_integer("size", 256, "side of the demo JPEGs on disk", flag_values=fv)
    flags.DEFINE_integer("rounds", 3, "interleaved rounds (the median is reported)", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> dict:
    """The benchmark in this process: ``main(["--n_images", "32"])``; its figures."""
    return run(commandline.parse(define_flags, argv or (), PROG))


def run(args: flags.FlagValues) -> dict:
    """The benchmark from the parsed flags of :func:`define_flags`."""
    import open_clip  # optional [torch] extra
    import torch  # optional [torch] extra


    with tempfile.TemporaryDirectory() as root:
        paths = make_demo(os.path.join(root, "demo"), n_images=args.n_images, size=args.size, seed=0)
        torch.manual_seed(0)
        tmodel, _, transform = open_clip.create_model_and_transforms(args.model)
        tmodel.eval()
        ckpt = os.path.join(root, "clip.pt")
        torch.save(tmodel.state_dict(), ckpt)

        ds, _ = read_aligned(paths["dataset_json"], paths["images_root"])
        head = openclip.load_head(args.model, ckpt, batch_size=args.batch)
        rs = np.random.default_rng(0)
        vocab = {d: sorted({r.labels[d] for r in ds.records if r.labels.get(d)}) for d in DIMS}
        ps = PrototypeSet(args.model, {d: l2_normalize(rs.standard_normal((len(v), head.width)).astype(np.float32))
                                       for d, v in vocab.items()},
                          {d: {c: i for i, c in enumerate(v)} for d, v in vocab.items()}, {d: list(v) for d, v in vocab.items()})
        image_paths = record_paths(ds)

        def run_cgjax(dims):
            emb, present = embed_records(head, ds)
            return {d: ps.signals(emb[present], d) for d in dims}

        protos_t = {d: torch.from_numpy(p) for d, p in ps.prototypes.items()}

        def run_original(dims):
            out = {}
            for d in dims:  # export_all_signals: one export_signals run (and one encoding) per dimension
                feats = []
                for s in range(0, len(image_paths), args.batch):
                    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in image_paths[s: s + args.batch]])
                    with torch.inference_mode():
                        f = tmodel.encode_image(x)
                    feats.append(torch.nn.functional.normalize(f.float(), dim=-1))
                out[d] = (torch.cat(feats) @ protos_t[d].T).numpy()
            return out

        ref, got = run_original(DIMS), run_cgjax(DIMS)  # warm-up (compiles) and agreement check
        err = max(float(np.abs(ref[d] - got[d]).max()) for d in DIMS)
        times = {k: [] for k in ("cgjax_all", "orig_all", "cgjax_one", "orig_one")}
        for _ in range(args.rounds):
            for key, fn, dims in (("cgjax_all", run_cgjax, DIMS), ("orig_all", run_original, DIMS),
                                  ("cgjax_one", run_cgjax, DIMS[:1]), ("orig_one", run_original, DIMS[:1])):
                t0 = time.perf_counter()
                fn(dims)
                times[key].append(time.perf_counter() - t0)
        med = {k: float(np.median(v)) for k, v in times.items()}

    n = len(image_paths)

    res = {
        "label": f"signals for 3 dimensions from image files, {args.model}, batch {args.batch}",
        "unit": "images/s",
        "cgjax": n / med["cgjax_all"], "torch": n / med["orig_all"], "speedup": med["orig_all"] / med["cgjax_all"],
        "flops_per_unit": flops.encode_flops(head.model.config, 1),
        "one_dimension": {"cgjax": n / med["cgjax_one"], "torch": n / med["orig_one"],
                          "speedup": med["orig_one"] / med["cgjax_one"]},
        "max_abs_diff": err, "n_images": n, "model": args.model, "torch_threads": torch.get_num_threads(),
    }
    print(f"signals, {args.model}, {n} images of {args.size}px, batch {args.batch} (max |diff| {err:.2e}):")
    print(f"  3 dimensions: cgjax {res['cgjax']:.1f} images/s, original procedure {res['torch']:.1f} images/s "
          f"-> {res['speedup']:.2f}x (the original encodes every image once per dimension)")
    o = res["one_dimension"]
    print(f"  1 dimension : cgjax {o['cgjax']:.1f} images/s, original procedure {o['torch']:.1f} images/s "
          f"-> {o['speedup']:.2f}x")
    return res


if __name__ == "__main__":
    commandline.run(define_flags, run)
