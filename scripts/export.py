"""Export a finished work dir to PyTorch / HF files (see ``cgjax.export``).

``python scripts/export.py --workdir DIR --out OUT`` writes the HF LLaVA, the open_clip tower, the
prototypes, the concept values, the signals, ``concept_tokens.py`` and ``example.py`` to ``OUT``.
"""
from __future__ import annotations

from absl import app, flags

from cgjax.export import export

_WORKDIR = flags.DEFINE_string("workdir", None, "work dir of scripts/demo.py (stageA/B, prototypes)", required=True)
_OUT = flags.DEFINE_string("out", None, "output folder: new, empty, or an earlier export (replaced whole)",
                           required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an existing --out that cgjax did not write")
_ACCEPT_MISMATCH = flags.DEFINE_bool("accept_mismatch", False,
                                     "export with a LLaVA other than the one the values were trained on")
_STAGE_WORKDIR = flags.DEFINE_string("stage-workdir", None, "default: WORKDIR/stageB, else WORKDIR/stageA")
_PROTOTYPES_WORKDIR = flags.DEFINE_string("prototypes-workdir", None, "default: WORKDIR/prototypes")
_LLAVA_CHECKPOINT = flags.DEFINE_string("llava-checkpoint", None,
                                        "default: the one named by the stage's concepts json")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    written = export(_WORKDIR.value, _OUT.value, stage_workdir=_STAGE_WORKDIR.value,
                     prototypes_workdir=_PROTOTYPES_WORKDIR.value, llava_checkpoint=_LLAVA_CHECKPOINT.value,
                     step=_STEP.value, overwrite=_OVERWRITE.value, accept_mismatch=_ACCEPT_MISMATCH.value)
    for k, v in written.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    app.run(main)
