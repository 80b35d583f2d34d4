"""A non-editable install (a wheel of this checkout in a fresh venv, ``installed`` in tests/conftest.py) works
from another folder: cgjax, converters and the configs come from the venv, never from a checkout."""
import json
import os
import subprocess

PROBE = r"""
import json, sys
import os
import cgjax, cgjax.config, converters
from cgjax.kernels import int8_cpu
assert os.path.isfile(int8_cpu.SOURCE), "the int8 kernel's source is not in the wheel"
assert "configs" not in sys.modules, "importing cgjax imported configs"
config = cgjax.config.load_config("stageA.py:preset=demo")
import configs
print(json.dumps({"cgjax": cgjax.__file__, "converters": converters.__file__, "configs": configs.__file__,
                  "configs_dir": cgjax.config.configs_dir(), "preset": config.preset,
                  "finders": [repr(f) for f in sys.meta_path]}))
"""

ABSL = r"""
import sys
from absl import flags
from ml_collections import config_flags
config = config_flags.DEFINE_config_file("config")  # as scripts/train.py: the overrides are read from sys.argv
flags.FLAGS(sys.argv)
print(config.value.preset, config.value.num_steps)
"""


def _run(installed, args, cwd):
    out = subprocess.run([installed["python"], "-I", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-6000:]
    return out.stdout


def test_wheel_imports_from_the_venv(installed, tmp_path):
    found = json.loads(_run(installed, ["-c", PROBE], tmp_path).strip().splitlines()[-1])
    site = os.path.realpath(installed["site"])
    for name in ("cgjax", "converters", "configs", "configs_dir"):
        path = os.path.realpath(found[name])
        assert path.startswith(site + os.sep), (name, path, found["finders"])
        assert not path.startswith(os.path.realpath(installed["repo"]) + os.sep), (name, path)
    assert found["preset"] == "demo"


def test_installed_config_file_loads_by_path_through_absl(installed, tmp_path):
    """``--config <installed configs>/stageB.py`` (the common.py next to it) with a field override."""
    stage_b = os.path.join(installed["site"], "configs", "stageB.py")
    out = _run(installed, ["-c", ABSL, "--config", stage_b + ":preset=demo", "--config.num_steps=3"], tmp_path)
    assert out.split() == ["demo", "3"]
