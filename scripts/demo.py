"""Run the whole cgjax pipeline on the embedded demo data: ``python scripts/demo.py --workdir DIR``.

Thin entry point: the work is ``cgjax.demo.run``.
"""
from __future__ import annotations

from absl import app, flags

from cgjax import demo, quantize
from cgjax.data.demo_domains import DOMAINS

_WORKDIR = flags.DEFINE_string("workdir", "workdir/demo", "where data, checkpoints and reports go")
_DOMAIN = flags.DEFINE_enum("domain", "art", sorted(DOMAINS),
                            "concept domain: art (artist/style/genre) or birds (species/habitat/season)")
_N_IMAGES = flags.DEFINE_integer("n_images", 240, "images in the demo data set")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "image side in pixels")
_SEED = flags.DEFINE_integer("seed", 0, "random seed")
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", 300, "base LLaVA pretraining (blank images)")
_CLIP_EPOCHS = flags.DEFINE_integer("clip_pretrain_epochs", 10, "CLIP tower pretraining (0 = random tower)")
_CLIP_IMAGES = flags.DEFINE_integer("clip_pretrain_images", 1536, "images in the CLIP pretraining corpus")
_STAGE_STEPS = flags.DEFINE_integer("stage_steps", 64, "steps of Stage A and of Stage B")
_EVAL_IMAGES = flags.DEFINE_integer("eval_images", 0, "test images to evaluate (0 = the whole test split)")
_QUANTIZE = flags.DEFINE_enum("quantize", "none", list(quantize.MODES),
                              "Stage A/B and inference on the pretrained base quantized (cgjax.quantize)")
_GROUP = flags.DEFINE_integer("quantize_group_size", 32, "int4: inputs per scale (the demo's tiny widths: 32)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    demo.run(_WORKDIR.value, n_images=_N_IMAGES.value, image_size=_IMAGE_SIZE.value, seed=_SEED.value,
             pretrain_steps=_PRETRAIN_STEPS.value, clip_pretrain_epochs=_CLIP_EPOCHS.value,
             clip_pretrain_images=_CLIP_IMAGES.value, stage_steps=_STAGE_STEPS.value, eval_images=_EVAL_IMAGES.value,
             quant=quantize.QuantConfig(_QUANTIZE.value, _GROUP.value), domain=_DOMAIN.value)


if __name__ == "__main__":
    app.run(main)
