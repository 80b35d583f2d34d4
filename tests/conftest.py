"""Test set-up: 8 virtual CPU devices (for sharding tests), fp32 matmuls, quiet logs; the ``gcs`` server and
the ``installed`` venv (a wheel of this checkout, installed the way users install it)."""
import json
import os
import shutil
import subprocess
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A GCS-compatible server on localhost (tests/multiproc.py ``GcsEmulator``) for the session;
    this process's environment points gcsfs and tensorstore at it while the fixture lives."""
    import multiproc

    server = multiproc.GcsEmulator(str(tmp_path_factory.mktemp("gcs")))
    old = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _check(cmd, what, timeout=300, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if out.returncode != 0:
        pytest.fail(f"{what} failed ({out.returncode}): {' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
    return out


@pytest.fixture(scope="session")
def installed(tmp_path_factory, request):
    """A wheel of this checkout installed (non-editable) into a fresh venv that sees the system's
    site-packages (jax, torch, ...): ``{"python": ..., "site": ..., "repo": ...}``. Run its Python with
    ``-I`` (no PYTHONPATH, no script folder on sys.path) so nothing from a checkout can be imported.
    Under pytest-xdist the workers share one venv: the first builds it, under a file lock."""
    if getattr(request.config, "workerinput", None) is None:
        return _install(tmp_path_factory.mktemp("installed"))
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # the run's folder, above each worker's own
    with FileLock(str(shared / "installed.lock")):
        done = shared / "installed.json"
        if not done.exists():
            root = shared / "installed"
            root.mkdir()
            done.write_text(json.dumps(_install(root)))
        return json.loads(done.read_text())


def _install(root) -> dict:
    # build from a copy: an in-tree build leaves build/ and *.egg-info in the checkout (and stale files in build/)
    src = root / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                              ".pytest_cache", ".hypothesis", "workdir"))
    _check([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"),
            str(src)], "building the wheel")
    wheel, = (root / "dist").glob("cgjax-*.whl")
    venv = root / "venv"
    _check([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], "creating the venv")
    python = str(venv / "bin" / "python")
    # the system's pip, run by the venv's Python, installs into the venv; --ignore-installed: a cgjax installed in
    # the system site-packages (e.g. editable) is neither reused nor uninstalled
    _check([python, "-I", "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
           "installing the wheel")
    site = _check([python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                  "asking the venv for its site-packages").stdout.strip()
    return {"python": python, "site": site, "repo": REPO, "wheel": str(wheel)}


#: The longest modules, collected first: the README's command runs the suite on two workers, one
#: module at a time each (``-n 2 --dist loadscope``), so the long ones start early and the short
#: ones fill the gaps at the end.
LONGEST_FIRST = ("test_multiprocess.py", "test_faults.py", "test_demo.py", "test_notebook.py")


def pytest_collection_modifyitems(config, items):
    order = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # stable: the rest keep their order
