"""The original's ``validate_signals`` report: how concept signals would gate concept injection.

Per image and dimension, concepts whose signal passes ``threshold`` are selected (sorted by
score, cut to ``topk_per_dim``); if none passes, the best one within ``backoff_delta`` below the
threshold is taken ("backoff"). Across dimensions a per-image ``budget`` is applied; with
``fairness`` each dimension in ``priority`` order first gets its top-1, then the remaining slots
are filled by score. Metrics (same names as the original):

- per dimension: ``activation_rate`` (images with >= 1 concept selected after the budget / n),
  ``activation_pre_backoff_rate``, ``backoff_usage_rate``, ``coverage_rate`` (= activation rate,
  as in the original), ``precision_top1`` (top selected concept == ground truth, over images with
  a selection and a known ground truth), ``false_injection_rate_known_gt`` (1 - precision),
  ``injection_when_unknown_gt`` (a selection while the ground truth is empty / n);
- ``budget_hit_rate`` (selected total == budget / n) and ``budget_overflow_precut_rate``
  (candidates before the budget > budget / n).

Names are compared after ``strip().lower()`` with ``_`` and ``-`` -> space.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from absl import flags

from cgjax import commandline, persistence
from cgjax.data.signals import read_signals_index
from cgjax.prototypes import io as pio
from cgjax.prototypes.head import read_records

DEFAULTS = dict(threshold=0.6, backoff_delta=0.05, topk_per_dim=2, budget=3, fairness=True,
                priority=("artist", "style", "genre"), threshold_mode="similarity")


def normalize_name(name: Any) -> str:
    if name is None:
        return ""
    return str(name).strip().lower().replace("_", " ").replace("-", " ")


def select_per_dim(
    signal: Mapping[str, Sequence[float]] | None, threshold: float = 0.6, backoff_delta: float = 0.05,
    topk_per_dim: int = 2, threshold_mode: str = "similarity",
) -> tuple[list[tuple[int, float]], int, bool]:
    """One image, one dimension: ``({"<idx>": [1 - x, x]}) -> ([(idx, score)], pre_backoff_count, backoff)``.

    Similarity mode keeps ``x >= threshold`` (score x); distance mode keeps ``d <= threshold``
    (score ``1 - d``).
    """
    if threshold_mode not in ("similarity", "distance"):
        raise ValueError(f"threshold_mode must be 'similarity' or 'distance', got {threshold_mode!r}")
    cands: list[tuple[int, float, bool]] = []
    for key, pair in (signal or {}).items():
        d, s = float(pair[0]), float(pair[1])
        if threshold_mode == "similarity":
            cands.append((int(key), s, s >= threshold))
        else:
            cands.append((int(key), 1.0 - d, d <= threshold))
    chosen = sorted([(i, sc) for i, sc, ok in cands if ok], key=lambda t: -t[1])
    pre = len(chosen)
    used_backoff = False
    if not chosen and backoff_delta > 0 and cands:
        if threshold_mode == "similarity":
            floor = max(0.0, threshold - backoff_delta)
            ok = [(i, sc) for i, sc, _ in cands if sc >= floor]
        else:
            ok = [(i, sc) for i, sc, _ in cands if 1.0 - sc <= threshold + backoff_delta]
        if ok:
            chosen = [max(ok, key=lambda t: t[1])]
            used_backoff = True
    if topk_per_dim and topk_per_dim > 0:
        chosen = chosen[:topk_per_dim]
    return chosen, pre, used_backoff


def fair_budget_merge(
    per_dim: Mapping[str, list[tuple[int, float]]], budget: int, fairness: bool = True,
    priority: Sequence[str] = ("artist", "style", "genre"),
) -> dict[str, list[tuple[int, float]]]:
    """Apply the per-image budget: priority dims' top-1 first (with fairness), then by score."""
    if budget <= 0:
        return {d: list(v) for d, v in per_dim.items()}
    out: dict[str, list[tuple[int, float]]] = {d: [] for d in per_dim}
    taken: set[tuple[str, int]] = set()
    total = 0
    if fairness:
        for d in (list(priority) or list(per_dim)):
            if total >= budget:
                break
            if per_dim.get(d):
                i, sc = per_dim[d][0]
                out[d].append((i, sc))
                taken.add((d, i))
                total += 1
    rest = sorted(((sc, d, i) for d, v in per_dim.items() for i, sc in v if (d, i) not in taken),
                  key=lambda t: -t[0])
    for sc, d, i in rest:
        if total >= budget:
            break
        out[d].append((i, sc))
        total += 1
    for d in out:
        out[d].sort(key=lambda t: -t[1])
    return out


