"""Benchmarks: ``python scripts/bench.py MODE [options]``; ``all`` runs every mode.

Each mode lives in ``scripts/bench_<mode>.py`` with ``main(argv) -> dict`` that prints its own
figures and returns them; this file only dispatches and, for ``all``, prints one table.
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import sys
import time

import jax

from cgjax.flops import matmul_peak

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MODES = ("stageA", "generate", "encode", "signals", "prototypes", "loader", "startup")
NOT_IN_ALL = ("startup",)  # minutes of fresh processes; run it on its own


def _available() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    return [m for m in MODES if os.path.exists(os.path.join(here, f"bench_{m}.py"))]


def _rows(mode: str, r: dict):
    """Table rows of one mode's result: ``(label, unit, cgjax, torch, speed-up, FLOPs per unit,
    cgjax compile s, torch compile s)``; Stage A gives a second row against ``torch.compile``,
    generation one for the one-shot ``cgjax.generate`` call, signals one for a single dimension."""
    label = r.get("label", mode)
    yield (label + " vs eager" if "torch_compile" in r else label, r.get("unit", ""), r.get("cgjax"),
           r.get("torch"), r.get("speedup"), r.get("flops_per_unit"), r.get("compile_s"), None)
    if "torch_compile" in r:
        yield (label + " vs torch.compile", r["unit"], r["cgjax"], r["torch_compile"], r.get("speedup_vs_compile"),
               r.get("flops_per_unit"), r.get("compile_s"), r.get("torch_compile_compile_s"))
    if "cgjax_one_shot" in r:
        yield ("the same, one-shot `cgjax.generate` call", r["unit"], r["cgjax_one_shot"], r["torch"],
               r.get("speedup_one_shot"), r.get("flops_per_unit"), None, None)
    if isinstance(r.get("one_dimension"), dict):
        o = r["one_dimension"]
        yield ("the same, one dimension", r.get("unit", ""), o.get("cgjax"), o.get("torch"), o.get("speedup"),
               r.get("flops_per_unit"), None, None)


def table(results: dict, peak_flops: float) -> str:
    """Markdown table: throughput, speed-up, MFU against ``peak_flops`` (for rates in units/s
    with a FLOP count) and compile times."""
    def num(x, fmt="{:.4g}"):
        return "-" if x is None else fmt.format(x)

    lines = ["| benchmark | unit | cgjax | PyTorch | speed-up | cgjax MFU | PyTorch MFU | compile s (cgjax / torch) |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, r in results.items():
        if not isinstance(r, dict) or "cgjax" not in r:
            continue
        for label, unit, cg, th, sp, fpu, cs, tcs in _rows(mode, r):
            rate = unit.endswith("/s") and fpu is not None
            mfu = [num(x * fpu / peak_flops if rate and x else None, "{:.0%}") for x in (cg, th)]
            lines.append(f"| {label} | {unit} | {num(cg)} | {num(th)} | {num(sp, '{:.2f}x')} | {mfu[0]} | {mfu[1]} | "
                         f"{num(cs, '{:.1f}')} / {num(tcs, '{:.1f}')} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    modes = _available()
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("modes available:", ", ".join(modes + ["all"]))
        return
    mode, rest = argv[0], argv[1:]
    if mode == "all":
        peak = matmul_peak()
        print(f"measured fp32 matmul peak: jax {peak['jax'] / 1e9:.1f} GFLOP/s, torch "
              f"{peak.get('torch', float('nan')) / 1e9:.1f} GFLOP/s (2048^3; MFU below is against the higher)")
        results = {"matmul_peak": peak}
        for m in [m for m in modes if m not in NOT_IN_ALL]:
            print(f"\n=== {m} ===", flush=True)
            results[m] = importlib.import_module(f"bench_{m}").main(rest)
        print(f"\n{table(results, peak['peak'])}")
        print(f"({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"jax {jax.__version__} on {jax.devices()[0].platform})")
        print(json.dumps(results, default=float))
        return
    if mode not in modes:
        raise SystemExit(f"unknown mode {mode!r}; available: {', '.join(modes + ['all'])}")
    importlib.import_module(f"bench_{mode}").main(rest)


if __name__ == "__main__":
    main(sys.argv[1:])
