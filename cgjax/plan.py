"""Launch planner: what a Stage A/B run needs per device, without allocating the model.

``python scripts/plan.py --config configs/stageA.py:preset=llava-1.5-7b --mesh data=1,fsdp=8,tensor=1
--device tpu-v5e`` prints parameter counts (total, trainable, per module), the per-device memory of
the parameters, the optimizer state, the batch, the activations and the generation KV cache, the
FLOPs per step and the expected step time at a stated MFU, and a ``WARNING`` line when a device
would run out of memory (``--strict``: exit status 1).

Nothing real is allocated: the model is built with ``nnx.eval_shape`` (shapes and dtypes only) and
every per-device size comes from the shapes and the config's logical-axis rules. Activations come
from XLA's memory analysis of the trainer's own compiled step (``cgjax.steps.train_step``
lowered on abstract arguments) on stand-in CPU devices (``scripts/plan.py`` asks for as many as the
mesh has); where that is not possible (too few devices, ``--no-compile``) an analytic estimate is
used, and the output says which. The CPU compiler's buffer assignment is a stand-in for the
accelerator's: fusion, layouts and bf16 handling differ (XLA:CPU keeps many bf16 intermediates in
fp32), so read it as an estimate, checked against the analytic figure printed next to it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec
from ml_collections import config_flags

from cgjax import commandline, sharding, text
from cgjax.concepts.index import ConceptIndex, gating_config
from cgjax.concepts.model import ConceptLlava
from cgjax.flops import attention_flops, param_counts, step_flops
from cgjax.models.llava import Llava, LLAVA_PRESETS, LlavaConfig
from cgjax.quantize import SCALE_SUFFIX, QuantConfig
from cgjax.sharding import canonical_sharding
from cgjax.steps import (StageLength, StepConfig, check_stage_length, dtype_from_name, make_optimizer, path_str,
                         prefix_length, stage_length, train_step, trainable_filter)
from converters.tiny_llava import SIZES

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """One accelerator chip: memory per chip and dense bf16 peak."""

    name: str
    hbm_bytes: int
    peak_bf16_flops: float
    note: str = ""

    @property
    def is_gpu(self) -> bool:
        return not self.name.startswith("tpu")


# Per chip (TPU) / per GPU; dense bf16 (no sparsity). Sources: Cloud TPU system architecture pages
# and NVIDIA data sheets (SXM parts).
DEVICES: dict[str, DeviceSpec] = {
    "tpu-v4": DeviceSpec("tpu-v4", 32 * GiB, 275e12, "TPU v4 chip, 32 GiB HBM2"),
    "tpu-v5e": DeviceSpec("tpu-v5e", 16 * GiB, 197e12, "TPU v5e (v5litepod) chip, 16 GiB HBM2"),
    "tpu-v5p": DeviceSpec("tpu-v5p", 95 * GiB, 459e12, "TPU v5p chip, 95 GiB HBM2e"),
    "tpu-v6e": DeviceSpec("tpu-v6e", 32 * GiB, 918e12, "TPU v6e (Trillium) chip, 32 GiB HBM"),
    "a100-80g": DeviceSpec("a100-80g", 80 * GiB, 312e12, "A100 80GB SXM"),
    "h100": DeviceSpec("h100", 80 * GiB, 989e12, "H100 80GB SXM"),
    "h200": DeviceSpec("h200", 141 * GiB, 989e12, "H200 141GB SXM"),
    "t4": DeviceSpec("t4", 15 * GiB, 65e12, "NVIDIA T4 16GB (about 15 GiB usable; fp16 peak: no bf16)"),
    "l4": DeviceSpec("l4", 22 * GiB, 121e12, "NVIDIA L4 24GB (about 22 GiB usable)"),
}
# The single chips of a Colab runtime (and a v5e-1): what "fits on one chip" is checked against.
SINGLE_CHIPS = ("tpu-v5e", "t4", "l4")
# JAX preallocates this fraction of a GPU's memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise.
GPU_DEFAULT_MEM_FRACTION = 0.75

# Concept dimensions when the data set is not read: they size only the trained values.
DEFAULT_CONCEPTS = "artist=23,style=27,genre=10"
# Tokens before <image> (BOS + the llava_v1 system prompt + " USER: ") for a LLaMA tokenizer:
# an estimate used when no tokenizer is at hand (it only moves the no-gradient prefix boundary).
ESTIMATED_PROMPT_HEAD = 35


# ----------------------------------------------------------------------------------------------
# model architecture


def tiny_llava_hf_config(size: str = "tiny") -> dict:
    """The HF config dict of ``converters.tiny_llava``'s random LLaVA of ``size`` (no torch needed)."""
    if size not in SIZES:
        raise ValueError(f"unknown tiny LLaVA size {size!r}; expected one of {sorted(SIZES)}")
    spec = SIZES[size]
    vision = dict(spec["vision"], model_type="clip_vision_model", hidden_act="quick_gelu")
    text = dict(spec["text"], model_type="llama", pad_token_id=0)
    n_patches = (vision["image_size"] // vision["patch_size"]) ** 2
    return {"model_type": "llava", "vision_config": vision, "text_config": text,
            "image_token_id": min(spec["image_token_id"], text["vocab_size"] - 1), "image_seq_length": n_patches}


def resolve_model(config, model: str | None = None):
    """-> ``(LlavaConfig, description)``. ``model``: a ``LLAVA_PRESETS`` name, ``tiny``/``small``
    (``converters.tiny_llava``), or an HF directory / ``config.json``. Default: the config's
    ``llava_checkpoint`` if its ``config.json`` exists, else the preset named like ``config.preset``."""
    def from_path(p: str):
        path = os.path.join(p, "config.json") if os.path.isdir(p) else p
        with open(path) as f:
            return LlavaConfig.from_hf(json.load(f)), f"HF config {path}"

    if model:
        if model in LLAVA_PRESETS:
            return LlavaConfig.from_hf(LLAVA_PRESETS[model]), f"{model} (preset)"
        if model in ("tiny", "small"):
            return LlavaConfig.from_hf(tiny_llava_hf_config(model)), f"{model} (converters.tiny_llava)"
        if os.path.exists(model):
            return from_path(model)
        raise ValueError(f"--model {model!r}: not a preset ({', '.join(LLAVA_PRESETS)}, tiny, small) "
                         f"nor an existing HF directory / config.json")
    ckpt = str(config.get("llava_checkpoint", "") or "")
    if ckpt and os.path.exists(os.path.join(ckpt, "config.json")):
        return from_path(ckpt)
    preset = str(config.get("preset", "") or "")
    if preset in LLAVA_PRESETS:
        return LlavaConfig.from_hf(LLAVA_PRESETS[preset]), f"{preset} (preset)"
    raise ValueError(f"cannot tell the model: config.llava_checkpoint={ckpt!r} has no config.json and the "
                     f"config preset {preset!r} is not one of {sorted(LLAVA_PRESETS)}; pass --model")


def parse_concepts(text: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``"artist=23,style=27"`` -> (dims, sizes)."""
    dims, sizes = [], []
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        name, sep, n = part.partition("=")
        if not sep or not n.strip().isdigit() or int(n) < 1:
            raise ValueError(f"concept dimension {part!r} is not of the form name=count (count >= 1)")
        dims.append(name.strip())
        sizes.append(int(n))
    if not dims:
        raise ValueError("no concept dimensions given")
    return tuple(dims), tuple(sizes)


def abstract_concept_llava(llava_cfg, gating_cfg, dtype=jnp.float32, param_dtype=jnp.float32,
                           quant: QuantConfig | None = None):
    """A shape-only :class:`~cgjax.concepts.model.ConceptLlava` (``nnx.eval_shape``: no arrays);
    ``quant``: the base's weights quantized as ``config.quantize`` asks."""
    return nnx.eval_shape(lambda: ConceptLlava(Llava(llava_cfg, dtype=dtype, param_dtype=param_dtype,
                                                     rngs=nnx.Rngs(0), quant=quant), gating_cfg, rngs=nnx.Rngs(0)))


def module_of(path: str) -> str:
    """Reporting group of a parameter path (``llava/`` dropped; the language model by sub-module)."""
    parts = path.split("/")
    if parts[0] == "llava":
        parts = parts[1:]
    if parts[0] == "language_model" and len(parts) > 1:
        return f"{parts[0]}.{parts[1]}"
    if parts[0] == "concepts" and len(parts) > 1:
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


# ----------------------------------------------------------------------------------------------
# sizes


def _mesh_sizes(mesh) -> dict[str, int]:
    return {k: int(v) for k, v in dict(mesh.shape).items()}


def nbytes(count: float, dtype) -> int:
    """Bytes of ``count`` elements of ``dtype`` (int4: two per byte)."""
    bits = 4 if np.dtype(dtype) in (np.dtype(jnp.int4), np.dtype(jnp.uint4)) else 8 * np.dtype(dtype).itemsize
    return int(-(-int(count) * bits // 8))


def per_device_bytes(shape: Sequence[int], dtype, spec, mesh) -> int:
    """Bytes of the largest shard of an array of ``shape`` sharded by ``spec`` over ``mesh``."""
    sizes = _mesh_sizes(mesh)
    n = 1
    entries = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
    for dim, e in zip(shape, entries):
        axes = (e,) if isinstance(e, str) else tuple(e or ())
        div = int(np.prod([sizes[a] for a in axes])) if axes else 1
        n *= -(-int(dim) // div)
    return nbytes(n, dtype)


def _var_spec(var, rules, mesh):
    axes = var.get_metadata().get("out_sharding")
    return sharding.logical_to_spec(axes, rules, mesh, np.shape(var.get_value()))


@dataclasses.dataclass
class ParamInfo:
    path: str
    shape: tuple[int, ...]
    dtype: Any
    trainable: bool
    spec: Any

    @property
    def count(self) -> int:
        return int(np.prod(self.shape))

    @property
    def is_scale(self) -> bool:
        """A quantized weight's scale (:mod:`cgjax.quantize`): memory, not a model parameter."""
        return self.path.endswith(SCALE_SUFFIX)


def param_table(model, trainable_patterns: Sequence[str], rules, mesh) -> list[ParamInfo]:
    filt = trainable_filter(tuple(trainable_patterns))
    out = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        v = var.get_value()
        out.append(ParamInfo(path_str(path), tuple(np.shape(v)), np.dtype(v.dtype), bool(filt(path, var)),
                             _var_spec(var, rules, mesh)))
    return out


def analytic_activation_bytes(llava_cfg, *, batch_per_device: int, seq_len: int, diff_len: int, tensor: int,
                              compute_dtype, prefix_cache: bool) -> int:
    """Residuals kept for the backward pass of the concept-values step, per device (an estimate).

    Frozen weights need no weight gradients, so a matmul keeps nothing; what is kept per
    differentiated token and layer: the two RMSNorm inputs (compute dtype + an fp32 copy), q, k, v,
    the fp32 attention probabilities over all ``seq_len`` keys plus their compute-dtype copy, and the
    SwiGLU gate / up / product; plus the no-gradient prefix's KV cache (``prefix_cache``) and the
    fp32 logits and their gradient. ``tensor`` divides heads, MLP and vocabulary.
    """
    t = llava_cfg.text_config
    c = np.dtype(compute_dtype).itemsize
    D, F, L, V = t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.vocab_size
    H, KV, hd = t.num_attention_heads, t.num_key_value_heads, t.head_dim
    per_tok_layer = (2 * D * (c + 4) + (H + 2 * KV) * hd * c / tensor + H * seq_len * (4 + c) / tensor
                     + 3 * F * c / tensor)
    residuals = per_tok_layer * diff_len * L
    cache = 2 * L * seq_len * KV * hd * c / tensor if prefix_cache else 0
    logits = diff_len * V * 8 / tensor
    v = llava_cfg.vision_config
    n_tok = v.grid[0] * v.grid[1] + 1
    vision_transient = v.heads * n_tok * n_tok * 4 + 4 * n_tok * v.mlp_dim * 4
    return int(batch_per_device * (residuals + cache + logits + vision_transient))


def plan_inference(params: Sequence[ParamInfo], llava_cfg, dev: DeviceSpec, amesh, b_div: int, tensor: int,
                   batch: int, length: int, cdt) -> dict[str, Any]:
    """Per-device memory of ``scripts/infer.py`` on this mesh (weights in their shardings, the
    generation batch and its KV cache sharded where they divide, the last logits), and the smallest
    ``fsdp=n`` mesh of this device that holds it when this one does not (weights split evenly: an
    estimate)."""
    weights = sum(per_device_bytes(p.shape, p.dtype, p.spec, amesh) for p in params)
    weights_total = sum(nbytes(p.count, p.dtype) for p in params)
    kv_total = kv_cache_bytes(llava_cfg.text_config, batch, length, cdt)
    kv_div = (b_div if batch % b_div == 0 else 1) * (tensor if llava_cfg.text_config.num_key_value_heads % tensor == 0
                                                     else 1)
    kv = -(-kv_total // kv_div)
    logits = batch * llava_cfg.text_config.vocab_size * 4 * 2
    total = weights + kv + logits
    out = {"batch": batch, "length": length, "weights": weights, "kv_cache": kv, "logits": logits, "total": total,
           "fits": total <= dev.hbm_bytes, "suggest": None, "suggest_total": None}
    if not out["fits"]:
        for n in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            est = -(-weights_total // n) + -(-kv_total // (n if batch % n == 0 else 1)) + logits
            if est <= dev.hbm_bytes:
                out["suggest"] = f"--config.mesh=fsdp={n} ({n} x {dev.name}, about {_gib(est)} per device)"
                out["suggest_total"] = est
                break
    return out


def kv_cache_bytes(text_cfg, batch: int, length: int, dtype) -> int:
    """Keys + values ``[L, B, KV, S, hd]`` (+ the bool slot mask) of :func:`cgjax.models.llama.init_cache`."""
    per = text_cfg.num_hidden_layers * batch * length * text_cfg.num_key_value_heads * text_cfg.head_dim
    return 2 * per * np.dtype(dtype).itemsize + batch * length


# ----------------------------------------------------------------------------------------------
# the plan


@dataclasses.dataclass
class Plan:
    config_spec: str
    stage: str
    model: str
    llava_cfg: Any
    device: DeviceSpec
    mesh: dict[str, int]
    n_devices: int
    dtype: str
    param_dtype: str
    quant: QuantConfig
    batch: int
    batch_per_device: int
    batch_sharded: bool
    grad_accum: int
    seq_len: int
    n_image_tokens: int
    n_concept_tokens: int
    text_tokens: int
    prefix_len: int
    prefix_estimated: bool
    n_concepts: int
    params: list[ParamInfo]
    memory: dict[str, int]
    activations_analytic: int
    activations_compiled: int | None
    compiled: dict[str, int] | None
    compile_note: str
    compile_seconds: float | None
    kv: dict[str, Any]
    inference: dict[str, Any]
    flops: dict[str, float]
    mfu: float
    warnings: list[str]
    notes: list[str]
    length: StageLength | None = None  # the stage's resolved length; None: epochs without --train-examples
    num_epochs: int = 0

    # -- derived ------------------------------------------------------------------------------
    @property
    def counts(self) -> dict[str, int]:
        """Parameters per module, in model order (vision tower, projector, language model, concepts)."""
        out: dict[str, int] = {}
        for p in self.params:
            if not p.is_scale:
                out[module_of(p.path)] = out.get(module_of(p.path), 0) + p.count
        order = ("vision_tower", "multi_modal_projector", "language_model.embed_tokens", "language_model.layers",
                 "language_model.norm", "language_model.lm_head", "concepts")
        rank = lambda k: next((i for i, o in enumerate(order) if k.startswith(o)), len(order))  # noqa: E731
        return dict(sorted(out.items(), key=lambda kv: (rank(kv[0]), kv[0])))

    @property
    def n_total(self) -> int:
        return sum(p.count for p in self.params if not p.is_scale)

    @property
    def n_llava(self) -> int:
        return sum(p.count for p in self.params if not p.path.startswith("concepts/") and not p.is_scale)

    @property
    def n_trainable(self) -> int:
        return sum(p.count for p in self.params if p.trainable)

    @property
    def activations(self) -> int:
        return self.activations_compiled if self.activations_compiled is not None else self.activations_analytic

    @property
    def activations_source(self) -> str:
        if self.activations_compiled is not None:
            return "compiled"
        return "analytic"

    @property
    def total_per_device(self) -> int:
        m = self.memory
        return (m["params_frozen"] + m["params_trainable"] + m["opt_state"] + m["batch"] + self.activations
                + m.get("outputs", 0))

    @property
    def step_seconds(self) -> float:
        return self.flops["total"] / (self.n_devices * self.device.peak_bf16_flops * self.mfu)

    @property
    def fits(self) -> bool:
        return self.total_per_device <= self.device.hbm_bytes

    @property
    def total_analytic(self) -> int:
        """:attr:`total_per_device` with the analytic activations (what an accelerator keeps)."""
        return self.total_per_device - self.activations + self.activations_analytic

    def single_chip_fits(self) -> list[tuple[DeviceSpec, bool, bool, bool]]:
        """For a one-device plan: ``(chip, stage step fits, stage step fits with the analytic
        activations, inference fits)`` on each of :data:`SINGLE_CHIPS` (the per-device figures do
        not depend on the chip)."""
        if self.n_devices != 1:
            return []
        return [(DEVICES[d], self.total_per_device <= DEVICES[d].hbm_bytes, self.total_analytic <= DEVICES[d].hbm_bytes,
                 self.inference["total"] <= DEVICES[d].hbm_bytes) for d in SINGLE_CHIPS]


def _prompt_head_len(config, llava_cfg) -> tuple[int, bool]:
    """Tokens before ``<image>`` with the checkpoint's tokenizer, else an estimate (``True``)."""
    ckpt = str(config.get("llava_checkpoint", "") or "")
    if ckpt and any(os.path.exists(os.path.join(ckpt, f)) for f in ("tokenizer.json", "tokenizer.model")):
        try:
            from transformers import AutoTokenizer  # optional [torch] extra


            tok = AutoTokenizer.from_pretrained(ckpt)
            probe = text.encode(tok, text.STAGE_A_PROMPT, 1, llava_cfg.image_token_id, "x")
            return int(np.argmax(np.asarray(probe.input_ids) == llava_cfg.image_token_id)), False
        except Exception:  # noqa: BLE001 - fall back to the estimate
            pass
    return ESTIMATED_PROMPT_HEAD, True


def resolve_mesh_shape(text: str, n_devices: int | None) -> dict[str, int]:
    """``"fsdp=-1"`` + a device count -> every axis sized (``data``/``fsdp``/``tensor``)."""
    shape = {ax: 1 for ax in sharding.MESH_AXES}
    given = sharding.parse_mesh(text or "data=-1")
    unknown = set(given) - set(sharding.MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {sharding.MESH_AXES}")
    shape.update(given)
    free = [a for a, s in shape.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh {text!r}: at most one axis may be -1")
    fixed = int(np.prod([s for s in shape.values() if s != -1]))
    if free:
        if not n_devices:
            raise ValueError(f"mesh {text!r} has a -1 axis: give the device count (--num-devices)")
        if n_devices % fixed:
            raise ValueError(f"mesh {text!r}: {n_devices} devices do not divide by {fixed}")
        shape[free[0]] = n_devices // fixed
    elif n_devices and fixed != n_devices:
        raise ValueError(f"mesh {text!r} has {fixed} devices, --num-devices says {n_devices}")
    if any(s < 1 for s in shape.values()):
        raise ValueError(f"mesh sizes must be >= 1, got {shape}")
    return shape


def _abstract_tree(tree, sharding_of):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_of(x)), tree)


def compile_train_step(model, config, sc, rules, mesh_shape: Mapping[str, int], batch: int, seq_len: int,
                       n_concepts: int, with_reg: bool, probe_rows: int | None = None):
    """Lower and compile the trainer's ``_train_step`` on abstract arguments over a mesh of the
    visible devices; -> ``(memory_analysis stats dict, seconds)``. With ``probe_rows`` (the
    differentiated length), ``stats["global_batch_tensor"]`` names a per-device tensor that still
    has the global batch on its rows axis (the partitioner did not shard the batch there), or ""."""
    n = int(np.prod(list(mesh_shape.values())))
    devices = jax.devices()
    if len(devices) < n:
        raise RuntimeError(f"the mesh needs {n} devices and {len(devices)} are visible "
                           f"(scripts/plan.py asks for {n} CPU stand-ins before JAX starts)")
    mesh = sharding.make_mesh(dict(mesh_shape), devices[:n])
    filt = trainable_filter(tuple(config.trainable))
    graphdef, trainable, frozen = nnx.split(model, filt, ...)

    def placed(state):
        shard = nnx.to_pure_dict(sharding.state_shardings(state, mesh, rules))
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=canonical_sharding(s, mesh)),
                            nnx.to_pure_dict(state), shard)

    params, frozen_abs = placed(trainable), placed(frozen)
    replicated = canonical_sharding(NamedSharding(mesh, PartitionSpec()), mesh)
    opt = jax.eval_shape(make_optimizer(sc).init, params)
    like = {(x.shape, x.dtype): x.sharding for x in jax.tree.leaves(params)}
    opt = _abstract_tree(opt, lambda x: like.get((x.shape, x.dtype), replicated))
    state = {"params": params, "opt_state": opt, "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
             "rng": _abstract_tree(jax.eval_shape(lambda: jax.random.PRNGKey(0)), lambda x: replicated)}
    shardings = tuple(x.sharding for x in jax.tree.leaves(state))
    v = model.llava.config.vision_config
    hw = (v.image_size, v.image_size) if isinstance(v.image_size, int) else tuple(v.image_size)
    shapes = {"input_ids": ((batch, seq_len), jnp.int32), "labels": ((batch, seq_len), jnp.int32),
              "segment_ids": ((batch, seq_len), jnp.int32), "attention_mask": ((batch, seq_len), jnp.int32),
              "pixel_values": ((batch, 3) + hw, jnp.float32), "scores": ((batch, n_concepts), jnp.float32)}
    batch_abs = {}
    for k, (shape, dt) in shapes.items():
        spec = sharding.logical_to_spec(("batch",) + (None,) * (len(shape) - 1), rules, mesh, shape)
        batch_abs[k] = jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, spec))
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):  # as Trainer.train_step: activations constrained to the batch sharding
        lowered = train_step.lower(graphdef, sc, bool(with_reg), shardings, state, frozen_abs, batch_abs,
                                          jax.ShapeDtypeStruct((2,), jnp.int32))
    # LLVM's optimisation level changes the machine code only, not XLA's buffer assignment (the
    # memory analysis is the same): level 0 halves the CPU compile time
    compiled = lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
    ma = compiled.memory_analysis()
    seconds = time.perf_counter() - t0
    if ma is None:
        raise RuntimeError("this backend gives no memory analysis")
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
    stats = {k: int(getattr(ma, k, 0) or 0) for k in keys}
    stats["global_batch_tensor"] = ""
    if probe_rows and n > 1:  # a per-device tensor [.., B_global, rows, ..]: the batch is not sharded there
        try:
            hit = re.search(rf"\b(?:bf16|f32|f16)\[(?:\d+,)?{batch},{int(probe_rows)},\d+\]", compiled.as_text())
            stats["global_batch_tensor"] = hit.group(0) if hit else ""
        except Exception:  # noqa: BLE001 - as_text is a diagnostic only
            pass
    return stats, seconds


def make_plan(config, *, config_spec: str = "", mesh: str | Mapping[str, int] | None = None,
              device: str = "tpu-v5e", num_devices: int | None = None, model: str | None = None,
              concepts: str = DEFAULT_CONCEPTS, mfu: float = 0.4, gen_batch: int | None = None,
              gen_len: int | None = None, compile: bool = True,  # noqa: A002 - the natural name
              train_examples: int | None = None) -> Plan:
    """Everything :func:`format_plan` prints, from shapes only (see the module docstring).
    ``train_examples``: the training split's size, which turns ``config.num_epochs`` into steps."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; expected one of {sorted(DEVICES)}")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    dev = DEVICES[device]
    stage = str(config.get("stage", "A"))
    llava_cfg, model_desc = resolve_model(config, model)
    mesh_shape = dict(mesh) if isinstance(mesh, Mapping) else resolve_mesh_shape(mesh or str(config.mesh), num_devices)
    for ax in sharding.MESH_AXES:
        mesh_shape.setdefault(ax, 1)
    n_dev = int(np.prod(list(mesh_shape.values())))
    amesh = AbstractMesh(tuple(mesh_shape[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)
    rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.sharding_rules)

    dims, sizes = parse_concepts(concepts)
    names = tuple(tuple(f"{d}_{i}" for i in range(n)) for d, n in zip(dims, sizes))
    index = ConceptIndex(dims, names, int(config.gating.k_max))
    gcfg = gating_config(config, index)
    cdt, pdt = dtype_from_name(config.dtype), dtype_from_name(config.param_dtype)
    quant = QuantConfig.from_config(config)
    abstract = abstract_concept_llava(llava_cfg, gcfg, cdt, pdt, quant)
    params = param_table(abstract, tuple(config.trainable), rules, amesh)
    if not any(p.trainable for p in params):
        raise ValueError(f"config.trainable {tuple(config.trainable)} matches no parameter")

    n_img = llava_cfg.num_image_tokens
    text_tokens = int(config.text.max_text_tokens)
    seq_len = text_tokens + n_img + gcfg.n_tokens
    head, head_est = _prompt_head_len(config, llava_cfg)
    prefix_len = prefix_length([p.path for p in params if p.trainable], head, n_img)
    diff_len = seq_len - prefix_len
    batch = int(config.batch_size)
    bspec = sharding.logical_to_spec(("batch",), rules, amesh)  # the rule, before the divisibility check
    b_axes = (bspec[0],) if isinstance(bspec[0], str) else tuple(bspec[0] or ())
    b_div = int(np.prod([mesh_shape[a] for a in b_axes])) if b_axes else 1
    batch_dev = batch // b_div if batch % b_div == 0 else batch  # the trainer replicates a batch that does not divide
    tensor = int(mesh_shape["tensor"])

    # memory per device from the shapes
    frozen_b = sum(per_device_bytes(p.shape, p.dtype, p.spec, amesh) for p in params if not p.trainable)
    train_b = sum(per_device_bytes(p.shape, p.dtype, p.spec, amesh) for p in params if p.trainable)
    tparams = {p.path: jax.ShapeDtypeStruct(p.shape, p.dtype) for p in params if p.trainable}
    spec_of = {(p.shape, np.dtype(p.dtype)): p.spec for p in params if p.trainable}
    check_stage_length(config)  # exactly one of num_steps / num_epochs, as the trainer checks
    epochs = int(config.get("num_epochs", 0))
    length = stage_length(config, train_examples) if (train_examples or not epochs) else None
    # without the training set size a stage in epochs has no step count: a placeholder length for a
    # cosine schedule (it changes no figure here)
    sc = StepConfig.from_config(config, prefix_len, num_steps=length.steps if length else 1)
    opt = jax.eval_shape(make_optimizer(sc).init, tparams)
    opt_b = sum(per_device_bytes(x.shape, x.dtype, spec_of.get((tuple(x.shape), np.dtype(x.dtype)), ()), amesh)
                for x in jax.tree.leaves(opt))
    v = llava_cfg.vision_config
    hw = (v.image_size, v.image_size) if isinstance(v.image_size, int) else tuple(v.image_size)
    per_row = 4 * seq_len * 4 + 3 * hw[0] * hw[1] * 4 + gcfg.n_concepts * 4
    batch_b = batch_dev * per_row
    memory = {"params_frozen": frozen_b, "params_trainable": train_b, "opt_state": opt_b, "batch": batch_b}
    act_analytic = analytic_activation_bytes(llava_cfg, batch_per_device=batch_dev, seq_len=seq_len,
                                             diff_len=diff_len, tensor=tensor, compute_dtype=cdt,
                                             prefix_cache=prefix_len > 0)

    warnings: list[str] = []
    notes: list[str] = []
    compiled, act_compiled, secs = None, None, None
    with_reg = float(config.loss.reg_lambda) > 0 and int(config.loss.attn_reg_interval) > 0
    if compile:
        try:
            compiled, secs = compile_train_step(abstract, config, sc, rules, mesh_shape, batch, seq_len,
                                                gcfg.n_concepts, with_reg,
                                                probe_rows=diff_len if batch_dev < batch else None)
            act_compiled = compiled["temp_size_in_bytes"]
            memory["outputs"] = max(0, compiled["output_size_in_bytes"] - compiled["alias_size_in_bytes"])
            platform = jax.devices()[0].platform
            compile_note = (f"XLA memory analysis of the compiled train step ({'with' if with_reg else 'without'} "
                            f"the attention regulariser) on {n_dev} {platform.upper()} devices")
            if platform == "cpu":
                compile_note += " standing in for the accelerator"
        except Exception as e:  # noqa: BLE001 - the analytic estimate still stands; say why
            compile_note = f"compiled analysis unavailable ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    else:
        compile_note = "compiled analysis skipped (--no-compile)"

    if b_div > 1 and batch % b_div:
        notes.append(f"batch {batch} does not divide over the batch mesh axes ({'*'.join(b_axes)}={b_div}): "
                     f"the trainer replicates it, every device computes all {batch} rows (the step time above assumes "
                     f"the work splits over the devices)")
    if compiled and compiled.get("global_batch_tensor"):
        notes.append(f"the compiled step holds the whole global batch on every device (per-device "
                        f"tensor {compiled['global_batch_tensor']}): the partitioner did not keep the activations "
                        f"sharded over {'*'.join(b_axes)}: each device processes all {batch} rows (split along the "
                        f"hidden dimension at best), so activation memory and step time do not shrink with the "
                        f"batch axes; activation sharding constraints in the model/step would fix it")
    elif act_compiled is not None and act_analytic > 0 and act_compiled > 2.5 * act_analytic:
        notes.append(f"the compiled step keeps {act_compiled / act_analytic:.1f}x the analytic activations: the "
                     f"partitioner may not keep the activations sharded over the batch (look for batch-sized "
                     f"all-reduces in the HLO), or XLA:CPU holds bf16 intermediates in fp32")

    # generation KV cache (the trainer's validation / greedy decoding)
    gb = int(gen_batch if gen_batch is not None else config.val.batch_size)
    gl = int(gen_len if gen_len is not None else seq_len + int(config.val.max_new_tokens))
    kv_total = kv_cache_bytes(llava_cfg.text_config, gb, gl, cdt)
    kv_div = (b_div if gb % b_div == 0 else 1) * (tensor if llava_cfg.text_config.num_key_value_heads % tensor == 0 else 1)
    kv_shard = -(-kv_total // kv_div)
    kv = {"batch": gb, "length": gl, "dtype": str(np.dtype(cdt)), "total": kv_total, "replicated": kv_total,
          "sharded": kv_shard}

    inference = plan_inference(params, llava_cfg, dev, amesh, b_div, tensor, gb, gl, cdt)

    # FLOPs: the trainer's accounting + attention
    counts = param_counts(nnx.state(abstract))
    n_dense = 0 if prefix_len else sum(p.count for p in params if p.trainable)
    t = llava_cfg.text_config
    max_targets = sc.max_targets
    model_flops = step_flops(counts, batch, seq_len, n_img, v.grid[0] * v.grid[1], n_dense,
                             head_params=0 if t.tie_word_embeddings else t.hidden_size * t.vocab_size,
                             diff_len=diff_len, logit_positions=max_targets or None)
    att = attention_flops(llava_cfg, batch, seq_len, diff_len if prefix_len else seq_len)
    flops = {"model": float(model_flops), "attention": att["total"], "total": float(model_flops) + att["total"],
             "attention_lm_forward": att["lm_forward"], "attention_lm_backward": att["lm_backward"],
             "attention_vision": att["vision_forward"], "n_lm": float(counts["lm"])}

    plan = Plan(config_spec=config_spec, stage=stage, model=model_desc, llava_cfg=llava_cfg, device=dev,
                mesh=mesh_shape, n_devices=n_dev, dtype=str(config.dtype), param_dtype=str(config.param_dtype),
                quant=quant,
                batch=batch, batch_per_device=batch_dev, batch_sharded=batch % b_div == 0 and b_div > 1,
                grad_accum=int(config.grad_accum), seq_len=seq_len, n_image_tokens=n_img,
                n_concept_tokens=gcfg.n_tokens, text_tokens=text_tokens, prefix_len=prefix_len,
                prefix_estimated=head_est and prefix_len > 0, n_concepts=gcfg.n_concepts, params=params,
                memory=memory, activations_analytic=act_analytic, activations_compiled=act_compiled,
                compiled=compiled, compile_note=compile_note, compile_seconds=secs, kv=kv, inference=inference,
                flops=flops, mfu=mfu,
                warnings=warnings, notes=notes, length=length, num_epochs=epochs)

    total = plan.total_per_device
    if total > dev.hbm_bytes:
        warnings.append(f"WARNING: does not fit: {_gib(total)} per device needed ({plan.activations_source} "
                        f"activations), {dev.name} has {_gib(dev.hbm_bytes)} ({100 * total / dev.hbm_bytes:.0f}%). "
                        f"Shard more (a larger fsdp axis), lower config.batch_size, or shorten the sequence.")
    elif dev.is_gpu and total > GPU_DEFAULT_MEM_FRACTION * dev.hbm_bytes:
        warnings.append(f"WARNING: {_gib(total)} per device is over JAX's default GPU preallocation "
                        f"({GPU_DEFAULT_MEM_FRACTION:.0%} of {_gib(dev.hbm_bytes)}): set "
                        f"XLA_PYTHON_CLIENT_MEM_FRACTION=.95 before launching")
    if not inference["fits"]:
        warnings.append(f"WARNING: inference (scripts/infer.py, batch {gb} x {gl}) does not fit on this mesh: "
                        f"{_gib(inference['total'])} per device of {_gib(dev.hbm_bytes)}; "
                        + (f"{inference['suggest']} holds it" if inference["suggest"] else "no fsdp mesh up to 256 "
                           "chips holds it: lower generation.batch_size"))
    gen_total = frozen_b + train_b + kv_total
    if gen_total > dev.hbm_bytes:
        warnings.append(f"WARNING: generation (validation) does not fit: parameters + a replicated KV cache of "
                        f"batch {gb} x {gl} need {_gib(gen_total)} per device of {_gib(dev.hbm_bytes)}; lower "
                        f"config.val.batch_size")
    return plan


# ----------------------------------------------------------------------------------------------
# printing


def _gib(n: float) -> str:
    if n < 0.1 * GiB:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / GiB:.2f} GiB"


def _hw(x) -> str:
    x = (x, x) if isinstance(x, int) else tuple(x)
    return str(x[0]) if x[0] == x[1] else f"{x[0]}x{x[1]}"


def _flops(x: float) -> str:
    for unit, s in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= s:
            return f"{x / s:.3g} {unit}"
    return f"{x:.3g} FLOP"


def _seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _duration(s: float) -> str:
    return _seconds(s) if s < 60 else f"{s / 60:.1f} min" if s < 3600 else f"{s / 3600:.1f} h"


def format_plan(p: Plan) -> str:
    t, v = p.llava_cfg.text_config, p.llava_cfg.vision_config
    mesh = ",".join(f"{k}={s}" for k, s in p.mesh.items())
    lines = [
        f"cgjax launch plan: {p.config_spec or '(config)'}  [stage {p.stage}]",
        f"model     {p.model}: CLIP {v.width}w x {v.layers}L, {_hw(v.image_size)}px / patch {_hw(v.patch_size)}; "
        f"LLaMA {t.hidden_size}d x {t.num_hidden_layers}L, {t.num_attention_heads} heads "
        f"({t.num_key_value_heads} KV), FFN {t.intermediate_size}, vocab {t.vocab_size}",
        f"dtypes    compute {p.dtype}, frozen weights {p.param_dtype}"
        + (f" (language model and projector: {p.quant.mode}"
           + (f" in groups of {p.quant.group_size}" if p.quant.mode == "int4" else " per output channel")
           + (", int8 activations" if p.quant.activations else "") + ")" if p.quant.enabled else "")
        + ", trained values float32",
        f"device    {p.device.name}: {_gib(p.device.hbm_bytes)} HBM, {p.device.peak_bf16_flops / 1e12:.0f} TFLOP/s "
        f"bf16 peak ({p.device.note})",
        f"mesh      {mesh} ({p.n_devices} devices)",
        f"batch     {p.batch} sequences/step ({p.batch_per_device} per device"
        f"{'' if p.batch_sharded or p.n_devices == 1 else ', replicated'}), grad_accum {p.grad_accum}; "
        f"sequence {p.seq_len} = {p.n_image_tokens} image + {p.n_concept_tokens} concept slots + "
        f"{p.text_tokens} text",
        "length    " + (p.length.describe() if p.length else
                         f"{p.num_epochs} epochs (config.num_epochs): --train-examples N (the training split's "
                         f"size) gives the steps"),
    ]
    if p.prefix_len:
        lines.append(f"          no-gradient prefix {p.prefix_len} tokens (prompt head + image), "
                     f"{p.seq_len - p.prefix_len} differentiated"
                     + (" [prompt head estimated: no tokenizer at hand]" if p.prefix_estimated else ""))
    lines += ["", f"parameters {'':34}{'count':>15} {'trainable':>15}"]
    trainable_by: dict[str, int] = {}
    for q in p.params:
        if q.trainable:
            trainable_by[module_of(q.path)] = trainable_by.get(module_of(q.path), 0) + q.count
    for name, n in p.counts.items():
        tr = trainable_by.get(name, 0)
        lines.append(f"  {name:42}{n:>15,} {(f'{tr:,}' if tr else '-'):>15}")
    lines.append(f"  {'LLaVA (without the concept values)':42}{p.n_llava:>15,}")
    lines.append(f"  {'total':42}{p.n_total:>15,} {p.n_trainable:>15,}")

    m = p.memory
    lines += ["", f"memory per device {'':27}{'':>15}"]
    rows = [(f"parameters, frozen ({p.param_dtype})", m["params_frozen"]),
            ("parameters, trained (float32)", m["params_trainable"]),
            ("optimizer state (AdamW moments + accumulated grads)", m["opt_state"]),
            ("batch (ids, labels, masks, pixels, scores)", m["batch"])]
    if m.get("outputs", 0) > 2**20:
        rows.append(("step outputs not aliased to inputs", m["outputs"]))
    for name, b in rows:
        lines.append(f"  {name:52}{_gib(b):>12}")
    a_src = "compiled" if p.activations_compiled is not None else "analytic estimate"
    lines.append(f"  {'activations + temporaries (' + a_src + ')':52}{_gib(p.activations):>12}")
    if p.activations_compiled is not None:
        lines.append(f"  {'  (analytic estimate)':52}{_gib(p.activations_analytic):>12}")
    lines.append(f"  {'total':52}{_gib(p.total_per_device):>12}   of {_gib(p.device.hbm_bytes)} "
                 f"({100 * p.total_per_device / p.device.hbm_bytes:.0f}%)")
    src = p.compile_note + (f", compiled in {p.compile_seconds:.1f} s" if p.compile_seconds else "")
    lines.append(f"  activations from: {src}")
    if p.compiled:
        c = p.compiled
        lines.append(f"  compiled: arguments {_gib(c['argument_size_in_bytes'])} (from the shapes: "
                     f"{_gib(m['params_frozen'] + m['params_trainable'] + m['opt_state'] + m['batch'])}), "
                     f"temporaries {_gib(c['temp_size_in_bytes'])}, outputs {_gib(c['output_size_in_bytes'])} "
                     f"({_gib(c['alias_size_in_bytes'])} donated)")
    kv = p.kv
    lines += ["", f"generation KV cache (batch {kv['batch']}, length {kv['length']}, {kv['dtype']}): "
              f"{_gib(kv['total'])} in all; per device {_gib(kv['replicated'])} replicated (the trainer's "
              f"validation), {_gib(kv['sharded'])} if the batch and KV heads shard"]

    inf = p.inference
    lines += ["", f"inference (scripts/infer.py on this mesh, generation batch {inf['batch']} x {inf['length']} "
              f"tokens), per device:",
              f"  {'weights (in their shardings)':52}{_gib(inf['weights']):>12}",
              f"  {'KV cache (batch and KV heads sharded where they divide)':52}{_gib(inf['kv_cache']):>12}",
              f"  {'logits of the last position':52}{_gib(inf['logits']):>12}",
              f"  {'total':52}{_gib(inf['total']):>12}   of {_gib(p.device.hbm_bytes)}: "
              + ("fits" if inf["fits"] else "does NOT fit" + (f"; {inf['suggest']} holds it" if inf["suggest"]
                                                              else ""))]

    f = p.flops
    lines += ["", "FLOPs per step (frozen LLaVA, trained concept values):",
              f"  matmuls {_flops(f['model'])}: forward 2*N*tokens (vision tower on its patches, projector on "
              f"the image tokens, LM N={int(f['n_lm']):,} on {p.seq_len} tokens x {p.batch}); backward 2*N_LM*tokens (activation gradients only: frozen weights get no weight "
              f"gradients) on the differentiated rows only, lm_head only at the supervised positions "
              f"(cgjax.flops.step_flops)",
              f"  attention {_flops(f['attention'])}: 4*T*S*H*hd per layer forward (LM "
              f"{_flops(f['attention_lm_forward'])}, vision {_flops(f['attention_vision'])}), backward 2x "
              f"forward on the differentiated rows ({_flops(f['attention_lm_backward'])})",
              f"  total {_flops(f['total'])} per step, {_flops(f['total'] / p.n_devices)} per device",
              f"  expected step time at {p.mfu:.0%} MFU: {_seconds(p.step_seconds)} "
              f"({p.batch * p.seq_len / p.step_seconds:,.0f} tokens/s; an optimizer update every {p.grad_accum} "
              f"steps: {_seconds(p.step_seconds * p.grad_accum)})"]
    if p.length:
        lines.append(f"  the stage, {p.length.steps:,} steps: {_duration(p.step_seconds * p.length.steps)} at that MFU")
    chips = p.single_chip_fits()
    if chips:
        yes = lambda ok: "fits" if ok else "does NOT fit"  # noqa: E731
        both = (f" ({p.activations_source} activations), {_gib(p.total_analytic)} (analytic activations)"
                if p.activations_compiled is not None else " (analytic activations)")
        lines += ["", f"one chip (Colab / v5e-1): Stage {p.stage} step {_gib(p.total_per_device)}{both}; inference "
                  f"{_gib(p.inference['total'])}"]
        for dev, train_ok, analytic_ok, infer_ok in chips:
            lines.append(f"  {dev.name:8} {_gib(dev.hbm_bytes):>10}: Stage {p.stage} {yes(train_ok)}"
                         + (f" ({yes(analytic_ok)} with the analytic activations)" if p.activations_compiled is not None
                            else "") + f", inference {yes(infer_ok)}")
        if p.activations_compiled is not None and p.dtype != "float32":
            lines.append("  (XLA:CPU's memory analysis also counts an fp32 copy of every bf16 / int8 / int4 weight it "
                         "multiplies, which TPU and GPU matmuls do not make: on an accelerator, trust the analytic line)")
    if p.notes:
        lines.append("")
        lines += [f"note: {n}" for n in p.notes]
    lines.append("")
    if p.warnings:
        lines += p.warnings
    else:
        lines.append(f"OK: fits, {_gib(p.device.hbm_bytes - p.total_per_device)} per device to spare")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# CLI


PROG = "scripts/plan.py"


def define_flags(fv: flags.FlagValues, argv: Sequence[str] | None = None) -> None:
    """The planner's flags on ``fv`` (see :mod:`cgjax.commandline`); config fields are overridden
    as for ``scripts/train.py``: ``--config.batch_size=16 --config.text.max_text_tokens=128``."""
    config_flags.DEFINE_config_file("config", None, "config spec, e.g. configs/stageA.py:preset=llava-1.5-7b; "
                                    "override fields with --config.FIELD=VALUE", flag_values=fv, sys_argv=argv)
    flags.mark_flag_as_required("config", flag_values=fv)
    flags.DEFINE_string("mesh", None, "data=A,fsdp=B,tensor=C (default: the config's mesh)", flag_values=fv)
    flags.DEFINE_integer("num-devices", None, "device count for a mesh with a -1 axis (default 8)", flag_values=fv)
    flags.DEFINE_enum("device", "tpu-v5e", sorted(DEVICES), "accelerator kind", flag_values=fv)
    flags.DEFINE_string("model", None, "LLaVA architecture: a preset (llava-1.5-7b, llava-1.5-13b), tiny/small, "
                        "or an HF dir", flag_values=fv)
    flags.DEFINE_string("concepts", DEFAULT_CONCEPTS, "concept dimensions name=count,... (size the trained "
                        "values)", flag_values=fv)
    flags.DEFINE_integer("train-examples", None, "training split size: turns config.num_epochs into steps",
                         flag_values=fv)
    flags.DEFINE_float("mfu", 0.4, "model FLOPs utilisation for the step time", flag_values=fv)
    flags.DEFINE_integer("gen-batch", None, "KV cache batch (default config.val.batch_size)", flag_values=fv)
    flags.DEFINE_integer("gen-len", None, "KV cache length (default sequence + config.val.max_new_tokens)",
                         flag_values=fv)
    flags.DEFINE_bool("no-compile", False, "analytic activations only (no XLA compile)", flag_values=fv)
    flags.DEFINE_bool("strict", False, "exit status 1 when a WARNING is printed", flag_values=fv)
    flags.DEFINE_string("json", None, "also write the numbers to this JSON file", flag_values=fv)
    flags.DEFINE_multi_string("set", [], "removed: override config fields with --config.FIELD=VALUE",
                              flag_values=fv)
    flags.register_validator("set", lambda v: not v, flag_values=fv,
                             message="--set is gone: override config fields as scripts/train.py does, "
                                     "e.g. --config.batch_size=16 --config.text.max_text_tokens=128")


def mesh_devices_needed(mesh: str, num_devices: int | None = None) -> int:
    """Devices a plan on ``mesh`` compiles on: its size, or ``num_devices`` (default 8) where an axis is -1."""
    sizes = list((sharding.parse_mesh(mesh) or {"data": -1}).values())
    if -1 in sizes:
        return int(num_devices or 8)
    return max(1, int(np.prod(sizes)))


def use_cpu_stand_ins(n: int) -> None:
    """Compile on ``n`` CPU devices standing in for the accelerators: sets ``XLA_FLAGS`` and JAX's
    platform, so it must run before anything starts a JAX backend (parsing flags and reading the
    config do not)."""
    xla = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{xla} --xla_force_host_platform_device_count={max(1, int(n))}".strip()
    jax.config.update("jax_platforms", "cpu")


def to_json(p: Plan) -> dict:
    return {"config": p.config_spec, "model": p.model, "device": p.device.name, "mesh": p.mesh,
            "n_devices": p.n_devices, "batch": p.batch, "seq_len": p.seq_len, "params": p.counts,
            "n_llava": p.n_llava, "n_total": p.n_total, "n_trainable": p.n_trainable, "memory": p.memory,
            "activations": p.activations, "activations_source": p.activations_source,
            "activations_analytic": p.activations_analytic, "compiled": p.compiled,
            "total_per_device": p.total_per_device, "hbm": p.device.hbm_bytes, "fits": p.fits, "kv_cache": p.kv,
            "inference": p.inference, "quantize": p.quant.to_json(),
            "total_analytic": p.total_analytic,
            "single_chip": {d.name: {"hbm": d.hbm_bytes, "stage_fits": t, "stage_fits_analytic": a,
                                     "inference_fits": i} for d, t, a, i in p.single_chip_fits()},
            "flops": p.flops, "mfu": p.mfu, "step_seconds": p.step_seconds,
            "num_steps": p.length.steps if p.length else None, "updates": p.length.updates if p.length else None,
            "num_epochs": p.num_epochs, "warnings": p.warnings,
            "notes": p.notes}


def run(fv: flags.FlagValues, *, stand_ins: bool = False) -> int:
    """Plan from the parsed flags of :func:`define_flags`, print it (and ``--json``); the exit status.
    ``stand_ins``: first ask for the mesh's CPU stand-in devices (:func:`use_cpu_stand_ins`), as
    ``scripts/plan.py`` does before any JAX backend starts."""
    config = fv.config
    mesh = fv.mesh or str(config.mesh)
    n = fv["num-devices"].value
    if n is None and -1 in (sharding.parse_mesh(mesh) or {"data": -1}).values():
        n = 8
    if stand_ins:
        use_cpu_stand_ins(mesh_devices_needed(mesh, n))
    plan = make_plan(config, config_spec=fv["config"].config_filename, mesh=mesh, device=fv.device,
                     num_devices=n, model=fv.model, concepts=fv.concepts, mfu=fv.mfu,
                     gen_batch=fv["gen-batch"].value, gen_len=fv["gen-len"].value, compile=not fv["no-compile"].value,
                     train_examples=fv["train-examples"].value)
    print(format_plan(plan))
    if fv.json:
        with open(fv.json, "w") as f:
            json.dump(to_json(plan), f, indent=2, default=str)
    return 1 if (fv.strict and plan.warnings) else 0


def main(argv: Sequence[str]) -> int:
    """``scripts/plan.py``'s command line, in this process (on the devices JAX already has):
    ``main(["--config", "configs/stageA.py:preset=demo", "--config.batch_size=16", "--no-compile"])``."""
    return run(commandline.parse(define_flags, argv, PROG))