def validate_signals(
    signals: Mapping[str, Sequence[Mapping[str, Any]]],
    ground_truth: Mapping[str, Sequence[str | None]],
    idx_to_concept: Mapping[str, Sequence[str]] | None = None,
    threshold: float = 0.6, backoff_delta: float = 0.05, topk_per_dim: int = 2, budget: int = 3,
    fairness: bool = True, priority: Sequence[str] = ("artist", "style", "genre"),
    threshold_mode: str = "similarity",
) -> dict[str, Any]:
    """The report over ``n = min(len of every list)`` images.

    ``signals[dim][i]`` is the original per-image entry (``{dim: {"<idx>": [1-x, x]}}`` or
    directly ``{"<idx>": [1-x, x]}``); ``ground_truth[dim][i]`` the label name (None / "" when
    unknown); ``idx_to_concept[dim]`` maps local indices to names.
    """
    dims = list(signals)
    idx_to_concept = idx_to_concept or {}
    lengths = [len(signals[d]) for d in dims] + [len(ground_truth[d]) for d in dims if d in ground_truth]
    n = min(lengths) if lengths else 0
    # the priority's dimensions that this data has; none of them (another domain): the data's order
    prio = [p for p in (s.strip() for s in priority) if p in dims] or list(dims)
    cnt = {d: dict(act=0, pre=0, backoff=0, correct=0, judged=0, unknown_inj=0) for d in dims}
    budget_hit = overflow = 0
    for i in range(n):
        per_dim: dict[str, list[tuple[int, float]]] = {}
        for d in dims:
            entry = signals[d][i] or {}
            if d in entry and isinstance(entry[d], Mapping):
                entry = entry[d]
            chosen, pre, used = select_per_dim(entry, threshold, backoff_delta, topk_per_dim, threshold_mode)
            per_dim[d] = chosen
            cnt[d]["pre"] += pre > 0
            cnt[d]["backoff"] += used
        if sum(len(v) for v in per_dim.values()) > budget > 0:
            overflow += 1
        merged = fair_budget_merge(per_dim, budget, fairness, prio)
        if budget > 0 and sum(len(v) for v in merged.values()) == budget:
            budget_hit += 1
        for d in dims:
            sel = merged[d]
            if not sel:
                continue
            c = cnt[d]
            c["act"] += 1
            gt = normalize_name(ground_truth.get(d, [None] * n)[i])
            names = idx_to_concept.get(d)
            if not gt:
                c["unknown_inj"] += 1
            elif names is not None and 0 <= sel[0][0] < len(names):
                c["judged"] += 1
                c["correct"] += normalize_name(names[sel[0][0]]) == gt
    den = max(n, 1)
    report: dict[str, Any] = {"samples": n}
    for d in dims:
        c = cnt[d]
        prec = c["correct"] / c["judged"] if c["judged"] else 0.0
        report[d] = {
            "activation_rate": c["act"] / den,
            "activation_pre_backoff_rate": c["pre"] / den,
            "backoff_usage_rate": c["backoff"] / den,
            "coverage_rate": c["act"] / den,
            "precision_top1": prec,
            "false_injection_rate_known_gt": (1.0 - prec) if c["judged"] else 0.0,
            "injection_when_unknown_gt": c["unknown_inj"] / den,
            "judged": c["judged"],
        }
    report["budget_hit_rate"] = budget_hit / den
    report["budget_overflow_precut_rate"] = overflow / den
    report["settings"] = dict(threshold=threshold, backoff_delta=backoff_delta, topk_per_dim=topk_per_dim,
                              budget=budget, fairness=fairness, priority=prio, threshold_mode=threshold_mode)
    return report


def define_gating_flags(fv: flags.FlagValues) -> None:
    """The original's gating flags (threshold 0.6, backoff 0.05, top-k 2, budget 3, fairness, priority)
    on ``fv`` (absl; see :mod:`cgjax.commandline`)."""
    d = DEFAULTS
    flags.DEFINE_float("threshold", d["threshold"], "a concept is selected when its signal reaches this",
                       flag_values=fv)
    flags.DEFINE_float("backoff_delta", d["backoff_delta"], "none passes: take the best within this below the "
                       "threshold", flag_values=fv)
    flags.DEFINE_integer("topk_per_dim", d["topk_per_dim"], "concepts kept per dimension", flag_values=fv)
    flags.DEFINE_integer("budget", d["budget"], "concepts per image over all dimensions", flag_values=fv)
    flags.DEFINE_string("fairness", "true" if d["fairness"] else "false", "true: every dimension first gets its "
                        "top-1 (priority order)", flag_values=fv)
    flags.DEFINE_string("priority", ",".join(d["priority"]), "dimension order for the budget", flag_values=fv)


