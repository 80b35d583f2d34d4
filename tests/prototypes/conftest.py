"""Session fixtures: a tiny random open_clip checkpoint and a small demo data set."""
import os

import pytest


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """``(model_name, checkpoint, hub_dir)``: model_name is ``local-dir:`` so no registration is needed."""
    from converters import tiny_clip as tc

    out = str(tmp_path_factory.mktemp("tiny_clip"))
    name, ckpt = tc.make_openclip_checkpoint(out, width=64, layers=2, heads=2, patch=8, image_size=32, embed_dim=32)
    hub = os.path.join(out, f"{name}-hub")
    return f"local-dir:{hub}", ckpt, hub


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    from cgjax.data.demo_data import make_demo

    return make_demo(str(tmp_path_factory.mktemp("demo") / "demo"), n_images=48, size=32, seed=0)
