"""Checks an install: ``python -m cgjax.doctor [--no-torch] [--mesh data=-1]``.

Prints the versions of the packages cgjax uses, the JAX backend and devices, the mesh
:func:`cgjax.sharding.make_mesh` builds for them, and runs a short self-test that tells a broken
environment from a bug:

* ``llava``: a tiny random HF ``LlavaForConditionalGeneration`` converted with
  ``converters.hf_llava.load``, logits compared with PyTorch's;
* ``clip``: a tiny random open_clip model converted with ``converters.openclip.load``,
  ``encode_image`` compared with PyTorch's;
* ``jax`` (only where the PyTorch checks do not run: ``--no-torch``, or torch missing): a tiny random
  LLaVA compiled with ``jax.jit``, prefill + one KV-cache decode step against the full forward.

Each check prints ``PASS``/``FAIL`` with its max abs difference (atol 1e-4, fp32, "highest" matmul
precision). ``--no-torch`` skips the two PyTorch parity checks (and says so); without it, a missing
torch is a FAIL. Exit status 0 when every check that ran passed, 1 otherwise.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from cgjax import checkpoints, commandline, multihost, sharding
from cgjax.kernels import int8_cpu
from cgjax.models.llava import Llava, LlavaConfig
from cgjax.plan import tiny_llava_hf_config
from converters import hf_llava, openclip as oc
from converters.tiny_clip import make_openclip_checkpoint
from converters.tiny_llava import make_llava_model

ATOL = 1e-4

# (label, distribution name, import name)
PACKAGES = (
    ("jax", "jax", "jax"),
    ("jaxlib", "jaxlib", "jaxlib"),
    ("flax", "flax", "flax"),
    ("optax", "optax", "optax"),
    ("orbax", "orbax-checkpoint", "orbax.checkpoint"),
    ("grain", "grain", "grain"),
    ("numpy", "numpy", "numpy"),
    ("ml_collections", "ml_collections", "ml_collections"),
    ("torch", "torch", "torch"),
    ("transformers", "transformers", "transformers"),
    ("open_clip", "open_clip_torch", "open_clip"),
)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def versions() -> list[tuple[str, str]]:
    out = [("python", f"{platform.python_version()} ({sys.executable})")]
    for label, dist, module in PACKAGES:
        try:
            v = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            v = None
        if v is None:
            out.append((label, "not installed"))
        elif not _importable(module):
            out.append((label, f"{v} (installed, but `import {module}` is not found)"))
        else:
            out.append((label, v))
    return out


def torch_available() -> bool:
    return _importable("torch")


# ----------------------------------------------------------------------------------------------
# checks: each returns the max abs difference


def _tiny_inputs(cfg, batch: int = 2, text: int = 6, seed: int = 0):
    rs = np.random.RandomState(seed)
    n = cfg.num_image_tokens
    ids = rs.randint(3, cfg.image_token_id, (batch, n + text))
    ids[:, 1:1 + n] = cfg.image_token_id
    size = cfg.vision_config.image_size
    hw = (size, size) if isinstance(size, int) else tuple(size)
    pixels = rs.randn(batch, 3, *hw).astype(np.float32)
    return ids.astype(np.int32), np.ones_like(ids, dtype=np.int32), pixels


def check_jax() -> float:
    """Tiny random LLaVA (cgjax only): prefill of all but the last token + one decode step against
    the full forward's logits."""
    cfg = LlavaConfig.from_hf(tiny_llava_hf_config("tiny"))
    # random values straight into the abstract model (eager initialisation compiles op by op: slow)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llava(cfg, rngs=nnx.Rngs(0))))
    rs = np.random.default_rng(0)

    def fill(x):
        n = rs.standard_normal(x.shape, dtype=np.float32)
        return jnp.asarray(1.0 + 0.1 * n if len(x.shape) == 1 else 0.2 * n, x.dtype)

    model = nnx.merge(graphdef, jax.tree.map(fill, state))
    ids, mask, pixels = _tiny_inputs(cfg)
    B, T = ids.shape

    @jax.jit
    def run(m, ids, pixels):
        full = m(ids, pixels)
        cache = m.language_model.init_cache(B, T)
        pre, cache = m(ids[:, :-1], pixels, cache=cache)
        step, _ = m(ids[:, -1:], None, cache=cache)
        return full, jnp.concatenate([pre, step], axis=1)

    full, cached = run(model, jnp.asarray(ids), jnp.asarray(pixels))
    full, cached = np.asarray(full), np.asarray(cached)
    if not np.all(np.isfinite(full)):
        raise FloatingPointError("non-finite logits")
    return float(np.max(np.abs(full - cached)))


