"""Metrics of a ``reasoning.json`` against a dataset (definitions in ``docs/evaluation.md``).

Per answer mode (``structured``, ``natural``, ``keys`` = the Stage A/B template answers) and per
dimension: top-1 ``accuracy``; ``per_concept[dim][label] = {precision, recall, f1, support}``,
``macro_f1`` and ``weighted_f1`` over the ground-truth classes present (a prediction outside them,
``Unknown`` included, is a miss for the true class and a false positive for no class: sklearn's
``labels=`` semantics); ``multi_label_all_correct``; ``coverage`` and ``coverage_per_concept`` (the
original's: share of the ground-truth labels found verbatim, canonicalised, in the whole answer);
``explanation_coverage`` and ``explanation_coverage_per_concept`` (cgjax's: share named, with aliases,
in the explanation); ``coherence``. From ``__meta__``: ``activation[dim]`` = ``recall@1/3/5`` of ``ranked_names`` and
``precision`` of the injected ``selected_names``; ``calibration[dim]`` = expected calibration error
of the signals (confidence = top score of ``ranked_global``, correct = top name == ground truth,
10 equal-width bins). Items whose ground truth is missing are left out of that dimension.

Coherence
---------
An **evidence lexicon** is learned from training reasons (targets CSV ``target_reason`` and the
row's labels). A term is a unigram or bigram of stemmed canonical words with no stop word; the
words of every label name (all dimensions) are excluded, so a reason that merely restates a key
carries no evidence. For label ``c`` of dimension ``d`` and term ``t`` with document frequencies
``n_tc`` (reasons labelled ``c``, of ``N_c``) and ``n_to`` (the others, of ``N_o``), the weight is
the smoothed log-odds ratio ``w = log((n_tc+a)/(N_c-n_tc+a)) - log((n_to+a)/(N_o-n_to+a))``
(``a = 0.5``); candidates need ``n_tc >= min_count`` (2) and ``w >= min_weight`` (1.0). A term
is kept only in the dimension where its best weight is highest (palette words describe the artist,
not the style that happens to correlate with the artist), and each label keeps its ``top_k`` (30)
terms. The label a text *implies* is the argmax over labels of the summed weights of the lexicon
terms present in it (none when no term is present or the best is tied).
``coherence[d]`` = among the answers whose key for ``d`` is a real label and whose explanation
implies a label, the fraction where the two agree (``coherence_support[d]`` = that count).
The explanation is ``evidence`` (structured), the reason after the key lines (keys) or the whole
text (natural).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import posixpath
import re
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from cgjax.data.records import resolve_image
from cgjax.data.schema import UNKNOWN, Dataset, Record, Targets, Vocabulary
from cgjax.eval.parser import (DEFAULT_SENTINELS, MODES, AnswerParser, LabelMatcher, ParsedAnswer, canonical,
                               detect_mode, stem)

log = logging.getLogger("cgjax.eval")

METRICS_FORMAT = "cgjax.metrics"
METRICS_VERSION = 1
STOPWORDS = frozenset("""a an the and or but of in on at to for from by with as is are was were be been being it its
this that these those which who whom whose what where when while than then there their they them his her he she
we our you your i my me not no nor so such very more most much many some any each every all both few other into over
under out up down off about above below between through during before after again further once here also can could
would should will may might must shall do does did done has have had having just only own same too s t painting
paintings artwork work piece image picture artist style genre one two three""".split())


# ------------------------------------------------------------------------------------------------
# classification


def classification_metrics(y_true: Sequence[str | None], y_pred: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class P/R/F1 + support, macro / weighted F1 and the confusion matrix.

    Items with ``y_true`` None are skipped. Classes = the ground-truth labels present (sorted).
    Precision of a class never predicted is 0 (sklearn's ``zero_division=0``).
    """
    pairs = [(t, UNKNOWN if p is None else str(p)) for t, p in zip(y_true, y_pred) if t is not None]
    if not pairs:
        return {"n": 0, "accuracy": None, "macro_f1": None, "weighted_f1": None, "per_concept": {},
                "confusion": {"labels": [], "predicted": [], "matrix": []}}
    t = np.array([p[0] for p in pairs], dtype=object)
    p = np.array([p[1] for p in pairs], dtype=object)
    classes = sorted(set(t.tolist()))
    per, f1s, supports = {}, [], []
    for c in classes:
        tp = int(np.sum((t == c) & (p == c)))
        n_pred = int(np.sum(p == c))
        n_true = int(np.sum(t == c))
        prec = tp / n_pred if n_pred else 0.0
        rec = tp / n_true if n_true else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0
        per[c] = {"precision": prec, "recall": rec, "f1": f1, "support": n_true}
        f1s.append(f1)
        supports.append(n_true)
    others = sorted(set(p.tolist()) - set(classes) - {UNKNOWN})
    predicted = classes + others + ([UNKNOWN] if UNKNOWN in set(p.tolist()) else [])
    col = {c: j for j, c in enumerate(predicted)}
    row = {c: i for i, c in enumerate(classes)}
    matrix = np.zeros((len(classes), len(predicted)), np.int64)
    for a, b in pairs:
        matrix[row[a], col[b]] += 1
    return {"n": len(pairs), "accuracy": float(np.mean(t == p)), "macro_f1": float(np.mean(f1s)),
            "weighted_f1": float(np.dot(f1s, supports) / np.sum(supports)), "per_concept": per,
            "confusion": {"labels": classes, "predicted": predicted, "matrix": matrix.tolist()}}


