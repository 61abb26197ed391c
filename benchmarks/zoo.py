"""Reference-model figures: size, held-out quality and training time of the zoo models.

    python benchmarks/zoo.py [--quick] [--json FILE]

lm_heldout_bits_per_byte: the whole held-out split (quick: an evenly spaced subset of 128 windows).
diffusion_classifiable_rate: fraction of DDIM-50 samples the digit classifier labels with confidence >= 0.9
(256 samples; quick: 64), from fixed noises.
"""
from __future__ import annotations

import torch

from common import emit, machine, parse_args


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    from graphopt import metrics, zoo
    from graphopt.runtime.sampler import sample

    lm = zoo.load_lm()
    lm_log = zoo.train_log("tiny-code-lm")
    m = {"machine": machine(), "quick": args.quick}
    m["lm_params"] = sum(p.numel() for p in lm.parameters())
    m["lm_heldout_bits_per_byte"] = round(metrics.lm_bits_per_byte(lm, fast=args.quick), 4)
    m["lm_train_minutes"] = lm_log["train_minutes"]
    m["lm_train_tokens"] = lm_log["steps"] * lm_log["batch"] * lm_log["context"]

    unet = zoo.load_unet()
    d_log = zoo.train_log("tiny-diffusion")
    n = 64 if args.quick else 256
    noise = zoo.diffusion_noises(n, seed=1234)
    with torch.no_grad():
        samples = torch.cat([sample(lambda x, t: unet(x, t).sample, noise[i:i + 64], zoo.scheduler_config(),
                                    steps=50) for i in range(0, n, 64)])
    m["diffusion_params"] = sum(p.numel() for p in unet.parameters())
    m["diffusion_classifiable_rate"] = round(metrics.classifiable_rate(samples), 4)
    m["diffusion_samples"] = n
    m["diffusion_train_minutes"] = d_log["train_minutes"]
    from graphopt.zoo.digits import split
    real, _ = split("heldout")
    m["real_digits_classifiable_rate"] = round(metrics.classifiable_rate(real), 4)
    emit(m, args.json)


if __name__ == "__main__":
    main()
