"""Render the zoo's pictures: a grid of tiny-diffusion samples and the tiny-code-lm training curve.

    python examples/zoo_pictures.py [--out docs]     (needs matplotlib)
"""
import argparse
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs"))
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps")
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from graphopt import zoo
    from graphopt.runtime.sampler import sample
    args.out.mkdir(parents=True, exist_ok=True)

    unet = zoo.load_unet()
    clf = zoo.load_classifier()
    noise = zoo.diffusion_noises(64, seed=1234)
    with torch.no_grad():
        x = sample(lambda s, t: unet(s, t).sample, noise, zoo.scheduler_config(), steps=args.steps)
        probs = torch.softmax(clf(x.clamp(-1, 1)), -1)
    fig, axes = plt.subplots(8, 8, figsize=(6, 6.4))
    for ax, img, p in zip(axes.flat, x, probs):
        ax.imshow(img[0].clamp(-1, 1).numpy(), cmap="gray_r", vmin=-1, vmax=1)
        ax.set_title(f"{p.argmax().item()} {p.max().item():.2f}", fontsize=7)
        ax.axis("off")
    fig.suptitle(f"tiny-diffusion: 64 DDIM-{args.steps} samples (classifier label, confidence)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out / "diffusion_samples.png", dpi=100)

    log = zoo.train_log("tiny-code-lm")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([c["minutes"] for c in log["curve"]], [c["train_bits_per_token"] for c in log["curve"]],
            label="train (smoothed), bits/token")
    ev = log.get("evals", [])
    if ev:
        ax.plot([e["minutes"] for e in ev], [e["heldout_bits_per_byte_subset"] for e in ev], "o-",
                label="held-out subset, bits/byte")
    if "heldout_bits_per_byte" in log:  # absent while training is still running
        ax.axhline(log["heldout_bits_per_byte"], color="gray", ls="--",
                   label=f"final held-out {log['heldout_bits_per_byte']:.3f} bits/byte")
    ax.set_xlabel("minutes (2-core CPU)")
    ax.set_ylabel("bits")
    ax.set_ylim(0, 5)
    ax.set_title(f"tiny-code-lm ({log['params'] / 1e6:.1f} M params) training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "lm_training_curve.png", dpi=100)
    print(f"wrote {args.out / 'diffusion_samples.png'} and {args.out / 'lm_training_curve.png'}")


if __name__ == "__main__":
    main()
