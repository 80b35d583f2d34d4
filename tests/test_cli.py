"""One CLI dialect: every command in scripts/ (the benchmarks too), ``data/make_demo.py`` and
``python -m cgjax.doctor`` parse absl flags, with the flag names users' commands already use, and the
planner takes ``--config.FIELD=VALUE`` overrides like ``scripts/train.py``. Each command is started as
the user starts it (a subprocess); ``--helpfull`` and a mistyped flag only import it."""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent

LAUNCH = ["distributed", "coordinator_address", "num_processes", "process_id", "coordinator_timeout",
          "single_process"]
GATING = ["threshold", "backoff_delta", "topk_per_dim", "budget", "fairness", "priority"]
# command -> the flags it must keep (their old names)
COMMANDS = {
    "scripts/train.py": ["config", "workdir", *LAUNCH],
    "scripts/infer.py": ["config", *LAUNCH],
    "scripts/plan.py": ["config", "mesh", "num-devices", "device", "model", "concepts", "mfu", "gen-batch", "gen-len",
                        "no-compile", "strict", "json", "train-examples"],
    "scripts/export.py": ["workdir", "out", "overwrite", "accept_mismatch", "stage-workdir", "prototypes-workdir",
                          "llava-checkpoint", "step"],
    "scripts/demo.py": ["workdir", "n_images", "image_size", "seed", "pretrain_steps", "clip_pretrain_epochs",
                        "clip_pretrain_images", "stage_steps", "eval_images"],
    "scripts/evaluate.py": ["reasoning-json", "dataset-json", "images-root", "targets-csv", "vocab-json",
                            "baseline-json", "out", "baseline-out", "dimensions", "sentinels", "n-bins",
                            "lexicon-out", "report-dir", "gallery-n", "saliency-json", "allow_outside_root", "split",
                            "splits-json"],
    "scripts/validate_data.py": ["dataset_json", "images_root", "targets_csv", "signals", "dimensions", "vocab",
                                 "no_image_check", "strict", "allow_outside_root", "signals_index"],
    "scripts/export_signals.py": ["dataset_json", "images_root", "ckpt", "dimensions", "output", "format", "topk",
                                  "normalize", "temperature", "clip", "clip_checkpoint", "clip_model", "batch_size",
                                  "ema", "all", "output_dir", "ckpt_artist", "ckpt_style", "ckpt_genre", "ckpt_for",
                                  "csv", "keyed", "report", *GATING],
    "-m cgjax.doctor": ["no-torch", "mesh", "workdir", *LAUNCH],
    "-m cgjax.prototypes.validate_signals": ["dataset_json", "images_root", "signals", "ckpt", "signals_style_json",
                                             "ckpt_style", "threshold_mode", "output", *GATING],
    "data/make_demo.py": ["out", "n_images", "size", "seed", "split", "format"],
}
# benchmark mode -> the flags it must keep; each is its own script and a mode of scripts/bench.py
BENCH = {
    "stageA": ["steps", "rounds", "no-compile", "no-full"],
    "generate": ["batch", "new", "text", "repeats", "settle", "size", "dtype", "layout", "quantize", "quantize-activations", "group-size"],
    "encode": ["model", "batch", "iters", "warmup", "seed"],
    "signals": ["model", "n_images", "batch", "size", "rounds"],
    "prototypes": ["model", "n_images", "size", "epochs", "device"],
    "loader": ["n_images", "size", "image_size", "batch_size", "steps", "warmup", "workers", "read_threads", "source"],
    "quality": ["sizes", "batch", "text", "new", "group-size"],
    "startup": ["images", "packed", "code", "repeats"],
    "compile": ["depths", "new", "repeats"],
    "int8": ["size", "batch", "prompt", "repeats", "settle"],
}


