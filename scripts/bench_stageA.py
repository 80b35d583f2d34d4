"""One Stage A train step: cgjax vs PyTorch eager vs ``torch.compile``, in the same run.

The 'small' random LLaVA (CLIP 256 wide / 4 layers / 224 px / patch 16; LLaMA 512 wide /
6 layers / 8 heads / FFN 1376 / vocab 32064), batch 4, 64 text tokens + 196 image tokens + 12
concept tokens (2 concepts x K_max 6, all active), frozen model, trainable concept values,
AdamW (lr 1.0, wd 1e-4) after global-norm clipping at 0.05, one update per step.

* cgjax: ``cgjax.steps.train_step`` (the one ``train_stage`` runs), without the
  attention regulariser (the Stage A step on 3 of every 4 steps). It encodes the prefix before
  the concept slots (prompt head + image tokens) without gradient and differentiates / projects
  to logits only the rest; the ``cgjax_full_forward`` row is the same step without that
  shortcut (full-sequence backward and logits), printed for reference.
* PyTorch: the same step as the original states it: HF ``LlavaForConditionalGeneration`` with
  every weight frozen, the image features from ``get_image_features`` and an ``nn.Parameter``
  values tensor (L2-normalised, rescaled to the first image token's norm) spliced in as
  ``inputs_embeds``, ``model(inputs_embeds=..., labels=...).loss`` (full-sequence logits, as the
  original), ``clip_grad_norm_``, ``AdamW.step``. ``torch.compile`` compiles the loss function
  (forward + backward through AOTAutograd); the optimizer step stays eager.

Both sides start from the same weights and values; the first-step losses are printed side by side
as a check that the steps agree. Timings alternate between the implementations over ``--rounds``
rounds (the machine may be shared) and report the median s/step. The last line is JSON.

    python scripts/bench.py stageA [--steps 1] [--rounds 7] [--no-compile] [--no-full] [--quantize int8|int4]

With ``--quantize`` a ``cgjax_<mode>`` row times the same step on the quantized base (against the
fp32 ``cgjax`` row, interleaved).
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from cgjax import commandline, flops, quantize, steps
from cgjax.concepts import gating
from cgjax.concepts.model import ConceptLlava
from cgjax.config import load_config, override
from converters import hf_llava
from converters.tiny_llava import make_llava_model

PROG = "scripts/bench.py stageA"
B, N_TEXT, K_MAX, N_SLOTS = 4, 64, 6, 2
N_HEAD = 8  # text tokens before <image>; the other 56 follow the image block
N_TARGET = 24  # supervised tokens at the end (the key lines)


def _inputs(cfg, seed: int = 0):
    rs = np.random.RandomState(seed)
    vocab = cfg.text_config.vocab_size
    n_img = cfg.num_image_tokens
    n_block = n_img + N_SLOTS * K_MAX
    head = rs.randint(3, min(vocab, cfg.image_token_id), (B, N_HEAD))
    tail = rs.randint(3, min(vocab, cfg.image_token_id), (B, N_TEXT - N_HEAD))
    ids = np.concatenate([head, np.full((B, n_block), cfg.image_token_id), tail], axis=1).astype(np.int32)
    labels = np.full_like(ids, -100)
    labels[:, -N_TARGET:] = ids[:, -N_TARGET:]
    size = cfg.vision_config.image_size
    size = size if isinstance(size, int) else size[0]
    pixels = rs.normal(size=(B, 3, size, size)).astype(np.float32)
    values = rs.normal(size=(N_SLOTS, K_MAX, cfg.text_config.hidden_size)).astype(np.float32)
    values /= np.linalg.norm(values, axis=-1, keepdims=True)
    return ids, labels, pixels, values


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def define_flags(fv: flags.FlagValues, argv: Sequence[str] | None = None) -> None:
    """This benchmark's flags on ``fv`` (see :mod:`cgjax.commandline`)."""
    del argv  # no config file
    flags.DEFINE_integer("steps", 1, "timed steps per round and implementation", flag_values=fv)
    flags.DEFINE_integer("rounds", 7, "interleaved rounds (the median is reported)", flag_values=fv)
    flags.DEFINE_bool("no-compile", False, "skip torch.compile", flag_values=fv)
    flags.DEFINE_bool("no-full", False, "skip the cgjax reference row without the prefix shortcut", flag_values=fv)
    quantize.define_flags(fv, "also time cgjax on the quantized base (a cgjax_<mode> row, same step, same inputs)")


def main(argv: Sequence[str] | None = None) -> dict:
    """The benchmark in this process: ``main(["--rounds", "3", "--no-compile"])``; its figures."""
    return run(commandline.parse(define_flags, argv or (), PROG))


