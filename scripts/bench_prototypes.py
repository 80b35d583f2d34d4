"""``python scripts/bench.py prototypes [--model tiny|ViT-B-32] [--n_images 240]``.

One prototype-training epoch on the demo set:
- cgjax: cached embeddings (CLIP is frozen; embedded once, timed separately) and ONE jitted step
  over all dimensions, the epoch run as a ``lax.scan``;
- PyTorch: the original loop (``prototype_trainer.py``): DataLoader(batch 8, shuffle, drop_last)
  over the preprocessed images, ``encode_image`` of every batch every epoch, InfoNCE + margin,
  Adam, renormalise; the original trains ONE dimension per run, so its epoch over all dimensions
  is one epoch per dimension (the figure is their sum; the per-dimension mean is printed too).
Both use the same open_clip tower (a tiny random one, or ViT-B-32 with random weights).
"""
from __future__ import annotations

import json
import os
import random
import tempfile
import time
import types
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from PIL import Image

from cgjax import commandline
from cgjax.data.demo_data import make_demo
from cgjax.data.records import resolve_image
from cgjax.prototypes.head import build_prototypes, read_records, record_paths
from cgjax.prototypes.trainer import PrototypeTrainer, TrainerConfig, epoch_batches
from converters import openclip, tiny_clip

PROG = "scripts/bench.py prototypes"


def _setup(model: str, n_images: int, size: int, root: str):
    paths = make_demo(os.path.join(root, "demo"), n_images=n_images, size=size, seed=0)
    if model == "tiny":
        name, ckpt = tiny_clip.make_openclip_checkpoint(os.path.join(root, "clip"), heads=2)
        name = f"local-dir:{os.path.join(root, 'clip', name)}-hub"
    else:
        import open_clip  # optional [torch] extra
        import torch  # optional [torch] extra

        torch.manual_seed(0)
        m = open_clip.create_model(model)
        ckpt = os.path.join(root, "clip.pt")
        torch.save(m.state_dict(), ckpt)
        name = model
    return paths, name, ckpt


def bench_cgjax(paths, name, ckpt, epochs: int, cfg_kw: dict) -> dict:
    dims = ["artist", "style", "genre"]
    head = openclip.load_head(name, ckpt, batch_size=32)
    ds = read_records(paths["dataset_json"], paths["images_root"], dimensions=dims)
    files = record_paths(ds)
    head.embed_paths(files[:32])  # compile
    t0 = time.perf_counter()
    emb, _ = head.embed_paths(files, missing="error")
    t_embed = time.perf_counter() - t0
    labels = {d: [r.labels[d] for r in ds.records] for d in dims}
    ps = build_prototypes(emb, labels, name)
    p0, mask = ps.padded(dims)
    cfg = TrainerConfig(**cfg_kw)
    tr = PrototypeTrainer(cfg, dims, p0, mask)
    y = jnp.asarray(ps.label_indices(labels, dims))
    f = jnp.asarray(emb)
    k = jnp.asarray(tr.k)
    state = tr.init_state()
    batches = jnp.asarray(epoch_batches(len(files), cfg.batch_size, cfg.seed, 0, cfg.drop_last), jnp.int32)
    t0 = time.perf_counter()
    state, _ = tr._epoch_fn(state, f, y, batches, tr.mask, k)
    jax.block_until_ready(state["protos"])
    t_compile = time.perf_counter() - t0
    times = []
    for e in range(1, epochs + 1):
        batches = jnp.asarray(epoch_batches(len(files), cfg.batch_size, cfg.seed, e, cfg.drop_last), jnp.int32)
        t0 = time.perf_counter()
        state, _ = tr._epoch_fn(state, f, y, batches, tr.mask, k)
        jax.block_until_ready(state["protos"])
        times.append(time.perf_counter() - t0)
    return {"epoch_s": float(np.median(times)), "embed_once_s": t_embed, "first_epoch_with_compile_s": t_compile,
            "steps": int(batches.shape[0]), "device": str(jax.devices()[0])}


