"""Train one stage: ``python scripts/train.py --config configs/stageA.py [--workdir DIR]``.

Thin entry point (as in flax ``examples/gemma``): parses flags and hands the config to the
library. ``config.task`` picks the stage: ``prototypes`` (CLIP concept prototypes),
``stageA`` / ``stageB`` (gated concept tokens in LLaVA). Config fields can be overridden on
the command line, e.g. ``--config.batch_size=8``; presets with ``configs/stageA.py:preset=demo``.

Several processes (a pod, or a rehearsal on one machine): ``--distributed`` lets JAX find the
cluster (TPU pod, SLURM, Open MPI); ``--coordinator_address HOST:PORT --num_processes N
--process_id I`` launches explicitly. See docs/pods.md.
"""
from __future__ import annotations

import importlib

from absl import app, flags, logging
from ml_collections import config_flags

from cgjax import multihost

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (default: config.workdir).")
_LAUNCH = multihost.define_flags()

# task name -> "module:function" taking (config, workdir) and returning a dict of final metrics.
TASKS = {
    "prototypes": "cgjax.prototypes.run:train_prototypes",
    "stageA": "cgjax.train:train_stage",
    "stageB": "cgjax.train:train_stage",
}


def main(argv):
    del argv
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config configs/prototypes.py")
    multihost.initialize_from_flags(_LAUNCH)
    workdir = _WORKDIR.value or config.get("workdir")
    if not workdir:
        raise app.UsageError("no work directory: pass --workdir or set config.workdir")
    multihost.enable_compile_cache(config.get("compile_cache_dir"))
    task = config.get("task")
    if task not in TASKS:
        raise app.UsageError(f"config.task={task!r} is not one of {sorted(TASKS)}")
    module_name, fn_name = TASKS[task].split(":")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except ModuleNotFoundError as e:
        raise app.UsageError(f"task {task!r} is not available in this build ({e})") from e
    logging.info("task %s, workdir %s", task, workdir)
    metrics = fn(config, workdir)
    logging.info("final metrics: %s", metrics)


if __name__ == "__main__":
    app.run(main)
