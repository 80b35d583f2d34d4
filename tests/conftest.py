"""Test set-up: 8 virtual CPU devices (for sharding tests), fp32 matmuls, quiet logs."""
import os

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