def multi_label_all_correct(preds: Sequence[Mapping[str, str]], gts: Sequence[Mapping[str, str | None]],
                            dimensions: Sequence[str]) -> float | None:
    """Share of items whose every dimension with a ground truth is predicted exactly."""
    scored = [all(p.get(d) == g[d] for d in dimensions if g.get(d) is not None)
              for p, g in zip(preds, gts) if any(g.get(d) is not None for d in dimensions)]
    return float(np.mean(scored)) if scored else None


def original_canonical(text: Any) -> str:
    """The original metrics' ``canon``: lower case, every run of characters outside ``a-z0-9`` -> one space."""
    return re.sub(r"[^a-z0-9]+", " ", str(text or "").lower()).strip()


def verbatim_mention(text: str, label: str) -> bool:
    """The original's coverage test: the label's canonical form occurs as whole words in the text's."""
    c = original_canonical(label)
    return bool(c) and f" {c} " in f" {original_canonical(text)} "


def coverage(texts: Sequence[str], gts: Sequence[Mapping[str, str | None]],
             dimensions: Sequence[str]) -> tuple[float | None, dict[str, dict[str, dict[str, float]]]]:
    """The original's (``coverage``, ``coverage_per_concept``): ground-truth labels found verbatim
    (:func:`verbatim_mention`, no aliases) in the whole answer ``texts``."""
    return _coverage(texts, gts, dimensions, lambda text, label, d: verbatim_mention(text, label))


def explanation_coverage(texts: Sequence[str], gts: Sequence[Mapping[str, str | None]], matcher: LabelMatcher,
                         dimensions: Sequence[str]) -> tuple[float | None, dict[str, dict[str, dict[str, float]]]]:
    """cgjax's (``explanation_coverage``, ``explanation_coverage_per_concept``): ground-truth labels
    named in the explanation ``texts`` (any alias of ``matcher`` counts)."""
    return _coverage(texts, gts, dimensions,
                     lambda text, label, d: label in matcher.mentioned_labels(text, d))


def _coverage(texts, gts, dimensions, found):
    """Mean over items (with a ground truth) of the share of their labels ``found``, and per label."""
    per_item, hits = [], {d: {} for d in dimensions}
    for text, g in zip(texts, gts):
        named = [(d, g[d], bool(found(text or "", g[d], d))) for d in dimensions if g.get(d) is not None]
        if not named:
            continue
        per_item.append(np.mean([x[2] for x in named]))
        for d, label, ok in named:
            h = hits[d].setdefault(label, [0, 0])
            h[0] += int(ok)
            h[1] += 1
    per_concept = {d: {lab: {"coverage": h[0] / h[1], "support": h[1]} for lab, h in sorted(hits[d].items())}
                   for d in dimensions}
    return (float(np.mean(per_item)) if per_item else None), per_concept


# ------------------------------------------------------------------------------------------------
# calibration


