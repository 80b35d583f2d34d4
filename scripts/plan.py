"""Launch planner: ``python scripts/plan.py --config configs/stageA.py:preset=llava-1.5-7b
--mesh data=1,fsdp=8,tensor=1 --device tpu-v5e [--config.batch_size=16] [--strict]`` (see ``cgjax/plan.py``).

Runs on a CPU: once the flags are parsed (which reads the config, not JAX), it asks XLA for as many
CPU stand-in devices as the mesh has and compiles the train step there on abstract arrays; nothing
of the model is allocated.
"""
from __future__ import annotations

import functools

from cgjax import commandline, plan

if __name__ == "__main__":
    commandline.run(plan.define_flags, functools.partial(plan.run, stand_ins=True))
