"""Multi-process (pod) runtime: start-up, the primary process, barriers, a collective stop, gathers.

One JAX process runs per host (per TPU VM, per GPU node, or several on one machine for a
rehearsal). :func:`initialize` starts ``jax.distributed`` from explicit flags or from the
cluster's own environment (TPU pod, SLURM, Open MPI), and refuses to run single-process where the
environment shows a cluster. Everything that writes a shared file goes through
:func:`on_primary` (process 0 does it, the others wait and learn whether it worked); everything
that reads a sharded array on the host goes through :func:`to_host`.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from typing import Any, Callable, Mapping, TypeVar

import jax
import numpy as np
from absl import flags, logging
from jax._src import distributed
from jax.experimental import multihost_utils

T = TypeVar("T")

# environment variable -> what it says about the number of processes of this job
_CLUSTER_VARS = (
    ("SLURM_NTASKS", "SLURM"),
    ("OMPI_COMM_WORLD_SIZE", "Open MPI"),
    ("PMI_SIZE", "MPI (PMI)"),
    ("WORLD_SIZE", "a torchrun-style launcher"),
)


def cluster_environment(environ: Mapping[str, str] | None = None) -> str | None:
    """A description of the multi-process cluster the environment shows, or None for one host."""
    env = os.environ if environ is None else environ
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return f"a TPU pod slice of {len(hosts)} hosts (TPU_WORKER_HOSTNAMES)"
    for var, name in _CLUSTER_VARS:
        try:
            n = int(env.get(var, "1"))
        except ValueError:
            continue
        if n > 1:
            return f"{name} with {n} processes ({var}={n})"
    return None


def is_initialized() -> bool:
    """Whether ``jax.distributed`` is up (checked without starting the backend)."""
    try:
        return distributed.global_state.client is not None
    except Exception:  # noqa: BLE001 - private API moved: fall back on the process count
        return jax.process_count() > 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False, single_process: bool = False,
               timeout_s: int = 300) -> None:
    """Start the multi-process runtime before any JAX computation.

    * ``coordinator_address`` / ``num_processes`` / ``process_id``: an explicit launch (all three);
    * ``auto``: JAX's own detection (TPU pod, SLURM, Open MPI);
    * neither: one process, unless :func:`cluster_environment` shows a cluster, which is an error
      naming the flags (``single_process`` runs one process anyway).

    A coordinator that does not answer within ``timeout_s`` is an error naming its address.
    """
    explicit = [coordinator_address, num_processes, process_id]
    if any(x not in (None, "") for x in explicit):
        if coordinator_address in (None, "") or num_processes is None or process_id is None:
            raise ValueError("--coordinator_address, --num_processes and --process_id go together; got "
                             f"{coordinator_address!r}, {num_processes!r}, {process_id!r}")
        if not 0 <= int(process_id) < int(num_processes):
            raise ValueError(f"--process_id {process_id} is outside [0, {num_processes})")
        if is_initialized():
            return
        logging.info("jax.distributed: process %d of %d, coordinator %s", process_id, num_processes,
                     coordinator_address)
        # JAX aborts the whole process (no exception) when the coordinator does not answer, with a
        # message that does not say where it looked: probe the address first and say it.
        if int(process_id) == 0:
            _check_bindable(coordinator_address)
        else:
            _wait_for_listener(coordinator_address, timeout_s)
        try:
            jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=int(num_processes),
                                       process_id=int(process_id), initialization_timeout=int(timeout_s))
        except Exception as e:  # noqa: BLE001 - name the address the user gave
            raise ConnectionError(f"could not join the JAX coordinator at {coordinator_address} as process "
                                  f"{process_id} of {num_processes} within {timeout_s} s "
                                  f"(--coordinator_timeout): {type(e).__name__}: {e}") from e
        return
    if auto:
        if not is_initialized():
            try:
                jax.distributed.initialize(initialization_timeout=int(timeout_s))
            except Exception as e:  # noqa: BLE001
                raise ConnectionError(f"--distributed: JAX found no cluster to join or could not reach its "
                                      f"coordinator within {timeout_s} s: {type(e).__name__}: {e}") from e
        return
    cluster = cluster_environment()
    if cluster and not single_process and not is_initialized():
        raise RuntimeError(f"the environment shows {cluster}, but jax.distributed is not initialised: pass "
                           "--distributed (auto-detection) or --coordinator_address/--num_processes/--process_id; "
                           "--single_process runs this process alone")


def _host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--coordinator_address {address!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def _check_bindable(address: str) -> None:
    """Process 0 starts the coordinator on ``address``'s port: fail clearly if it is taken."""
    _, port = _host_port(address)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            raise ConnectionError(f"process 0 cannot start the JAX coordinator on {address}: port {port} is in "
                                  f"use ({e})") from e


def _wait_for_listener(address: str, timeout_s: float) -> None:
    """Wait until something accepts connections on ``address``; a clear error after ``timeout_s``."""
    host, port = _host_port(address)
    deadline = time.monotonic() + float(timeout_s)
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, float(timeout_s))):
                return
        except OSError as e:
            last = e
            time.sleep(0.25)
    raise ConnectionError(f"the JAX coordinator at {address} did not answer within {timeout_s} s "
                          f"(--coordinator_timeout; is process 0 running, and is the address right?): {last}")


