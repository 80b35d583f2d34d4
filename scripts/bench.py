"""Benchmarks: ``python scripts/bench.py MODE [flags]``; ``all`` runs every mode but quality, startup, compile and int8.

Each mode lives in ``scripts/bench_<mode>.py``: its absl flags (``define_flags``), ``run(flags) -> dict``,
which prints its own figures and returns them, and ``main(argv) -> dict`` for a command line in this
process. ``python scripts/bench.py MODE --helpfull`` lists a mode's flags. ``all`` gives each mode the
flags it defines (``--steps 2`` goes to stageA and loader, ``--batch 8`` to generate, encode and
signals) and refuses a flag that no mode defines before anything runs; then it prints one table.
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import sys
import time
from types import ModuleType
from typing import Sequence

import jax
from absl import app, flags

from cgjax import commandline
from cgjax.flops import matmul_peak

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MODES = ("stageA", "generate", "encode", "signals", "prototypes", "loader", "quality", "startup", "compile", "int8")
# quality and compile time: not a speed vs torch; startup: minutes of fresh processes; int8: generate's kernels
NOT_IN_ALL = ("quality", "startup", "compile", "int8")
HELP = ("-h", "-?", "--help", "--helpshort", "--helpfull")


def _available() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    return [m for m in MODES if os.path.exists(os.path.join(here, f"bench_{m}.py"))]


def usage(flag_help: Sequence[str] = ()) -> str:
    """This file's help and the modes; with ``flag_help``, those modes' flags too."""
    out = [__doc__, "modes available: " + ", ".join(_available() + ["all"])]
    for m in flag_help:
        fv = flags.FlagValues()
        module_of(m).define_flags(fv, None)
        out.append(f"\n{m} flags:\n{fv.get_help(include_special_flags=False)}")
    return "\n".join(out)


def module_of(name: str) -> ModuleType:
    """The module of benchmark ``name`` (``scripts/bench_<name>.py``)."""
    if name not in _available():
        raise commandline.UsageError(f"unknown mode {name!r}; available: {', '.join(_available() + ['all'])}")
    return importlib.import_module(f"bench_{name}")


def _takes(fv: flags.FlagValues, name: str) -> bool:
    return name in fv or (name.startswith("no") and name[2:] in fv and fv[name[2:]].boolean)


def route(argv: Sequence[str], modes: Sequence[str]) -> tuple[dict[str, list[str]], list[str]]:
    """``all``'s flags split among ``modes``: each mode gets the flags it defines (a flag several
    modes define goes to each of them), and absl's own (``--verbosity``, ``--only_check_args``) come
    back apart. A flag that neither a mode nor absl defines, or a stray value, raises
    :class:`cgjax.commandline.UsageError` naming it."""
    spaces = {}
    for m in modes:
        spaces[m] = flags.FlagValues()
        module_of(m).define_flags(spaces[m], None)
    per_mode: dict[str, list[str]] = {m: [] for m in modes}
    own: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg.strip("-") == "":
            raise commandline.UsageError(f"unexpected argument {arg!r}: every value belongs to a flag "
                                         "(--flag VALUE or --flag=VALUE)")
        name, eq, _ = arg.lstrip("-").partition("=")
        owners = [m for m, fv in spaces.items() if _takes(fv, name)]
        fvs = [spaces[m] for m in owners] or ([flags.FLAGS] if _takes(flags.FLAGS, name) else [])
        if not fvs:
            raise commandline.UsageError(f"no benchmark in `all` ({', '.join(modes)}) takes --{name}; "
                                         "`python scripts/bench.py MODE --helpfull` lists a mode's flags")
        boolean = {name not in fv or fv[name].boolean for fv in fvs}
        if not eq and len(boolean) > 1:
            raise commandline.UsageError(f"--{name} is a boolean in some modes and not in others "
                                         f"({', '.join(owners)}): give it as --{name}=VALUE")
        takes_value = not eq and boolean == {False}
        if takes_value and i + 1 == len(argv):
            raise commandline.UsageError(f"flag --{name} needs a value")
        unit = list(argv[i:i + 2]) if takes_value else [arg]
        i += len(unit)
        for m in owners:
            per_mode[m] += unit
        if not owners:
            own += unit
    return per_mode, own


def parse_modes(per_mode: dict[str, list[str]]) -> dict[str, flags.FlagValues]:
    """Each mode's flags (from :func:`route`) parsed; an error names the mode and the flag."""
    parsed = {}
    for m, args in per_mode.items():
        try:
            parsed[m] = commandline.parse(module_of(m).define_flags, args, f"scripts/bench.py all ({m})")
        except flags.Error as e:
            raise commandline.UsageError(f"{m}: {e}") from e
    return parsed


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


def run_all(parsed: dict[str, flags.FlagValues]) -> dict:
    """``all``: the matmul peak, each mode with its parsed flags, one table; the figures of each."""
    peak = matmul_peak()
    print(f"measured fp32 matmul peak: jax {peak['jax'] / 1e9:.1f} GFLOP/s, torch "
          f"{peak.get('torch', float('nan')) / 1e9:.1f} GFLOP/s (2048^3; MFU below is against the higher)")
    results = {"matmul_peak": peak}
    for m, fv in parsed.items():
        print(f"\n=== {m} ===", flush=True)
        results[m] = module_of(m).run(fv)
    print(f"\n{table(results, peak['peak'])}")
    print(f"({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__} on {jax.devices()[0].platform})")
    print(json.dumps(results, default=float))
    return results


def in_all() -> list[str]:
    """The modes ``all`` runs."""
    return [m for m in _available() if m not in NOT_IN_ALL]


def main(argv: Sequence[str]) -> dict | None:
    """``scripts/bench.py``'s command line (without the program name) in this process:
    ``main(["encode", "--batch", "8"])``, ``main(["all", "--steps", "2"])``; the figures (None when
    it printed the usage). A bad command line raises ``absl.flags.Error``."""
    if not argv or argv[0] in HELP:
        print(usage())
        return None
    name, rest = argv[0], list(argv[1:])
    if name != "all":
        return module_of(name).main(rest)
    per_mode, own = route(rest, in_all())
    if own:
        raise commandline.UsageError(f"absl's own flags ({' '.join(own)}) only on the command line")
    return run_all(parse_modes(per_mode))


def _script(argv: list[str]) -> None:
    """``python scripts/bench.py ...``: a mode runs under ``absl.app.run`` with its flags, as
    ``python scripts/bench_<mode>.py`` would (``--help`` shows that mode's); ``all`` parses every
    mode's flags before it runs any, then runs them under ``absl.app.run`` with absl's own flags."""
    if not argv or argv[0] in HELP:
        print(usage())
        return
    name, rest = argv[0], argv[1:]
    try:
        if name != "all":
            m = module_of(name)
        elif any(a in HELP for a in rest):
            print(usage(in_all()))
            return
        else:
            per_mode, own = route(rest, in_all())
            parsed = parse_modes(per_mode)
    except flags.Error as e:
        sys.exit(f"scripts/bench.py {name}: {e}")
    if name != "all":
        sys.argv = [sys.argv[0], *rest]
        sys.modules["__main__"].__doc__ = m.__doc__  # absl's --help shows the main module's doc
        commandline.run(m.define_flags, m.run)
        return
    for m_name, args in per_mode.items():
        if args:
            print(f"{m_name}: {' '.join(args)}")

    def run(_):
        run_all(parsed)

    sys.argv = [sys.argv[0], *own]
    app.run(run)


if __name__ == "__main__":
    _script(sys.argv[1:])
