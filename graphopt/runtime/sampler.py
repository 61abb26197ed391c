"""Diffusion sampling loops around any denoiser callable, using diffusers' schedulers."""
from __future__ import annotations

from typing import Callable

import torch

SAMPLERS = ("ddim", "ddpm")


def make_scheduler(config: dict, kind: str = "ddim"):
    from diffusers import DDIMScheduler, DDPMScheduler
    if kind not in SAMPLERS:
        raise ValueError(f"sampler '{kind}': choose one of {', '.join(SAMPLERS)}")
    cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
    return cls.from_config(config)  # keeps the trained beta schedule; ignores keys the other class lacks


@torch.no_grad()
def sample(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
           scheduler_config: dict, steps: int = 50, kind: str = "ddim", seed: int = 0,
           on_step: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run the sampler from `noise` ([B, C, H, W]); denoise(sample, timestep[B] int64) -> predicted noise.

    DDIM (eta 0) is deterministic given the noise; DDPM draws its per-step noise from a generator seeded by `seed`.
    """
    sched = make_scheduler(scheduler_config, kind)
    sched.set_timesteps(steps)
    x = noise.clone()
    g = torch.Generator().manual_seed(seed)
    for i, t in enumerate(sched.timesteps):
        tt = torch.full((x.shape[0],), int(t), dtype=torch.int64)
        eps = denoise(x, tt)
        if on_step is not None:
            on_step(i, int(t), eps)
        kwargs = {"generator": g} if kind == "ddpm" else {"eta": 0.0}
        x = sched.step(eps, t, x, **kwargs).prev_sample
    return x
