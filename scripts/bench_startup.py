"""Start-up time: ``python scripts/bench.py startup [--images 1000,10000] [--packed] [--code DIR]``.

Seconds from launching a fresh Stage A process (``cgjax.train.train_stage``, demo preset: tiny
LLaVA) to the end of its first train step, on a synthetic data set of N images (the demo's images
hard-linked N times over, with their targets and signals), read from the image folder and, with
``--packed``, from the packed ArrayRecord set of the same records. The growth per 10,000 images is
the slope between the smallest and the largest N; the fixed part (imports, model load, compile)
is the intercept. ``--code DIR`` times another checkout (e.g. an older commit) with the same data.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from absl import flags

from cgjax import commandline
from cgjax.config import load_config
from cgjax.data.demo_data import write_label_signals
from cgjax.data.tfds_builder import pack
from cgjax.demo_assets import ensure_demo_assets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROG = "scripts/bench.py startup"

CHILD = r"""
import json, os, sys, time
t0 = float(sys.argv[1])
from cgjax import train
from cgjax.config import load_config
spec = json.loads(sys.argv[2])
c = load_config(os.path.join(spec["code"], "configs", "stageA.py") + ":preset=demo")
c.demo.root = spec["demo_root"]
c.data.dataset_json, c.data.images_root = spec["dataset_json"], spec["images_root"]
c.data.targets_csv, c.data.signals = spec["targets_csv"], (spec["signals"],)
if spec.get("packed_dir"):
    c.data.packed_dir = spec["packed_dir"]
c.num_steps, c.batch_size, c.mesh = 1, 4, "data=1"
c.val.at_end, c.export.pt, c.log.progress_bar, c.log.tensorboard = False, False, False, False
c.checkpoint.every_steps = 0
first = []
train.train_stage(c, spec["workdir"], step_callback=lambda s, m: first.append(time.time() - t0))
print("STARTUP_JSON " + json.dumps({"first_step_s": first[0]}))
"""


def synthetic_set(demo_root: str, n: int, out: str) -> dict[str, str]:
    """N records over the demo's images (hard links), 80/10/10 splits, targets and label signals."""
    src = json.load(open(os.path.join(demo_root, "data", "dataset.json")))
    rows = list(csv.DictReader(open(os.path.join(demo_root, "data", "targets.csv"), newline="")))
    by_image = {r["image_path"]: r for r in rows}
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    records, targets = [], []
    for i in range(n):
        rec = dict(src[i % len(src)])
        name = f"images/{i:06d}{os.path.splitext(rec['image'])[1]}"
        os.link(os.path.join(demo_root, "data", rec["image"]), os.path.join(out, name))
        t = dict(by_image[rec["image"]], image_path=name)
        rec["image"] = name
        rec["split"] = "train" if i % 10 < 8 else ("validation" if i % 10 == 8 else "test")
        records.append(rec)
        targets.append(t)
    with open(os.path.join(out, "dataset.json"), "w") as f:
        json.dump(records, f)
    with open(os.path.join(out, "targets.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(targets[0]))
        w.writeheader()
        w.writerows(targets)
    signals = os.path.join(out, "signals.keyed.json")
    write_label_signals(os.path.join(out, "dataset.json"), out, signals, dims=("artist", "style", "genre"))
    return {"dataset_json": os.path.join(out, "dataset.json"), "images_root": out,
            "targets_csv": os.path.join(out, "targets.csv"), "signals": signals}


def run_child(code: str, spec: dict) -> float:
    env = dict(os.environ, PYTHONPATH=code, JAX_PLATFORMS="cpu")
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", CHILD, repr(t0), json.dumps(dict(spec, code=code))], env=env,
                         cwd=code, capture_output=True, text=True, timeout=1800)  # cwd: `-c` imports from it
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("STARTUP_JSON ")]
    if out.returncode or not lines:
        raise RuntimeError(f"start-up run failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1].split(" ", 1)[1])["first_step_s"]


def define_flags(fv: flags.FlagValues, argv: Sequence[str] | None = None) -> None:
    """This benchmark's flags on ``fv`` (see :mod:`cgjax.commandline`)."""
    del argv  # no config file
    flags.DEFINE_list("images", ["1000", "10000"], "data set sizes, comma-separated", flag_values=fv)
    flags.DEFINE_bool("packed", False, "also time the packed ArrayRecord set", flag_values=fv)
    flags.DEFINE_string("code", ROOT, "checkout to time (default: this one)", flag_values=fv)
    flags.DEFINE_integer("repeats", 1, "launches per size (the fastest is reported)", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> dict:
    """The benchmark in this process: ``main(["--images", "100,1000", "--packed"])``; its figures."""
    return run(commandline.parse(define_flags, argv or (), PROG))


def print_json(args: flags.FlagValues) -> None:
    """``python scripts/bench_startup.py``: the figures, then them as JSON."""
    print(json.dumps(run(args), indent=2, default=str))


def run(args: flags.FlagValues) -> dict:
    """The benchmark from the parsed flags of :func:`define_flags`."""
    sizes = sorted(int(x) for x in args.images)
    work = tempfile.mkdtemp(prefix="cgjax-bench-startup-")
    c = load_config(os.path.join(ROOT, "configs", "stageA.py:preset=demo"))
    c.demo.root = os.path.join(work, "demo")
    c.demo.n_images = 48
    ensure_demo_assets(c)
    results: dict = {"label": "start-up to the first step", "sizes": sizes, "code": os.path.abspath(args.code)}
    kinds = ["files"] + (["packed"] if args.packed else [])
    sets = {n: synthetic_set(c.demo.root, n, os.path.join(work, f"set{n}")) for n in sizes}
    for kind in kinds:
        times = {}
        for n in sizes:
            data = sets[n]
            spec = dict(data, demo_root=c.demo.root)
            if kind == "packed":
                spec["packed_dir"] = pack(data["dataset_json"], data["images_root"], os.path.join(work, f"packed{n}"),
                                          targets_csv=data["targets_csv"], signals=[data["signals"]])
            best = min(run_child(args.code, dict(spec, workdir=os.path.join(work, f"wd-{kind}-{n}-{r}")))
                       for r in range(args.repeats))
            times[n] = best
            print(f"{kind:6} {n:>7} images: {best:6.2f} s from launch to the first step", flush=True)
        slope = (times[sizes[-1]] - times[sizes[0]]) / max(1, sizes[-1] - sizes[0]) * 10_000
        fixed = times[sizes[0]] - slope * sizes[0] / 10_000
        print(f"{kind:6} fixed part {fixed:.2f} s, growth {slope:.2f} s per 10,000 images")
        results[kind] = {"seconds": times, "per_10k_images_s": slope, "fixed_s": fixed}
    return results


if __name__ == "__main__":
    commandline.run(define_flags, print_json)
