"""notebooks/quickstart.ipynb, executed top to bottom in a Jupyter kernel at its smallest size (CGJAX_NB_FAST=1),
the kernel being the Python of the ``installed`` venv (a non-editable wheel of this checkout; tests/conftest.py)."""
import json
import os
import re

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install -e '.[test]')")
nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install -e '.[test]')")
pytest.importorskip("ipykernel", reason="ipykernel is not installed (pip install -e '.[test]')")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")
KERNEL = "cgjax-test-python"


def _kernel_spec(root, python) -> None:
    """A kernel spec running ``python``: the kernel is that interpreter, whatever else is installed."""
    d = root / "kernels" / KERNEL
    d.mkdir(parents=True)
    spec = {"argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "cgjax test (installed venv)", "language": "python"}
    (d / "kernel.json").write_text(json.dumps(spec))


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def _cell(nb, tag):
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"one cell tagged {tag!r} expected, found {len(cells)}"
    return cells[0]


def test_notebook_stored_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for c in nb.cells:
        if c.cell_type == "code":
            assert not c.outputs and c.execution_count is None, "store the notebook without outputs"
    assert "parameters" in _cell(nb, "parameters").metadata["tags"]


@pytest.mark.slow
def test_notebook_executes(installed, tmp_path, monkeypatch):
    _kernel_spec(tmp_path / "jupyter", installed["python"])
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    work = tmp_path / "work"
    env = dict(os.environ)
    # cgjax, converters and configs as installed in the venv (no PYTHONPATH; the kernel's cwd is tmp_path, outside
    # the checkout), the smallest sizes, a known work dir
    env.pop("PYTHONPATH", None)
    env.update(CGJAX_NB_FAST="1", CGJAX_NB_WORKDIR=str(work))
    # the notebook selects the inline backend; one CPU device (tests/conftest.py asks for 8 virtual ones,
    # which the notebook does not need and which make every compilation slower)
    for name in ("CGJAX_NB_RUN_REAL_CHECKPOINT", "MPLBACKEND", "XLA_FLAGS"):
        env.pop(name, None)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name=KERNEL, allow_errors=False,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)  # raises CellExecutionError on the first failing cell

    for c in nb.cells:
        if c.cell_type == "code":
            assert not [o for o in c.outputs if o.get("output_type") == "error"], c.source[:200]

    # the install cell installed nothing: cgjax came from the venv's site-packages
    assert f"from {os.path.join(installed['site'], 'cgjax')}\n" in _text(_cell(nb, "install"))

    # conversion parity: cgjax vs PyTorch
    m = re.search(r"parity max abs diff \(cgjax vs PyTorch\): (\S+)", _text(_cell(nb, "parity")))
    assert m and float(m.group(1)) < 1e-4

    # the images figure and the gating heat map are rendered images
    for tag in ("images", "gating"):
        assert any("image/png" in o.get("data", {}) for o in _cell(nb, tag).outputs), tag
    assert re.search(r"\d+ concept tokens", _text(_cell(nb, "gating")))

    # answers of the concept model and the baseline, with the truth
    answers = _text(_cell(nb, "answers"))
    assert "concept model:" in answers and "baseline:" in answers and "truth:" in answers
    n = int(re.search(r"(\d+) answers shown", answers).group(1))
    assert n >= 3  # EVAL_IMAGES=3 in fast mode, two prompt modes each

    # evaluation plots and the report
    plots = _cell(nb, "plots")
    assert sum("image/png" in o.get("data", {}) for o in plots.outputs) >= 3
    assert os.path.getsize(work / "eval" / "report.html") > 0
    assert f"report: {work / 'eval' / 'report.html'}" in _text(plots)
    assert "RUN_REAL_CHECKPOINT is False" in _text(_cell(nb, "real-checkpoint"))

    # one chip: the planner's llava-1.5-7b figures by quantization, and int8 on the tiny base
    one = _text(_cell(nb, "one-chip"))
    weights = {m: float(g) for m, g in re.findall(r"quantize=(\w+) *: weights +([\d.]+) GiB", one)}
    assert set(weights) == {"none", "int8", "int4"} and weights["int4"] < weights["int8"] < 0.6 * weights["none"]
    m = re.search(r"int8 vs fp32: next-token KL (\S+), greedy tokens identical (\d+)%", one)
    assert m and float(m.group(1)) < 1e-3
