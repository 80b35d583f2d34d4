"""Staged training of the gated concept tokens (Stage A: key lines; Stage B: keys + reasoning).

``train_stage(config, workdir) -> dict`` (``scripts/train.py --config configs/stageA.py``) runs one
stage: the loop's orchestration. :class:`Trainer` sets the stage up -- a frozen LLaVA (HF or
params-only orbax checkpoint) wrapped in :class:`~cgjax.concepts.model.ConceptLlava`, split into
trained and frozen state by the ``config.trainable`` regexes, the mesh, the data through the grain
pipeline with :class:`~cgjax.text_rows.TextRows`, and validation. The compiled steps and their
settings are :mod:`cgjax.steps`; checkpoint layout and restore :mod:`cgjax.checkpoints`;
preemption and multi-host state :mod:`cgjax.multihost`; ``metrics.jsonl``/TensorBoard
:mod:`cgjax.metrics_log`; the ``.pt`` export :func:`cgjax.export.write_values_pt`.

Work directory::

    checkpoints/           orbax CheckpointManager (latest N + best N by validation key accuracy):
                           state = trained params, optimizer state, step, RNG;
                           meta  = grain iterator state, concept index, validation metrics
    concepts_stage{A,B}.pt the original's format {step: {"values": Tensor}} (torch.load(weights_only=True))
    concepts_stage{A,B}.json  its metadata: dimensions, concept names, ranges, K_max (the original had none)
    metrics.jsonl          one JSON line per train step and per validation
    tensorboard/           tensorboardX event files
    provenance.json        stage, base and data fingerprints, the resolved config

Resuming from the latest checkpoint gives bit-identical losses; SIGTERM saves and exits cleanly;
a NaN/inf loss or gradient stops the run (``FloatingPointError``) without applying that step, leaving
the last good checkpoint intact.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from cgjax import checkpoints, multihost, persistence, provenance, quantize, sharding, text
from cgjax.concepts.index import ConceptIndex, concept_index_from_vocabs, gating_config
from cgjax.concepts.model import ConceptLlava
from cgjax.config import check_choices, check_input_paths, config_paths
from cgjax.data.pipeline import PackedSource, image_dataset, split_sources
from cgjax.data.splits import SplitPolicy
from cgjax.demo_assets import ensure_demo_assets
from cgjax.export import write_values_pt
from cgjax.flops import param_counts, step_flops
from cgjax.infer import structured_prompt
from cgjax.metrics_log import MetricsLog
from cgjax.multihost import Preemption, gather_host_strings, host_data_state
from cgjax.preprocess import PREPROCESS_MODES, llava_preprocess_config
from cgjax.prototypes.io import concept_index
from cgjax.quantize import QuantConfig
from cgjax.sharding import canonical_sharding
from cgjax.steps import (CLIP_MODES, DTYPES, SCHEDULES, StepConfig, carry_adam, check_stage_length, dtype_from_name,
                         eval_step, greedy_generate, lr_schedule, make_optimizer, path_str, prefix_length,
                         stage_length, train_step, trainable_filter)
from cgjax.text_rows import Collate, TextRows, parse_key_lines
from converters import hf_llava

__all__ = ["train_stage", "Trainer", "load_trained_model", "STAGE_CHOICES"]

# the enumerated fields of a stage config, checked before anything is loaded (cgjax.config.check_choices)
STAGE_CHOICES = {"stage": ("A", "B"), "dtype": tuple(DTYPES), "param_dtype": tuple(DTYPES),
                 "optim.schedule": SCHEDULES, "optim.clip_mode": CLIP_MODES, "data.preprocess": PREPROCESS_MODES,
                 "quantize": quantize.MODES, "export.pt_dtype": tuple(DTYPES)}


# ----------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """Everything one stage needs: model split into trained / frozen state, mesh, data, steps."""

    def __init__(self, config, workdir: str):
        from transformers import AutoTokenizer  # optional [torch] extra


        self.config = config
        self.workdir = persistence.resolve(workdir)
        self.stage = str(config.stage)
        if self.stage not in ("A", "B"):
            raise ValueError(f"config.stage must be 'A' or 'B', got {self.stage!r}")
        if config.get("preset") == "demo" and config.get("demo") is not None and config.demo.generate_missing:
            multihost.on_primary("demo asset generation", lambda: ensure_demo_assets(config))
        packed = bool(config.data.get("packed_dir"))  # a packed set is all the trainer reads of the data
        check_input_paths(config, ("llava_checkpoint", "init_from", "data.vocab_json", "data.signals_index")
                          + (("data.packed_dir",) if packed else
                             ("data.dataset_json", "data.images_root", "data.targets_csv", "data.signals")))

        # mesh and rules
        shape = sharding.parse_mesh(config.mesh)
        devices = jax.devices()
        if shape and all(v != -1 for v in shape.values()):
            devices = devices[: int(np.prod(list(shape.values())))]
        self.mesh = sharding.make_mesh(shape, devices)
        self.rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.sharding_rules)
        self.n_devices = self.mesh.devices.size

        # data (vocabularies / concept index first: they size the model)
        # dimensions "" / (): the data's own (records' concepts keys, CSV header, vocab.json); list-format
        # signals are read against data.signals_index (a prototypes .pt / vocab.json), else the vocab.json
        # beside them; records without a split take theirs from the data set's split file
        index_files = config_paths(config.data.get("signals_index", ""))
        kw = dict(targets_csv=config.data.targets_csv or None, signals=config_paths(config.data.signals) or None,
                  dimensions=tuple(config_paths(config.data.dimensions)) or None, vocab=config.data.vocab_json or None,
                  preload=bool(config.data.preload), allow_outside_root=bool(config.data.allow_outside_root),
                  signals_index=concept_index(index_files) if index_files else None,
                  split_policy=SplitPolicy.from_config(config.data))
        root = config.data.images_root or None
        if config.data.get("packed_dir"):  # a packed ArrayRecord set (cgjax.data.tfds_builder.pack)
            cache = config.data.packed_cache_dir or None
            self.train_source = PackedSource(config.data.packed_dir, config.data.train_split, cache)
            self.val_source = PackedSource(config.data.packed_dir, config.data.val_split, cache) if config.data.val_split \
                else None
        else:  # one read of the data set for both splits; image files checked to exist, decoded by the loader
            self.train_source, self.val_source = split_sources(
                config.data.dataset_json, root, splits=(config.data.train_split, config.data.val_split), **kw)
        if self.val_source is not None and int(config.val.max_examples) > 0:
            self.val_source.indices = self.val_source.indices[: int(config.val.max_examples)]
        self.label_dims = tuple(self.train_source.data.dimensions)
        self.index = concept_index_from_vocabs(self.train_source.data.signal_vocabs, self.label_dims,
                                               int(config.gating.k_max))
        self.gating = gating_config(config, self.index)

        # model
        # tokenizer and processor files, read locally (a gs:// base is copied to a temporary folder)
        self.base_files = persistence.localize(config.llava_checkpoint, hf_llava.TOKENIZER_FILES)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_files)
        llava = hf_llava.load_any(config.llava_checkpoint, dtype=dtype_from_name(config.param_dtype), mesh=self.mesh,
                                  rules_table=self.rules, compute_dtype=dtype_from_name(config.dtype),
                                  quant=QuantConfig.from_config(config))
        model = ConceptLlava(llava, self.gating, rngs=nnx.Rngs(int(config.seed)))
        sharding.shard_model(model, self.mesh, self.rules)
        self.model_config = llava.config
        self.n_image_block = model.n_image_block
        self.n_image_tokens = llava.config.num_image_tokens
        self.image_token_id = llava.config.image_token_id
        self.length = int(config.text.max_text_tokens) + self.n_image_block

        filt = trainable_filter(tuple(config.trainable))
        self.graphdef, trainable, frozen = nnx.split(model, filt, ...)
        self.trainable_paths = [path_str(p) for p, _ in nnx.to_flat_state(trainable)]
        if not self.trainable_paths:
            raise ValueError(f"config.trainable {tuple(config.trainable)} matches no parameter")
        self.params0 = nnx.to_pure_dict(trainable)
        self.frozen = nnx.to_pure_dict(frozen)
        values_only = all(p.startswith("concepts/") for p in self.trainable_paths)  # no dense trained weights
        self.param_counts = param_counts(nnx.state(model))
        self.n_trainable = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(self.params0))
        self.n_trainable_dense = 0 if values_only else self.n_trainable

        # the prompt head before <image> has a fixed length: the concept slots sit at a static position
        probe = text.encode(self.tokenizer, text.STAGE_A_PROMPT, self.n_image_block, self.image_token_id, "x")
        self.n_head = int(np.argmax(probe.input_ids == self.image_token_id))
        prefix_len = prefix_length(self.trainable_paths, self.n_head, self.n_image_tokens)

        # the stage's length: config.num_steps, or config.num_epochs over the training split
        self.stage_length = stage_length(config, len(self.train_source))
        self.sc = StepConfig.from_config(config, prefix_len, num_steps=self.stage_length.steps)
        self.nan_at = (int(config.debug.nan_at_step), int(config.debug.get("nan_grad_at_step", -1)))
        self.state_shardings: tuple | None = None

        # preprocessing
        self.preprocess = self._preprocess_config()
        self.batch_size = int(config.batch_size)
        if self.batch_size % jax.process_count():
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of the {jax.process_count()} hosts")
        self._val_cache: list | None = None
        self.last_val_examples: list[str] = []

    # -- setup helpers ---------------------------------------------------------------------------
    def _preprocess_config(self):
        return llava_preprocess_config(self.base_files, self.model_config.vision_config.image_size,
                                       str(self.config.data.preprocess))

    def text_rows(self, with_prompt: bool = False) -> TextRows:
        vocabs = self.train_source.vocabs
        share = float(self.config.text.get("structured_share", 0.0))
        no_concepts = float(self.config.data.get("no_concept_share", 0.0))
        for name, v in (("text.structured_share", share), ("data.no_concept_share", no_concepts)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"config.{name} must be in [0, 1], got {v}")
        return TextRows(
            tokenizer=self.tokenizer, stage=self.stage, n_image_block=self.n_image_block,
            image_token_id=self.image_token_id, length=self.length, concept_dims=self.index.dims,
            label_dims=self.label_dims, label_names=tuple(tuple(vocabs[d].names) for d in self.label_dims),
            prompt_seed=int(self.config.text.prompt_seed), max_reason_tokens=int(self.config.text.max_reason_tokens),
            add_eos=bool(self.config.text.add_eos), with_prompt=with_prompt, n_head=self.n_head,
            max_targets=self.sc.max_targets, blank_images=bool(self.config.data.get("blank_images", False)),
            structured_share=share, structured_prompt=structured_prompt(self.label_dims) if share > 0 else "",
            no_concept_share=no_concepts)

    def train_dataset(self):
        per_host = self.batch_size // jax.process_count()
        c = self.config.data
        return image_dataset(self.train_source, self.preprocess, per_host, seed=int(self.config.seed), shuffle=True,
                             element_fn=self.text_rows(), collate_fn=Collate(per_host),
                             worker_count=int(c.worker_count), read_threads=int(c.read_threads),
                             prefetch_batches=int(c.prefetch_batches), skip_undecodable=bool(c.skip_undecodable))

    def _put(self, x: np.ndarray) -> jax.Array:
        """Host-local batch rows -> a global array sharded over ``batch`` (replicated if it does not divide)."""
        shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        spec = sharding.logical_to_spec(("batch",) + (None,) * (x.ndim - 1), self.rules, self.mesh, shape)
        return jax.make_array_from_process_local_data(NamedSharding(self.mesh, spec), x, shape)

    def device_batch(self, batch: Mapping[str, Any], keys: Sequence[str]) -> dict[str, jax.Array]:
        return {k: self._put(np.asarray(batch[k])) for k in keys}

    TRAIN_KEYS = ("input_ids", "labels", "segment_ids", "attention_mask", "pixel_values", "scores")

    # -- state -----------------------------------------------------------------------------------
    def init_state(self) -> dict[str, Any]:
        replicated = NamedSharding(self.mesh, PartitionSpec())
        params = self.params0
        opt_state = make_optimizer(self.sc).init(params)
        # optimizer leaves shaped like a param take its sharding; the rest is replicated
        like = {(x.shape, x.dtype): x.sharding for x in jax.tree.leaves(params)}
        opt_state = jax.tree.map(lambda x: jax.device_put(x, like.get((x.shape, x.dtype), replicated)), opt_state)
        state = {"params": jax.tree.map(jnp.copy, params),  # the step donates its state: keep params0
                 "opt_state": opt_state, "step": jnp.zeros((), jnp.int32),
                 "rng": jax.random.PRNGKey(int(self.config.seed))}
        # canonical shardings (mesh axes of size 1 dropped), as the compiled step returns them
        state = jax.tree.map(lambda x: jax.device_put(x, canonical_sharding(x.sharding, self.mesh)), state)
        self.state_shardings = tuple(x.sharding for x in jax.tree.leaves(state))
        return state

    def with_reg(self, step: int) -> bool:
        """The regulariser runs on ``step % attn_reg_interval == 0`` (as the original's batch index)."""
        interval = int(self.config.loss.attn_reg_interval)
        return self.sc.reg_lambda > 0 and interval > 0 and step % interval == 0

    def train_step(self, state, batch: Mapping[str, jax.Array], step: int):
        """One step (donates ``state``), the compiled variant chosen by :meth:`with_reg`."""
        with jax.set_mesh(self.mesh):  # lets the model constrain activations to the batch sharding
            return train_step(self.graphdef, self.sc, self.with_reg(step), self.state_shardings, state,
                               self.frozen, batch, jnp.asarray(self.nan_at, jnp.int32))

    def model(self, params=None) -> ConceptLlava:
        return nnx.merge(self.graphdef, self.params0 if params is None else params, self.frozen)

    # -- validation ------------------------------------------------------------------------------
    def _val_batches(self):
        if self._val_cache is None:
            vb = int(self.config.val.batch_size)
            ds = image_dataset(self.val_source, self.preprocess, vb, shuffle=False, num_epochs=1,
                               drop_remainder=False, shard_index=0, shard_count=1,
                               element_fn=self.text_rows(with_prompt=True), collate_fn=Collate(vb),
                               read_threads=int(self.config.data.read_threads),
                               skip_undecodable=bool(self.config.data.skip_undecodable))
            self._val_cache = list(ds)
        return self._val_cache

    def _put_replicated(self, x) -> jax.Array:
        return jax.device_put(np.asarray(x), NamedSharding(self.mesh, PartitionSpec()))

    def evaluate(self, params) -> dict[str, float]:
        """Teacher-forced loss per segment and per-dimension key accuracy of greedy generations."""
        n_new = int(self.config.val.max_new_tokens)
        tok = self.tokenizer
        eos = tok.eos_token_id if tok.eos_token_id is not None else -1
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        sums: dict[str, float] = {}
        dims = self.label_dims
        runs = [("", bool(self.sc.use_concepts))]
        if self.config.val.no_concept_baseline:
            runs.append(("noconcepts_", False))
        correct = {(r, d): 0 for r, _ in runs for d in dims}
        total = {d: 0 for d in dims}
        examples = []
        for hb in self._val_batches():
            # validation runs replicated: its batch need not divide over the mesh
            b = {k: self._put_replicated(hb[k]) for k in self.TRAIN_KEYS + ("valid",)}
            for k, v in eval_step(self.graphdef, self.sc, params, self.frozen, b).items():
                sums[k] = sums.get(k, 0.0) + float(v)
            valid = np.asarray(hb["valid"]) > 0
            golds = [parse_key_lines(g, dims) for g in hb["gold_keys"]]
            for i in np.flatnonzero(valid):
                for d in dims:
                    total[d] += int(d in golds[i])
            for prefix, use in runs:
                out = greedy_generate(nnx.merge(self.graphdef, params, self.frozen),
                                      self._put_replicated(hb["prompt_ids"]), b["pixel_values"],
                                      self._put_replicated(hb["prompt_mask"]), b["scores"], n_new, eos, pad, use)
                texts = tok.batch_decode(np.asarray(out).tolist(), skip_special_tokens=True)
                for i in np.flatnonzero(valid):
                    pred = parse_key_lines(texts[i], dims)
                    for d in dims:
                        correct[(prefix, d)] += int(d in golds[i] and pred.get(d) == golds[i][d])
                    if prefix == "" and len(examples) < 3:
                        examples.append(texts[i])
        out: dict[str, float] = {
            "val_loss": sums.get("wce", 0.0) / max(sums.get("w", 0.0), 1e-8),
            "val_loss_keys": sums.get("ce_keys", 0.0) / max(sums.get("n_keys", 0.0), 1.0),
            "val_loss_reason": sums.get("ce_reason", 0.0) / max(sums.get("n_reason", 0.0), 1.0),
        }
        for prefix, _ in runs:
            accs = []
            for d in dims:
                a = correct[(prefix, d)] / max(total[d], 1)
                out[f"val_{prefix}acc_{d}"] = a
                accs.append(a)
            out[f"val_{prefix}key_acc"] = float(np.mean(accs)) if accs else 0.0
        out["val_examples"] = float(sum(int(np.sum(np.asarray(hb["valid"]))) for hb in self._val_batches()))
        self.last_val_examples = examples
        return out

    # -- exports ---------------------------------------------------------------------------------
    def values(self, params) -> np.ndarray:
        """The trained concept values on the host (a collective when they are sharded over processes)."""
        return multihost.to_host(params["concepts"]["values"])

    def export_pt(self, params, step: int) -> tuple[str, str] | None:
        """``concepts_stage{A,B}.pt`` (the original's ``{step: {"values": Tensor}}``) + its metadata JSON.

        Called on every process (the values are gathered collectively); process 0 writes and
        returns the two paths, the others return None once it has."""
        values = self.values(params).astype(np.dtype(str(self.config.export.pt_dtype)))
        return multihost.on_primary("the .pt export", lambda: write_values_pt(
            self.workdir, self.stage, step, values, self.index, self.gating, self.config.llava_checkpoint,
            QuantConfig.from_config(self.config)))


# ----------------------------------------------------------------------------------------------
# checkpoints (cgjax.checkpoints) and loading a trained stage


def load_trained_model(config, workdir: str) -> ConceptLlava:
    """The model of ``config`` with the trained parameters of ``workdir``'s latest checkpoint."""
    trainer = Trainer(config, workdir)
    state = trainer.init_state()
    mngr = checkpoints.manager(persistence.join(workdir, "checkpoints"), config, read_only=True)
    step = mngr.latest_step()
    if step is None:
        raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint to load")
    got, _ = checkpoints.restore(mngr, step, state)
    mngr.close()
    return trainer.model(got["params"])


def _init_from(trainer: Trainer, state, config):
    """Stage hand-off: params and, with ``init_optimizer`` (the default, as the original kept its
    optimizer), AdamW's moments and step count (:func:`cgjax.steps.carry_adam`) from the latest step
    of ``config.init_from``; the concept index, the trained parameters and (carrying it) the
    optimizer state's layout must match."""
    directory = checkpoints.stage_dir(config.init_from)
    if not persistence.isdir(directory):
        raise FileNotFoundError(f"config.init_from: {directory} is not a checkpoint directory")
    mngr = checkpoints.manager(directory, config, read_only=True)
    step = mngr.latest_step()
    if step is None:
        raise FileNotFoundError(f"config.init_from: no checkpoint in {directory}")
    meta = checkpoints.read_meta(mngr, step)
    theirs = ConceptIndex.from_json(meta["concept_index"])
    if theirs != trainer.index:
        raise ValueError(f"config.init_from {directory} step {step}: its concept index {theirs.to_json()} differs "
                         f"from this run's {trainer.index.to_json()}")
    tree = checkpoints.saved_tree(mngr, step)
    replicated = NamedSharding(trainer.mesh, PartitionSpec())
    abstract = checkpoints.abstract(tree, lambda x: replicated)
    if jax.tree.structure(checkpoints.abstract(tree["params"], lambda x: None)) != jax.tree.structure(state["params"]):
        raise ValueError(f"config.init_from {directory}: its trained parameters differ from this run's "
                         f"({', '.join(trainer.trainable_paths)})")
    abstract["params"] = jax.tree.map(lambda a, x: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=x.sharding),
                                      checkpoints.abstract(tree["params"], lambda x: None), state["params"])
    carry = bool(config.init_optimizer)
    if carry:
        diff = checkpoints.tree_differences({"opt_state": tree["opt_state"]}, {"opt_state": state["opt_state"]})
        if diff:
            mngr.close()
            raise ValueError(f"config.init_from {directory} step {step}: its optimizer state differs from this "
                             f"run's ({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''}): the optimizer "
                             f"settings differ (optim.clip_mode, optim.clip_norm, optim.schedule). Use the same, or "
                             f"set config.init_optimizer=False to start this stage's optimizer fresh")
        abstract["opt_state"] = checkpoints.abstract(state["opt_state"], lambda x: x.sharding)
    got = checkpoints.restore_state(mngr, step, abstract)
    mngr.close()
    state = dict(state, params=got["params"])
    if carry:
        state["opt_state"] = carry_adam(got["opt_state"], state["opt_state"])
    logging.info("initialised from %s step %d (%s)", directory, step,
                 "values and AdamW moments" if carry else "values; optimizer fresh: config.init_optimizer=False")
    return state, int(step)


