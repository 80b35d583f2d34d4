"""Validate a data set: ``python scripts/validate_data.py --dataset_json D --images_root R
[--targets_csv C] [--signals S ...]``; prints every problem (file + row / image path) and exits
non-zero if there is any. See ``cgjax/data/validate.py``."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cgjax.data.validate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
