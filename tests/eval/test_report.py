"""The HTML report and the concept graph."""
import base64
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from cgjax.eval.metrics import evaluate
from cgjax.eval.report import concept_cooccurrence, draw_concept_graph, write_report

VOID = {"img", "meta", "br", "hr", "input", "link", "source", "wbr"}


class _Checker(HTMLParser):
    """Well-formedness: every non-void tag closed in order."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.ids, self.images = [], [], set(), []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()


def _check_html(path):
    text = open(path, encoding="utf-8").read()
    assert text.startswith("<!DOCTYPE html>")
    c = _Checker()
    c.feed(text)
    c.close()
    assert not c.errors and not c.stack, (c.errors[:3], c.stack)
    for src in c.images:  # every image is inlined and decodes
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    return text, c


@pytest.fixture(scope="module")
def metrics_pair(demo_reasoning):
    ds = demo_reasoning["dataset"]
    return evaluate(demo_reasoning["reasoning_obj"], ds), evaluate(demo_reasoning["baseline_obj"], ds)


def _check_overview(text, demo_reasoning):
    """The overview (first section) against accuracy and macro-F1 (over the ground-truth classes)
    computed here from the structured answers the fixture wrote (its predictions; the baseline
    always answers Unknown / Unknown / landscape); every table scrolls inside its own box."""
    ds = demo_reasoning["dataset"]
    assert re.search(r"</h1>\s*<p>[^<]*</p>\s*<h2 id=\"overview\">", text)  # right after the title line
    overview = text[text.index('<h2 id="overview">'):text.index('<h2 id="summary">')]
    bars = _bars(overview)
    baseline_pred = {"artist": "Unknown", "style": "Unknown", "genre": "landscape"}
    for d in ds.dimensions:
        recs = [r for r in ds.records if r.labels.get(d)]
        gt = [r.labels[d] for r in recs]
        for series, pred in (("concept", [demo_reasoning["preds"][r.image][d] for r in recs]),
                             ("baseline", [baseline_pred[d]] * len(recs))):
            f1 = np.mean([2 * sum(g == p == k for g, p in zip(gt, pred))
                          / (sum(g == k for g in gt) + sum(p == k for p in pred)) for k in set(gt)])
            acc = float(np.mean(np.asarray(gt) == np.asarray(pred)))
            assert bars["structured", d, series] == pytest.approx(f1, abs=1e-9)
            row = re.search(rf"<tr><td>structured</td><td>{d}</td>(.*?)</tr>", overview).group(1)
            cells = re.findall(r"<td>(.*?)</td>", row)
            assert float(cells[0 if series == "concept" else 1]) == pytest.approx(acc, abs=5e-4)
            assert float(cells[3 if series == "concept" else 4]) == pytest.approx(f1, abs=5e-4)
    assert {k[0] for k in bars} == {"structured", "natural"} and len(bars) == 2 * 2 * len(ds.dimensions)
    assert "parse as JSON: concept model 100%, baseline 100%" in overview
    assert re.search(r"\.scroll\{overflow-x:auto", text)
    assert text.count("<table") == text.count('<div class="scroll"><table') > 5


@pytest.fixture(scope="module")
def full_report(demo_reasoning, metrics_pair, tmp_path_factory):
    """report.html with a baseline and saliency maps (written once for this module)."""
    m, mb = metrics_pair
    ds = demo_reasoning["dataset"]
    first = next(k for k in demo_reasoning["reasoning_obj"] if k.endswith(ds.records[0].image))  # gallery order
    saliency = {first: {"prototype artist": np.random.default_rng(0).random((8, 8)),
                        "llava answer": np.outer(np.arange(6), np.arange(6))},
                ds.records[1].image: np.ones((4, 4))}  # keyed by record path; constant map
    return write_report(tmp_path_factory.mktemp("report") / "eval", m, demo_reasoning["reasoning"], ds,
                        baseline_metrics=mb, saliency=saliency, gallery_n=4)


def test_report_sections(demo_reasoning, full_report):
    path = full_report
    text, c = _check_html(path)
    assert {"summary", "baseline", "signals", "reliability", "confusion", "f1", "graph", "gallery"} <= c.ids
    for needle in ("Reliability diagram", "Confusion matrices", "Per-class F1", "Baseline vs concept model",
                   "prototype artist", "llava answer", "activated concepts", "raw answer", "explanation coverage",
                   "explanation_coverage</td>"):
        assert needle in text
    assert text.count('<div class="card">') == 4
    _check_overview(text, demo_reasoning)
    # figures: reliability, confusion, F1, graph; 4 thumbnails + 3 saliency overlays
    assert len(c.images) == 4 + 4 + 3
    assert re.search(r"macro_f1</td><td>artist</td><td>[0-9.]+</td><td>[0-9.]+</td><td><span class=\"pos\">\+", text)
    graph = os.path.join(os.path.dirname(path), "concept_graph.png")
    with Image.open(graph) as im:
        assert im.format == "PNG" and min(im.size) > 200


def _bars(text):
    """``{(mode, dim, series): value}`` of the overview plot's bars."""
    out = {}
    for m in re.finditer(r'<rect class="bar"[^>]*data-mode="([^"]*)" data-dim="([^"]*)" data-series="([^"]*)" '
                         r'data-value="([^"]*)"', text):
        out[m.group(1), m.group(2), m.group(3)] = float(m.group(4)) if m.group(4) else None
    return out


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium (apt-get install chromium)")
def test_report_fits_the_window_in_chromium(full_report, tmp_path):
    """Headless Chromium at 900 px: the page itself does not scroll sideways, while its widest
    table (the per-mode summary) is wider than its box and scrolls inside it."""
    probe = ("<script>const boxes = [...document.querySelectorAll('.scroll')];"
             "document.body.dataset.page = document.documentElement.scrollWidth > window.innerWidth;"
             "document.body.dataset.inner = boxes.some(b => b.scrollWidth > b.clientWidth);</script>")
    page = tmp_path / "probe.html"
    page.write_text(open(full_report, encoding="utf-8").read().replace("</body>", probe + "</body>"), encoding="utf-8")
    out = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--window-size=900,800",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r'<body data-page="(\w+)" data-inner="(\w+)"', out.stdout)
    assert m, out.stderr[-2000:]
    assert m.groups() == ("false", "true")


