"""Quality of the quantized base (``cgjax.quantize``) against the same model in fp32.

For the tiny and small random LLaVAs (``converters.tiny_llava``: random weights, norms and biases
perturbed), each mode (int8, int8 with int8 activations, int4 in groups) is compared with fp32 on
the same inputs (batch 4, image + text prompt):

* KL(fp32 || quantized) of the next-token distributions, averaged over every prompt position;
* greedy-token agreement over 64 new tokens (``cgjax.Generator`` on both);
* the bytes of the quantized weights against their fp32 size.

    python scripts/bench.py quality [--sizes tiny,small] [--new 64] [--group-size 128]
"""
from __future__ import annotations

import os
import tempfile
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

import cgjax
from cgjax import commandline
from cgjax.quantize import SCALE_SUFFIX, QuantConfig
from converters import hf_llava
from converters.tiny_llava import make_llava_checkpoint

PROG = "scripts/bench.py quality"


def _inputs(cfg, batch: int, text: int, seed: int = 0):
    rs = np.random.RandomState(seed)
    n_img = cfg.num_image_tokens
    ids = rs.randint(3, min(cfg.text_config.vocab_size, cfg.image_token_id), (batch, n_img + text))
    ids[:, 1:1 + n_img] = cfg.image_token_id
    size = cfg.vision_config.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    pix = rs.randn(batch, 3, *size).astype(np.float32)
    return ids, pix, np.ones(ids.shape, np.int64)


def _kl(p_logits, q_logits) -> float:
    p, q = jax.nn.log_softmax(jnp.asarray(p_logits), -1), jax.nn.log_softmax(jnp.asarray(q_logits), -1)
    return float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1)))


def _quantized_bytes(model) -> tuple[int, int]:
    """(bytes of the quantized weights and their scales, bytes of the same weights in fp32)."""
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    q = f = 0
    for path, var in flat.items():
        if path[:-1] + (path[-1] + SCALE_SUFFIX,) in flat:
            v = var.get_value()
            q += v.size * jnp.dtype(v.dtype).itemsize * (0.5 if v.dtype == jnp.int4 else 1)
            q += flat[path[:-1] + (path[-1] + SCALE_SUFFIX,)].get_value().size * 4
            f += v.size * 4
    return int(q), int(f)


def define_flags(fv: flags.FlagValues, argv: Sequence[str] | None = None) -> None:
    """This benchmark's flags on ``fv`` (see :mod:`cgjax.commandline`)."""
    del argv  # no config file
    flags.DEFINE_list("sizes", ["tiny", "small"], "random LLaVA sizes (converters.tiny_llava), comma-separated",
                      flag_values=fv)
    flags.DEFINE_integer("batch", 4, "prompts", flag_values=fv)
    flags.DEFINE_integer("text", 16, "text tokens per prompt (besides the image tokens)", flag_values=fv)
    flags.DEFINE_integer("new", 64, "new greedy tokens compared", flag_values=fv)
    flags.DEFINE_integer("group-size", 128, "int4 group (tiny: the largest divisor of its widths)", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> dict:
    """The benchmark in this process: ``main(["--sizes", "tiny", "--new", "8"])``; its figures."""
    return run(commandline.parse(define_flags, argv or (), PROG))


def run(args: flags.FlagValues) -> dict:
    """The benchmark from the parsed flags of :func:`define_flags`."""
    results = {}
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            path = make_llava_checkpoint(os.path.join(tmp, "llava"), size, seed=0)
            fp = hf_llava.load(path)
            cfg = fp.config
            widths = [cfg.vision_config.width, cfg.text_config.hidden_size, cfg.text_config.intermediate_size,
                      cfg.text_config.head_dim]
            group = args["group-size"].value
            while any(w % group for w in widths):
                group //= 2
            modes = {"int8": QuantConfig("int8"), "int8 w8a8": QuantConfig("int8", activations=True),
                     f"int4 g{group}": QuantConfig("int4", group)}
            ids, pix, mask = _inputs(cfg, args.batch, args.text)
            ref_logits = np.asarray(fp(input_ids=jnp.asarray(ids), pixel_values=jnp.asarray(pix)))  # [B, T, V]
            ref_tokens = np.asarray(cgjax.Generator(fp)(ids, pix, mask, max_new_tokens=args.new))
            for name, q in modes.items():
                qm = hf_llava.load(path, quant=q)
                logits = np.asarray(qm(input_ids=jnp.asarray(ids), pixel_values=jnp.asarray(pix)))
                tokens = np.asarray(cgjax.Generator(qm)(ids, pix, mask, max_new_tokens=args.new))
                qb, fb = _quantized_bytes(qm)
                r = {"kl": _kl(ref_logits, logits), "greedy_agreement": float((tokens == ref_tokens).mean()),
                     "top1_agreement": float((logits.argmax(-1) == ref_logits.argmax(-1)).mean()),
                     "weight_bytes": qb, "fp32_bytes": fb}
                results[f"{size} {name}"] = r
                print(f"{size:5s} {name:10s}: KL {r['kl']:.2e} | greedy tokens identical over {args.new}: "
                      f"{r['greedy_agreement'] * 100:5.1f}% | next-token argmax {r['top1_agreement'] * 100:5.1f}% | "
                      f"quantized weights {qb / 2**20:.2f} MiB (fp32 {fb / 2**20:.2f} MiB)", flush=True)
    return results


if __name__ == "__main__":
    commandline.run(define_flags, run)
