"""Strict configs (cgjax.config, configs/*.py): a typo in a preset argument, a command-line field or
an ``override`` is an error naming the nearest valid name, never a silent default or a new field."""
import os
import subprocess
import sys

import pytest

from cgjax.config import load_config, override, parse_preset
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["stageA.py", "stageB.py", "infer.py", "prototypes.py"])
def test_preset_typos_are_errors(name):
    with pytest.raises(ValueError, match=r"unknown config argument 'prest' \(did you mean 'preset'\?\)"):
        load_config(f"{name}:prest=demo")
    with pytest.raises(ValueError, match=r"unknown preset 'dmeo' \(did you mean 'demo'\?\)"):
        load_config(f"{name}:preset=dmeo")
    assert load_config(f"{name}:demo").preset == "demo"


def test_parse_preset_defaults_and_bare_names():
    assert parse_preset(None, ("a", "b"), "a") == "a"
    assert parse_preset("b", ("a", "b"), "a") == "b"
    assert parse_preset(" preset = b ", ("a", "b"), "a") == "b"


@pytest.mark.parametrize("name", ["stageA.py", "infer.py", "prototypes.py"])
def test_override_and_assignment_refuse_unknown_fields(name):
    c = load_config(name)
    with pytest.raises(KeyError, match=r"no 'workdri' \(did you mean 'workdir'\?\)"):
        override(c, workdri="x")
    with pytest.raises(AttributeError, match="locked"):
        c.num_stepz = 3
    override(c, workdir="somewhere")
    assert c.workdir == "somewhere"


def test_nested_override_names_the_level():
    c = load_config("stageA.py")
    with pytest.raises(KeyError, match=r"optim has no 'lrr' \(did you mean 'lr'\?\)"):
        override(c, **{"optim.lrr": 0.1})
    with pytest.raises(KeyError, match=r"the config has no 'optimm'"):
        override(c, **{"optimm.lr": 0.1})


def test_command_line_typo_is_an_error(tmp_path):
    out = subprocess.run([sys.executable, "scripts/train.py", "--config", "configs/stageA.py",
                          "--config.num_stepz=3", "--workdir", str(tmp_path / "wd")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "num_stepz" in out.stderr
    assert not (tmp_path / "wd").exists()


def test_bare_names_resolve_to_the_configs_package(tmp_path, monkeypatch):
    """From any folder, ``stageA.py`` and ``configs/stageA.py`` name the config files shipped as ``configs``."""
    import configs
    from cgjax.config import configs_dir

    assert os.path.realpath(configs_dir()) == os.path.realpath(os.path.dirname(configs.__file__))
    monkeypatch.chdir(tmp_path)
    assert load_config("stageB.py:preset=demo").preset == "demo"
    assert load_config("configs/infer.py").preset == "demo"
    with pytest.raises(FileNotFoundError, match=r"stageC\.py.*configs package"):
        load_config("stageC.py")
    (tmp_path / "configs").mkdir()  # a local configs/ folder wins for a path that exists
    (tmp_path / "configs" / "stageA.py").write_text("def get_config(arg):\n    return {'local': arg}\n")
    assert load_config("configs/stageA.py:x") == {"local": "x"}


def test_cgjax_does_not_import_configs(tmp_path):
    code = ("import sys, cgjax, cgjax.config, cgjax.train, cgjax.demo\n"
            "assert cgjax.config.load_config('stageA.py').preset == 'demo'\n"
            "print(sorted(m for m in sys.modules if m == 'configs' or m.startswith('configs.')))")
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.split() == ["[]"]


@pytest.mark.parametrize("field,value,nearest", [("optim.schedule", "warmup_cosin", "warmup_cosine"),
                                                 ("quantize", "int16", "int8"), ("dtype", "bfloat", "bfloat16"),
                                                 ("optim.clip_mode", "original_micr", "original_micro")])
def test_a_mistyped_choice_fails_before_anything_loads(tmp_path, field, value, nearest):
    """An enumerated field with a value it cannot take stops train_stage at once (no model, no data
    read: the checkpoint and data paths here do not even exist), naming the field and the nearest value."""
    from cgjax.config import override
    from cgjax.train import train_stage

    config = load_config("stageA.py:preset=demo")
    config.llava_checkpoint = str(tmp_path / "no-such-llava")
    override(config, **{field: value})
    with pytest.raises(ValueError, match=rf"config\.{field}='{value}' \(did you mean '{nearest}'\?\)"):
        train_stage(config, str(tmp_path / "work"))
    assert not (tmp_path / "work").exists()


def test_steps_and_epochs_both_set_fail_before_anything_loads(tmp_path):
    """A stage's length is num_steps or num_epochs: both set (the production preset's 100 epochs and
    a --config.num_steps) stops train_stage at once, naming both and the fix."""
    from cgjax.train import train_stage

    config = load_config("stageA.py:preset=llava-1.5-7b")
    config.llava_checkpoint = str(tmp_path / "no-such-llava")
    config.num_steps = 400
    with pytest.raises(ValueError, match=r"config.num_steps=400 and config.num_epochs=100 are both set.*"
                                         r"--config.num_epochs=0 --config.num_steps=400"):
        train_stage(config, str(tmp_path / "work"))
    assert not (tmp_path / "work").exists()


def test_inference_checks_its_choices_first(tmp_path):
    from cgjax.infer import run_inference

    config = load_config("infer.py")
    config.data.dataset_json = str(tmp_path / "missing.json")
    config.quantize = "int3"
    with pytest.raises(ValueError, match=r"config\.quantize='int3'"):
        run_inference(config)
    config.quantize, config.prompt.mode = "int8", "strctured"
    with pytest.raises(ValueError, match="unknown prompt mode 'strctured'"):
        run_inference(config)