def enable_compile_cache(path: str | None) -> None:
    """JAX's persistent compilation cache in ``path`` (local or ``gs://``): a restarted or
    preempted run loads its compiled steps instead of compiling them again."""
    if not path:
        return
    if "://" not in str(path):
        path = os.path.abspath(path)
        os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    logging.info("persistent compilation cache: %s", path)


def is_primary() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def all_true(flag: bool) -> list[bool]:
    """``flag`` of every process, in process order (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return [bool(flag)]

    return [bool(x) for x in np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).reshape(-1)]


def sum_over_processes(n: int) -> int:
    """The sum of ``n`` over every process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return int(n)
    return int(np.asarray(multihost_utils.process_allgather(np.int64(n))).sum())


def on_primary(name: str, fn: Callable[[], T]) -> T | None:
    """``fn()`` on process 0 while the others wait; if it fails there, every process raises.

    Returns ``fn()``'s result on process 0 and None elsewhere.
    """
    result, error = None, None
    if is_primary():
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the others learn of it
            error = e
    ok = all_true(error is None)
    if error is not None:
        raise error
    if not all(ok):
        raise RuntimeError(f"{name} failed on process 0 (see its log)")
    return result


def to_host(x: Any) -> np.ndarray:
    """A (possibly sharded over several processes) array as one numpy array on every host.

    A collective when ``x`` is not fully addressable: every process must call it.
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def gather_host_strings(text: str) -> list[str]:
    """``text`` of every process, in process order (two collectives: lengths, then padded bytes)."""
    if jax.process_count() == 1:
        return [text]

    data = np.frombuffer(text.encode("utf-8"), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(data)))).reshape(-1)
    n = int(lengths.max())
    padded = np.zeros(n, np.uint8)
    padded[:len(data)] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), n)
    return [bytes(r[:k]).decode("utf-8") for r, k in zip(rows, lengths)]


def host_data_state(meta: Mapping[str, Any]) -> Any:
    """This process's data-iterator state from a checkpoint's metadata: its own entry of
    ``data_iter_by_process`` (every host's grain state, saved by the primary host) or, for a
    checkpoint from one host, ``data_iter``. A checkpoint of another process count is refused:
    each host's iterator walks its own shard of the data, so the positions do not carry over."""
    per_host = meta.get("data_iter_by_process")
    saved = len(per_host) if per_host else int(meta.get("process_count", 1))
    if saved != jax.process_count():
        raise ValueError(f"the checkpoint holds the data state of {saved} process(es), this run has "
                         f"{jax.process_count()}: each process reads its own shard of the data, so the data "
                         "positions cannot carry over; resume with the same number of processes (or start a new "
                         "work dir with config.init_from pointing at this one)")
    if per_host:
        return json.loads(per_host[jax.process_index()])
    return meta["data_iter"]


class Preemption:
    """SIGTERM sets a flag; the loop saves and exits at the next step boundary. With several
    processes, :meth:`stop` is collective: every host stops (and saves) at the same step when any
    host was signalled, so no host waits alone in the checkpoint's collectives."""

    def __init__(self):
        self.requested = False
        self._prev = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._prev = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint and stopping at the end of this step")
        self.requested = True

    def stop(self) -> bool:
        """Whether to save and stop now (call it at the same step on every process)."""
        return any(all_true(self.requested))

    def __exit__(self, *exc):
        if self._prev is not None:
            signal.signal(signal.SIGTERM, self._prev)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, Any]:
    """The launch flags every multi-process script takes (absl): call once at module level (or on a
    command's own ``FlagValues``, see :mod:`cgjax.commandline`)."""
    fv = flag_values
    return {
        "distributed": flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() with JAX's own "
                                         "cluster detection (TPU pod, SLURM, Open MPI).", flag_values=fv),
        "coordinator_address": flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's "
                                                   "coordinator (explicit multi-process launch).", flag_values=fv),
        "num_processes": flags.DEFINE_integer("num_processes", None, "Number of processes of the launch.",
                                              flag_values=fv),
        "process_id": flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).",
                                           flag_values=fv),
        "coordinator_timeout": flags.DEFINE_integer("coordinator_timeout", 300, "Seconds to wait for the "
                                                    "coordinator and the other processes.", flag_values=fv),
        "single_process": flags.DEFINE_bool("single_process", False, "Run one process even where the "
                                            "environment shows a cluster.", flag_values=fv),
    }


def initialize_from_flags(fl: Mapping[str, Any] | flags.FlagValues) -> None:
    """:func:`initialize` from the flags of :func:`define_flags` (its dict, or the ``FlagValues``
    they were defined on)."""
    initialize(fl["coordinator_address"].value, fl["num_processes"].value, fl["process_id"].value,
               auto=fl["distributed"].value, single_process=fl["single_process"].value,
               timeout_s=fl["coordinator_timeout"].value)