def _bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin ``k`` holds ``(edges[k], edges[k+1]]`` of ``linspace(0, 1, n_bins + 1)``; 0 goes into the first."""
    return np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], conf, side="left")


def reliability_bins(confidences: Sequence[float], correct: Sequence[bool], n_bins: int = 10) -> dict[str, Any]:
    """Per equal-width bin: ``edges``, ``count``, mean ``confidence``, ``accuracy`` (None when empty).

    Confidences are clipped to [0, 1].
    """
    conf = np.clip(np.asarray(confidences, np.float64).reshape(-1), 0.0, 1.0)
    corr = np.asarray(correct, np.float64).reshape(-1)
    if conf.shape != corr.shape:
        raise ValueError(f"confidences {conf.shape} and correct {corr.shape} differ in length")
    idx = _bin_index(conf, n_bins)
    count = np.bincount(idx, minlength=n_bins)
    s_conf = np.bincount(idx, conf, minlength=n_bins)
    s_acc = np.bincount(idx, corr, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mconf, macc = s_conf / count, s_acc / count
    return {"edges": np.linspace(0, 1, n_bins + 1).tolist(), "count": count.tolist(),
            "confidence": [None if c == 0 else float(x) for c, x in zip(count, mconf)],
            "accuracy": [None if c == 0 else float(x) for c, x in zip(count, macc)]}


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], n_bins: int = 10) -> float | None:
    """ECE = sum over bins of ``|B|/N * |accuracy(B) - mean confidence(B)|`` (None for no items)."""
    conf = np.clip(np.asarray(confidences, np.float64).reshape(-1), 0.0, 1.0)
    corr = np.asarray(correct, np.float64).reshape(-1)
    if conf.shape != corr.shape:
        raise ValueError(f"confidences {conf.shape} and correct {corr.shape} differ in length")
    if conf.size == 0:
        return None
    idx = _bin_index(conf, n_bins)
    gap = np.abs(np.bincount(idx, corr, minlength=n_bins) - np.bincount(idx, conf, minlength=n_bins))
    return float(gap.sum() / conf.size)  # |B|/N * |acc - conf| = |sum corr - sum conf| / N


# ------------------------------------------------------------------------------------------------
# __meta__ (prototype signals)


def activation_entry(meta: Any, dim: str) -> Mapping[str, Any]:
    """``__meta__["activation"][dim]`` or ``{}``."""
    if not isinstance(meta, Mapping):
        return {}
    act = meta.get("activation")
    if not isinstance(act, Mapping):
        return {}
    a = act.get(dim)
    return a if isinstance(a, Mapping) else {}


def name_list(value: Any) -> list[str]:
    """A list of names as strings (``[]`` for anything that is not a list)."""
    return [str(x) for x in value] if isinstance(value, (list, tuple)) else []


def top_signal(meta: Any, dim: str) -> tuple[str, float] | None:
    """(name, score) of the best-scored concept of ``dim`` in ``__meta__``, or None."""
    a = activation_entry(meta, dim)
    names = name_list(a.get("ranked_names"))
    ranked = a.get("ranked_global")
    if not names or not isinstance(ranked, (list, tuple)) or not ranked:
        return None
    try:
        scores = [float(r[1]) for r in ranked]
    except (TypeError, ValueError, IndexError):
        return None
    k = int(np.argmax(scores)) if len(scores) == len(names) else 0
    if not math.isfinite(scores[k]):
        return None
    return names[k], scores[k]


def activation_metrics(metas: Sequence[Any], gts: Sequence[Mapping[str, str | None]], dimensions: Sequence[str],
                       ks: Sequence[int] = (1, 3, 5)) -> dict[str, dict[str, Any]]:
    """``recall@k`` (ground truth within ``ranked_names[:k]``, over items with a ranking) and
    ``precision`` (micro: correct ``selected_names`` / all selected) per dimension."""
    out = {}
    for d in dimensions:
        hits = {k: [] for k in ks}
        n_sel = n_sel_ok = n_items = n_active = 0
        for meta, g in zip(metas, gts):
            gt = g.get(d)
            if gt is None:
                continue
            a = activation_entry(meta, d)
            if not a:
                continue
            n_items += 1
            cg = canonical(gt)
            ranked = [canonical(x) for x in name_list(a.get("ranked_names"))]
            if ranked:
                for k in ks:
                    hits[k].append(cg in ranked[:k])
            sel = [canonical(x) for x in name_list(a.get("selected_names"))]
            n_active += bool(sel)
            n_sel += len(sel)
            n_sel_ok += sum(s == cg for s in sel)
        if not n_items:
            continue
        m: dict[str, Any] = {f"recall@{k}": (float(np.mean(hits[k])) if hits[k] else None) for k in ks}
        m["precision"] = n_sel_ok / n_sel if n_sel else None
        m["activation_rate"] = n_active / n_items
        m["mean_selected"] = n_sel / n_items
        m["support"] = n_items
        out[d] = m
    return out


def calibration_metrics(metas: Sequence[Any], gts: Sequence[Mapping[str, str | None]], dimensions: Sequence[str],
                        n_bins: int = 10) -> dict[str, dict[str, Any]]:
    out = {}
    for d in dimensions:
        conf, corr = [], []
        for meta, g in zip(metas, gts):
            if g.get(d) is None:
                continue
            top = top_signal(meta, d)
            if top is None:
                continue
            conf.append(top[1])
            corr.append(canonical(top[0]) == canonical(g[d]))
        if not conf:
            continue
        out[d] = {"ece": expected_calibration_error(conf, corr, n_bins), "n": len(conf),
                  "top1_accuracy": float(np.mean(corr)), "mean_confidence": float(np.mean(np.clip(conf, 0, 1))),
                  "n_out_of_range": int(np.sum((np.asarray(conf) < 0) | (np.asarray(conf) > 1))),
                  "bins": reliability_bins(conf, corr, n_bins)}
    return out


# ------------------------------------------------------------------------------------------------
# coherence: the evidence lexicon


def text_terms(text: str, max_ngram: int = 2, exclude: Iterable[str] = ()) -> set[str]:
    """Stemmed unigrams/bigrams of the canonical text without stop words or ``exclude``d stems."""
    excluded = set(exclude)
    raw = canonical(text or "").split()
    words = [stem(w) for w in raw]
    keep = [r not in STOPWORDS and w not in STOPWORDS and w not in excluded and len(w) > 1 and not w.isdigit()
            for r, w in zip(raw, words)]
    out = set()
    for n in range(1, max_ngram + 1):
        for i in range(len(words) - n + 1):
            if all(keep[i:i + n]) and (n > 1 or len(words[i]) > 2):
                out.add(" ".join(words[i:i + n]))
    return out


def label_stems(names: Iterable[str]) -> set[str]:
    return {stem(w) for n in names for w in canonical(n).split()}


@dataclasses.dataclass
class EvidenceLexicon:
    """``terms[dim][label][term] = weight`` (see the module docstring); ``implied`` reads a text."""

    terms: dict[str, dict[str, dict[str, float]]]
    excluded: list[str] = dataclasses.field(default_factory=list)
    max_ngram: int = 2
    n_documents: int = 0

    @classmethod
    def fit(cls, texts: Sequence[str], labels: Sequence[Mapping[str, str | None]], dimensions: Sequence[str], *,
            max_ngram: int = 2, min_count: int = 2, top_k: int = 30, min_weight: float = 1.0, prior: float = 0.5,
            exclude_label_words: bool = True) -> "EvidenceLexicon":
        """Learns the lexicon from reasons ``texts`` and their ``labels`` rows (dim -> label or None)."""
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} label rows")
        names = {d: sorted({lab[d] for lab in labels if lab.get(d) is not None}) for d in dimensions}
        excl = set()
        if exclude_label_words:
            for d in dimensions:
                excl |= label_stems(names[d])
        doc_terms = [text_terms(t, max_ngram, excl) for t in texts]
        cand: dict[str, dict[str, dict[str, float]]] = {}
        for d in dimensions:
            docs = [(lab.get(d), ts) for ts, lab in zip(doc_terms, labels) if lab.get(d) is not None]
            df_all = Counter(t for _, ts in docs for t in ts)
            cand[d] = {}
            for c in names[d]:
                class_docs = [ts for lab, ts in docs if lab == c]
                n_c, n_o = len(class_docs), len(docs) - len(class_docs)
                df_c = Counter(t for ts in class_docs for t in ts)
                cand[d][c] = {}
                for t, k in df_c.items():
                    o = df_all[t] - k
                    w = math.log((k + prior) / (n_c - k + prior)) - math.log((o + prior) / (n_o - o + prior))
                    if k >= min_count and w >= min_weight:
                        cand[d][c][t] = w
        # a term belongs to the dimension(s) where it is most specific (palette words -> artist, ...)
        best: dict[str, dict[str, float]] = {}
        for d in dimensions:
            for per in cand[d].values():
                for t, w in per.items():
                    best.setdefault(t, {})[d] = max(w, best.get(t, {}).get(d, -math.inf))
        terms = {}
        for d in dimensions:
            terms[d] = {}
            for c, per in cand[d].items():
                owned = sorted(((w, t) for t, w in per.items() if best[t][d] >= max(best[t].values())),
                               key=lambda x: (-x[0], x[1]))
                terms[d][c] = {t: round(w, 6) for w, t in owned[:top_k]}
        return cls(terms, sorted(excl), max_ngram, len(texts))

    @classmethod
    def from_targets(cls, targets: Targets, *, exclude_images: Iterable[str] = (),
                     dimensions: Sequence[str] | None = None, **kwargs) -> "EvidenceLexicon":
        """Fits on the targets CSV rows whose ``image_path`` is not in ``exclude_images``."""
        skip = set(exclude_images)
        rows = [r for r in targets.rows if r.image_path not in skip and (r.target_reason or "").strip()]
        dims = tuple(dimensions if dimensions is not None else targets.dimensions)
        return cls.fit([r.target_reason for r in rows], [r.labels for r in rows], dims, **kwargs)

    def scores(self, text: str, dim: str) -> dict[str, float]:
        present = text_terms(text, self.max_ngram, self.excluded)
        return {c: float(sum(w for t, w in lex.items() if t in present)) for c, lex in self.terms.get(dim, {}).items()}

    def implied(self, text: str, dim: str) -> str | None:
        """The label the text's evidence points to, or None (no lexicon term present, or a tie)."""
        s = self.scores(text, dim)
        if not s:
            return None
        best = max(s.values())
        if best <= 0:
            return None
        winners = [c for c, v in s.items() if v == best]
        return winners[0] if len(winners) == 1 else None

    def to_json(self) -> dict[str, Any]:
        return {"format": "cgjax.evidence_lexicon", "max_ngram": self.max_ngram, "n_documents": self.n_documents,
                "excluded": self.excluded, "terms": self.terms}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "EvidenceLexicon":
        return cls({d: {c: dict(t) for c, t in v.items()} for d, v in obj["terms"].items()},
                   list(obj.get("excluded", [])), int(obj.get("max_ngram", 2)), int(obj.get("n_documents", 0)))


