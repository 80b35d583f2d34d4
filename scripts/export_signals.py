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

import json
import os
import sys
from typing import Sequence

from absl import flags

from cgjax import commandline
from cgjax.prototypes import export, io as pio
from cgjax.prototypes.calibrate import MODES
from cgjax.prototypes.validate_signals import define_gating_flags, gating_kwargs
from converters import openclip

DIMS = ("artist", "style", "genre")  # the original's per-dimension flags (--ckpt_<dim>)


def _bool(v: str) -> bool:
    return str(v).strip().lower() in {"1", "true", "yes", "y"}


def define_flags(fv: flags.FlagValues, argv: Sequence[str] | None = None) -> None:
    """The flags (the original's names) on ``fv`` (see ``cgjax.commandline``)."""
    del argv  # no config file
    flags.DEFINE_string("dataset_json", None, "the dataset JSON", flag_values=fv, required=True)
    flags.DEFINE_string("images_root", None, "default: the dataset JSON's folder", flag_values=fv)
    flags.DEFINE_string("ckpt", None, "prototypes: original .pt or cgjax checkpoint dir (comma list ok)",
                        flag_values=fv)
    flags.DEFINE_string("dimensions", "", "comma list; empty = every dimension in the checkpoint(s)", flag_values=fv)
    flags.DEFINE_string("output", None, "output file (single mode)", flag_values=fv)
    flags.DEFINE_string("format", "json", "json, anything else = csv (as the original)", flag_values=fv)
    flags.DEFINE_integer("topk", 3, "top concepts per image in the output", flag_values=fv)
    flags.DEFINE_enum("normalize", None, list(MODES), "default none (bulk: zscore)", flag_values=fv)
    flags.DEFINE_float("temperature", None, "default 1.0 (bulk: 0.8)", flag_values=fv)
    flags.DEFINE_string("clip", "true", "clip cosines to [-1, 1] before mapping", flag_values=fv)
    flags.DEFINE_string("clip_checkpoint", None, "local open_clip weights (file or folder)", flag_values=fv)
    flags.DEFINE_string("clip_model", None, "open_clip model name (default: the checkpoint's)", flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "CLIP encode batch (fixed shape)", flag_values=fv)
    flags.DEFINE_bool("ema", False, "cgjax checkpoints: use the EMA prototypes", flag_values=fv)
    # bulk mode
    flags.DEFINE_bool("all", False, "export_all_signals: one JSON per dimension", flag_values=fv)
    flags.DEFINE_string("output_dir", "artifacts", "bulk mode: output folder", flag_values=fv)
    for d in DIMS:
        flags.DEFINE_string(f"ckpt_{d}", None, f"prototypes of {d} (bulk mode)", flag_values=fv)
    flags.DEFINE_multi_string("ckpt_for", [], "DIM=PATH per-dimension checkpoint; repeat the flag for several",
                              flag_values=fv)
    flags.DEFINE_string("csv", "false", "bulk mode: also write concept_signals_<dim>.csv", flag_values=fv)
    # cgjax outputs
    flags.DEFINE_string("keyed", "", "keyed signals JSON ('' = beside the output, 'none' = skip)", flag_values=fv)
    flags.DEFINE_string("report", "", "validate_signals report ('' = beside the output, 'none' = skip)",
                        flag_values=fv)
    define_gating_flags(fv)


def load_checkpoints(a: flags.FlagValues):
    per_dim = {d: a[f"ckpt_{d}"].value for d in DIMS if a[f"ckpt_{d}"].value}
    for item in a.ckpt_for:
        d, _, p = item.partition("=")
        if not p:
            raise commandline.UsageError(f"--ckpt_for expects DIM=PATH, got {item!r}")
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
        raise commandline.UsageError("no prototypes: give --ckpt (or --ckpt_<dim> / --ckpt_for DIM=PATH)")
    return ps


def run(a: flags.FlagValues) -> dict:
    """The export from the parsed flags of :func:`define_flags`; -> what was written."""
    bulk = a["all"].value
    normalize = a.normalize or ("zscore" if bulk else "none")
    temperature = a.temperature if a.temperature is not None else (0.8 if bulk else 1.0)
    if not bulk and not a.output:
        raise commandline.UsageError("--output is required (or use --all --output_dir DIR)")
    ps = load_checkpoints(a)
    dims = [d.strip() for d in a.dimensions.split(",") if d.strip()] or ps.dimensions
    for d in dims:
        ps.require(d)  # clear error naming the checkpoint and its dimensions
    model_name = a.clip_model or ps.clip_model_name
    if a.clip_checkpoint is None and not model_name.startswith(("local-dir:", "hf-hub:")):
        raise commandline.UsageError(f"--clip_checkpoint is required for {model_name!r} (no hub access)")
    head = openclip.load_head(model_name, a.clip_checkpoint, batch_size=a.batch_size)
    head.load_prototypes(ps)  # checks the embedding width
    ds, row_images = export.read_aligned(a.dataset_json, a.images_root, dims)
    emb, present = export.embed_records(head, ds)
    sig = export.make_signals(ps, ds, emb, present, dims, normalize, temperature, _bool(a.clip),
                              dataset_json=os.path.abspath(a.dataset_json))
    vkw = gating_kwargs(a)
    keyed = None if a.keyed.lower() == "none" else a.keyed
    report = None if a.report.lower() == "none" else a.report
    out: dict = {}
    if bulk:
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


def main(argv: Sequence[str]) -> dict:
    """The command line, in this process: ``main(["--dataset_json", D, "--ckpt", C, "--output", O])``."""
    return run(commandline.parse(define_flags, argv, "scripts/export_signals.py"))


if __name__ == "__main__":
    commandline.run(define_flags, run)
