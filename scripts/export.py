"""Export a finished work dir to PyTorch / HF files (see ``cgjax.export``).

``python scripts/export.py --workdir DIR --out OUT`` writes the HF LLaVA, the open_clip tower, the
prototypes, the concept values, the signals, ``concept_tokens.py`` and ``example.py`` to ``OUT``.
"""
from __future__ import annotations

import argparse

from cgjax.export import export



def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="work dir of scripts/demo.py (stageA/B, prototypes)")
    p.add_argument("--out", required=True, help="output folder: new, empty, or an earlier export (replaced whole)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out that cgjax did not write")
    p.add_argument("--accept_mismatch", action="store_true",
                   help="export with a LLaVA other than the one the values were trained on")
    p.add_argument("--stage-workdir", default=None, help="default: WORKDIR/stageB, else WORKDIR/stageA")
    p.add_argument("--prototypes-workdir", default=None, help="default: WORKDIR/prototypes")
    p.add_argument("--llava-checkpoint", default=None, help="default: the one named by the stage's concepts json")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    a = p.parse_args(argv)

    written = export(a.workdir, a.out, stage_workdir=a.stage_workdir, prototypes_workdir=a.prototypes_workdir,
                     llava_checkpoint=a.llava_checkpoint, step=a.step, overwrite=a.overwrite,
                     accept_mismatch=a.accept_mismatch)
    for k, v in written.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
