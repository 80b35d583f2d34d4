"""Answer a data set's images with the trained concept model and the no-concept baseline.

``python scripts/infer.py --config configs/infer.py --config.workdir DIR`` writes
``reasoning.json`` and ``reasoning_baseline.json`` (the original project's schema) to
``config.output_dir`` (default ``DIR/eval``). Thin entry point: the work is ``cgjax.infer.run_inference``.
"""
from __future__ import annotations

from absl import app, logging
from ml_collections import config_flags

from cgjax import multihost
from cgjax.infer import run_inference


_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file (configs/infer.py).")
_LAUNCH = multihost.define_flags()  # --coordinator_address, --num_processes, --process_id, ...


def main(argv):
    del argv
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config configs/infer.py --config.workdir DIR")

    multihost.initialize_from_flags(_LAUNCH)
    multihost.enable_compile_cache(config.get("compile_cache_dir"))

    written = run_inference(config)
    for name, path in written.items():
        logging.info("%s: %s", name, path)
        print(f"{name}: {path}")


if __name__ == "__main__":
    app.run(main)