def test_report_from_paths_without_baseline_or_signals(demo_reasoning, eval_demo, metrics_pair, tmp_path):
    _, mb = metrics_pair
    mpath = tmp_path / "metrics_baseline.json"
    mpath.write_text(json.dumps(mb))
    path = write_report(tmp_path / "r", str(mpath), demo_reasoning["baseline"], eval_demo["test_json"],
                        images_root=eval_demo["images_root"], gallery_n=2)
    text, c = _check_html(path)
    assert "baseline" not in c.ids and "no signal scores to calibrate" in text
    assert "no concept signals" in text
    assert (tmp_path / "r" / "concept_graph.png").exists()
    assert "No baseline metrics were given" in text and {k[2] for k in _bars(text)} == {"concept"}


def test_cooccurrence_counts():
    reasoning = {
        "a.png": {"__meta__": {"activation": {"artist": {"selected_names": ["X"]},
                                              "style": {"selected_names": ["P", "Q"]}}}},
        "b.png": {"__meta__": {"activation": {"artist": {"selected_names": ["X"]},
                                              "style": {"selected_names": ["P"]}}}},
        "c.png": {"__meta__": {"activation": {"artist": {"selected_names": ["Y"]}, "style": {"selected_names": []}}}},
    }
    nodes, counts, weights = concept_cooccurrence(reasoning, ["artist", "style"])
    assert nodes == [("artist", "X"), ("artist", "Y"), ("style", "P"), ("style", "Q")]
    assert counts.tolist() == [2, 1, 2, 1]
    assert weights.tolist() == [[0, 0, 2, 1], [0, 0, 0, 0], [2, 0, 0, 1], [1, 0, 1, 0]]


@pytest.mark.parametrize("layout", ["circular", "spring"])
def test_concept_graph_png(demo_reasoning, tmp_path, layout):
    out = draw_concept_graph(demo_reasoning["reasoning"], tmp_path / f"g_{layout}.png", layout=layout)
    with Image.open(out) as im:
        assert im.format == "PNG"
        arr = np.asarray(im.convert("RGB"))
    assert arr.std() > 10  # something was drawn
    empty = draw_concept_graph({"x": {"__meta__": {"activation": {}}}}, tmp_path / "empty.png", ["artist"])
    assert Image.open(empty).format == "PNG"
    with pytest.raises(ValueError):
        draw_concept_graph(demo_reasoning["reasoning"], tmp_path / "bad.png", layout="hexagonal")


def test_every_table_cell_is_escaped():
    """Dimension and mode names come from the user's data: markup in them is shown, not run."""
    from cgjax.eval.report import _comparison_table, _overview, _summary_table

    d = "<img src=x onerror=alert(1)>"
    c = {"dimensions": [d], "natural": {"accuracy": {d: 0.8}, "macro_f1": {d: 0.7}, "n": 3,
                                        "multi_label_all_correct": 0.5, "coverage": 0.4}}
    b = {"dimensions": [d], "natural": {"accuracy": {d: 0.5}, "macro_f1": {d: 0.2}, "n": 3,
                                        "multi_label_all_correct": 0.1, "coverage": 0.4}}
    for html_text in (_comparison_table(c, b), _summary_table(c, [d]), _overview(c, b, [d])):
        assert "<img" not in html_text and "&lt;img src=x onerror=alert(1)&gt;" in html_text
