"""Metrics of a reasoning.json (cgjax's or the original PyTorch project's) against a dataset JSON.

    python scripts/evaluate.py --reasoning-json R --dataset-json D --out metrics.json \\
        [--images-root ROOT] [--targets-csv C] [--baseline-json B] [--report-dir DIR]

The logic lives in ``cgjax.eval.cli`` (``evaluate_reasoning``, importable from Colab); definitions:
``docs/evaluation.md``. Errors in the inputs print one line and exit 2.
"""
from cgjax import commandline
from cgjax.eval import cli

if __name__ == "__main__":
    commandline.run(cli.define_flags, cli.run)
