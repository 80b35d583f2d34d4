"""Compile time against depth: generation with the unrolled and the scanned decoder stack.

A random LLaVA of tiny width (CLIP 32 wide / 2 layers; LLaMA 64 wide, vocab 128) is built at each
``--depths`` value of the language model. For each, the first call of ``cgjax.Generator`` with
``layout="unrolled"`` and ``layout="scanned"`` (``--new`` greedy tokens, batch 2) is timed, minus
a later call's time: that is the compile (trace + lowering + XLA). The scanned forward (the
training path) is timed the same way for reference. Steady-state tokens/s of both layouts is
printed too: the unrolled stack is the CPU default because it decodes faster there.

    python scripts/bench.py compile [--depths 4,32] [--new 32]
"""
from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

import cgjax
from cgjax import commandline
from cgjax.generate import LAYOUTS
from cgjax.models.llava import Llava, LlavaConfig

PROG = "scripts/bench.py compile"


def define_flags(fv: flags.FlagValues, argv: Sequence[str] | None = None) -> None:
    flags.DEFINE_list("depths", ["4", "32"], "language-model depths to build", flag_values=fv)
    flags.DEFINE_integer("new", 32, "new greedy tokens per call", flag_values=fv)
    flags.DEFINE_integer("repeats", 3, "timed steady-state calls (the fastest is used)", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> dict:
    """The benchmark in this process: ``main(["--depths", "4,8"])``; its figures."""
    return run(commandline.parse(define_flags, argv or (), PROG))


def tiny_llava(depth: int) -> Llava:
    """A random cgjax LLaVA of tiny width with ``depth`` decoder layers (no checkpoint, no torch)."""
    import transformers  # optional [torch] extra: only its config classes are used here

    hf = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, image_size=32, patch_size=8),
        text_config=transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=depth,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=128),
        image_token_id=127)
    return Llava(LlavaConfig.from_hf(hf.to_dict()), rngs=nnx.Rngs(0))


def _first_and_best(fn, repeats: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return first, best


def run(args: flags.FlagValues) -> dict:
    """The benchmark from the parsed flags of :func:`define_flags`."""
    rows = []
    for depth in (int(d) for d in args.depths):
        model = tiny_llava(depth)
        cfg = model.config
        rs = np.random.RandomState(0)
        n_img = cfg.num_image_tokens
        ids = rs.randint(3, cfg.image_token_id, (2, n_img + 9))
        ids[:, 1:1 + n_img] = cfg.image_token_id
        pix = rs.randn(2, 3, 32, 32).astype(np.float32)
        row = {"depth": depth}
        for layout in LAYOUTS:
            gen = cgjax.Generator(model, layout=layout)
            first, best = _first_and_best(lambda: gen(ids, pix, max_new_tokens=args.new), args.repeats)
            row[f"{layout}_compile_s"] = first - best
            row[f"{layout}_tokens_per_s"] = 2 * args.new / best
        graphdef, state = nnx.split(model)
        fwd = jax.jit(lambda s, i, p: nnx.merge(graphdef, s)(i, p))
        first, best = _first_and_best(lambda: fwd(state, jnp.asarray(ids), jnp.asarray(pix)), args.repeats)
        row["forward_compile_s"] = first - best
        rows.append(row)
        print(f"  {depth:3d} layers: generate compile unrolled {row['unrolled_compile_s']:5.1f} s, "
              f"scanned {row['scanned_compile_s']:5.1f} s; forward (scanned) {row['forward_compile_s']:5.1f} s; "
              f"decode unrolled {row['unrolled_tokens_per_s']:7.1f} tok/s, scanned {row['scanned_tokens_per_s']:7.1f}")
    last, first_row = rows[-1], rows[0]
    res = {"rows": rows, "unit": "s compile at the deepest model",
           "cgjax": last["scanned_compile_s"], "torch": None,
           "speedup": last["unrolled_compile_s"] / max(last["scanned_compile_s"], 1e-9),
           "scanned_growth": last["scanned_compile_s"] / max(first_row["scanned_compile_s"], 1e-9),
           "unrolled_growth": last["unrolled_compile_s"] / max(first_row["unrolled_compile_s"], 1e-9)}
    print(f"compile growth {first_row['depth']} -> {last['depth']} layers: unrolled x{res['unrolled_growth']:.2f}, "
          f"scanned x{res['scanned_growth']:.2f}")
    return res


if __name__ == "__main__":
    commandline.run(define_flags, run)
