"""``train_prototypes(config, workdir)``: the prototype stage behind ``scripts/train.py``.

1. read the dataset (``cgjax.data.records``; its dimensions are the records' ``concepts`` keys
   unless ``data.dimensions`` names them), split it (the records' ``split`` field, else the data
   set's split file, made here on first use and reused by every later stage: ``cgjax.data.splits``;
   test records are never trained on);
2. convert the open_clip tower and embed every train/validation image ONCE (cached on disk
   under ``workdir/cache``, keyed by model, weights and files);
3. mean prototypes from the training images, then the jitted all-dimension trainer with an
   orbax checkpoint per epoch (resumed from the latest);
4. per-dimension temperature calibration on validation (NLL, ECE before/after);
5. exports: a cgjax checkpoint (``workdir/prototypes``), the original's
   ``prototypes_<dim>_trained.pt``, signals for every record (``concept_signals_<dim>.json`` + the
   keyed format + the validate_signals report) and ``metrics.json``.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cgjax import demo_assets, multihost, persistence
from cgjax.data.splits import SplitPolicy
from cgjax.prototypes import export, io as pio
from cgjax.prototypes.calibrate import calibrate
from cgjax.prototypes.head import AugmentedEncoder, PrototypeHead, build_prototypes, read_records, record_paths
from cgjax.prototypes.trainer import PrototypeTrainer, TrainerConfig, l2_normalize
from cgjax.prototypes.validate_signals import write_json
from converters import openclip

log = logging.getLogger(__name__)


def _get(cfg: Any, path: str, default: Any = None) -> Any:
    cur = cfg
    for part in path.split("."):
        try:
            cur = cur[part]
        except (KeyError, TypeError, AttributeError):
            return default
    return cur


def split_indices(ds: Any) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) record indices from the records' ``split`` (after
    :meth:`SplitPolicy.apply <cgjax.data.splits.SplitPolicy.apply>`, every record has one; a record
    without one trains); test records are excluded."""
    splits = [r.split for r in ds.records]
    train = np.array([i for i, s in enumerate(splits) if s in (None, "train")], np.int64)
    val = np.array([i for i, s in enumerate(splits) if s == "validation"], np.int64)
    return train, val


def _fingerprint(*parts: Any) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(repr(p).encode())
    return h.hexdigest()[:16]


def _file_id(path: str) -> tuple:
    try:
        st = os.stat(path)
        return (path, st.st_size, int(st.st_mtime_ns))
    except OSError:
        return (path, None)


def cached_embeddings(head: PrototypeHead, paths: list[str], cache_dir: str | None, checkpoint: str) -> np.ndarray:
    """Embeddings of ``paths`` (all must exist), read from / written to ``cache_dir``."""
    key = _fingerprint(head.clip_model_name, _file_id(str(checkpoint)), head.preprocess_cfg,
                       [_file_id(p) for p in paths])
    file = persistence.join(cache_dir, f"embeddings_{key}.npy") if cache_dir else None
    if file and persistence.exists(file):
        emb = np.load(io.BytesIO(persistence.Path(file).read_bytes()))
        if emb.shape[0] == len(paths):
            log.info("embeddings from cache %s", file)
            return emb
    emb, kept = head.embed_paths(paths, missing="error")
    if file and multihost.is_primary():  # every process embeds; one writes the cache
        def write(tmp):
            with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a path
                np.save(f, emb)

        persistence.write_file(file, write)
    return emb


def trainer_config(config: Any) -> TrainerConfig:
    t = config.trainer
    return TrainerConfig(batch_size=int(t.batch_size), lr=float(t.lr), epochs=int(t.epochs),
                         temperature=float(t.temperature), negatives_k=str(t.negatives_k),
                         hard_negatives=bool(t.hard_negatives), margin=float(t.margin),
                         lambda_margin=float(t.lambda_margin), drop_last=bool(t.drop_last),
                         ema_decay=float(t.ema_decay), seed=int(t.seed), log_interval=int(t.log_interval),
                         debug_log=bool(_get(config, "trainer.debug_log", False)),
                         max_to_keep=_get(config, "trainer.max_to_keep", 3))


