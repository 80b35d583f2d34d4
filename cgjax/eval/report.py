"""The evaluation report: a self-contained ``report.html`` (images inlined as base64 PNG) and
``concept_graph.png`` (concepts as nodes coloured by dimension, edges weighted by co-activation).

Sections: an overview that fits one screen (per answer mode and dimension, the concept model
against the no-concept baseline: an inline SVG bar plot of macro-F1 and a short table of accuracy and
macro-F1), summary per answer mode, baseline vs concept model, signals (recall@k, precision of the
injected concepts, reliability diagram), confusion matrices, per-class F1 bars, the concept graph
and a gallery of test images with the activated concepts, the parsed answer and the explanation
(plus saliency overlays when given). Wide tables and figures scroll inside their box. matplotlib only
(``Figure`` objects, no pyplot: the caller's backend is left alone).
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from cgjax import persistence
from cgjax.data.records import read_dataset_json, resolve_image
from cgjax.data.schema import UNKNOWN, Dataset, read_json
from cgjax.eval.metrics import (activation_entry, collect, compare, comparison_rows, label_vocabs,
                                name_list)
from cgjax.eval.parser import DEFAULT_SENTINELS, MODES, AnswerParser

DIM_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
THUMB = 192


# ------------------------------------------------------------------------------------------------
# helpers


def _fig_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, pil_kwargs={"compress_level": 3})
    return buf.getvalue()


def _img_tag(png: bytes, alt: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return (f'<img alt="{html.escape(alt)}"{w} src="data:image/png;base64,'
            f'{base64.b64encode(png).decode("ascii")}">')


def _figure(png: bytes, alt: str) -> str:
    """A wide figure scrolls inside its box instead of widening the page."""
    return f'<div class="scroll">{_img_tag(png, alt)}</div>'


def _array_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _fmt(x: Any, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "&ndash;"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        return f"{x:+.3f}" if signed else f"{x:.3f}"
    return html.escape(str(x))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """Header cells are escaped here; body cells arrive as HTML, every text in them escaped by the caller."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return (f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
            "</table></div>")


def _load(obj: Any) -> Any:
    return read_json(obj) if isinstance(obj, (str, os.PathLike)) else obj


def _dims(metrics: Mapping[str, Any], dataset: Dataset) -> list[str]:
    return list(metrics.get("dimensions") or dataset.dimensions)


# ------------------------------------------------------------------------------------------------
# plots