def coherence(texts: Sequence[str], keys: Sequence[Mapping[str, str]], lexicon: EvidenceLexicon,
              dimensions: Sequence[str]) -> dict[str, Any]:
    """``coherence[dim]``, ``coherence_support[dim]`` and ``coherence_mean`` (see the module docstring)."""
    rate, support = {}, {}
    for d in dimensions:
        agree = n = 0
        for text, k in zip(texts, keys):
            key = k.get(d, UNKNOWN)
            if key == UNKNOWN or key is None:
                continue
            implied = lexicon.implied(text or "", d)
            if implied is None:
                continue
            n += 1
            agree += implied == key
        rate[d] = agree / n if n else None
        support[d] = n
    vals = [v for v in rate.values() if v is not None]
    return {"coherence": rate, "coherence_support": support,
            "coherence_mean": float(np.mean(vals)) if vals else None}


# ------------------------------------------------------------------------------------------------
# reasoning.json <-> dataset records


def _parts(path: str) -> list[str]:
    return [p for p in posixpath.normpath(str(path).replace("\\", "/")).split("/") if p not in ("", ".")]


def match_records(keys: Iterable[str], dataset: Dataset,
                  images_root: str | os.PathLike | None = None) -> tuple[dict[str, Record], list[str]]:
    """Maps reasoning.json image keys to dataset records: the record's own path, then the resolved
    absolute path, then a key that ends with the record's whole relative path (absolute paths of
    another machine); a bare file name never matches a record in a sub-folder. Two keys that match
    one record are an error naming both. Returns ``(matches, unmatched_keys)``."""
    root = os.fspath(images_root) if images_root is not None else dataset.images_root
    by_image = {r.image: r for r in dataset.records}
    by_abs = {}
    for r in dataset.records:
        by_abs[os.path.realpath(os.path.abspath(resolve_image(root, r.image)))] = r
    by_name: dict[str, list[tuple[list[str], Record]]] = {}
    for r in dataset.records:
        parts = _parts(r.image)
        if parts:
            by_name.setdefault(parts[-1], []).append((parts, r))
    matches, unmatched = {}, []
    for key in keys:
        if key == "__meta__":
            continue
        r = by_image.get(key)
        if r is None:
            cands = [key] if os.path.isabs(key) else [os.path.join(root or "", key), key]
            for c in cands:
                r = by_abs.get(os.path.realpath(os.path.abspath(c)))
                if r is not None:
                    break
        if r is None:
            kp = _parts(key)
            best, best_n, tie = None, 0, False
            for parts, rec in (by_name.get(kp[-1], []) if kp else []):
                n = 0
                while n < min(len(kp), len(parts)) and kp[-1 - n] == parts[-1 - n]:
                    n += 1
                if n < len(parts):  # the record's whole relative path must match, not just its name
                    continue
                if n > best_n:
                    best, best_n, tie = rec, n, False
                elif n == best_n and n > 0:
                    tie = True
            r = best if best_n > 0 and not tie else None
        if r is None:
            unmatched.append(key)
        else:
            matches[key] = r
    seen: dict[str, str] = {}
    for key, r in matches.items():
        if r.image in seen:
            raise ValueError(f"answers {seen[r.image]!r} and {key!r} both match the record {r.image!r} of "
                             f"{dataset.path}: each image must be answered once")
        seen[r.image] = key
    return matches, unmatched


