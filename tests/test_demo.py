"""The README's demo, end to end at a small size, from a non-editable install: ``scripts/demo.py`` run by the
venv's Python of the ``installed`` fixture (a wheel of this checkout; tests/conftest.py) in a folder outside the
checkout. Every stage runs and leaves its artefacts."""
import json
import os
import subprocess

import numpy as np
import torch
from safetensors.torch import load_file

DEMO_ARGS = ["--n_images", "40", "--pretrain_steps", "6", "--stage_steps", "4", "--eval_images", "3",
             "--clip_pretrain_epochs", "1", "--clip_pretrain_images", "64"]


def test_demo_runs_end_to_end(installed, tmp_path):
    script = os.path.join(installed["repo"], "scripts", "demo.py")
    # -I: no PYTHONPATH and no script folder on sys.path, so cgjax, converters and configs can only come from the
    # venv (tests/test_install.py checks where they resolve), unless the script itself edits sys.path
    with open(script) as f:
        assert "sys.path" not in f.read(), "scripts/demo.py must run on the installed package alone"
    work = str(tmp_path / "demo")
    run_dir = tmp_path / "cwd"
    run_dir.mkdir()
    env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest")  # as tests/conftest.py sets in-process
    out = subprocess.run([installed["python"], "-I", script, "--workdir", work, *DEMO_ARGS], cwd=run_dir, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"demo.py failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-8000:]}"
    with open(os.path.join(work, "demo_summary.json")) as f:
        summary = json.load(f)
    assert summary["workdir"] == os.path.abspath(work)
    assert sorted(os.listdir(run_dir)) == []  # everything went to --workdir

    assert summary["conversion"]["clip_max_abs_diff"] < 1e-4
    assert summary["conversion"]["llava_max_abs_diff"] < 1e-4
    # the CLIP tower was pretrained (visual weights moved, text tower untouched) and that is what was converted
    random_dir = os.path.join(work, "checkpoints", "clip", "cgjax-demo-clip-hub")
    assert summary["clip_model"] == "local-dir:" + os.path.join(work, "checkpoints", "clip-pretrained",
                                                                "cgjax-demo-clip-hub")
    before = load_file(os.path.join(random_dir, "open_clip_model.safetensors"))
    after = load_file(os.path.join(summary["clip_model"].removeprefix("local-dir:"), "open_clip_model.safetensors"))
    assert before.keys() == after.keys()
    assert not torch.equal(before["visual.proj"], after["visual.proj"])
    assert torch.equal(before["token_embedding.weight"], after["token_embedding.weight"])

    # signals in the original format: one entry per dataset record, [1 - s, s] pairs
    with open(summary["data"]["dataset_json"]) as f:
        n_records = len(json.load(f))
    art = summary["prototypes"]["artifacts"]
    with open(art["signals"]["style"]) as f:
        style = json.load(f)
    assert len(style) == n_records
    pair = next(iter(style[0]["style"].values()))
    np.testing.assert_allclose(sum(pair), 1.0, atol=1e-6)
    protos = torch.load(art["pt"][0], weights_only=True)
    assert set(protos) == {"clip_model_name", "prototypes", "concept_to_idx", "idx_to_concept"}

    # both stages trained and reported held-out accuracy with and without concept tokens
    for stage in ("stageA", "stageB"):
        accs = summary["stages"][stage]
        assert 0.0 <= accs["val_key_acc"] <= 1.0 and "val_noconcepts_key_acc" in accs
    values = torch.load(summary["stages"]["stageB_pt"], weights_only=True)
    (step, payload), = values.items()
    assert payload["values"].ndim == 3

    # inference + metrics + report in DIR/eval (concept model and the no-concept baseline)
    eval_dir = os.path.join(work, "eval")
    for name in ("metrics.json", "metrics_baseline.json", "reasoning.json", "reasoning_baseline.json", "report.html",
                 "concept_graph.png"):
        assert os.path.getsize(os.path.join(eval_dir, name)) > 0, name
    with open(os.path.join(eval_dir, "reasoning.json")) as f:
        reasoning = json.load(f)
    assert len(reasoning) == 3
    entry = next(iter(reasoning.values()))
    assert set(entry["__meta__"]["activation"]) == {"artist", "style", "genre"}
    with open(os.path.join(eval_dir, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["n_images"] == 3 and "comparison" in metrics
    assert summary["eval"]["structured_json_parse_rate"] == metrics["structured"]["json_parse_rate"]
    with open(os.path.join(eval_dir, "report.html"), encoding="utf-8") as f:
        assert '<h2 id="overview">' in f.read()  # the report opens with concept model vs baseline
