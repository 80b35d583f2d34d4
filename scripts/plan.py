"""Launch planner: ``python scripts/plan.py --config configs/stageA.py:preset=llava-1.5-7b
--mesh data=1,fsdp=8,tensor=1 --device tpu-v5e [--strict]`` (see ``cgjax/plan.py``).

Runs on a CPU: it asks XLA for as many CPU stand-in devices as the mesh has (before jax is
imported) and compiles the train step there on abstract arrays; nothing of the model is allocated.
"""
from __future__ import annotations

import os
import re
import sys

import jax

from cgjax.plan import main as plan_main, mesh_devices_needed



def main() -> int:
    argv = sys.argv[1:]
    if "-h" not in argv and "--help" not in argv:
        # jax must not be initialised before XLA_FLAGS asks for the stand-in devices: read the mesh size
        # from the arguments (and, without --mesh, the config file) with jax imported but not started.
        jax.config.update("jax_platforms", "cpu")

        n = max(1, mesh_devices_needed(argv))
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()

    return plan_main(argv)


if __name__ == "__main__":
    sys.exit(main())