def split_answers(entry: Mapping[str, Any], parser: AnswerParser) -> dict[str, tuple[str, str]]:
    """``{mode: (prompt, answer)}`` for one reasoning.json entry; the longest answer per mode wins."""
    out: dict[str, tuple[str, str]] = {}
    if not isinstance(entry, Mapping):
        return out
    for prompt, answer in entry.items():
        if prompt == "__meta__" or not isinstance(answer, str):
            continue
        mode = detect_mode(prompt, answer, parser)
        if mode not in out or len(answer) > len(out[mode][1]):
            out[mode] = (prompt, answer)
    return out


@dataclasses.dataclass
class ImageResult:
    key: str                 # the reasoning.json key
    record: Record
    meta: dict
    answers: dict[str, tuple[str, str, ParsedAnswer]]  # mode -> (prompt, answer, parsed)

    @property
    def gt(self) -> dict[str, str | None]:
        return self.record.labels


def label_vocabs(dataset: Dataset, reasoning: Mapping[str, Any] | None = None, targets: Targets | None = None,
                 vocabs: Mapping[str, Vocabulary | Iterable[str]] | None = None) -> dict[str, list[str]]:
    """Every label name known per dimension: ``vocabs``, the dataset, the targets, ``__meta__`` names."""
    dims = dataset.dimensions
    out: dict[str, dict[str, None]] = {d: {} for d in dims}
    for d in dims:
        for n in (vocabs or {}).get(d, []):
            out[d][str(n)] = None
        for r in dataset.records:
            if r.labels.get(d) is not None:
                out[d][r.labels[d]] = None
        if targets is not None:
            for r in targets.rows:
                if r.labels.get(d) is not None:
                    out[d][r.labels[d]] = None
        for entry in (reasoning or {}).values():
            a = activation_entry(entry.get("__meta__") if isinstance(entry, Mapping) else None, d)
            for n in name_list(a.get("ranked_names")) + name_list(a.get("selected_names")):
                out[d][n] = None
    return {d: list(v) for d, v in out.items()}


