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

    def __init__(self, argv: Sequence[str], n: int, devices: int, log_dir: str, cwd: str | None = None,
                 env: dict[str, str] | None = None):
        self.n = n
        self.logs = [os.path.join(log_dir, f"process{i}.log") for i in range(n)]
        port = free_port()
        os.makedirs(log_dir, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        for i in range(n):
            extra = ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}", f"--process_id={i}",
                      "--coordinator_timeout=60"] if n > 1 else [])
            with open(self.logs[i], "w") as log:
                self.procs.append(subprocess.Popen([sys.executable, *argv, *extra], env={**env_for(devices), **(env or {})},
                                                   cwd=cwd,
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


def run(argv: Sequence[str], n: int, devices: int, log_dir: str, timeout: float = 300, cwd: str | None = None,
        env: dict[str, str] | None = None, **kw) -> Launch:
    """Launch and wait; raises with the processes' logs when any of them fails."""
    launch = Launch(argv, n, devices, log_dir, cwd=cwd, env=env)
    launch.check(timeout, **kw)
    return launch


def metric_rows(workdir: str) -> list[dict]:
    """The rows of ``workdir/metrics.jsonl`` (a local folder or a URL)."""
    from cgjax import persistence

    return [json.loads(line) for line in persistence.read_text(persistence.join(workdir, "metrics.jsonl")).splitlines()
            if line.strip()]


def train_losses(workdir: str) -> dict[int, float]:
    """``{step: loss}`` of the train rows of ``workdir/metrics.jsonl``; a step logged twice is an error."""
    out: dict[int, float] = {}
    for row in metric_rows(workdir):
        if row["split"] == "train":
            assert int(row["step"]) not in out, f"step {row['step']} logged twice in {workdir}/metrics.jsonl"
            out[int(row["step"])] = float(row["loss"])
    return out


def val_rows(workdir: str) -> list[dict]:
    return [r for r in metric_rows(workdir) if r["split"] == "val"]


class GcsEmulator:
    """A GCS-compatible server (``gcp-storage-emulator``, in memory) on a free localhost port, with
    bucket ``bucket``; :attr:`env` points gcsfs and tensorstore (orbax) at it."""

    def __init__(self, log_dir: str, bucket: str = "cgjax-test"):
        self.port = free_port()
        self.bucket = bucket
        os.makedirs(log_dir, exist_ok=True)
        self.log = open(os.path.join(log_dir, "gcs-emulator.log"), "w")
        # the emulator with its media downloads fixed (they lack x-goog-generation): tests/gcs_emulator_fixed.py
        cmd = [sys.executable, os.path.join(ROOT, "tests", "gcs_emulator_fixed.py")]
        self.proc = subprocess.Popen([*cmd, "start", "--host", "127.0.0.1", "--port", str(self.port),
                                      "--default-bucket", bucket, "--in-memory"], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{self.port}"
        self.env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"gcp-storage-emulator did not start on port {self.port}")
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.log.close()


N_STEPS = 8


def demo_assets(root: str) -> str:
    """The demo preset's assets (48 images: 34 train, 7 val, 7 test, a tiny LLaVA) under ``root``."""
    from cgjax.config import load_config
    from cgjax.train import ensure_demo_assets

    cfg = load_config(os.path.join(ROOT, "configs", "stageA.py:preset=demo"))
    cfg.demo.root = root
    cfg.demo.n_images = 48
    ensure_demo_assets(cfg)
    return root


def stage_argv(stage: str, workdir: str, root: str, mesh: str, steps: int = N_STEPS, *extra: str) -> list[str]:
    """``scripts/train.py`` on the demo preset with the assets of :func:`demo_assets`."""
    return [TRAIN, "--config", os.path.join(ROOT, "configs", f"stage{stage}.py:preset=demo"),
            "--workdir", workdir, f"--config.demo.root={root}", "--config.demo.n_images=48",
            f"--config.num_steps={steps}", "--config.batch_size=8", f"--config.mesh={mesh}",
            "--config.val.max_examples=4", "--config.val.every_steps=0", "--config.val.no_concept_baseline=True",
            "--config.val.max_new_tokens=8", "--config.checkpoint.every_steps=100",
            "--config.log.progress_bar=false", "--config.log.every_steps=1", "--config.log.tensorboard=false",
            # one persistent compilation cache for every launch here: a relaunch loads its steps
            f"--config.compile_cache_dir={os.path.join(root, 'jax_cache')}", *extra]
