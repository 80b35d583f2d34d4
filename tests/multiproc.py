"""Real multi-process JAX launches on this machine, for the tests.

Each process gets ``XLA_FLAGS=--xla_force_host_platform_device_count=D`` (D CPU devices) and the
launch flags ``--coordinator_address 127.0.0.1:PORT --num_processes N --process_id I``; CPU
collectives go over gloo. Every launch has a time-out, and whatever it started is killed when it
fails or times out, so a stuck collective never hangs the suite.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "scripts", "train.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


class Launch:
    """``n`` processes of ``argv`` (+ the launch flags when ``n > 1``), started together."""

    def __init__(self, argv: Sequence[str], n: int, devices: int, log_dir: str, cwd: str | None = None):
        self.n = n
        self.logs = [os.path.join(log_dir, f"process{i}.log") for i in range(n)]
        port = free_port()
        os.makedirs(log_dir, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        for i in range(n):
            extra = ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}", f"--process_id={i}",
                      "--coordinator_timeout=60"] if n > 1 else [])
            with open(self.logs[i], "w") as log:
                self.procs.append(subprocess.Popen([sys.executable, *argv, *extra], env=env_for(devices), cwd=cwd,
                                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def wait(self, timeout: float, until: Callable[[], bool] | None = None, then: Callable[["Launch"], None] | None = None
             ) -> list[int]:
        """Return codes once every process exits; ``then(self)`` is called once when ``until()`` holds."""
        deadline = time.monotonic() + timeout
        fired = False
        try:
            while any(p.poll() is None for p in self.procs):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"launch still running after {timeout} s:\n{self.tail()}")
                if not fired and until is not None and until():
                    fired = True
                    then(self)
                time.sleep(0.2)
        except BaseException:
            self.kill()
            raise
        return [p.returncode for p in self.procs]

    def signal(self, i: int, sig: int = signal.SIGTERM) -> None:
        self.procs[i].send_signal(sig)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            p.wait(timeout=30)

    def tail(self, lines: int = 40) -> str:
        out = []
        for path in self.logs:
            with open(path, errors="replace") as f:
                rows = [r for r in f.read().splitlines() if not r.startswith(("I1", "W1"))]
            out.append(f"--- {path}\n" + "\n".join(rows[-lines:]))
        return "\n".join(out)

    def check(self, timeout: float, **kw) -> None:
        codes = self.wait(timeout, **kw)
        if any(codes):
            raise AssertionError(f"exit codes {codes}:\n{self.tail()}")


def run(argv: Sequence[str], n: int, devices: int, log_dir: str, timeout: float = 300, **kw) -> Launch:
    """Launch and wait; raises with the processes' logs when any of them fails."""
    launch = Launch(argv, n, devices, log_dir)
    launch.check(timeout, **kw)
    return launch


def train_losses(workdir: str) -> dict[int, float]:
    """``{step: loss}`` of the train rows of ``workdir/metrics.jsonl`` (the last row of a step wins)."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row["split"] == "train":
                out[int(row["step"])] = float(row["loss"])
    return out


def val_rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == "val"]
