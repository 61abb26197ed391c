"""Train the zoo's `tiny-diffusion` (a diffusers UNet2DModel DDPM noise predictor on 16x16 digits) and the digit
classifier that judges its samples.

    python -m graphopt.zoo.train_diffusion [--out-dir graphopt/zoo/models] [--steps N] [--device cuda]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from . import digits, write_dir_atomically

UNET_CONFIG = dict(
    sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64, 128),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=16,
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                        clip_sample=True)


def build_unet(seed: int = 0):
    from diffusers import UNet2DModel
    torch.manual_seed(seed)
    return UNet2DModel(**UNET_CONFIG)


def save_classifier(model, log: dict, out: Path) -> None:
    from safetensors.torch import save_file

    def write(tmp):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        (tmp / "train_log.json").write_text(json.dumps(log, indent=1))
    write_dir_atomically(out, write)


def train(out_dir: Path, steps: int, batch: int, lr: float, device: str, seed: int, threads: int) -> dict:
    from diffusers import DDPMScheduler
    if device == "cpu":
        torch.set_num_threads(threads)
    t0 = time.time()
    clf, clf_log = digits.train_classifier(seed=seed)
    clf_log["minutes"] = round((time.time() - t0) / 60, 2)
    save_classifier(clf, clf_log, out_dir / "digit-classifier")
    print(f"digit classifier: held-out accuracy {clf_log['heldout_accuracy']}", flush=True)

    x_train, _ = digits.split("train")
    unet = build_unet(seed).to(device)
    ema = copy.deepcopy(unet).eval()
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    n_params = sum(p.numel() for p in unet.parameters())
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    g = torch.Generator().manual_seed(seed)
    log = {"unet": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIG.items()},
           "scheduler": SCHEDULER_CONFIG, "params": n_params, "steps": steps, "batch": batch, "lr": lr,
           "device": device, "threads": threads, "seed": seed, "torch": torch.__version__, "curve": [],
           "ema_decay": 0.999}
    print(f"tiny-diffusion: {n_params / 1e6:.2f} M parameters, {steps} steps x {batch}", flush=True)
    t1 = time.time()
    smoothed = None
    for step in range(steps):
        unet.train()
        lr_now = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr_now
        idx = torch.randint(0, len(x_train), (batch,), generator=g)
        x0 = x_train[idx].to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g).to(device)
        xt = sched.add_noise(x0, noise, t)
        loss = torch.nn.functional.mse_loss(unet(xt, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.mul_(decay).add_(p.detach(), alpha=1 - decay)
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            minutes = (time.time() - t1) / 60
            log["curve"].append({"step": step, "minutes": round(minutes, 3), "loss": round(smoothed, 5)})
            print(f"step {step:5d}  {minutes:6.1f} min  loss {smoothed:.4f}", flush=True)
        if (step + 1) % 1000 == 0 and step + 1 < steps:
            save_unet(ema, sched, log, out_dir / "tiny-diffusion")
    log["train_minutes"] = round((time.time() - t1) / 60, 2)
    save_unet(ema, sched, log, out_dir / "tiny-diffusion")
    print(f"done in {log['train_minutes']} min", flush=True)
    return log


def save_unet(unet, sched, log: dict, out: Path) -> None:
    def write(tmp):
        unet.to("cpu").save_pretrained(tmp, safe_serialization=True)
        sched.save_pretrained(tmp / "scheduler")
        (tmp / "train_log.json").write_text(json.dumps(log, indent=1))
    write_dir_atomically(out, write)
    unet.to(log["device"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "models")
    ap.add_argument("--steps", type=int, default=3500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    train(a.out_dir, a.steps, a.batch, a.lr, a.device, a.seed, a.threads)


if __name__ == "__main__":
    main()
