"""Session fixtures for the data tests: one small demo set and its tfds pack."""
import os

import pytest

from cgjax.data.demo_data import make_demo


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """48 images at 32x32, split 0.5/0.25/0.25; returns the demo paths dict (+ "dir")."""
    root = tmp_path_factory.mktemp("demo")
    paths = make_demo(os.path.join(root, "demo"), n_images=48, size=32, seed=1, split=(0.5, 0.25, 0.25))
    return {**paths, "dir": os.path.join(root, "demo")}


@pytest.fixture(scope="session")
def packed(demo, tmp_path_factory):
    from cgjax.data import tfds_builder
    out = os.path.join(tmp_path_factory.mktemp("packed"), "pack")
    return tfds_builder.pack(demo["dataset_json"], demo["images_root"], out, targets_csv=demo["targets_csv"])