def train_prototypes(config: Any, workdir: str) -> dict[str, Any]:
    """Run the prototype stage; returns the final metrics (also written to ``artifacts/metrics.json``)."""
    workdir = persistence.resolve(workdir)  # a local folder or a URL (gs://...), never a local "gs:" folder
    if persistence.is_url(workdir):
        persistence.check_reachable(workdir)  # seconds, naming the URL, before any compute
    persistence.makedirs(workdir)
    config = config.copy_and_resolve_references() if hasattr(config, "copy_and_resolve_references") else config
    if hasattr(config, "unlock"):
        config.unlock()
    if str(_get(config, "preset", "")).startswith("demo"):
        if persistence.is_url(workdir):
            raise ValueError(f"{workdir}: the demo preset generates its assets inside the work dir, on a local disk; "
                             "use a local work dir, or the default preset with your data")
        # process 0 builds what is missing; then every process fills in the same paths
        multihost.on_primary("demo asset generation", lambda: demo_assets.prepare_prototype_demo(config.copy_and_resolve_references(),
                                                                           workdir))
        demo_assets.prepare_prototype_demo(config, workdir)
    if not config.data.dataset_json:
        raise ValueError("config.data.dataset_json is not set")
    if not config.clip.checkpoint and not config.clip.model_name.startswith(("local-dir:", "hf-hub:")):
        raise ValueError("config.clip.checkpoint is not set (local open_clip weights; there is no hub access)")
    layout = config.layout
    dims = [d.strip() for d in (config.data.dimensions.split(",") if isinstance(config.data.dimensions, str)
                                else config.data.dimensions) if d.strip()]

    # -- data
    ds = read_records(config.data.dataset_json, config.data.images_root or None, dimensions=dims or None)
    dims = list(ds.dimensions)
    ds = SplitPolicy.from_config(config.data).apply(ds)  # the split file every later stage reuses
    paths = record_paths(ds)
    train_idx, val_idx = split_indices(ds)
    used = np.concatenate([train_idx, val_idx])
    missing = [(int(i), paths[i]) for i in used if not os.path.isfile(paths[i])]
    if missing:
        msg = (f"{config.data.dataset_json}: {len(missing)} image(s) not found, e.g. row "
               f"{ds.records[missing[0][0]].row} -> {missing[0][1]}")
        if config.data.missing_images != "skip":
            raise FileNotFoundError(msg + " (set data.missing_images='skip' to drop them)")
        log.warning("%s; skipped", msg)
        bad = {i for i, _ in missing}
        train_idx = np.array([i for i in train_idx if i not in bad], np.int64)
        val_idx = np.array([i for i in val_idx if i not in bad], np.int64)
    if len(train_idx) == 0:
        raise ValueError(f"{config.data.dataset_json}: no training records")

    # -- CLIP and embeddings (once)
    dtype = None
    if config.clip.dtype not in ("", "float32"):
        dtype = getattr(jnp, config.clip.dtype)
    head = openclip.load_head(config.clip.model_name, config.clip.checkpoint or None,
                                       batch_size=int(config.clip.batch_size), dtype=dtype)
    order = np.concatenate([train_idx, val_idx])
    cache_dir = persistence.join(workdir, layout.cache) if config.cache_embeddings else None
    emb = cached_embeddings(head, [paths[i] for i in order], cache_dir, config.clip.checkpoint)
    tr_emb, va_emb = emb[: len(train_idx)], emb[len(train_idx):]

    labels = {d: [ds.records[i].labels.get(d) for i in train_idx] for d in dims}
    ps = build_prototypes(tr_emb, labels, head.clip_model_name)
    tdims = [d for d in dims if d in ps.prototypes]
    if len(tdims) < len(dims):
        log.warning("dimensions without any training concept skipped: %s", sorted(set(dims) - set(tdims)))
    y_tr = ps.label_indices(labels, tdims)
    y_va = ps.label_indices({d: [ds.records[i].labels.get(d) for i in val_idx] for d in tdims}, tdims)
    p0, mask = ps.padded(tdims)

    tcfg = trainer_config(config)
    meta = {"clip_model_name": ps.clip_model_name, "concept_to_idx": ps.concept_to_idx,
            "idx_to_concept": ps.idx_to_concept}
    trainer = PrototypeTrainer(tcfg, tdims, p0, mask, metadata=meta)
    if config.augment:
        aug = AugmentedEncoder(head.model, head.encoder.batch_size)
        pixels = head.load_pixels([paths[i] for i in train_idx])
        base = jax.random.PRNGKey(tcfg.seed + 1)
        embeddings: Any = lambda epoch: aug.augmented(pixels, jax.random.fold_in(base, epoch))  # noqa: E731
    else:
        embeddings = tr_emb
    state, history = trainer.train(embeddings, y_tr, va_emb, y_va,
                                   ckpt_dir=persistence.join(workdir, layout.checkpoints),
                                   resume=bool(config.trainer.resume), log_fn=log.info)

    # -- final prototypes, calibration
    protos = l2_normalize(state["ema"]) if config.export.use_ema else state["protos"]
    final = ps.subset(tdims).with_padded(np.asarray(protos), tdims)
    metrics: dict[str, Any] = {"epochs": int(state["epoch"]), "steps": int(state["step"]),
                               "n_train": int(len(train_idx)), "n_val": int(len(val_idx)),
                               "dimensions": tdims, "history": history}
    if config.calibration.enabled and len(val_idx):
        scores = {d: final.signals(va_emb, d) for d in tdims}
        cal = calibrate(scores, {d: y_va[:, j] for j, d in enumerate(tdims)}, tcfg.temperature,
                        int(config.calibration.n_bins))
        final.temperatures = {d: c["temperature"] for d, c in cal.items()}
        metrics["calibration"] = cal
    if history:
        metrics["val"] = {d: {k: v for k, v in history[-1][d].items() if k.startswith("val_")} for d in tdims}

    # -- exports (process 0 writes them; the others wait for it)
    out = multihost.on_primary("the prototype exports", lambda: _export(final, head, config, workdir, tdims,
                                                                         int(state["epoch"]), metrics))
    return metrics if out is None else out


