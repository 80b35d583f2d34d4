"""Metrics of a reasoning.json (cgjax's or the original PyTorch project's) against a dataset JSON.

    python scripts/evaluate.py --reasoning-json R --dataset-json D --out metrics.json \\
        [--images-root ROOT] [--targets-csv C] [--baseline-json B] [--report-dir DIR]

``--targets-csv`` supplies the training reasons for the coherence lexicon (rows of the evaluated
images are left out). ``--baseline-json`` also writes ``metrics_baseline.json`` next to ``--out``
and adds ``comparison`` to the metrics. ``--report-dir`` writes ``report.html`` +
``concept_graph.png``. Definitions: ``docs/evaluation.md``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import posixpath
import sys
from typing import Any, Sequence

from cgjax import persistence
from cgjax.data.records import read_dataset_json, read_targets_csv
from cgjax.data.schema import DataError, load_vocab, read_json
from cgjax.eval.metrics import EvidenceLexicon, compare, evaluate, label_vocabs, match_records
from cgjax.eval.parser import AnswerParser, DEFAULT_SENTINELS
from cgjax.eval.report import write_report
from cgjax.infer import load_saliency

log = logging.getLogger("cgjax.eval")


def _read_reasoning(path: str) -> dict[str, Any]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(path, None, f"expected a JSON object {{image_path: {{prompt: answer, '__meta__': ...}}}}, "
                                    f"got {type(data).__name__}")
    for key, entry in data.items():
        if not isinstance(entry, dict):
            raise DataError(path, f"image {key!r}", f"entry is not a JSON object ({type(entry).__name__})")
    return data


def _parts(path: str) -> list[str]:
    return [p for p in posixpath.normpath(path.replace("\\", "/")).split("/") if p not in ("", ".")]


def _evaluated_paths(targets, records) -> set[str]:
    """Targets rows (image paths) that are one of ``records``, compared by path suffix."""
    wanted = {"/".join(_parts(r.image)) for r in records}
    out = set()
    for row in targets.rows:
        parts = _parts(row.image_path)
        if any("/".join(parts[k:]) in wanted for k in range(len(parts))) or \
                any(w.endswith("/" + "/".join(parts)) for w in wanted):
            out.add(row.image_path)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reasoning-json", required=True, help="reasoning.json of the concept model")
    ap.add_argument("--dataset-json", required=True, help="dataset JSON with the ground-truth labels")
    ap.add_argument("--images-root", default=None, help="images root (default: the dataset JSON's folder)")
    ap.add_argument("--targets-csv", default=None, help="targets CSV whose reasons train the coherence lexicon")
    ap.add_argument("--vocab-json", default=None, help="cgjax vocab.json: extra label names to snap answers to")
    ap.add_argument("--baseline-json", default=None, help="reasoning_baseline.json of the no-concept baseline")
    ap.add_argument("--out", required=True, help="metrics JSON to write")
    ap.add_argument("--baseline-out", default=None, help="baseline metrics JSON (default: beside --out)")
    ap.add_argument("--dimensions", default=None, help="comma-separated dimensions (default artist,style,genre)")
    ap.add_argument("--sentinels", default=",".join(DEFAULT_SENTINELS), help="JSON start,end sentinels")
    ap.add_argument("--n-bins", type=int, default=10, help="calibration bins")
    ap.add_argument("--lexicon-out", default=None, help="also write the learned evidence lexicon here")
    ap.add_argument("--report-dir", default=None, help="write report.html and concept_graph.png here")
    ap.add_argument("--gallery-n", type=int, default=12)
    ap.add_argument("--saliency-json", default=None, help="saliency.json from scripts/infer.py, drawn in the report")
    ap.add_argument("--allow_outside_root", action="store_true",
                    help="accept image paths that are absolute or leave the images root with '..'")
    return ap


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dims = [d.strip() for d in args.dimensions.split(",") if d.strip()] if args.dimensions else None
    sentinels = tuple(s.strip() for s in args.sentinels.split(","))
    if len(sentinels) != 2:
        raise SystemExit(f"--sentinels needs two comma-separated markers, got {args.sentinels!r}")
    dataset = read_dataset_json(args.dataset_json, args.images_root, dimensions=dims,
                                allow_outside_root=args.allow_outside_root)
    root = dataset.images_root
    reasoning = _read_reasoning(args.reasoning_json)
    baseline = _read_reasoning(args.baseline_json) if args.baseline_json else None
    vocabs = load_vocab(args.vocab_json) if args.vocab_json else None
    targets = read_targets_csv(args.targets_csv, root, dimensions=dataset.dimensions) if args.targets_csv else None

    lexicon = None
    if targets is not None:
        evaluated = list(match_records(reasoning, dataset, root)[0].values())
        if baseline is not None:
            evaluated += list(match_records(baseline, dataset, root)[0].values())
        lexicon = EvidenceLexicon.from_targets(targets, exclude_images=_evaluated_paths(targets, evaluated))
        log.info("evidence lexicon from %d training reasons", lexicon.n_documents)
        if args.lexicon_out:
            persistence.write_json(args.lexicon_out, lexicon.to_json())

    every = dict(reasoning)
    every.update({k: v for k, v in (baseline or {}).items() if k not in every})
    parser = AnswerParser(label_vocabs(dataset, every, targets, vocabs), dataset.dimensions, sentinels=sentinels)
    kw = dict(images_root=root, lexicon=lexicon, n_bins=args.n_bins, parser=parser)
    metrics = evaluate(reasoning, dataset, **kw)
    metrics["inputs"] = {"reasoning_json": os.path.abspath(args.reasoning_json),
                         "dataset_json": os.path.abspath(args.dataset_json),
                         "targets_csv": os.path.abspath(args.targets_csv) if args.targets_csv else None}
    baseline_metrics = None
    if baseline is not None:
        baseline_metrics = evaluate(baseline, dataset, **kw)
        baseline_metrics["inputs"] = {**metrics["inputs"], "reasoning_json": os.path.abspath(args.baseline_json)}
        metrics["comparison"] = compare(metrics, baseline_metrics)
        out_b = args.baseline_out or os.path.join(os.path.dirname(os.path.abspath(args.out)), "metrics_baseline.json")
        persistence.write_json(out_b, baseline_metrics)
        log.info("wrote %s", out_b)
    persistence.write_json(args.out, metrics)
    log.info("wrote %s (%d images, %d unmatched)", args.out, metrics["n_images"], metrics["n_unmatched"])
    if args.report_dir:
        saliency = None
        if args.saliency_json:
            saliency = load_saliency(args.saliency_json)
        path = write_report(args.report_dir, metrics, reasoning, dataset, baseline_metrics, root,
                            gallery_n=args.gallery_n, sentinels=sentinels, saliency=saliency)
        log.info("wrote %s", path)
    for mode in metrics["modes"]:
        m = metrics[mode]
        print(f"{mode:10s} n={m['n']:4d} all-correct={m['multi_label_all_correct']} macro-F1="
              + json.dumps({d: None if v is None else round(v, 3) for d, v in m["macro_f1"].items()}))
    return metrics


def run(argv: Sequence[str] | None = None) -> None:
    """The command line: errors in the inputs print one line and exit 2."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
