"""Run the whole cgjax pipeline on the embedded demo data: ``python scripts/demo.py --workdir DIR``."""
from __future__ import annotations

import argparse

from cgjax import demo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", default="workdir/demo", help="where data, checkpoints and reports go")
    p.add_argument("--n_images", type=int, default=240)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain_steps", type=int, default=300, help="base LLaVA pretraining (blank images)")
    p.add_argument("--clip_pretrain_epochs", type=int, default=10, help="CLIP tower pretraining (0 = random tower)")
    p.add_argument("--clip_pretrain_images", type=int, default=1536, help="paintings in the CLIP pretraining corpus")
    p.add_argument("--stage_steps", type=int, default=64, help="steps of Stage A and of Stage B")
    p.add_argument("--eval_images", type=int, default=0, help="test images to evaluate (0 = the whole test split)")
    a = p.parse_args()
    demo.run(a.workdir, n_images=a.n_images, image_size=a.image_size, seed=a.seed,
             pretrain_steps=a.pretrain_steps, clip_pretrain_epochs=a.clip_pretrain_epochs,
             clip_pretrain_images=a.clip_pretrain_images, stage_steps=a.stage_steps, eval_images=a.eval_images)


if __name__ == "__main__":
    main()
