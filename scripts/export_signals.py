"""Export concept signals: ``python scripts/export_signals.py --dataset_json D --ckpt C --output O``.

The original's flags (``--dataset_json --images_root --ckpt --dimensions --output --format json|csv
--topk 3 --normalize none|zero_one|clamp_zero|zscore --temperature 1.0 --clip true``) plus
``--clip_checkpoint PATH`` (local open_clip weights; no hub access) and ``--clip_model`` (default:
the checkpoint's ``clip_model_name``). ``--ckpt`` takes the original's ``.pt`` (read with
``weights_only=True``) or a cgjax checkpoint directory; several may be given comma-separated.

Bulk mode (the original's ``export_all_signals.py``): ``--all --output_dir artifacts`` writes
``concept_signals_<dim>.json`` for every dimension (defaults ``--normalize zscore --temperature
0.8``; per-dimension checkpoints with ``--ckpt_<dim> PATH`` or ``--ckpt_for DIM=PATH``).

Besides the original files, both modes write cgjax's keyed signals (``--keyed``) and the
validate_signals report (``--report``; threshold 0.6, backoff 0.05, top-k 2, budget 3, fairness).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from cgjax.prototypes import export, io as pio
from cgjax.prototypes.calibrate import MODES
from cgjax.prototypes.validate_signals import add_gating_args
from converters import openclip


def _bool(v: str) -> bool:
    return str(v).strip().lower() in {"1", "true", "yes", "y"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset_json", required=True)
    ap.add_argument("--images_root", default=None, help="default: the dataset JSON's folder")
    ap.add_argument("--ckpt", default=None, help="prototypes: original .pt or cgjax checkpoint dir (comma list ok)")
    ap.add_argument("--dimensions", default="", help="comma list; empty = every dimension in the checkpoint(s)")
    ap.add_argument("--output", default=None, help="output file (single mode)")
    ap.add_argument("--format", default="json", help="json, anything else = csv (as the original)")
    ap.add_argument("--topk", type=int, default=3)
    ap.add_argument("--normalize", default=None, choices=MODES, help="default none (bulk: zscore)")
    ap.add_argument("--temperature", type=float, default=None, help="default 1.0 (bulk: 0.8)")
    ap.add_argument("--clip", default="true", help="clip cosines to [-1, 1] before mapping")
    ap.add_argument("--clip_checkpoint", default=None, help="local open_clip weights (file or folder)")
    ap.add_argument("--clip_model", default=None, help="open_clip model name (default: the checkpoint's)")
    ap.add_argument("--batch_size", type=int, default=32, help="CLIP encode batch (fixed shape)")
    ap.add_argument("--ema", action="store_true", help="cgjax checkpoints: use the EMA prototypes")
    # bulk mode
    ap.add_argument("--all", action="store_true", help="export_all_signals: one JSON per dimension")
    ap.add_argument("--output_dir", default="artifacts")
    for d in ("artist", "style", "genre"):
        ap.add_argument(f"--ckpt_{d}", default=None)
    ap.add_argument("--ckpt_for", nargs="*", default=[], help="DIM=PATH per-dimension checkpoints")
    ap.add_argument("--csv", default="false", help="bulk mode: also write concept_signals_<dim>.csv")
    # cgjax outputs
    ap.add_argument("--keyed", default="", help="keyed signals JSON ('' = beside the output, 'none' = skip)")
    ap.add_argument("--report", default="", help="validate_signals report ('' = beside the output, 'none' = skip)")
    add_gating_args(ap)
    a = ap.parse_args(argv)
    if a.normalize is None:
        a.normalize = "zscore" if a.all else "none"
    if a.temperature is None:
        a.temperature = 0.8 if a.all else 1.0
    if not a.all and not a.output:
        ap.error("--output is required (or use --all --output_dir DIR)")
    return a


def load_checkpoints(a: argparse.Namespace):
    per_dim = {d: getattr(a, f"ckpt_{d}") for d in ("artist", "style", "genre") if getattr(a, f"ckpt_{d}")}
    for item in a.ckpt_for:
        d, _, p = item.partition("=")
        if not p:
            raise SystemExit(f"--ckpt_for expects DIM=PATH, got {item!r}")
        per_dim[d] = p
    ps = None
    if a.ckpt:
        for p in [x for x in a.ckpt.split(",") if x]:
            q = pio.load_prototypes(p, ema=a.ema)
            ps = q if ps is None else ps.merged(q)
    for d, p in per_dim.items():
        q = pio.load_prototypes(p, ema=a.ema)
        q.require(d)
        q = q.subset([d])
        ps = q if ps is None else ps.merged(q)
    if ps is None:
        raise SystemExit("no prototypes: give --ckpt (or --ckpt_<dim> / --ckpt_for DIM=PATH)")
    return ps


def main(argv: Sequence[str] | None = None) -> dict:
    a = parse_args(argv)

    ps = load_checkpoints(a)
    dims = [d.strip() for d in a.dimensions.split(",") if d.strip()] or ps.dimensions
    for d in dims:
        ps.require(d)  # clear error naming the checkpoint and its dimensions
    model_name = a.clip_model or ps.clip_model_name
    if a.clip_checkpoint is None and not model_name.startswith(("local-dir:", "hf-hub:")):
        raise SystemExit(f"--clip_checkpoint is required for {model_name!r} (no hub access)")
    head = openclip.load_head(model_name, a.clip_checkpoint, batch_size=a.batch_size)
    head.load_prototypes(ps)  # checks the embedding width
    ds, row_images = export.read_aligned(a.dataset_json, a.images_root, dims)
    emb, present = export.embed_records(head, ds)
    sig = export.make_signals(ps, ds, emb, present, dims, a.normalize, a.temperature, _bool(a.clip),
                              dataset_json=os.path.abspath(a.dataset_json))
    vkw = dict(threshold=a.threshold, backoff_delta=a.backoff_delta, topk_per_dim=a.topk_per_dim, budget=a.budget,
               fairness=_bool(a.fairness), priority=a.priority.split(","))
    keyed = None if a.keyed.lower() == "none" else a.keyed
    report = None if a.report.lower() == "none" else a.report
    out: dict = {}
    if a.all:
        out = export.write_bulk(sig, ds, row_images, dims, a.output_dir, _bool(a.csv), a.topk, keyed, report, vkw)
    else:
        fmt = "json" if a.format == "json" else "csv"
        out = export.write_outputs(sig, ds, row_images, dims, a.output, fmt, a.topk, keyed, report, ps, vkw)
    n_missing = int((~present).sum())
    print(json.dumps({k: v for k, v in out.items() if k != "validation"}, indent=2))
    if "validation" in out:
        print(json.dumps(out["validation"], indent=2))
    if n_missing:
        print(f"warning: {n_missing} image(s) missing: their signals are empty", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