def plot_confusion(metrics: Mapping[str, Any], dims: Sequence[str]) -> bytes | None:
    """One row of confusion matrices (row-normalised colour, counts written) per answer mode."""
    panels = [(m, d) for m in MODES for d in dims
              if ((metrics.get(m) or {}).get("confusion") or {}).get(d, {}).get("matrix")]
    if not panels:
        return None
    modes = [m for m in MODES if any(p[0] == m for p in panels)]
    fig = Figure(figsize=(4.4 * len(dims), 4.2 * len(modes)))
    axes = fig.subplots(len(modes), len(dims), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for mode, d in panels:
        ax = axes[modes.index(mode), list(dims).index(d)]
        ax.set_axis_on()
        block = metrics[mode]
        c = block["confusion"][d]
        m = np.asarray(c["matrix"], np.float64)
        norm = m / np.maximum(m.sum(1, keepdims=True), 1)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if m[i, j]:
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(c["predicted"])), [str(x)[:18] for x in c["predicted"]], rotation=60, ha="right",
                      fontsize=7)
        ax.set_yticks(range(len(c["labels"])), [str(x)[:18] for x in c["labels"]], fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("ground truth", fontsize=8)
        acc = block.get("accuracy", {}).get(d)
        ax.set_title(f"{mode}: {d}" + (f" (accuracy {acc:.2f})" if acc is not None else ""), fontsize=9)
    fig.tight_layout()
    return _fig_png(fig)


def plot_f1_bars(metrics: Mapping[str, Any], dims: Sequence[str],
                 baseline: Mapping[str, Any] | None = None) -> bytes | None:
    series = []  # (name, metrics block)
    for m in MODES:
        if isinstance(metrics.get(m), Mapping):
            series.append((m, metrics[m]))
        if baseline is not None and isinstance(baseline.get(m), Mapping):
            series.append((f"{m} (baseline)", baseline[m]))
    if not series:
        return None
    fig = Figure(figsize=(5.0 * len(dims), 3.8))
    axes = fig.subplots(1, len(dims), squeeze=False)
    for ax, d in zip(axes[0], dims):
        classes = sorted({c for _, b in series for c in (b.get("per_concept", {}).get(d) or {})})
        if not classes:
            ax.set_axis_off()
            continue
        width = 0.8 / len(series)
        x = np.arange(len(classes))
        for k, (name, b) in enumerate(series):
            per = b.get("per_concept", {}).get(d) or {}
            vals = [per.get(c, {}).get("f1", 0.0) for c in classes]
            ax.bar(x + (k - (len(series) - 1) / 2) * width, vals, width, label=name,
                   hatch="//" if "baseline" in name else None, alpha=0.6 if "baseline" in name else 0.95)
        ax.set_xticks(x, [c[:18] for c in classes], rotation=45, ha="right", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"per-class F1: {d}", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return _fig_png(fig)


def plot_reliability(metrics: Mapping[str, Any], dims: Sequence[str]) -> bytes | None:
    cal = metrics.get("calibration") or {}
    dims = [d for d in dims if d in cal]
    if not dims:
        return None
    fig = Figure(figsize=(3.8 * len(dims), 3.8))
    axes = fig.subplots(1, len(dims), squeeze=False)
    for ax, d in zip(axes[0], dims):
        b = cal[d]["bins"]
        edges = np.asarray(b["edges"])
        centres = (edges[:-1] + edges[1:]) / 2
        width = edges[1] - edges[0]
        acc = [a if a is not None else 0.0 for a in b["accuracy"]]
        conf = [c if c is not None else m for c, m in zip(b["confidence"], centres)]
        count = np.asarray(b["count"])
        has = count > 0
        ax.bar(centres[has], np.asarray(acc)[has], width * 0.9, color="#1f77b4", label="accuracy")
        ax.scatter(centres[has], np.asarray(conf)[has], marker="_", s=260, linewidths=2.5, color="#d62728",
                   label="mean confidence", zorder=3)
        for x, y, c in zip(centres[has], np.asarray(acc)[has], count[has]):
            ax.text(x, min(y + 0.02, 0.95), str(int(c)), ha="center", fontsize=7)
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("signal confidence (top score)")
        ax.set_ylabel("top-1 accuracy")
        ece = cal[d].get("ece")
        ax.set_title(f"{d}: ECE {ece:.3f} (n={cal[d]['n']})" if ece is not None else d, fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return _fig_png(fig)


# ------------------------------------------------------------------------------------------------
# concept graph


def concept_cooccurrence(reasoning: Mapping[str, Any], dimensions: Sequence[str]):
    """``(nodes, counts, weights)``: nodes ``(dim, name)``, activations per node, and the symmetric
    matrix of images where both concepts were selected (``selected_names`` in ``__meta__``)."""
    order: dict[tuple[str, str], int] = {}
    selections = []
    for entry in reasoning.values():
        meta = entry.get("__meta__") if isinstance(entry, Mapping) else None
        sel = []
        for d in dimensions:
            for n in name_list(activation_entry(meta, d).get("selected_names")):
                sel.append(order.setdefault((d, n), len(order)))
        selections.append(sorted(set(sel)))
    if not order:  # nothing selected: show the known concepts unconnected
        for entry in reasoning.values():
            meta = entry.get("__meta__") if isinstance(entry, Mapping) else None
            for d in dimensions:
                for n in name_list(activation_entry(meta, d).get("ranked_names")):
                    order.setdefault((d, n), len(order))
    nodes = sorted(order, key=lambda k: (list(dimensions).index(k[0]), k[1]))
    remap = {order[k]: i for i, k in enumerate(nodes)}
    counts = np.zeros(len(nodes), np.int64)
    weights = np.zeros((len(nodes), len(nodes)), np.int64)
    for sel in selections:
        idx = [remap[i] for i in sel]
        counts[idx] += 1
        for a in idx:
            for b in idx:
                if a != b:
                    weights[a, b] += 1
    return nodes, counts, weights


def _circular_layout(nodes, dimensions) -> np.ndarray:
    """Nodes on a circle, each dimension on its own arc (a gap between dimensions)."""
    n = len(nodes)
    gaps = len({d for d, _ in nodes})
    slots = n + gaps
    pos, k, prev = np.zeros((n, 2)), 0, None
    for i, (d, _) in enumerate(nodes):
        if d != prev:
            k += 1
            prev = d
        t = 2 * np.pi * (i + k) / max(slots, 1)
        pos[i] = (np.cos(t), np.sin(t))
    return pos


def _spring_layout(weights: np.ndarray, init: np.ndarray, iterations: int = 200, seed: int = 0) -> np.ndarray:
    """Fruchterman-Reingold on the co-activation weights, started from ``init``."""
    n = len(init)
    if n < 2:
        return init.copy()
    rng = np.random.default_rng(seed)
    pos = init + rng.normal(0, 0.01, init.shape)
    w = weights / max(weights.max(), 1)
    k = 1.0 / math.sqrt(n)
    temp = 0.1
    for _ in range(iterations):
        delta = pos[:, None, :] - pos[None, :, :]
        dist = np.maximum(np.linalg.norm(delta, axis=-1), 1e-3)
        force = (k * k / dist ** 2)[..., None] * delta - (w * dist / k)[..., None] * delta
        disp = force.sum(1)
        length = np.maximum(np.linalg.norm(disp, axis=-1, keepdims=True), 1e-9)
        pos += disp / length * np.minimum(length, temp)
        pos -= pos.mean(0)
        temp *= 0.98
    return pos / max(np.abs(pos).max(), 1e-9)


def draw_concept_graph(reasoning: Mapping[str, Any] | str, out_path: str | os.PathLike,
                       dimensions: Sequence[str] | None = None, layout: str = "circular") -> str:
    """Writes ``concept_graph.png``: nodes = concepts (colour = dimension, size = activations),
    edges weighted by co-activation across images. ``layout``: ``circular`` or ``spring``."""
    reasoning = _load(reasoning)
    if dimensions is None:
        dims: dict[str, None] = {}
        for entry in reasoning.values():
            act = (entry.get("__meta__") or {}).get("activation") if isinstance(entry, Mapping) else None
            for d in (act or {}):
                dims[d] = None
        dimensions = list(dims)
    nodes, counts, weights = concept_cooccurrence(reasoning, dimensions)
    fig = Figure(figsize=(8.5, 8.5))
    ax = fig.subplots()
    ax.set_axis_off()
    if not nodes:
        ax.text(0.5, 0.5, "no concept activations in __meta__", ha="center", va="center")
    else:
        pos = _circular_layout(nodes, dimensions)
        if layout == "spring":
            pos = _spring_layout(weights, pos)
        elif layout != "circular":
            raise ValueError(f"unknown layout {layout!r} (circular or spring)")
        wmax = max(int(weights.max()), 1)
        for a in range(len(nodes)):
            for b in range(a + 1, len(nodes)):
                if weights[a, b]:
                    f = weights[a, b] / wmax
                    ax.plot(*pos[[a, b]].T, color="#555555", lw=0.4 + 4.0 * f, alpha=0.15 + 0.6 * f, zorder=1)
        colors = {d: DIM_COLORS[i % len(DIM_COLORS)] for i, d in enumerate(dimensions)}
        cmax = max(int(counts.max()), 1)
        sizes = 80 + 900 * np.sqrt(counts / cmax)
        ax.scatter(pos[:, 0], pos[:, 1], s=sizes, c=[colors[d] for d, _ in nodes], edgecolors="black",
                   linewidths=0.6, zorder=2)
        for (d, name), p, c in zip(nodes, pos, counts):
            r = np.linalg.norm(p)
            off = p / r * 0.12 if r > 1e-6 else np.array([0, 0.12])
            ax.text(*(p + off), f"{name}\n({c})", ha="center", va="center", fontsize=7, zorder=3)
        for d in dimensions:
            ax.scatter([], [], c=colors[d], label=d, s=80, edgecolors="black")
        ax.legend(loc="upper left", fontsize=8, frameon=False)
        ax.set_xlim(-1.45, 1.45)
        ax.set_ylim(-1.45, 1.45)
        ax.set_title("concept co-activation (node size: images activated; edge: images co-activated)", fontsize=9)
    png = _fig_png(fig)
    persistence.write_bytes(out_path, png)
    return os.fspath(out_path)


# ------------------------------------------------------------------------------------------------
# gallery


def _thumbnail(path: str | None) -> np.ndarray | None:
    if not path or not os.path.isfile(path):
        return None
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = THUMB / max(im.size)
            size = (max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale)))
            im = im.resize(size, Image.NEAREST if scale > 1 else Image.LANCZOS)
            return np.asarray(im)
    except Exception:  # an unreadable image only loses its thumbnail
        return None


def _overlay(image: np.ndarray, heat: Any) -> np.ndarray:
    h = np.asarray(heat, np.float64)
    h = np.squeeze(h)
    if h.ndim != 2:
        raise ValueError(f"a saliency map must be 2-D, got shape {np.shape(heat)}")
    h = np.nan_to_num(h)
    h = (h - h.min()) / (h.max() - h.min()) if h.max() > h.min() else np.zeros_like(h)
    hm = np.asarray(Image.fromarray((h * 255).astype(np.uint8)).resize(image.shape[1::-1], Image.BILINEAR))
    colored = (matplotlib.colormaps["jet"](hm / 255.0)[..., :3] * 255).astype(np.float64)
    return np.clip(0.5 * image + 0.5 * colored, 0, 255).astype(np.uint8)


def _saliency_for(saliency: Mapping[str, Any] | None, keys: Sequence[str]) -> dict[str, Any]:
    if not saliency:
        return {}
    for k in keys:
        if k in saliency:
            v = saliency[k]
            return dict(v) if isinstance(v, Mapping) else {"saliency": v}
    return {}


def _gallery(results, dims, images_root, saliency, n) -> str:
    cards = []
    ordered = sorted(results, key=lambda r: (r.record.row if r.record.row is not None else 1 << 30, r.key))
    for r in ordered[:n]:
        img_path = r.key if os.path.isfile(r.key) else resolve_image(images_root, r.record.image)
        thumb = _thumbnail(img_path)
        pics = []
        if thumb is not None:
            pics.append(f"<figure>{_img_tag(_array_png(thumb), r.record.image)}<figcaption>image</figcaption></figure>")
            for name, heat in _saliency_for(saliency, [r.key, r.record.image, img_path]).items():
                try:
                    pics.append(f"<figure>{_img_tag(_array_png(_overlay(thumb, heat)), name)}"
                                f"<figcaption>{html.escape(str(name))}</figcaption></figure>")
                except ValueError as e:
                    pics.append(f"<p class=warn>{html.escape(str(name))}: {html.escape(str(e))}</p>")
        else:
            pics.append(f"<p class=warn>image not found: {html.escape(str(img_path))}</p>")
        rows = []
        for d in dims:
            a = activation_entry(r.meta, d)
            sel = name_list(a.get("selected_names"))
            scores = {}
            ranked, rn = a.get("ranked_global"), name_list(a.get("ranked_names"))
            if isinstance(ranked, list) and len(ranked) == len(rn):
                for name, item in zip(rn, ranked):
                    try:
                        scores[name] = float(item[1])
                    except (TypeError, ValueError, IndexError):
                        pass
            act = ", ".join(f"{html.escape(s)}" + (f" ({scores[s]:.2f})" if s in scores else "") for s in sel)
            rows.append([html.escape(d), _fmt(r.gt.get(d) or UNKNOWN), act or "&ndash;"])
        answers = []
        for mode in MODES:
            if mode not in r.answers:
                continue
            prompt, answer, parsed = r.answers[mode]
            keys = []
            for d in dims:
                pred, gt = parsed.label(d), r.gt.get(d)
                cls = "na" if gt is None else ("ok" if pred == gt else "bad")
                keys.append(f'<span class="{cls}">{html.escape(d)}: {html.escape(pred)}</span>')
            answers.append(
                f'<div class="answer"><b>{mode}</b>{" (JSON)" if parsed.json_ok else ""}: {" ".join(keys)}'
                f'<p class="evidence">{html.escape(parsed.evidence) or "&ndash;"}</p>'
                f"<details><summary>raw answer</summary><p class=prompt>{html.escape(prompt)}</p>"
                f"<pre>{html.escape(answer)}</pre></details></div>")
        cards.append(f'<div class="card"><h3>{html.escape(r.record.image)}</h3><div class="pics">{"".join(pics)}</div>'
                     f'{_table(["dimension", "ground truth", "activated concepts (score)"], rows, "small")}'
                     f'{"".join(answers) or "<p>no answers</p>"}</div>')
    return "".join(cards)


# ------------------------------------------------------------------------------------------------
# the report


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1500px}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:2em}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;font-size:13px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}table.small td{font-size:12px;text-align:left}
.pos{color:#087f23;font-weight:600}.neg{color:#b00020;font-weight:600}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(440px,1fr));gap:14px}
.card{border:1px solid #ddd;border-radius:6px;padding:10px}.card h3{font-size:13px;margin:0 0 6px;word-break:break-all}
.pics{display:flex;flex-wrap:wrap;gap:6px}figure{margin:0;text-align:center;font-size:11px}
.answer{margin-top:6px;font-size:13px}.evidence{margin:3px 0;color:#333}
.ok{background:#d7f5dd;padding:1px 4px;border-radius:3px}.bad{background:#fbd9d9;padding:1px 4px;border-radius:3px}
.na{background:#eee;padding:1px 4px;border-radius:3px}.warn{color:#b00020;font-size:12px}
pre{white-space:pre-wrap;font-size:11px;background:#f8f8f8;padding:6px}.prompt{font-size:11px;color:#666}
.scroll{overflow-x:auto;max-width:100%}.scroll table{margin:0}
.overview{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}.overview svg{flex:none}
.overview>div{flex:1 1 480px;min-width:0}th.group{text-align:center}table.brief th{vertical-align:bottom}table.brief td:nth-child(2){text-align:left}
.note{font-size:13px;color:#444;margin:4px 0}
"""


def _summary_table(metrics: Mapping[str, Any], dims: Sequence[str]) -> str:
    header = ["mode", "n", "all correct", "coverage", "explanation coverage", "JSON parsed"]
    for d in dims:
        header += [f"{d} acc", f"{d} macro-F1", f"{d} weighted-F1", f"{d} coherence"]
    rows = []
    for m in MODES:
        b = metrics.get(m)
        if not isinstance(b, Mapping):
            continue
        row = [html.escape(m), _fmt(b.get("n")), _fmt(b.get("multi_label_all_correct")), _fmt(b.get("coverage")),
               _fmt(b.get("explanation_coverage")), _fmt(b.get("json_parse_rate"))]
        for d in dims:
            row += [_fmt((b.get(k) or {}).get(d)) for k in ("accuracy", "macro_f1", "weighted_f1", "coherence")]
        rows.append(row)
    return _table(header, rows) if rows else "<p>no answers matched the dataset.</p>"


def _comparison_table(metrics: Mapping[str, Any], baseline: Mapping[str, Any]) -> str:
    rows = []
    for mode, metric, dim, c, b, delta in comparison_rows(compare(metrics, baseline)):
        cls = "" if delta is None or delta == 0 else ("pos" if delta > 0 else "neg")
        rows.append([html.escape(str(mode)), html.escape(str(metric)), html.escape(str(dim)), _fmt(c), _fmt(b),
                     f'<span class="{cls}">{_fmt(delta, True)}</span>'])
    return _table(["mode", "metric", "dimension", "concept model", "baseline", "delta"], rows)


def _activation_table(metrics: Mapping[str, Any], dims: Sequence[str]) -> str:
    act, cal = metrics.get("activation") or {}, metrics.get("calibration") or {}
    rows = []
    for d in dims:
        if d not in act and d not in cal:
            continue
        a = act.get(d, {})
        rows.append([html.escape(d), _fmt(a.get("recall@1")), _fmt(a.get("recall@3")), _fmt(a.get("recall@5")),
                     _fmt(a.get("precision")), _fmt(a.get("activation_rate")), _fmt(a.get("mean_selected")),
                     _fmt(cal.get(d, {}).get("ece")), _fmt(a.get("support"))])
    if not rows:
        return "<p>no concept signals in <code>__meta__</code>.</p>"
    return _table(["dimension", "recall@1", "recall@3", "recall@5", "precision (injected)", "activation rate",
                   "selected / image", "ECE", "n"], rows)


SUMMARY_METRICS = ("accuracy", "macro_f1")  # per dimension in the overview; the plot shows the last
METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1"}
MODE_NOTES = {"keys": "key lines (the Stage A/B prompts)", "structured": "the JSON prompt",
              "natural": "the prose prompt"}
CONCEPT_COLOR, BASELINE_COLOR = "#1f77b4", "#b0b0b0"


def overview_rows(metrics: Mapping[str, Any], baseline: Mapping[str, Any] | None,
                  dims: Sequence[str]) -> list[dict[str, Any]]:
    """One row per answer mode and dimension: ``{"mode", "dim", "<metric>": concept value,
    "<metric>_baseline": baseline value (None without a baseline)}`` for ``SUMMARY_METRICS``;
    only modes the concept model answered in (and the baseline too, when there is one)."""
    rows = []
    for mode in MODES:
        c, b = metrics.get(mode), (baseline or {}).get(mode)
        if not isinstance(c, Mapping) or (baseline is not None and not isinstance(b, Mapping)):
            continue
        for d in dims:
            row: dict[str, Any] = {"mode": mode, "dim": d}
            for k in SUMMARY_METRICS:
                row[k] = (c.get(k) or {}).get(d)
                row[f"{k}_baseline"] = (b.get(k) or {}).get(d) if isinstance(b, Mapping) else None
            rows.append(row)
    return rows


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float, np.integer, np.floating)) and math.isfinite(float(x)) else None


def overview_svg(rows: Sequence[Mapping[str, Any]], metric: str = SUMMARY_METRICS[-1]) -> str:
    """Inline SVG: per answer mode, per dimension, the concept model's ``metric`` beside the
    baseline's (bars on a 0-1 axis, value written above; each bar carries ``data-mode``,
    ``data-dim``, ``data-series`` and ``data-value``)."""
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    with_baseline = any(_num(r.get(f"{metric}_baseline")) is not None for r in rows)
    bar, gap, top, plot_h, left = 22, 18, 46, 150, 34
    series = [("concept", metric, CONCEPT_COLOR)] + ([("baseline", f"{metric}_baseline", BASELINE_COLOR)]
                                                    if with_baseline else [])
    group_w = bar * len(series) + gap
    out, x = [], left
    for mode in modes:
        mrows = [r for r in rows if r["mode"] == mode]
        x0 = x
        for r in mrows:
            for k, (name, key, color) in enumerate(series):
                v = _num(r.get(key))
                h = 0.0 if v is None else max(0.0, min(1.0, v)) * plot_h
                bx, by = x + k * bar, top + plot_h - h
                label = f"{mode} {r['dim']} {name}: {_fmt(v) if v is not None else 'n/a'}"
                out.append(f'<rect class="bar" x="{bx}" y="{by:.1f}" width="{bar - 2}" height="{h:.1f}" '
                           f'fill="{color}" data-mode="{html.escape(mode)}" data-dim="{html.escape(r["dim"])}" '
                           f'data-series="{name}" data-value="{"" if v is None else repr(v)}">'
                           f"<title>{html.escape(label)}</title></rect>")
                out.append(f'<text x="{bx + bar / 2 - 1}" y="{by - 3:.1f}" font-size="9" text-anchor="middle">'
                           f'{"n/a" if v is None else f"{v:.2f}"}</text>')
            out.append(f'<text x="{x + bar * len(series) / 2}" y="{top + plot_h + 14}" font-size="11" '
                       f'text-anchor="middle">{html.escape(str(r["dim"])[:14])}</text>')
            x += group_w
        out.append(f'<text x="{(x0 + x - gap) / 2}" y="{top + plot_h + 30}" font-size="12" font-weight="600" '
                   f'text-anchor="middle">{html.escape(mode)} answers</text>')
        x += gap
    width = max(x, 260)
    axis = [f'<line x1="{left - 4}" x2="{width - 8}" y1="{top + plot_h * (1 - t)}" y2="{top + plot_h * (1 - t)}" '
            f'stroke="#ddd"/><text x="{left - 8}" y="{top + plot_h * (1 - t) + 3}" font-size="9" '
            f'text-anchor="end">{t:g}</text>' for t in (0.0, 0.5, 1.0)]
    legend = [f'<text x="{left - 30}" y="14" font-size="12" font-weight="600">'
              f"{html.escape(METRIC_NAMES.get(metric, metric))} per dimension</text>"]
    for k, (name, _, color) in enumerate(series):
        lx = left - 30 + k * 150
        text_ = "concept model" if name == "concept" else "no-concept baseline"
        legend.append(f'<rect x="{lx}" y="22" width="12" height="12" fill="{color}"/>'
                      f'<text x="{lx + 16}" y="32" font-size="11">{text_}</text>')
    height = top + plot_h + 40
    return (f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" aria-label="{html.escape(metric)}: concept model vs baseline">'
            + "".join(axis + legend + out) + "</svg>")


def overview_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The overview's short table: per mode and dimension, each ``SUMMARY_METRICS`` for the
    concept model, the baseline and their difference (a two-row header)."""
    top = "".join(f'<th colspan="3" class="group">{html.escape(METRIC_NAMES.get(k, k))}</th>' for k in SUMMARY_METRICS)
    sub = "<th>concept model</th><th>baseline</th><th>delta</th>" * len(SUMMARY_METRICS)
    body = []
    for r in rows:
        cells = [html.escape(str(r["mode"])), html.escape(str(r["dim"]))]
        for k in SUMMARY_METRICS:
            c, b = _num(r.get(k)), _num(r.get(f"{k}_baseline"))
            delta = None if c is None or b is None else c - b
            cls = "" if not delta else ("pos" if delta > 0 else "neg")
            cells += [_fmt(c), _fmt(b), f'<span class="{cls}">{_fmt(delta, True)}</span>']
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return ('<div class="scroll"><table class="brief"><thead><tr><th rowspan="2">answers</th>'
            f'<th rowspan="2">dimension</th>{top}</tr><tr>{sub}</tr></thead><tbody>{"".join(body)}</tbody>'
            "</table></div>")


def _overview(metrics: Mapping[str, Any], baseline: Mapping[str, Any] | None, dims: Sequence[str]) -> str:
    rows = overview_rows(metrics, baseline, dims)
    if not rows:
        return "<p>no answers matched the dataset.</p>"
    notes = []
    for name, m in (("concept model", metrics), ("baseline", baseline)):
        rate = _num(((m or {}).get("structured") or {}).get("json_parse_rate"))
        if rate is not None:
            notes.append(f"{name} {100 * rate:.0f}%")
    note = (f'<p class="note">Structured answers that parse as JSON: {html.escape(", ".join(notes))}.</p>'
            if notes else "")
    if baseline is None:
        note += '<p class="note">No baseline metrics were given.</p>'
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    note += ('<p class="note">Answers: ' + "; ".join(f"{html.escape(m)} = {html.escape(MODE_NOTES[m])}" for m in modes)
             + ". The baseline is the same model with every concept slot empty.</p>")
    return f'<div class="overview">{overview_svg(rows)}<div>{overview_table(rows)}{note}</div></div>'


def write_report(out_dir: str | os.PathLike, metrics: Mapping[str, Any] | str, reasoning: Mapping[str, Any] | str,
                 dataset: Dataset | str, baseline_metrics: Mapping[str, Any] | str | None = None,
                 images_root: str | os.PathLike | None = None, saliency: Mapping[str, Any] | None = None,
                 gallery_n: int = 12, *, sentinels: tuple[str, str] = DEFAULT_SENTINELS,
                 title: str = "cgjax evaluation report") -> str:
    """Writes ``out_dir/report.html`` and ``out_dir/concept_graph.png``; returns the HTML path.

    ``metrics`` / ``baseline_metrics``: dicts from ``metrics.evaluate`` (or paths to their JSON);
    ``reasoning``: the reasoning.json dict (or path); ``dataset``: a ``Dataset`` (or a dataset JSON
    path, read with ``images_root``). ``saliency``: ``{image key: HxW array | {name: HxW array}}``
    (image key = reasoning.json key or the record's image path), drawn over the gallery images.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    metrics = _load(metrics)
    baseline = _load(baseline_metrics) if baseline_metrics is not None else None
    reasoning = _load(reasoning)
    if not isinstance(dataset, Dataset):
        dataset = read_dataset_json(dataset, images_root)
    root = os.fspath(images_root) if images_root is not None else dataset.images_root
    dims = _dims(metrics, dataset)
    parser = AnswerParser(label_vocabs(dataset, reasoning), dataset.dimensions, sentinels=sentinels)
    results, _ = collect(reasoning, dataset, parser=parser, images_root=root)
    graph_path = draw_concept_graph(reasoning, os.path.join(out_dir, "concept_graph.png"), dims)

    unmatched = metrics.get("n_unmatched")
    note = f"; {_fmt(unmatched)} reasoning entries matched no record" if unmatched else ""
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>{_fmt(metrics.get('n_images'))} images evaluated{note}. "
             f"Dimensions: {html.escape(', '.join(dims))}.</p>",
             '<h2 id="overview">Concept model vs no-concept baseline</h2>', _overview(metrics, baseline, dims),
             '<h2 id="summary">Summary per answer mode</h2>', _summary_table(metrics, dims)]
    if baseline is not None:
        parts += ['<h2 id="baseline">Baseline vs concept model</h2>', "<h3>baseline</h3>",
                  _summary_table(baseline, dims), "<h3>side by side</h3>", _comparison_table(metrics, baseline)]
    parts += ['<h2 id="signals">Concept signals</h2>', _activation_table(metrics, dims)]
    rel = plot_reliability(metrics, dims)
    parts += ['<h3 id="reliability">Reliability diagram</h3>',
              _figure(rel, "reliability diagram") if rel else "<p>no signal scores to calibrate.</p>"]
    conf = plot_confusion(metrics, dims)
    parts += ['<h2 id="confusion">Confusion matrices</h2>',
              _figure(conf, "confusion matrices") if conf else "<p>no answers.</p>"]
    f1 = plot_f1_bars(metrics, dims, baseline)
    parts += ['<h2 id="f1">Per-class F1</h2>', _figure(f1, "per-class F1") if f1 else "<p>no answers.</p>"]
    with open(graph_path, "rb") as f:
        parts += ['<h2 id="graph">Concept graph</h2>', _img_tag(f.read(), "concept graph", 640)]
    parts += [f'<h2 id="gallery">Gallery ({min(gallery_n, len(results))} of {len(results)})</h2>',
              f'<div class="gallery">{_gallery(results, dims, root, saliency, gallery_n)}</div>']
    doc = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
           f"<style>{_CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    path = os.path.join(out_dir, "report.html")
    persistence.write_text(path, doc)
    return path
