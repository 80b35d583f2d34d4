"""Metrics of a reasoning.json (cgjax's or the original PyTorch project's) against a dataset JSON.

    python scripts/evaluate.py --reasoning-json R --dataset-json D --out metrics.json \\
        [--images-root ROOT] [--targets-csv C] [--baseline-json B] [--report-dir DIR]

The logic lives in ``cgjax.eval.cli`` (importable from Colab); definitions: ``docs/evaluation.md``.
"""
from cgjax.eval.cli import run

if __name__ == "__main__":
    run()