def check_llava() -> float:
    """HF tiny random LLaVA -> ``converters.hf_llava.load`` (live model) -> logits vs PyTorch."""
    import torch  # optional [torch] extra


    hf = make_llava_model("tiny", seed=0)
    model = hf_llava.load(hf)
    ids, mask, pixels = _tiny_inputs(model.config)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=torch.tensor(pixels),
                  attention_mask=torch.tensor(mask, dtype=torch.long)).logits.float().numpy()
    forward = jax.jit(lambda m, i, p, a: m(i, p, attention_mask=a))
    got = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask)))
    if got.shape != want.shape:
        raise ValueError(f"logits shape {got.shape} != PyTorch's {want.shape}")
    return float(np.max(np.abs(got - want)))


def check_clip() -> float:
    """Tiny random open_clip ViT -> ``converters.openclip.load`` (live model) -> ``encode_image`` vs PyTorch."""
    import open_clip  # optional [torch] extra
    import torch  # optional [torch] extra


    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns that no pretrained weights were named: they follow
    try:
        with tempfile.TemporaryDirectory(prefix="cgjax-doctor-") as d:
            name, ckpt = make_openclip_checkpoint(d, width=32, layers=2, heads=4, patch=8, image_size=32,
                                                  embed_dim=16, seed=0, name="cgjax-doctor-tiny-clip")
            live = open_clip.create_model(name).eval()
            live.load_state_dict(torch.load(ckpt, weights_only=True))
            model, _ = oc.load(name, live)
    finally:
        root.setLevel(level)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        want = live.encode_image(torch.from_numpy(pixels)).float().numpy()
    got = np.asarray(jax.jit(lambda m, x: m.encode_image(x))(model, jnp.asarray(pixels)))
    if got.shape != want.shape:
        raise ValueError(f"embedding shape {got.shape} != PyTorch's {want.shape}")
    return float(np.max(np.abs(got - want)))


CHECKS: tuple[tuple[str, str, Callable[[], float], bool], ...] = (
    # name, description, function, needs torch (the jax check runs in place of the torch ones)
    ("jax", "tiny LLaVA jit: prefill + KV-cache decode vs full forward", check_jax, False),
    ("llava", "tiny HF LlavaForConditionalGeneration -> converters.hf_llava.load, logits vs PyTorch", check_llava,
     True),
    ("clip", "tiny open_clip ViT -> converters.openclip.load, encode_image vs PyTorch", check_clip, True),
)


# ----------------------------------------------------------------------------------------------


def pod_psum() -> str:
    """A sum over every device of every process: device i holds i + 1."""
    mesh = sharding.make_mesh({"data": -1})
    n = mesh.devices.size
    spec = NamedSharding(mesh, PartitionSpec("data"))
    x = jax.make_array_from_callback((n,), spec, lambda idx: np.arange(n, dtype=np.float32)[idx] + 1)
    total = float(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, PartitionSpec()))(x))
    want = n * (n + 1) / 2
    if total != want:
        raise AssertionError(f"sum over {n} devices gave {total}, expected {want}")
    return f"sum over {n} devices of {jax.process_count()} process(es) = {total:g}"


def pod_orbax(workdir: str | None) -> str:
    """A sharded array saved by every process into ``workdir`` and restored into its sharding."""
    if not workdir:
        if jax.process_count() > 1:
            raise ValueError("--workdir is required with several processes (a folder every process sees)")
        workdir = tempfile.mkdtemp(prefix="cgjax-doctor-")
    mesh = sharding.make_mesh({"data": -1})
    n = mesh.devices.size
    spec = NamedSharding(mesh, PartitionSpec("data"))
    want = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
    x = jax.make_array_from_callback(want.shape, spec, lambda idx: want[idx])
    path = os.path.join(os.path.abspath(workdir) if "://" not in workdir else workdir, "doctor_orbax_check")
    checkpoints.save_tree(path, {"x": x}, force=True)
    got = checkpoints.restore_tree(path, {"x": jax.ShapeDtypeStruct(want.shape, want.dtype, sharding=spec)})["x"]
    ok = multihost.to_host(got)
    multihost.barrier("doctor_orbax_restored")
    if multihost.is_primary():
        shutil.rmtree(path, ignore_errors=True)
    if not np.array_equal(ok, want):
        raise AssertionError("the restored array differs from the saved one")
    return f"{want.shape} sharded over {n} devices saved and restored in {path}"


PROG = "python -m cgjax.doctor"


def define_flags(fv: flags.FlagValues, argv: Sequence[str] | None = None) -> None:
    """The doctor's flags on ``fv`` (see :mod:`cgjax.commandline`): ``--no-torch``, ``--mesh``, the
    launch flags of :func:`cgjax.multihost.define_flags` and ``--workdir`` for the pod checks."""
    del argv  # no config file
    flags.DEFINE_bool("no-torch", False, "skip the PyTorch parity checks (for an install without torch / "
                      "open_clip)", flag_values=fv)
    flags.DEFINE_string("mesh", None, "also show this mesh, e.g. data=2,fsdp=4", flag_values=fv)
    multihost.define_flags(fv)
    flags.DEFINE_string("workdir", None, "pod checks (a cross-process psum and a sharded orbax save/restore): "
                        "a folder every process sees (the run's work dir)", flag_values=fv)