def bench_torch(paths, name, ckpt, cfg_kw: dict, device: str) -> dict:
    """The original's PrototypeDataset + PrototypeTrainer loop, one epoch per dimension."""
    import open_clip  # optional [torch] extra
    import torch  # optional [torch] extra
    import torch.nn.functional as F  # optional [torch] extra


    dims = ["artist", "style", "genre"]
    model = open_clip.create_model(name)
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    model = model.to(device).eval()
    pp = model.visual.preprocess_cfg
    preprocess = open_clip.image_transform(pp["size"], is_train=False, mean=pp["mean"], std=pp["std"],
                                           resize_mode=pp["resize_mode"], interpolation=pp["interpolation"])
    ds = read_records(paths["dataset_json"], paths["images_root"], dimensions=dims)
    images = [Image.open(resolve_image(ds.images_root, r.image)).convert("RGB") for r in ds.records]  # held in RAM
    for im in images:
        im.load()

    class PrototypeDataset(torch.utils.data.Dataset):
        def __init__(self, dim):
            self.dim = dim

        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return {"image_anchor": preprocess(images[i]), "label": ds.records[i].labels[self.dim] or ""}

    with torch.no_grad():  # build_prototypes (not timed): features of every image, once
        feats_all = torch.cat([F.normalize(model.encode_image(torch.stack([preprocess(im) for im in images[s:s + 32]])
                                                              .to(device)).float(), dim=-1)
                               for s in range(0, len(images), 32)])

    def head_prototypes(dim):
        groups = {}
        for i, r in enumerate(ds.records):
            groups.setdefault(r.labels[dim], []).append(i)
        names = list(groups)
        P = torch.stack([F.normalize(feats_all[groups[n]].mean(0), dim=-1) for n in names])
        return P, {n: i for i, n in enumerate(names)}

    cfg = types.SimpleNamespace(**{"batch_size": 8, "lr": 5e-3, "temperature": 0.07, "negatives_k": 16,
                                   "hard_negatives": True, "margin": 0.1, "lambda_margin": 0.5, **cfg_kw})
    per_dim = {}
    for dim in dims:
        P0, c2i = head_prototypes(dim)
        P = torch.nn.Parameter(P0.clone())
        opt = torch.optim.Adam([P], lr=cfg.lr)
        loader = torch.utils.data.DataLoader(PrototypeDataset(dim), batch_size=cfg.batch_size, shuffle=True,
                                             drop_last=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for batch in loader:  # the original's step
            keep = [i for i, lab in enumerate(batch["label"]) if lab is not None and lab in c2i]
            if not keep:
                continue
            x = batch["image_anchor"][keep].to(device)
            pos_idx = torch.tensor([c2i[batch["label"][i]] for i in keep], device=device)
            with torch.no_grad():
                f = F.normalize(model.encode_image(x).float(), dim=-1)
            K = P.shape[0]
            k = min(max(1, int(cfg.negatives_k)), max(0, K - 1))
            if k == 0:
                continue
            S = f @ P.t()
            if cfg.hard_negatives:
                masked = S.clone()
                masked[torch.arange(len(keep)), pos_idx] = float("-inf")
                neg_idx = masked.topk(k, dim=1).indices
            else:
                neg_idx = torch.stack([torch.tensor(random.sample([j for j in range(K) if j != int(p)], k))
                                       for p in pos_idx]).to(device)
            pos = S[torch.arange(len(keep)), pos_idx]
            neg = S.gather(1, neg_idx)
            logits = torch.cat([pos[:, None], neg], 1) / cfg.temperature
            loss = F.cross_entropy(logits, torch.zeros(len(keep), dtype=torch.long, device=device))
            loss = loss + cfg.lambda_margin * F.relu(cfg.margin - pos + neg.max(1).values).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                P.copy_(F.normalize(P, dim=-1))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        per_dim[dim] = time.perf_counter() - t0
    return {"epoch_s": float(sum(per_dim.values())), "per_dim_s": per_dim, "device": device,
            "threads": torch.get_num_threads()}


def define_flags(fv: flags.FlagValues, argv: Sequence[str] | None = None) -> None:
    """This benchmark's flags on ``fv`` (see :mod:`cgjax.commandline`)."""
    del argv  # no config file
    flags.DEFINE_string("model", "tiny", "tiny | an open_clip name, e.g. ViT-B-32", flag_values=fv)
    flags.DEFINE_integer("n_images", 240, "demo images generated", flag_values=fv)
    flags.DEFINE_integer("size", 64, "demo image side", flag_values=fv)
    flags.DEFINE_integer("epochs", 5, "cgjax epochs timed (median)", flag_values=fv)
    flags.DEFINE_string("device", "auto", "torch device (auto: cuda if available)", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> dict:
    """The benchmark in this process: ``main(["--n_images", "48"])``; its figures."""
    return run(commandline.parse(define_flags, argv or (), PROG))


def run(a: flags.FlagValues) -> dict:
    """The benchmark from the parsed flags of :func:`define_flags`."""
    import torch  # optional [torch] extra

    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    with tempfile.TemporaryDirectory() as root:
        paths, name, ckpt = _setup(a.model, a.n_images, a.size, root)
        cg = bench_cgjax(paths, name, ckpt, a.epochs, {})
        th = bench_torch(paths, name, ckpt, {}, device)
    out = {"cgjax": cg["epoch_s"], "torch": th["epoch_s"], "speedup": th["epoch_s"] / cg["epoch_s"],
           "unit": "s/epoch",
           "speedup_incl_embedding_over_3_epochs": th["epoch_s"] / (cg["epoch_s"] + cg["embed_once_s"] / 3),
           "model": a.model, "n_images": a.n_images, "cgjax_detail": cg, "torch_detail": th}
    print(f"prototype epoch on the demo set ({a.n_images} images, {a.model}): cgjax {cg['epoch_s'] * 1e3:.2f} ms "
          f"(all dims, cached embeddings; embedding once {cg['embed_once_s']:.2f} s) vs torch "
          f"{th['epoch_s']:.2f} s (one epoch per dim, re-encoding) -> {out['speedup']:.0f}x")
    print(json.dumps(out, default=float))
    return out


if __name__ == "__main__":
    commandline.run(define_flags, run)