def _export(final, head: PrototypeHead, config: Any, workdir: str, tdims: list[str], epoch: int,
            metrics: dict[str, Any]) -> dict[str, Any]:
    layout = config.layout
    art_dir = persistence.join(workdir, layout.artifacts)
    metrics["artifacts"] = {"checkpoint": pio.save_checkpoint(final, persistence.join(workdir, layout.prototypes),
                                                              epoch=epoch)}
    if config.export.pt:
        metrics["artifacts"]["pt"] = [pio.save_pt(final, persistence.join(art_dir, f"prototypes_{d}_trained.pt"), [d])
                                      for d in tdims]
    if config.export.signals:
        metrics["artifacts"]["signals"] = export_all(head, final, config, art_dir, tdims)

    write_json(persistence.join(art_dir, "metrics.json"), metrics)
    return metrics


def export_all(head: PrototypeHead, ps: Any, config: Any, out_dir: str, dims: list[str]) -> dict[str, Any]:
    """``concept_signals_<dim>.json`` for every record and dimension (+ keyed + report)."""
    ds, row_images = export.read_aligned(config.data.dataset_json, config.data.images_root or None, dims)
    emb, present = export.embed_records(head, ds)
    sig = export.make_signals(ps, ds, emb, present, dims, config.export.normalize, float(config.export.temperature))
    out = export.write_bulk(sig, ds, row_images, dims, out_dir, bool(config.export.csv), int(config.export.topk))
    out.pop("validation", None)
    return out
