"""Benchmarks: ``python scripts/bench.py MODE [options]``; ``all`` runs every mode.

Each mode lives in ``scripts/bench_<mode>.py`` with ``main(argv) -> dict`` that prints its own
figures and returns them; this file only dispatches and, for ``all``, prints one table.
"""
from __future__ import annotations

import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MODES = ("encode", "generate", "loader", "prototypes", "stageA")


def _available() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    return [m for m in MODES if os.path.exists(os.path.join(here, f"bench_{m}.py"))]


def main(argv: list[str]) -> None:
    modes = _available()
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("modes available:", ", ".join(modes + ["all"]))
        return
    mode, rest = argv[0], argv[1:]
    if mode == "all":
        results = {}
        for m in modes:
            print(f"\n=== {m} ===", flush=True)
            results[m] = importlib.import_module(f"bench_{m}").main(rest)
        print("\n| benchmark | cgjax | PyTorch | speed-up |")
        print("|---|---|---|---|")
        for m, r in results.items():
            if r and "cgjax" in r and "torch" in r:
                print(f"| {m} ({r.get('unit', '')}) | {r['cgjax']:.4g} | {r['torch']:.4g} | {r.get('speedup', float('nan')):.2f}x |")
        print(json.dumps(results, default=float))
        return
    if mode not in modes:
        raise SystemExit(f"unknown mode {mode!r}; available: {', '.join(modes + ['all'])}")
    importlib.import_module(f"bench_{mode}").main(rest)


if __name__ == "__main__":
    main(sys.argv[1:])
