"""The int8 matmuls under ``bench.py generate --quantize int8``: cgjax's products vs PyTorch's dynamic int8 Linear.

``python scripts/bench.py int8 [--size small] [--batch 4] [--prompt 212] [--repeats 20]``

Each linear product of the ``--size`` LLaVA's language model (q/k/v and gate/up joined, as
generation runs them; lm_head), at the rows of a prefill (``batch x prompt``) and of a decode step
(``batch``), with the same random weight on both sides:

* cgjax w8a8: :func:`cgjax.quantize.dot` with int8 activations, on XLA's matmuls (a prefill's rows on
  a CPU run as bf16 on the exact int8 values, a decode step's as an int8 matmul): training's path;
* cgjax vnni: :func:`cgjax.quantize.packed_dot`, the same product on cgjax's own int8 matmul
  (:mod:`cgjax.kernels.int8_cpu`, weights packed once): generation's path on an AVX512-VNNI CPU
  (skipped where that kernel does not serve);
* cgjax fp32: ``x @ w`` in fp32 (the unquantized model's product);
* torch int8: ``torch.ao.quantization.quantize_dynamic`` on an ``nn.Linear`` (fbgemm: weights packed
  once when quantized, activations quantized per call), the peer of ``bench.py generate``;
* torch fp32: the ``nn.Linear`` itself.

The sides alternate over ``--repeats`` rounds: in each, every side waits ``--settle`` s, then makes five
calls back to back, the first of which wakes its threads and is not counted; the fastest call of each
side is printed (ms): a product's speed inside a model, where products run back to back.
The per-product figures say where ``generate``'s int8 time goes, independent of the model code.
"""
from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from cgjax import commandline, quantize
from converters.tiny_llava import SIZES

PROG = "scripts/bench.py int8"
SIDES = ("cgjax_vnni", "cgjax_w8a8", "cgjax_fp32", "torch_int8", "torch_fp32")


def define_flags(fv: flags.FlagValues, argv: Sequence[str] | None = None) -> None:
    """This benchmark's flags on ``fv`` (see :mod:`cgjax.commandline`)."""
    del argv  # no config file
    flags.DEFINE_enum("size", "small", sorted(SIZES), "random LLaVA size whose products are timed "
                      "(converters.tiny_llava)", flag_values=fv)
    flags.DEFINE_integer("batch", 4, "prompts per call: a decode step's rows", flag_values=fv)
    flags.DEFINE_integer("prompt", 212, "tokens per prompt: a prefill has batch x prompt rows "
                         "(212 = bench.py generate's 16 text + 196 image tokens)", flag_values=fv)
    flags.DEFINE_integer("repeats", 20, "interleaved rounds of 5 calls per side (the fastest call is reported)", flag_values=fv)
    flags.DEFINE_float("settle", 0.05, "seconds of idle before each timed call, every side alike: PyTorch's "
                       "OpenMP threads keep spinning for a while after a call and slow whatever runs next",
                       flag_values=fv)


def main(argv: Sequence[str] | None = None) -> dict:
    """The benchmark in this process: ``main(["--repeats", "3"])``; its figures."""
    return run(commandline.parse(define_flags, argv or (), PROG))


def products(size: str) -> dict[str, tuple[int, int]]:
    """``name -> (in, out)`` of the language model's linear products as generation runs them."""
    t = SIZES[size]["text"]
    d, f = t["hidden_size"], t["intermediate_size"]
    kv = d // t["num_attention_heads"] * t["num_key_value_heads"]
    return {"qkv_proj": (d, d + 2 * kv), "o_proj": (d, d), "gate_up_proj": (d, 2 * f), "down_proj": (f, d),
            "lm_head": (d, t["vocab_size"])}


def _timed(fn, sync, settle: float, calls: int = 5) -> list[float]:
    """``calls`` back-to-back calls after ``settle`` s of idle: the times of all but the first (which
    wakes the threads)."""
    time.sleep(settle)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return times[1:]


