"""Generate cgjax's embedded demo data set (procedural paintings; no download):
``python data/make_demo.py --out DIR [--n_images 240 --size 64 --seed 0 --split 0.7,0.15,0.15 --format png]``.
See ``cgjax/data/demo_data.py``."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cgjax import commandline  # noqa: E402
from cgjax.data import demo_data  # noqa: E402

if __name__ == "__main__":
    commandline.run(demo_data.define_flags, demo_data.run)