def run(args: flags.FlagValues) -> dict:
    """The benchmark from the parsed flags of :func:`define_flags`."""
    import torch  # optional [torch] extra


    hf = make_llava_model("small", seed=0).eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    llava = hf_llava.load(hf)
    cfg = llava.config
    ids, labels, pixels, values0 = _inputs(cfg)
    n_img = cfg.num_image_tokens
    T = ids.shape[1]

    # ------------------------------------------------------------------ cgjax
    gcfg = gating.GatingConfig(dim_ranges=((0, 1), (1, 2)), k_max=K_MAX, threshold=0.5, backoff_delta=0.0,
                               topk_per_dim=1, max_concepts=N_SLOTS)
    model = ConceptLlava(llava, gcfg, rngs=nnx.Rngs(0))
    model.concepts.values.set_value(jnp.asarray(values0))
    # the trainer's StepConfig.from_config: the Stage A config with this benchmark's settings pinned
    config = override(load_config("stageA.py:preset=demo"), **{
        "grad_accum": 1, "loss.w_keys": 1.0, "loss.w_reason": 0.0, "loss.reg_lambda": 0.0, "optim.lr": 1.0,
        "optim.weight_decay": 1e-4, "optim.clip_norm": 0.05, "optim.schedule": "constant",
        "text.max_target_tokens": N_TARGET})
    sc = steps.StepConfig.from_config(config, prefix_len=N_HEAD + n_img)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    rep = NamedSharding(mesh, PartitionSpec())
    put = lambda t: jax.tree.map(lambda x: jax.device_put(x, rep), t)  # noqa: E731
    segs = np.where(labels != -100, 1, 0).astype(np.int32)
    batch = put({"input_ids": ids, "labels": labels.astype(np.int32), "segment_ids": segs,
                 "attention_mask": np.ones_like(ids), "pixel_values": pixels,
                 "scores": np.ones((B, 2), np.float32)})
    nan_at = jnp.full((2,), -1, jnp.int32)  # no fault injection

    def stepper(concept_model, step_config):
        """One compiled train step of ``concept_model`` (values trained), its state kept between calls."""
        gdef, tr, fr = nnx.split(concept_model, steps.trainable_filter(("concepts/.*",)), ...)
        # its own copy of the values: the step donates its state, and another stepper may share the model
        params, fr = jax.tree.map(jnp.copy, put(nnx.to_pure_dict(tr))), put(nnx.to_pure_dict(fr))
        box = {"state": put({"params": params, "opt_state": steps.make_optimizer(step_config).init(params),
                             "step": jnp.zeros((), jnp.int32), "rng": jax.random.PRNGKey(0)})}
        shardings = tuple(x.sharding for x in jax.tree.leaves(box["state"]))

        def step():
            box["state"], m = steps.train_step(gdef, step_config, False, shardings, box["state"], fr, batch, nan_at)
            return m["loss"]

        return step

    jax_step = stepper(model, sc)
    t0 = time.perf_counter()
    first_jax = float(jax_step())
    jax_compile = time.perf_counter() - t0
    print(f"cgjax: first step (compile + run) {jax_compile:.1f} s, loss {first_jax:.6f}", flush=True)

    # the same step without the prefix shortcut (full-sequence backward and logits), for reference
    jax_full_step = stepper(model, dataclasses.replace(sc, prefix_len=0, max_targets=0))

    quant = quantize.from_flags(args)
    q_row = None
    if quant.enabled:  # the same step on the quantized base (frozen weights int8/int4, values fp32)
        qmodel = ConceptLlava(hf_llava.load(hf, quant=quant), gcfg, rngs=nnx.Rngs(0))
        qmodel.concepts.values.set_value(jnp.asarray(values0))
        q_step = stepper(qmodel, sc)
        q_row = f"cgjax_{quant.mode}" + ("_w8a8" if quant.activations else "")
        t0 = time.perf_counter()
        first_q = float(q_step())
        print(f"{q_row}: first step (compile + run) {time.perf_counter() - t0:.1f} s, loss {first_q:.6f} "
              f"(fp32 {first_jax:.6f})", flush=True)

    if not args["no-full"].value:
        t0 = time.perf_counter()
        jax.block_until_ready(jax_full_step())
        print(f"cgjax (full forward): first step (compile + run) {time.perf_counter() - t0:.1f} s", flush=True)

    # ------------------------------------------------------------------ PyTorch
    ids_t = torch.from_numpy(ids.astype(np.int64))
    labels_t = torch.from_numpy(labels.astype(np.int64))
    pixels_t = torch.from_numpy(pixels)
    embed = hf.get_input_embeddings()

    def make_torch(compile_: bool):
        values = torch.nn.Parameter(torch.from_numpy(values0.copy()))
        opt = torch.optim.AdamW([values], lr=1.0, weight_decay=1e-4)

        def loss_fn(values, ids, pixels, labels):
            with torch.no_grad():
                out = hf.get_image_features(pixel_values=pixels, vision_feature_layer=cfg.vision_feature_layer,
                                            vision_feature_select_strategy=cfg.vision_feature_select_strategy)
                feats = torch.stack(list(out.pooler_output))  # [B, n_img, D]
                text = embed(ids)
            tok = values.reshape(1, N_SLOTS * K_MAX, -1)
            tok = tok / tok.norm(dim=-1, keepdim=True) * feats[:, :1].norm(dim=-1, keepdim=True)
            embeds = torch.cat([text[:, :N_HEAD], feats, tok.expand(ids.shape[0], -1, -1),
                                text[:, N_HEAD + n_img + N_SLOTS * K_MAX:]], dim=1)
            return hf(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), labels=labels).loss

        fn = torch.compile(loss_fn) if compile_ else loss_fn

        def step():
            loss = fn(values, ids_t, pixels_t, labels_t)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([values], 0.05)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        return step

    torch_eager = make_torch(False)
    t0 = time.perf_counter()
    first_eager = float(torch_eager())
    print(f"torch eager: first step {time.perf_counter() - t0:.1f} s, loss {first_eager:.6f}", flush=True)
    impls = {"cgjax": lambda: jax.block_until_ready(jax_step()), "torch_eager": torch_eager}
    if q_row:
        impls[q_row] = lambda: jax.block_until_ready(q_step())
    if not args["no-full"].value:
        impls["cgjax_full_forward"] = lambda: jax.block_until_ready(jax_full_step())
    compile_error, torch_compile_s = None, None
    if not args["no-compile"].value:
        try:
            torch_compiled = make_torch(True)
            t0 = time.perf_counter()
            first_compiled = float(torch_compiled())
            torch_compile_s = time.perf_counter() - t0
            print(f"torch.compile: first step (compile + run) {torch_compile_s:.1f} s, "
                  f"loss {first_compiled:.6f}", flush=True)
            impls["torch_compile"] = torch_compiled
        except Exception as e:  # noqa: BLE001 - report why and go on
            compile_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"torch.compile failed: {compile_error}", flush=True)

    for fn in impls.values():  # one more untimed step each
        fn()
    times = {k: [] for k in impls}
    for _ in range(args.rounds):  # interleaved: a load change on the shared machine hits every row alike
        for name, fn in impls.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[name].append((time.perf_counter() - t0) / args.steps)
    s = {k: _median(v) for k, v in times.items()}

    print(f"\nOne Stage A step: small LLaVA, batch {B}, {N_TEXT} text + {n_img} image + {N_SLOTS * K_MAX} "
          f"concept tokens ({T}), jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print(f"first-step loss: cgjax {first_jax:.6f} | torch eager {first_eager:.6f}")
    print("| implementation | s/step | steps/s | cgjax speed-up |")
    print("|---|---|---|---|")
    for k, v in s.items():
        print(f"| {k} | {v:.4f} | {1 / v:.3f} | {v / s['cgjax']:.2f}x |")
    if compile_error:
        print(f"| torch_compile | failed: {compile_error} | | |")
    last = {"cgjax_s_per_step": s["cgjax"], "torch_eager_s_per_step": s["torch_eager"],
            "torch_compile_s_per_step": s.get("torch_compile")}
    print(json.dumps(last))
    counts = flops.param_counts(nnx.state(model))
    grid = cfg.vision_config.grid
    head = 0 if cfg.text_config.tie_word_embeddings else cfg.text_config.hidden_size * cfg.text_config.vocab_size
    out = {"label": f"Stage A step, small LLaVA, batch {B}", "cgjax": 1 / s["cgjax"], "torch": 1 / s["torch_eager"],
           "speedup": s["torch_eager"] / s["cgjax"], "unit": "steps/s",
           # the work the step needs (gradients from the first concept slot on, logits at the
           # supervised positions): what cgjax computes, and less than torch's full pass does
           "flops_per_unit": flops.step_flops(counts, B, T, n_img, grid[0] * grid[1], head_params=head,
                                              diff_len=T - (N_HEAD + n_img), logit_positions=N_TARGET),
           "compile_s": jax_compile, **last}
    if "torch_compile" in s:
        out["torch_compile"] = 1 / s["torch_compile"]
        out["speedup_vs_compile"] = s["torch_compile"] / s["cgjax"]
        out["torch_compile_compile_s"] = torch_compile_s
    if compile_error:
        out["torch_compile_error"] = compile_error
    if q_row:
        out.update({"quantize": quant.to_json(), f"{q_row}_s_per_step": s[q_row],
                    "quantized_vs_fp32": s["cgjax"] / s[q_row], "quantized_first_loss": first_q,
                    "fp32_first_loss": first_jax})
    return out


if __name__ == "__main__":
    commandline.run(define_flags, run)