def run(args: flags.FlagValues) -> dict:
    """The benchmark from the parsed flags of :func:`define_flags`."""
    import torch  # optional [torch] extra

    rs = np.random.default_rng(0)
    shapes = []  # (product, rows)
    for name in products(args.size):
        if name != "lm_head":  # a prefill computes the logits of its last position only
            shapes.append((name, args.batch * args.prompt))
        shapes.append((name, args.batch))
    results = []
    for name, rows in shapes:
        k, n = products(args.size)[name]
        w = (rs.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        x = rs.standard_normal((rows, k)).astype(np.float32)
        q, s = quantize.quantize_array(jnp.asarray(w), quantize.scale_shape(w.shape, 1, quantize.QuantConfig("int8"),
                                                                                name), jnp.int8)
        w8a8 = jax.jit(lambda x, q, s: quantize.dot(x, q, s, 1, True))
        packed = quantize.pack(q, 1)
        vnni = jax.jit(lambda x, p, s: quantize.packed_dot(x, p, s, 1))
        packed = None if packed is None else [v.get_value() for v in packed]
        fp32 = jax.jit(jnp.dot)
        xj, wj = jnp.asarray(x), jnp.asarray(w)
        lin = torch.nn.Linear(k, n, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w.T.copy()))
        tq = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
        xt = torch.from_numpy(x)
        calls = {"cgjax_vnni": (lambda: vnni(xj, packed, s), jax.block_until_ready),
                 "cgjax_w8a8": (lambda: w8a8(xj, q, s), jax.block_until_ready),
                 "cgjax_fp32": (lambda: fp32(xj, wj), jax.block_until_ready),
                 "torch_int8": (lambda: tq(xt), lambda y: y),
                 "torch_fp32": (lambda: lin(xt), lambda y: y)}
        if packed is None:
            del calls["cgjax_vnni"]
        times = {side: [] for side in calls}
        with torch.inference_mode():
            want = x @ w
            err = {"cgjax_w8a8": float(np.abs(np.asarray(w8a8(xj, q, s)) - want).max()),
                   "torch_int8": float(np.abs(tq(xt).numpy() - want).max())}
            if packed is not None:
                err["cgjax_vnni"] = float(np.abs(np.asarray(vnni(xj, packed, s)) - want).max())
            for _ in range(args.repeats):
                for side in calls:
                    times[side] += _timed(*calls[side], args.settle)
        best = {side: min(times[side]) * 1e3 if times.get(side) else float("nan") for side in SIDES}
        results.append({"product": name, "rows": rows, "in": k, "out": n, "ms": best, "max_abs_err": err})

    print(f"int8 matmuls of the {args.size} LLaVA's language model, fastest of {args.repeats} interleaved calls "
          f"(ms; torch {torch.get_num_threads()} threads, jax on {jax.devices()[0].platform})")
    print(f"  {'product':14s} {'rows x in x out':>20s} " + " ".join(f"{s:>11s}" for s in SIDES)
          + "  best cgjax int8 vs torch int8")
    for r in results:
        ms = r["ms"]
        print(f"  {r['product']:14s} {r['rows']:>6d} x {r['in']:>4d} x {r['out']:>5d} "
              + " ".join(f"{ms[s]:11.3f}" for s in SIDES)
              + f"  {ms['torch_int8'] / np.nanmin([ms['cgjax_vnni'], ms['cgjax_w8a8']]):.2f}x")
    total = {side: sum(r["ms"][side] for r in results if r["rows"] > args.batch) for side in SIDES}
    step = {side: sum(r["ms"][side] for r in results if r["rows"] == args.batch) for side in SIDES}
    print("  one decoder layer, prefill rows: " + ", ".join(f"{s} {total[s]:.2f}" for s in SIDES))
    print("  one decoder layer + lm_head, decode rows: " + ", ".join(f"{s} {step[s]:.3f}" for s in SIDES))
    return {"label": f"int8 matmuls, {args.size} LLaVA", "unit": "ms", "products": results,
            "prefill_ms": total, "decode_step_ms": step, "torch_threads": torch.get_num_threads()}


if __name__ == "__main__":
    commandline.run(define_flags, run)