def gating_kwargs(fv: flags.FlagValues) -> dict[str, Any]:
    """The flags of :func:`define_gating_flags` as :func:`validate_signals` keyword arguments."""
    return dict(threshold=fv.threshold, backoff_delta=fv.backoff_delta, topk_per_dim=fv.topk_per_dim,
                budget=fv.budget, fairness=_bool(fv.fairness), priority=fv.priority.split(","))


def _bool(v: str) -> bool:
    return str(v).strip().lower() in {"1", "true", "yes", "y"}


def define_flags(fv: flags.FlagValues, argv: Sequence[str] | None = None) -> None:
    """``python -m cgjax.prototypes.validate_signals``'s flags (the original's) on ``fv``."""
    del argv  # no config file
    flags.DEFINE_string("dataset_json", None, "the dataset JSON (ground truth)", flag_values=fv, required=True)
    flags.DEFINE_string("images_root", None, "default: the dataset JSON's folder", flag_values=fv)
    for d in ("artist", "style", "genre"):
        flags.DEFINE_string(f"signals_{d}_json", None, f"signals of {d}", flag_values=fv)
        flags.DEFINE_string(f"ckpt_{d}", None, f"prototype checkpoint naming the {d} concepts", flag_values=fv)
    flags.DEFINE_multi_string("signals", [], "DIM=PATH (any dimension); repeat the flag for several",
                              flag_values=fv)
    flags.DEFINE_string("ckpt", None, "one prototype checkpoint holding every dimension", flag_values=fv)
    flags.DEFINE_enum("threshold_mode", "similarity", ["similarity", "distance"], "how signals compare with the "
                      "threshold", flag_values=fv)
    define_gating_flags(fv)
    flags.DEFINE_string("output", "artifacts/validation_metrics.json", "report JSON to write", flag_values=fv)


def run(fv: flags.FlagValues) -> dict[str, Any]:
    """The report from the parsed flags of :func:`define_flags`; written to ``--output`` and printed.
    Dimensions are any ``--signals DIM=PATH`` (plus the original's ``--signals_{artist,style,genre}_json``
    / ``--ckpt_{dim}``)."""
    paths = {d: fv[f"signals_{d}_json"].value for d in ("artist", "style", "genre") if fv[f"signals_{d}_json"].value}
    for item in fv.signals:
        d, _, p = item.partition("=")
        if not p:
            raise commandline.UsageError(f"--signals expects DIM=PATH, got {item!r}")
        paths[d] = p
    if not paths:
        raise commandline.UsageError("no signals given (--signals_<dim>_json or --signals DIM=PATH)")
    signals = {}
    for d, p in paths.items():
        with open(p) as fh:
            signals[d] = json.load(fh)
        if not isinstance(signals[d], list):
            raise ValueError(f"{p}: expected a JSON list aligned with the dataset records")
    idx_to_concept: dict[str, list[str]] = {}
    if fv.ckpt:
        idx_to_concept.update(pio.load_prototypes(fv.ckpt).idx_to_concept)
    for d in paths:
        ck = fv[f"ckpt_{d}"].value if f"ckpt_{d}" in fv else None
        if ck:
            idx_to_concept[d] = pio.load_prototypes(ck).idx_to_concept[d]
        beside = read_signals_index(paths[d]) or {}  # the concept index written beside the list, if any
        if d not in idx_to_concept and d in beside:
            idx_to_concept[d] = list(beside[d].names)
    gt = ground_truth_from_dataset(fv.dataset_json, list(paths), fv.images_root)
    rep = validate_signals(signals, gt, idx_to_concept, threshold_mode=fv.threshold_mode, **gating_kwargs(fv))
    write_json(fv.output, rep)
    print(json.dumps(rep, indent=2))
    return rep


def main(argv: Sequence[str]) -> dict[str, Any]:
    """The command line, in this process; -> the report."""
    return run(commandline.parse(define_flags, argv, "python -m cgjax.prototypes.validate_signals"))


def ground_truth_from_dataset(dataset_json: str, dims: Sequence[str], images_root: str | None = None) -> dict[str, list]:
    """Ground-truth label names per dimension, in record order (None where missing)."""
    ds = read_records(dataset_json, images_root, dimensions=dims)
    n = max([r.row for r in ds.records if r.row is not None], default=-1) + 1
    gt: dict[str, list] = {d: [None] * max(n, len(ds.records)) for d in dims}
    for i, r in enumerate(ds.records):
        for d in dims:
            gt[d][r.row if r.row is not None else i] = r.labels.get(d)
    return gt


def write_json(path: str, obj: Any) -> None:
    """Write JSON (indented by 2, ASCII, no final newline) atomically (:func:`cgjax.persistence.write_text`)."""
    persistence.write_text(path, json.dumps(obj, indent=2))


if __name__ == "__main__":
    commandline.run(define_flags, run)