def collect(reasoning: Mapping[str, Any], dataset: Dataset, *, parser: AnswerParser,
            images_root: str | os.PathLike | None = None) -> tuple[list[ImageResult], list[str]]:
    """Matches, splits by mode and parses every entry. Returns ``(results, unmatched_keys)``."""
    matches, unmatched = match_records(reasoning.keys(), dataset, images_root)
    results = []
    for key, rec in matches.items():
        entry = reasoning[key]
        meta = entry.get("__meta__", {}) if isinstance(entry, Mapping) else {}
        answers = {m: (p, a, parser.parse(a, m)) for m, (p, a) in split_answers(entry, parser).items()}
        results.append(ImageResult(key, rec, meta if isinstance(meta, dict) else {}, answers))
    return results, unmatched


def mode_metrics(items: Sequence[tuple[ParsedAnswer, Mapping[str, str | None]]], dimensions: Sequence[str],
                 matcher: LabelMatcher, lexicon: EvidenceLexicon | None = None,
                 answers: Sequence[str] | None = None) -> dict[str, Any]:
    """All per-mode metrics for (parsed answer, ground truth) pairs; ``answers``: the raw answer
    texts (the original's ``coverage`` reads the whole answer; default: the explanations)."""
    parsed = [p for p, _ in items]
    gts = [g for _, g in items]
    out: dict[str, Any] = {"n": len(items)}
    if parsed and parsed[0].mode == "structured":
        out["json_parse_rate"] = float(np.mean([p.json_ok for p in parsed]))
    for key in ("accuracy", "macro_f1", "weighted_f1", "per_concept", "confusion", "unknown_rate"):
        out[key] = {}
    for d in dimensions:
        cm = classification_metrics([g.get(d) for g in gts], [p.label(d) for p in parsed])
        for key in ("accuracy", "macro_f1", "weighted_f1", "per_concept", "confusion"):
            out[key][d] = cm[key]
        scored = [p.label(d) for p, g in items if g.get(d) is not None]
        out["unknown_rate"][d] = float(np.mean([x == UNKNOWN for x in scored])) if scored else None
    out["multi_label_all_correct"] = multi_label_all_correct([p.labels for p in parsed], gts, dimensions)
    whole = list(answers) if answers is not None else [p.evidence for p in parsed]
    out["coverage"], out["coverage_per_concept"] = coverage(whole, gts, dimensions)
    out["explanation_coverage"], out["explanation_coverage_per_concept"] = explanation_coverage(
        [p.evidence for p in parsed], gts, matcher, dimensions)
    if lexicon is not None:
        out.update(coherence([p.evidence for p in parsed], [p.labels for p in parsed], lexicon, dimensions))
    else:
        out.update({"coherence": {d: None for d in dimensions}, "coherence_support": {d: 0 for d in dimensions},
                    "coherence_mean": None})
    return out