def command(cmd: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python CMD ARGS`` from the repository root, on this checkout's code."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, *cmd.split(), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_every_script_is_covered():
    scripts = {f"scripts/{p.name}" for p in (REPO / "scripts").glob("*.py")} - {"scripts/bench.py"}
    assert scripts == {c for c in COMMANDS if c.startswith("scripts/")} | {f"scripts/bench_{m}.py" for m in BENCH}


@pytest.mark.parametrize("mode", sorted(BENCH))
def test_benchmark_flags(mode):
    """Each ``bench_<mode>.py`` defines its absl flags in ``define_flags`` (checked in this process: a
    subprocess per benchmark would only re-import torch; ``bench.py generate`` runs as a subprocess below)."""
    from absl import flags

    spec = importlib.util.spec_from_file_location(f"bench_{mode}", REPO / "scripts" / f"bench_{mode}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fv = flags.FlagValues()
    module.define_flags(fv, None)
    missing = [f for f in BENCH[mode] if f not in fv]
    assert not missing, f"bench_{mode}.py does not define {missing}"


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_absl_help_lists_the_flags(cmd):
    r = command(cmd, "--helpfull")
    assert r.returncode == 1, r.stderr[-2000:]  # absl: --helpfull prints the help and exits 1 before main
    listed = set(re.findall(r"^\s+(?:-\S+,)?--(?:\[no\])?([\w.-]+):", r.stdout, re.M))
    assert "helpfull" in listed and "only_check_args" in listed  # absl.app's own flags: an absl command
    missing = [f for f in COMMANDS[cmd] if f not in listed]
    assert not missing, f"{cmd} --helpfull does not list {missing}"


# one command per way of defining the flags: module level (export.py, as train/infer/demo), cgjax.commandline
# with a config (plan.py) and without (the doctor); --helpfull above already shows each runs under app.run
# (and the benchmarks' define_flags, through the dispatcher, and data/make_demo.py's in cgjax.data.demo_data)
@pytest.mark.parametrize("cmd", ["scripts/export.py", "scripts/plan.py", "-m cgjax.doctor", "scripts/bench.py generate",
                                 "data/make_demo.py"])
def test_a_mistyped_flag_is_named(cmd):
    typo = (COMMANDS.get(cmd) or BENCH[cmd.split()[-1]])[0] + "x"
    r = command(cmd, f"--{typo}=1")
    assert r.returncode != 0
    assert f"Unknown command line flag '{typo}'" in r.stderr, r.stderr[-2000:]


def test_plan_config_overrides_and_cpu_stand_ins(tmp_path):
    """``--config.FIELD=VALUE`` reaches the plan, the mesh given that way sizes the CPU stand-in devices
    (set after the flags are parsed, before JAX starts), ``--flag value`` / ``--flag=value`` / ``--noflag``."""
    out = tmp_path / "plan.json"
    r = command("scripts/plan.py", "--config", "configs/stageA.py:preset=demo", "--model=tiny",
                "--concepts", "artist=5,style=4,genre=3", "--config.mesh=data=1,fsdp=2,tensor=1",
                "--config.batch_size=2", "--config.text.max_text_tokens", "32", "--nostrict", "--json", str(out),
                timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    p = json.loads(out.read_text())
    assert p["config"] == "configs/stageA.py:preset=demo"
    assert p["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1} and p["n_devices"] == 2 and p["batch"] == 2
    assert p["activations_source"] == "compiled", r.stdout  # the two stand-in devices were there to compile on
    assert "on 2 CPU devices standing in for the accelerator" in r.stdout
    assert re.search(r"sequence \d+ = \d+ image \+ \d+ concept slots \+ 32 text", r.stdout)


def test_positional_arguments_are_a_usage_error():
    """Every value belongs to a flag: the old ``--signals A B`` is refused, naming the repeated form."""
    r = command("scripts/validate_data.py", "--dataset_json", "d.json", "--signals", "a.json", "b.json")
    assert r.returncode == 1 and "unexpected argument(s) 'b.json'" in r.stderr, r.stderr[-2000:]
    assert "--signals A --signals B" in r.stderr


def test_bench_without_arguments_prints_the_modes():
    r = command("scripts/bench.py")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "modes available: " + ", ".join([*BENCH, "all"]) in r.stdout


def test_bench_all_gives_each_mode_its_flags_and_refuses_a_flag_none_takes():
    """``bench.py all`` parses every mode's flags before it runs any (``--only_check_args``: absl's
    parse-and-exit); a flag goes to each mode that defines it."""
    r = command("scripts/bench.py", "all", "--steps", "2", "--batch=3", "--no-compile", "--only_check_args")
    assert r.returncode == 0, r.stderr[-2000:]
    routed = dict(line.split(": ", 1) for line in r.stdout.splitlines())
    assert routed == {"stageA": "--steps 2 --no-compile", "generate": "--batch=3", "encode": "--batch=3",
                      "signals": "--batch=3", "loader": "--steps 2"}
    r = command("scripts/bench.py", "all", "--steps", "2", "--stepz", "2")
    assert r.returncode == 1 and "takes --stepz" in r.stderr and "=== " not in r.stdout, r.stderr[-2000:]
