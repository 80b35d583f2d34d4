"""Greedy generation throughput: ``cgjax.generate`` vs HF ``LlavaForConditionalGeneration.generate``.

The 'small' random LLaVA (CLIP 256 wide / 4 layers / 224 px / patch 16; LLaMA 512 wide /
6 layers / vocab 32064), same weights on both sides, batch 4 (left padded), ~16 text tokens +
196 image tokens, 32 new tokens. Tokens/s counts new tokens (batch x new tokens) per second of
a full call (vision tower + prefill + decode); compile time is printed separately, not timed.
Each timed call starts after ``--settle`` seconds of idle, the same for every side, so that no
call runs on the heels of the other side's (on this project's shared 2-core VM such calls ran up
to 20-50 percent slower now and then; no thread of either side was found busy in between). The
machine's load still moves whole runs by as much, so compare several runs.
cgjax is timed twice: ``cgjax.Generator`` (the decoder layers laid out once, as the Inferencer's
batches run) and a one-shot ``cgjax.generate`` call (which lays them out inside every call); the
speed-up is the Generator's.

    python scripts/bench.py generate [--batch 4] [--new 32] [--text 16] [--repeats 5] [--settle 2] [--dtype float32]
        [--quantize int8|int4 [--quantize-activations] [--group-size 128]]

With ``--quantize``, cgjax runs on the quantized base (``cgjax.quantize``: the language model's
decoder layers and the projector) and a third peer joins the interleaved run: PyTorch's own
dynamic int8 (``torch.ao.quantization.quantize_dynamic``) on the same Linear layers. The speed-up
line then compares cgjax quantized with both HF fp32 and the PyTorch int8 peer.
"""
from __future__ import annotations

import copy
import os
import tempfile
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

import cgjax
from cgjax import commandline, flops, quantize
from converters import hf_llava
from converters.tiny_llava import SIZES, make_llava_checkpoint

PROG = "scripts/bench.py generate"


def define_flags(fv: flags.FlagValues, argv: Sequence[str] | None = None) -> None:
    """This benchmark's flags on ``fv`` (see :mod:`cgjax.commandline`)."""
    del argv  # no config file
    flags.DEFINE_integer("batch", 4, "prompts per call (row b has b left-padding slots)", flag_values=fv)
    flags.DEFINE_integer("new", 32, "new greedy tokens per prompt", flag_values=fv)
    flags.DEFINE_integer("text", 16, "text tokens per prompt (besides the image tokens)", flag_values=fv)
    flags.DEFINE_integer("repeats", 5, "interleaved timed calls per side (the fastest is reported)", flag_values=fv)
    flags.DEFINE_float("settle", 2.0, "seconds of idle before each timed call, every side alike, so that no call "
                       "runs on the heels of the other side's", flag_values=fv)
    flags.DEFINE_enum("size", "small", sorted(SIZES), "random LLaVA size (converters.tiny_llava)", flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "both sides' dtype", flag_values=fv)
    flags.DEFINE_enum("layout", "", ["", "unrolled", "scanned"], "cgjax's decoder stack in generation "
                      "(cgjax.generate.LAYOUTS; '' = the backend's default)", flag_values=fv)
    quantize.define_flags(fv, "cgjax's quantized base (and the PyTorch dynamic int8 peer)")


def main(argv: Sequence[str] | None = None) -> dict:
    """The benchmark in this process: ``main(["--new", "8", "--quantize", "int8"])``; its figures."""
    return run(commandline.parse(define_flags, argv or (), PROG))