def _saliency_summary(metas: Sequence[Any], names: Sequence[str], field: str = "saliency") -> dict[str, Any]:
    """The original's aggregation of ``__meta__[field][name]`` (``saliency``: one name per dimension;
    ``saliency_llava``: per prompt mode): paths + mean/max/count of the stats."""
    paths = {n: [] for n in names}
    stats = {n: {"mean": 0.0, "max": 0.0, "count": 0} for n in names}
    for meta in metas:
        sal = meta.get(field) if isinstance(meta, Mapping) else None
        if not isinstance(sal, Mapping):
            continue
        for n in names:
            info = sal.get(n)
            if not isinstance(info, Mapping):
                continue
            if info.get("path"):
                paths[n].append(str(info["path"]))
            st = info.get("stats") if isinstance(info.get("stats"), Mapping) else {}
            if isinstance(st.get("mean"), (int, float)):
                stats[n]["mean"] += float(st["mean"])
                stats[n]["count"] += 1
            if isinstance(st.get("max"), (int, float)):
                stats[n]["max"] = max(stats[n]["max"], float(st["max"]))
    for n in names:
        if stats[n]["count"]:
            stats[n]["mean"] /= stats[n]["count"]
    return {"paths": paths, "stats": stats}


def _saliency_llava_summary(metas: Sequence[Any]) -> dict[str, Any]:
    """The original's ``saliency_llava``: ``{"paths": [...], "stats": {mean, max, count}}`` over the
    ``structured`` maps; ``by_mode`` (cgjax) holds the same for every prompt mode present."""
    modes = sorted({str(m) for meta in metas if isinstance(meta, Mapping)
                    and isinstance(meta.get("saliency_llava"), Mapping) for m in meta["saliency_llava"]})
    per = _saliency_summary(metas, sorted(set(modes) | {"structured"}), "saliency_llava")
    by_mode = {m: {"paths": per["paths"][m], "stats": per["stats"][m]} for m in modes}
    return {"paths": per["paths"]["structured"], "stats": per["stats"]["structured"], "by_mode": by_mode}


