"""Metrics of a reasoning.json (cgjax's or the original PyTorch project's) against a dataset JSON.

    python scripts/evaluate.py --reasoning-json R --dataset-json D --out metrics.json \\
        [--images-root ROOT] [--targets-csv C] [--baseline-json B] [--report-dir DIR]

``--targets-csv`` supplies the training reasons for the coherence lexicon (rows of the evaluated
images are left out). The records' splits are those every stage used: a record's own ``split``,
else the data set's split file (``cgjax.data.splits``; ``--splits-json``, default beside the dataset
JSON; read, never made here). ``--split test`` scores only that split's images; the metrics'
``inputs.splits`` counts the evaluated images per split, and evaluated training images are warned
of. ``--baseline-json`` also writes ``metrics_baseline.json`` next to ``--out`` and adds
``comparison`` to the metrics. ``--report-dir`` writes ``report.html`` +
``concept_graph.png``. Definitions: ``docs/evaluation.md``.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import posixpath
import sys
from typing import Any, Sequence

from absl import flags

from cgjax import commandline, persistence
from cgjax.data.records import read_dataset_json, read_targets_csv
from cgjax.data.schema import DataError, load_vocab, normalize_split, read_json
from cgjax.data.splits import SplitPolicy
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


PROG = "scripts/evaluate.py"


def define_flags(fv: flags.FlagValues, argv: Sequence[str] | None = None) -> None:
    """``scripts/evaluate.py``'s flags on ``fv`` (see :mod:`cgjax.commandline`)."""
    del argv  # no config file
    flags.DEFINE_string("reasoning-json", None, "reasoning.json of the concept model", flag_values=fv, required=True)
    flags.DEFINE_string("dataset-json", None, "dataset JSON with the ground-truth labels", flag_values=fv,
                        required=True)
    flags.DEFINE_string("images-root", None, "images root (default: the dataset JSON's folder)", flag_values=fv)
    flags.DEFINE_string("targets-csv", None, "targets CSV whose reasons train the coherence lexicon", flag_values=fv)
    flags.DEFINE_string("vocab-json", None, "cgjax vocab.json: extra label names to snap answers to", flag_values=fv)
    flags.DEFINE_string("baseline-json", None, "reasoning_baseline.json of the no-concept baseline", flag_values=fv)
    flags.DEFINE_string("out", None, "metrics JSON to write", flag_values=fv, required=True)
    flags.DEFINE_string("baseline-out", None, "baseline metrics JSON (default: beside --out)", flag_values=fv)
    flags.DEFINE_string("dimensions", None, "comma-separated dimensions (default: the records' concepts keys, "
                        "else artist,style,genre)", flag_values=fv)
    flags.DEFINE_string("split", None, "score only the images of this split (train, validation or test)",
                        flag_values=fv)
    flags.DEFINE_string("splits-json", None, "the split file of a dataset JSON without splits (default: "
                        "<dataset stem>.splits.json beside it, as training writes it)", flag_values=fv)
    flags.DEFINE_string("sentinels", ",".join(DEFAULT_SENTINELS), "JSON start,end sentinels", flag_values=fv)
    flags.DEFINE_integer("n-bins", 10, "calibration bins", flag_values=fv)
    flags.DEFINE_string("lexicon-out", None, "also write the learned evidence lexicon here", flag_values=fv)
    flags.DEFINE_string("report-dir", None, "write report.html and concept_graph.png here", flag_values=fv)
    flags.DEFINE_integer("gallery-n", 12, "images in the report's gallery", flag_values=fv)
    flags.DEFINE_string("saliency-json", None, "saliency.json from scripts/infer.py, drawn in the report",
                        flag_values=fv)
    flags.DEFINE_bool("allow_outside_root", False, "accept image paths that are absolute or leave the images root "
                      "with '..'", flag_values=fv)


