"""Benchmark: CLIP image encoding, cgjax (jitted ``encode_image``) vs open_clip (PyTorch).

``python scripts/bench.py encode [--model ViT-B-32] [--batch 32] [--iters 5] [--warmup 1]``

Both sides use the same random open_clip weights (converted), fp32, the same batch, in the
same run; open_clip runs under ``torch.inference_mode()``. The two are timed in alternation
and the median per batch is reported, as images/s.
"""
from __future__ import annotations

import time
from typing import Sequence

import jax
import numpy as np
from absl import flags
from flax import nnx

from cgjax import commandline, flops
from converters import openclip as oc

PROG = "scripts/bench.py encode"


def _interleaved(fns: dict, iters: int, warmup: int) -> dict:
    """Median seconds per call of each function, timed in alternation (so background load on a
    shared machine hits both sides alike)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def define_flags(fv: flags.FlagValues, argv: Sequence[str] | None = None) -> None:
    """This benchmark's flags on ``fv`` (see :mod:`cgjax.commandline`)."""
    del argv  # no config file
    flags.DEFINE_string("model", "ViT-B-32", "open_clip model name (random weights)", flag_values=fv)
    flags.DEFINE_integer("batch", 32, "images per call", flag_values=fv)
    flags.DEFINE_integer("iters", 5, "timed calls per side (median)", flag_values=fv)
    flags.DEFINE_integer("warmup", 1, "untimed calls per side first", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "weights and input seed", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> dict:
    """The benchmark in this process: ``main(["--batch", "8"])``; its figures."""
    return run(commandline.parse(define_flags, argv or (), PROG))


def run(args: flags.FlagValues) -> dict:
    """The benchmark from the parsed flags of :func:`define_flags`."""
    import open_clip  # optional [torch] extra
    import torch  # optional [torch] extra


    torch.manual_seed(args.seed)
    tmodel = open_clip.create_model(args.model).eval()
    model, _ = oc.load(args.model, tmodel.visual)
    size = model.config.image_size
    x_np = np.random.default_rng(args.seed).standard_normal((args.batch, 3, *size), dtype=np.float32)

    graphdef, state = nnx.split(model)

    @jax.jit
    def encode(state, pixels):
        return nnx.merge(graphdef, state).encode_image(pixels)

    x_j = jax.device_put(x_np)
    t0 = time.perf_counter()
    out_j = encode(state, x_j).block_until_ready()
    compile_s = time.perf_counter() - t0
    x_t = torch.from_numpy(x_np)

    def run_torch():
        with torch.inference_mode():
            return tmodel.encode_image(x_t)

    out_t = run_torch()
    err = float(np.abs(np.asarray(out_j) - out_t.numpy()).max())
    med = _interleaved({"cgjax": lambda: encode(state, x_j).block_until_ready(), "torch": run_torch},
                       args.iters, args.warmup)
    t_j, t_t = med["cgjax"], med["torch"]

    res = {
        "label": f"CLIP {args.model} encode_image, batch {args.batch}",
        "flops_per_unit": flops.encode_flops(model.config, 1),
        "cgjax": args.batch / t_j,
        "torch": args.batch / t_t,
        "speedup": t_t / t_j,
        "unit": "images/s",
        "max_abs_diff": err,
        "compile_s": compile_s,
        "batch": args.batch,
        "model": args.model,
        "device": str(jax.devices()[0].platform),
        "torch_threads": torch.get_num_threads(),
    }
    print(f"encode {args.model} batch {args.batch}: cgjax {res['cgjax']:.1f} images/s, "
          f"open_clip {res['torch']:.1f} images/s, speed-up {res['speedup']:.2f}x "
          f"(max |diff| {err:.2e}, compile {compile_s:.1f}s, torch threads {res['torch_threads']})")
    return res


if __name__ == "__main__":
    commandline.run(define_flags, run)