def main(argv: Sequence[str]) -> int:
    """The doctor's command line, in this process: ``main(["--no-torch"])``; the exit status."""
    return run(commandline.parse(define_flags, argv, PROG))


def run(fv: flags.FlagValues) -> int:
    """The doctor from the parsed flags of :func:`define_flags`: starts the multi-process runtime, then :func:`check`."""
    multihost.initialize_from_flags(fv)
    return check(no_torch=fv["no-torch"].value, show_mesh=fv.mesh, workdir=fv.workdir)


def check(*, no_torch: bool = False, show_mesh: str | None = None, workdir: str | None = None) -> int:
    """Print the versions, devices and mesh (and ``show_mesh``), run the pod checks (several processes or ``workdir``) and
    the self-test; 0 when every check that ran passed, else 1."""
    print("cgjax doctor")
    print("versions")
    for label, v in versions():
        print(f"  {label:15} {v}")



    failures = 0
    print("devices")
    try:
        devs = jax.devices()
        kinds: dict[str, int] = {}
        for d in devs:
            kinds[d.device_kind] = kinds.get(d.device_kind, 0) + 1
        print(f"  backend {jax.default_backend()}: {len(devs)} device(s) "
              f"({', '.join(f'{n} x {k}' for k, n in kinds.items())}); {jax.local_device_count()} local; "
              f"process {jax.process_index()} of {jax.process_count()}")
        stats = None
        try:
            stats = devs[0].memory_stats()
        except Exception:  # noqa: BLE001 - not every backend reports memory
            pass
        if stats and stats.get("bytes_limit"):
            print(f"  memory per device: {stats['bytes_limit'] / 2**30:.2f} GiB usable")
    except Exception as e:  # noqa: BLE001 - a broken backend is exactly what the doctor reports
        print(f"  FAIL  no JAX devices: {type(e).__name__}: {e}")
        return 1

    reason = int8_cpu.unavailable_reason()
    print(f"  int8 CPU kernel (w8a8 generation): {'serves' if reason is None else 'not used: ' + reason}")

    print("mesh")
    specs = [None] + ([show_mesh] if show_mesh else [])
    for spec in specs:
        try:
            mesh = sharding.make_mesh(sharding.parse_mesh(spec) if spec else None)
            shape = ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
            print(f"  make_mesh({spec or ''}): {shape} over {mesh.devices.size} {jax.default_backend()} device(s)")
        except Exception as e:  # noqa: BLE001
            failures += 1
            print(f"  FAIL  make_mesh({spec or ''}): {type(e).__name__}: {e}")

    if jax.process_count() > 1 or workdir:
        print(f"pod (process {jax.process_index()} of {jax.process_count()})")
        for name, fn in (("psum", pod_psum), ("orbax", lambda: pod_orbax(workdir))):
            try:
                print(f"  PASS  {name}: {fn()}")
            except Exception as e:  # noqa: BLE001 - report, keep going
                failures += 1
                print(f"  FAIL  {name}: {type(e).__name__}: {e}")

    has_torch = torch_available()
    print(f"self-test (fp32, matmul precision 'highest', atol {ATOL:g}, backend {jax.default_backend()})")
    torch_checks = not no_torch and has_torch
    if torch_checks:
        t0 = time.perf_counter()
        try:
            for module in ("torch", "transformers", "open_clip"):
                importlib.import_module(module)
            print(f"  (imported torch, transformers, open_clip in {time.perf_counter() - t0:.1f} s)")
        except Exception as e:  # noqa: BLE001 - the checks below report it
            print(f"  (import failed: {type(e).__name__}: {e})")
    t_all = time.perf_counter()
    for name, desc, fn, needs_torch in CHECKS:
        if not needs_torch and torch_checks:
            continue  # the parity checks run the same JAX code paths, and compiling twice costs seconds
        if needs_torch and no_torch:
            print(f"  SKIP  {name}: {desc}  (--no-torch: PyTorch parity not checked)")
            continue
        if needs_torch and not has_torch:
            failures += 1
            print(f"  FAIL  {name}: {desc}  (torch is not importable: `pip install -e .[test]`, "
                  f"or pass --no-torch to skip the parity checks)")
            continue
        t0 = time.perf_counter()
        try:
            with jax.default_matmul_precision("highest"):
                diff = fn()
        except Exception as e:  # noqa: BLE001 - report, keep going
            failures += 1
            print(f"  FAIL  {name}: {desc}  ({type(e).__name__}: {e})")
            traceback.print_exc(limit=3, file=sys.stdout)
            continue
        ok = diff <= ATOL
        failures += 0 if ok else 1
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {desc}  max abs diff {diff:.2e}  "
              f"({time.perf_counter() - t0:.1f} s)")
    elapsed = time.perf_counter() - t_all
    if no_torch or not has_torch:
        print("  note: without the PyTorch checks the converters are not verified on this install")
    print(f"{'all checks passed' if not failures else f'{failures} check(s) FAILED'} (self-test {elapsed:.1f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    commandline.run(define_flags, run)