def evaluate_reasoning(reasoning_json: str, dataset_json: str, out: str, *, images_root: str | None = None,
                       targets_csv: str | None = None, vocab_json: str | None = None,
                       baseline_json: str | None = None, baseline_out: str | None = None,
                       dimensions: Sequence[str] | None = None, sentinels: Sequence[str] = DEFAULT_SENTINELS,
                       n_bins: int = 10, lexicon_out: str | None = None, report_dir: str | None = None,
                       gallery_n: int = 12, saliency_json: str | None = None,
                       allow_outside_root: bool = False, split: str | None = None,
                       splits_json: str | None = None) -> dict[str, Any]:
    """Metrics of ``reasoning_json`` against ``dataset_json``, written to ``out`` (see the module
    docstring for the optional inputs and outputs); -> the metrics."""
    sentinels = tuple(sentinels)
    if len(sentinels) != 2:
        raise ValueError(f"sentinels: expected a start and an end marker, got {sentinels!r}")
    dataset = read_dataset_json(dataset_json, images_root, dimensions=list(dimensions) if dimensions else None,
                                allow_outside_root=allow_outside_root)
    policy = SplitPolicy(splits_json=splits_json or "")
    dataset = policy.apply(dataset, create=False)  # the split file the stages wrote, if there is one
    if split:
        name = normalize_split(split)
        if any(r.split is None for r in dataset.records):
            raise DataError(dataset_json, None, f"--split {split}: records carry no split and there is no split file "
                                                f"{policy.path(dataset_json)} (the stages write it on first use)")
        dataset = dataclasses.replace(dataset, records=[r for r in dataset.records if r.split == name])
    root = dataset.images_root
    reasoning = _read_reasoning(reasoning_json)
    baseline = _read_reasoning(baseline_json) if baseline_json else None
    vocabs = load_vocab(vocab_json) if vocab_json else None
    targets = read_targets_csv(targets_csv, root, dimensions=dataset.dimensions) if targets_csv else None

    lexicon = None
    if targets is not None:
        evaluated = list(match_records(reasoning, dataset, root)[0].values())
        if baseline is not None:
            evaluated += list(match_records(baseline, dataset, root)[0].values())
        lexicon = EvidenceLexicon.from_targets(targets, exclude_images=_evaluated_paths(targets, evaluated))
        log.info("evidence lexicon from %d training reasons", lexicon.n_documents)
        if lexicon_out:
            persistence.write_json(lexicon_out, lexicon.to_json())

    every = dict(reasoning)
    every.update({k: v for k, v in (baseline or {}).items() if k not in every})
    parser = AnswerParser(label_vocabs(dataset, every, targets, vocabs), dataset.dimensions, sentinels=sentinels)
    kw = dict(images_root=root, lexicon=lexicon, n_bins=n_bins, parser=parser)
    metrics = evaluate(reasoning, dataset, **kw)
    per_split = collections.Counter(str(r.split) for r in match_records(reasoning, dataset, root)[0].values())
    if per_split.get("train"):
        log.warning("%d evaluated image(s) are training images (split train): their numbers are not held out",
                    per_split["train"])
    metrics["inputs"] = {"reasoning_json": os.path.abspath(reasoning_json),
                         "dataset_json": os.path.abspath(dataset_json),
                         "targets_csv": os.path.abspath(targets_csv) if targets_csv else None,
                         "split": normalize_split(split) if split else None, "splits": dict(sorted(per_split.items()))}
    baseline_metrics = None
    if baseline is not None:
        baseline_metrics = evaluate(baseline, dataset, **kw)
        baseline_metrics["inputs"] = {**metrics["inputs"], "reasoning_json": os.path.abspath(baseline_json)}
        metrics["comparison"] = compare(metrics, baseline_metrics)
        out_b = baseline_out or os.path.join(os.path.dirname(os.path.abspath(out)), "metrics_baseline.json")
        persistence.write_json(out_b, baseline_metrics)
        log.info("wrote %s", out_b)
    persistence.write_json(out, metrics)
    log.info("wrote %s (%d images, %d unmatched)", out, metrics["n_images"], metrics["n_unmatched"])
    if report_dir:
        saliency = load_saliency(saliency_json) if saliency_json else None
        path = write_report(report_dir, metrics, reasoning, dataset, baseline_metrics, root,
                            gallery_n=gallery_n, sentinels=sentinels, saliency=saliency)
        log.info("wrote %s", path)
    return metrics


def evaluate_from_flags(fv: flags.FlagValues) -> dict[str, Any]:
    """:func:`evaluate_reasoning` from the parsed flags of :func:`define_flags`; prints a summary line per mode."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dims = [d.strip() for d in fv.dimensions.split(",") if d.strip()] if fv.dimensions else None
    sentinels = tuple(s.strip() for s in fv.sentinels.split(","))
    if len(sentinels) != 2:
        raise commandline.UsageError(f"--sentinels needs two comma-separated markers, got {fv.sentinels!r}")
    metrics = evaluate_reasoning(
        fv["reasoning-json"].value, fv["dataset-json"].value, fv.out, images_root=fv["images-root"].value,
        targets_csv=fv["targets-csv"].value, vocab_json=fv["vocab-json"].value,
        baseline_json=fv["baseline-json"].value, baseline_out=fv["baseline-out"].value, dimensions=dims,
        sentinels=sentinels, n_bins=fv["n-bins"].value, lexicon_out=fv["lexicon-out"].value,
        report_dir=fv["report-dir"].value, gallery_n=fv["gallery-n"].value, saliency_json=fv["saliency-json"].value,
        allow_outside_root=fv.allow_outside_root, split=fv.split, splits_json=fv["splits-json"].value)
    for mode in metrics["modes"]:
        m = metrics[mode]
        print(f"{mode:10s} n={m['n']:4d} all-correct={m['multi_label_all_correct']} macro-F1="
              + json.dumps({d: None if v is None else round(v, 3) for d, v in m["macro_f1"].items()}))
    return metrics


def main(argv: Sequence[str]) -> dict[str, Any]:
    """``scripts/evaluate.py``'s command line, in this process; -> the metrics."""
    return evaluate_from_flags(commandline.parse(define_flags, argv, PROG))


def run(fv: flags.FlagValues) -> int:
    """The script (under ``absl.app.run``): errors in the inputs print one line and exit 2."""
    try:
        evaluate_from_flags(fv)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