def run(args: flags.FlagValues) -> dict:
    """The benchmark from the parsed flags of :func:`define_flags`."""
    quant = quantize.from_flags(args)

    import torch  # optional [torch] extra


    with tempfile.TemporaryDirectory() as tmp:
        path = make_llava_checkpoint(os.path.join(tmp, "llava"), args.size, seed=0)
        import transformers  # optional [torch] extra

        tdtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
        hf = transformers.LlavaForConditionalGeneration.from_pretrained(path, dtype=tdtype).eval()
        model = hf_llava.load(path, dtype=jnp.dtype(args.dtype), quant=quant)
    cfg = model.config
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hf = hf.to(dev)
    tq = None
    if quant.enabled:  # the peer: PyTorch's dynamic int8 on the Linear layers cgjax quantizes
        names = {n for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)
                 and ("language_model.layers" in n or "multi_modal_projector" in n or n.split(".")[-1] == "lm_head")}
        tq = torch.ao.quantization.quantize_dynamic(copy.deepcopy(hf).cpu(), names, dtype=torch.qint8).eval()

    B, n_img, n_txt = args.batch, cfg.num_image_tokens, args.text
    T = n_img + n_txt
    rs = np.random.RandomState(0)
    vocab = cfg.text_config.vocab_size
    ids = rs.randint(3, min(vocab, cfg.image_token_id), (B, T))
    mask = np.ones((B, T), np.int64)
    for b in range(B):  # left padding: row b has b padding slots
        mask[b, :b] = 0
        ids[b, :b] = 0
        ids[b, b + 1: b + 1 + n_img] = cfg.image_token_id  # BOS, image, text
    size = cfg.vision_config.image_size
    pix = rs.randn(B, 3, size[0], size[1]).astype(np.float32)

    tids, tmask = torch.tensor(ids, device=dev), torch.tensor(mask, device=dev)
    tpix = torch.tensor(pix, device=dev, dtype=tdtype)
    kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0, eos_token_id=None)

    gen = cgjax.Generator(model, layout=args.layout or None)

    def run_cgjax(n=args.new, one_shot=False):
        out = (cgjax.generate(model, ids, pix, mask, max_new_tokens=n, layout=args.layout or None) if one_shot
               else gen(ids, pix, mask, max_new_tokens=n))
        return jax.block_until_ready(out)

    def run_torch(n=args.new):
        with torch.inference_mode():
            out = hf.generate(input_ids=tids, pixel_values=tpix, attention_mask=tmask,
                              **dict(kw, max_new_tokens=n, min_new_tokens=n))
        if dev == "cuda":
            torch.cuda.synchronize()
        return out

    def run_torch_int8(n=args.new):
        with torch.inference_mode():
            return tq.generate(input_ids=tids.cpu(), pixel_values=tpix.cpu(), attention_mask=tmask.cpu(),
                               **dict(kw, max_new_tokens=n, min_new_tokens=n))

    def timed(fn, *a):
        time.sleep(args.settle)
        t0 = time.perf_counter()
        out = fn(*a)
        return time.perf_counter() - t0, out

    t0 = time.perf_counter()
    out = run_cgjax()  # compiles
    compile_s = time.perf_counter() - t0
    run_cgjax(args.new, True)  # the one-shot call's own program (no prepared layers)
    for one_shot in (False, True):
        run_cgjax(1, one_shot)  # a 1-token call (prefill only) is another shape bucket: compile it now
    ref = run_torch()  # warm-up
    if tq is not None:
        run_torch_int8()
    times, shot_times, ttimes, qtimes = [], [], [], []
    qref = None
    for _ in range(args.repeats):  # interleaved, so all see the same machine load
        dt, out = timed(run_cgjax)
        times.append(dt)
        dt, shot = timed(run_cgjax, args.new, True)
        shot_times.append(dt)
        dt, ref = timed(run_torch)
        ttimes.append(dt)
        if tq is not None:
            dt, qref = timed(run_torch_int8)
            qtimes.append(dt)
    jx, js, th = min(times), min(shot_times), min(ttimes)
    # breakdown: a 1-token call is vision tower + prefill + first token
    pj, pt, pq = [], [], []
    for _ in range(args.repeats):
        pj.append(timed(run_cgjax, 1)[0])
        pt.append(timed(run_torch, 1)[0])
        if tq is not None:
            pq.append(timed(run_torch_int8, 1)[0])
    pj, pt = min(pj), min(pt)
    same = float((np.asarray(out) == ref[:, T:].cpu().numpy()).mean())
    same_shot = float((np.asarray(shot) == np.asarray(out)).mean())

    n = B * args.new

    call_flops = flops.generate_flops(cfg, flops.param_counts(nnx.state(model)), B, T, args.new)
    qlabel = "" if not quant.enabled else f", {quant.mode}{' w8a8' if quant.activations else ''} base"
    res = {"label": f"greedy generation, {args.size} LLaVA{qlabel}, batch {B}, {args.new} tokens (`cgjax.Generator`)",
           "flops_per_unit": call_flops / n, "cgjax": n / jx, "torch": n / th, "speedup": th / jx, "unit": "tokens/s",
           "compile_s": compile_s, "cgjax_s": jx, "torch_s": th, "token_agreement": same,
           "cgjax_one_shot": n / js, "cgjax_one_shot_s": js, "speedup_one_shot": th / js,
           "cgjax_prefill_s": pj, "torch_prefill_s": pt,
           "device": str(jax.devices()[0].platform) + "/" + dev, "dtype": args.dtype, "quantize": quant.to_json()}
    if qtimes:
        tq_s = min(qtimes)
        res.update({"torch_int8": n / tq_s, "torch_int8_s": tq_s, "speedup_vs_torch_int8": tq_s / jx,
                    "torch_int8_prefill_s": min(pq),
                    "torch_int8_token_agreement_with_fp32": float((qref[:, T:].numpy() == ref[:, T:].cpu().numpy()).mean())})
    print(f"generate ({args.size} LLaVA, batch {B}, prompt {T} = {n_txt} text + {n_img} image tokens, "
          f"{args.new} new greedy tokens, {args.dtype}, jax on {jax.devices()[0].platform}, torch on {dev})")
    print(f"  cgjax Generator : {res['cgjax']:8.1f} tokens/s  ({jx * 1e3:.1f} ms/call; compile + first call "
          f"{compile_s:.1f} s)")
    print(f"  cgjax.generate  : {res['cgjax_one_shot']:8.1f} tokens/s  ({js * 1e3:.1f} ms/call, one-shot: "
          f"lays the layers out in the call)")
    print(f"  torch           : {res['torch']:8.1f} tokens/s  ({th * 1e3:.1f} ms/call)")
    print(f"  prefill (vision + prompt, 1st token): cgjax {pj * 1e3:.1f} ms, torch {pt * 1e3:.1f} ms; "
          f"decode per step: cgjax {(jx - pj) / (args.new - 1) * 1e3:.1f} ms, torch {(th - pt) / (args.new - 1) * 1e3:.1f} ms")
    if qtimes:
        print(f"  torch dyn. int8 : {res['torch_int8']:8.1f} tokens/s  ({res['torch_int8_s'] * 1e3:.1f} ms/call; "
              f"quantize_dynamic on the same Linear layers)  -> cgjax {quant.mode} is "
              f"{res['speedup_vs_torch_int8']:.2f}x the PyTorch int8 peer; the peer's greedy tokens identical to "
              f"fp32 HF: {res['torch_int8_token_agreement_with_fp32'] * 100:.1f}%")
        print(f"    its prefill {min(pq) * 1e3:.1f} ms, decode per step {(tq_s - min(pq)) / (args.new - 1) * 1e3:.1f} ms")
    if quant.mode == "int8" and not quant.activations and jax.default_backend() == "cpu":
        print("  (weight-only int8 on XLA:CPU dequantizes each weight before its matmul; --quantize-activations "
              "runs the peer's own scheme, int8 weights and activations)")
    print(f"  speed-up {res['speedup']:.2f}x (one-shot generate {res['speedup_one_shot']:.2f}x); greedy tokens "
          f"identical to HF: {same * 100:.1f}%, one-shot to Generator: {same_shot * 100:.1f}%")
    return res


if __name__ == "__main__":
    commandline.run(define_flags, run)