def evaluate(reasoning: Mapping[str, Any], dataset: Dataset, *, images_root: str | os.PathLike | None = None,
             vocabs: Mapping[str, Vocabulary | Iterable[str]] | None = None, lexicon: EvidenceLexicon | None = None,
             sentinels: tuple[str, str] = DEFAULT_SENTINELS, n_bins: int = 10, ks: Sequence[int] = (1, 3, 5),
             parser: AnswerParser | None = None) -> dict[str, Any]:
    """The metrics dict of a reasoning.json (already loaded) against ``dataset``'s labels."""
    dims = dataset.dimensions
    if parser is None:
        parser = AnswerParser(label_vocabs(dataset, reasoning, vocabs=vocabs), dims, sentinels=sentinels)
    results, unmatched = collect(reasoning, dataset, parser=parser, images_root=images_root)
    if unmatched:
        log.warning("%d reasoning entries match no dataset record (e.g. %s)", len(unmatched), unmatched[0])
    out: dict[str, Any] = {"format": METRICS_FORMAT, "schema_version": METRICS_VERSION, "dimensions": list(dims),
                           "n_images": len(results), "n_unmatched": len(unmatched), "unmatched": unmatched[:20]}
    modes = [m for m in MODES if any(m in r.answers for r in results)]
    out["modes"] = modes
    for m in modes:
        answered = [r for r in results if m in r.answers]
        out[m] = mode_metrics([(r.answers[m][2], r.gt) for r in answered], dims, parser.matcher, lexicon,
                              [r.answers[m][1] for r in answered])
    metas = [r.meta for r in results]
    gts = [r.gt for r in results]
    out["activation"] = activation_metrics(metas, gts, dims, ks)
    out["calibration"] = calibration_metrics(metas, gts, dims, n_bins)
    if any(isinstance(m.get("saliency"), Mapping) for m in metas):
        out["saliency"] = _saliency_summary(metas, dims)
    if any(isinstance(m.get("saliency_llava"), Mapping) for m in metas):
        out["saliency_llava"] = _saliency_llava_summary(metas)
    out["lexicon"] = None if lexicon is None else {
        "n_documents": lexicon.n_documents,
        "n_terms": {d: sum(len(t) for t in lexicon.terms.get(d, {}).values()) for d in dims}}
    return out


# ------------------------------------------------------------------------------------------------
# baseline vs concept model


COMPARED_PER_DIM = ("accuracy", "macro_f1", "weighted_f1", "coherence")
COMPARED_SCALAR = ("multi_label_all_correct", "coverage", "explanation_coverage", "coherence_mean")


def compare(metrics_concept: Mapping[str, Any], metrics_baseline: Mapping[str, Any]) -> dict[str, Any]:
    """``{mode: {metric: {dim | "all": {"concept", "baseline", "delta"}}}}`` for the modes in both."""
    out: dict[str, Any] = {}

    def cell(a, b):
        delta = a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        return {"concept": a, "baseline": b, "delta": delta}

    for mode in MODES:
        mc, mb = metrics_concept.get(mode), metrics_baseline.get(mode)
        if not isinstance(mc, Mapping) or not isinstance(mb, Mapping):
            continue
        block: dict[str, Any] = {}
        for metric in COMPARED_PER_DIM:
            dc, db = mc.get(metric) or {}, mb.get(metric) or {}
            dims = [d for d in (metrics_concept.get("dimensions") or list(dc)) if d in dc or d in db]
            block[metric] = {d: cell(dc.get(d), db.get(d)) for d in dims}
        for metric in COMPARED_SCALAR:
            block[metric] = {"all": cell(mc.get(metric), mb.get(metric))}
        out[mode] = block
    return out


def comparison_rows(comparison: Mapping[str, Any]) -> list[tuple[str, str, str, Any, Any, Any]]:
    """Flat ``(mode, metric, dim, concept, baseline, delta)`` rows of ``compare``'s result."""
    rows = []
    for mode, block in comparison.items():
        for metric, per in block.items():
            for dim, c in per.items():
                rows.append((mode, metric, dim, c["concept"], c["baseline"], c["delta"]))
    return rows
