"""Validate a data set: ``python scripts/validate_data.py --dataset_json D --images_root R
[--targets_csv C] [--signals S ...]``; prints every problem (file + row / image path) and exits
non-zero if there is any. See ``cgjax/data/validate.py``."""
import sys

from cgjax.data.validate import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