def _check_resumable(mngr, step: int, state) -> None:
    """Resuming needs the saved state's layout: another optimizer (optim.clip_mode, clip_norm,
    schedule) or trained set is an error here, before the restore would set the checkpoints aside
    as unreadable. A step whose metadata cannot be read is left to the restore's fall-back."""
    try:
        saved = checkpoints.saved_tree(mngr, step)
    except Exception:  # noqa: BLE001 - a damaged step: restore_latest_good sets it aside and falls back
        return
    diff = checkpoints.tree_differences(saved, state)
    if diff:
        raise ValueError(f"{mngr.directory} step {step}: the saved training state differs from this run's "
                         f"({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''}): resume with the optimizer "
                         f"settings (optim.clip_mode, optim.clip_norm, optim.schedule) and config.trainable it was "
                         f"trained with, or use another work dir")


# ----------------------------------------------------------------------------------------------
# the stage


def train_stage(config, workdir: str, *, step_callback: Callable[[int, dict], None] | None = None) -> dict:
    """Train one stage (``config.stage`` A or B) in ``workdir``; returns the final metrics.

    ``step_callback(step, metrics)`` is called on the host after every step (``step`` = steps done).
    Raises ``FloatingPointError`` on a NaN/inf loss (the last good checkpoint stays the latest).
    """
    check_choices(config, STAGE_CHOICES)  # a mistyped enumerated field fails here, not after the model loads
    check_stage_length(config)  # exactly one of num_steps / num_epochs
    workdir = persistence.resolve(workdir)
    persistence.check_reachable(workdir, float(config.get("storage_timeout_s", 30)))  # before any compute
    persistence.makedirs(workdir)
    # hand-offs are checked before the (possibly 14 GB) model is loaded: the work dir's stage, base
    # and data must be this run's (a Stage B config in a Stage A work dir, another LLaVA, another
    # data set), init_from's base and data too; each refusal names both sides
    accept = bool(config.get("accept_mismatch", False))
    stage = str(config.stage)
    resuming = bool(config.checkpoint.resume) and checkpoints.has_checkpoints(persistence.join(workdir, "checkpoints"))
    if resuming:
        for d in provenance.check(provenance.read(workdir), provenance.record(config, stage), f"work dir {workdir}",
                                  keys=("stage", "base", "data"), accept=accept):
            logging.warning("accepted (config.accept_mismatch): %s", d)
    elif config.init_from:
        init_dir = persistence.resolve(config.init_from)
        for d in provenance.check(provenance.read(init_dir), provenance.record(config, stage),
                                  f"config.init_from {init_dir}", keys=("base", "data"), accept=accept):
            logging.warning("accepted (config.accept_mismatch): %s", d)
    tr = Trainer(config, workdir)
    is_main = jax.process_index() == 0
    mngr = checkpoints.manager(persistence.join(workdir, "checkpoints"), config)
    num_steps = tr.stage_length.steps  # config.num_steps, or config.num_epochs resolved on the training split
    state = tr.init_state()
    ds = tr.train_dataset()
    it = iter(ds)
    start, init_step = 0, None
    latest = mngr.latest_step() if config.checkpoint.resume else None
    if latest is not None:
        _check_resumable(mngr, latest, state)
        state, meta, latest = checkpoints.restore_latest_good(mngr, state)  # a truncated latest: the one before
        if meta.get("stage", tr.stage) != tr.stage:  # a work dir from before provenance.json
            raise ValueError(f"{mngr.directory} step {latest} is a Stage {meta['stage']} checkpoint; this run is "
                             f"Stage {tr.stage}: use another work dir (Stage {tr.stage} starts from Stage "
                             f"{meta['stage']} with config.init_from={workdir})")
        if ConceptIndex.from_json(meta["concept_index"]) != tr.index:
            raise ValueError(f"{mngr.directory} step {latest}: concept index differs from this run's data")
        it.set_state(host_data_state(meta))
        start = int(latest)
        logging.info("resumed from %s step %d", mngr.directory, latest)
    elif config.init_from:
        state, init_step = _init_from(tr, state, config)
    if latest is None:  # a fresh run records what it trains on (after the demo assets exist)
        mine = provenance.record(config, tr.stage)
        multihost.on_primary("writing provenance.json", lambda: provenance.write(workdir, mine))
    logs = MetricsLog(workdir, is_main, bool(config.log.tensorboard), resume_step=start if latest is not None else None)

    def meta(step, it_state, val=None):
        # every host's grain state (orbax writes the metadata from the primary host only)
        by_process = gather_host_strings(json.dumps(it_state)) if jax.process_count() > 1 else None
        return {"step": int(step), "stage": tr.stage, "num_steps": num_steps, "data_iter": it_state,
                "concept_index": tr.index.to_json(), "val": val or {}, "trainable": tr.trainable_paths,
                "process_count": jax.process_count(),
                **({"data_iter_by_process": by_process} if by_process else {})}

    seq_tokens = tr.batch_size * tr.length
    text_cfg = tr.model_config.text_config
    flops = step_flops(tr.param_counts, tr.batch_size, tr.length, tr.n_image_tokens,
                       tr.model_config.vision_config.grid[0] * tr.model_config.vision_config.grid[1],
                       tr.n_trainable_dense,
                       head_params=0 if text_cfg.tie_word_embeddings else text_cfg.hidden_size * text_cfg.vocab_size,
                       diff_len=tr.length - tr.sc.prefix_len, logit_positions=tr.sc.max_targets or None)
    if is_main:
        logging.info("stage %s length: %s", tr.stage, tr.stage_length.describe())
        logging.info("stage %s: %d trainable parameters (%s), %d frozen; sequence %d (%d image + %d concept + "
                     "%d text); mesh %s; %.3g model FLOPs/step", tr.stage, tr.n_trainable,
                     ", ".join(tr.trainable_paths),
                     sum(tr.param_counts.values()) - tr.n_trainable, tr.length, tr.n_image_tokens, tr.gating.n_tokens,
                     int(config.text.max_text_tokens), dict(tr.mesh.shape), flops)

    val_every = int(config.val.every_steps)
    ckpt_every = int(config.checkpoint.every_steps)
    log_every = max(1, int(config.log.every_steps))
    history: list[float] = []
    last: dict[str, float] = {}
    val: dict[str, float] = {}
    best = (-1.0, None)
    saved_step = start if latest is not None else None
    preempted = False
    it_state = it.get_state()
    times: list[float] = []
    variants: set[bool] = set()
    bar = tqdm(total=num_steps, initial=start, desc=f"stage {tr.stage}", dynamic_ncols=True,
               disable=not (is_main and config.log.progress_bar))
    has_val = tr.val_source is not None

    def validate(step: int) -> dict:
        nonlocal best
        v = tr.evaluate(state["params"])
        logs.write(step, "val", v)
        if v["val_key_acc"] > best[0]:
            best = (v["val_key_acc"], step)
        if is_main:
            accs = " ".join(f"{d} {v[f'val_acc_{d}']:.3f}" for d in tr.label_dims)
            bar.write(f"val step {step}: key acc {v['val_key_acc']:.3f} ({accs}) | loss {v['val_loss']:.4f} "
                      f"(keys {v['val_loss_keys']:.4f} reason {v['val_loss_reason']:.4f})")
            for ex in tr.last_val_examples[:1]:
                bar.write("  e.g. " + ex.replace("\n", " | ")[:200])
        return v

    with Preemption() as pre:
        try:
            skipped = [0]  # undecodable images in this host's batches (data.skip_undecodable), this launch

            def next_batch():
                hb = next(it)
                skipped[0] += int(np.sum(hb.get("skipped", 0)))
                return tr.device_batch(hb, tr.TRAIN_KEYS)

            batch = next_batch() if start < num_steps else None
            t_prev = time.perf_counter()
            for s in range(start, num_steps):
                state, m = tr.train_step(state, batch, s)
                it_state = it.get_state()  # after the batches of steps 0..s
                if s + 1 < num_steps:
                    batch = next_batch()  # overlaps the device step
                m = {k: float(v) for k, v in jax.device_get(m).items()}
                done = s + 1
                if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                    mngr.wait_until_finished()
                    what = "loss" if not math.isfinite(m["loss"]) else "gradient (norm)"
                    raise FloatingPointError(
                        f"stage {tr.stage}: non-finite {what} {m['loss'] if what == 'loss' else m['grad_norm']} at "
                        f"step {s}; stopped without applying it. The last good checkpoint is step "
                        f"{mngr.latest_step()} in {mngr.directory}")
                dt = time.perf_counter() - t_prev
                if tr.with_reg(s) in variants:  # the first step of each variant compiles
                    times.append(dt)
                variants.add(tr.with_reg(s))
                history.append(m["loss"])
                m["lr"] = float(lr_schedule(tr.sc)(s // max(1, tr.sc.grad_accum)))
                m["s_per_step"] = dt
                if config.data.skip_undecodable:
                    m["skipped_images"] = skipped[0]
                last = m
                logs.write(done, "train", m)
                if done % log_every == 0:
                    logs.flush()  # an object store gets the rows every log_every steps
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}")
                if is_main and (done % log_every == 0 or done == num_steps):
                    window = times[-log_every:] or [dt]
                    sps = float(np.mean(window))
                    tfl = flops / sps / tr.n_devices / 1e12
                    tps = seq_tokens / sps / tr.n_devices
                    bar.write(f"step {done} | {sps:.4f} s/step | {tfl:.4f} TFLOP/s/device | {tps:.0f} tokens/s/device "
                              f"| loss {m['loss']:.4f} | keys {m['loss_keys']:.4f} reason {m['loss_reason']:.4f} "
                              f"| reg {m['reg']:.3g}")
                    logs.write(done, "perf", {"s_per_step": sps, "tflops_per_device": tfl,
                                              "tokens_per_s_per_device": tps})
                if step_callback is not None:
                    step_callback(done, m)
                val_now = has_val and val_every > 0 and done % val_every == 0 and done < num_steps
                if val_now:
                    val = validate(done)
                periodic = ckpt_every > 0 and done % ckpt_every == 0 and done < num_steps  # the end saves below
                stop = pre.stop()
                if val_now or periodic or stop:
                    logs.flush()
                    checkpoints.save(mngr, done, state, meta(done, it_state, val if val_now else None),
                          {"val_key_acc": val["val_key_acc"]} if val_now else None)
                    saved_step = done
                if stop:
                    preempted = True
                    break
                t_prev = time.perf_counter()  # s/step excludes logging, validation and saving
            done = int(jax.device_get(state["step"]))
            end_val = None
            if not preempted and has_val and config.val.at_end:
                val = end_val = validate(done)
            if saved_step != done:
                checkpoints.save(mngr, done, state, meta(done, it_state, end_val),
                      {"val_key_acc": end_val["val_key_acc"]} if end_val else None)
            mngr.wait_until_finished()
            pt = tr.export_pt(state["params"], done) if config.export.pt else None
        finally:
            bar.close()
            mngr.close()
            logs.close()

    out: dict[str, Any] = {"stage": tr.stage, "step": done, "num_steps": num_steps, "preempted": preempted,
                           "history": history, "start_step": start,
                           "checkpoint_dir": persistence.join(workdir, "checkpoints")}
    if init_step is not None:
        out["init_from_step"] = init_step
    out.update({k: last[k] for k in ("loss", "loss_keys", "loss_reason", "reg") if k in last})
    out.update(val)
    if config.data.skip_undecodable:
        out["skipped_images"] = multihost.sum_over_processes(skipped[0])
    if best[1] is not None:
        out["best_val_key_acc"], out["best_step"] = best
    if times:
        out["s_per_step"] = float(np.mean(times))
    if pt:
        out["pt"], out["pt_meta"] = pt
    return out
