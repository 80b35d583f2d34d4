"""Validate a data set: ``python scripts/validate_data.py --dataset_json D --images_root R
[--targets_csv C] [--signals S1 --signals S2 ...]``; prints every problem (file + row / image path)
and exits non-zero if there is any. See ``cgjax/data/validate.py``."""
from cgjax import commandline
from cgjax.data import validate

if __name__ == "__main__":
    commandline.run(validate.define_flags, validate.run)
