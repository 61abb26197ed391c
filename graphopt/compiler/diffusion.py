"""`--task diffusion`: a denoiser program plus its sampling plan (input roles, scheduler, steps).

The denoiser is captured like a single program (method `forward`); this module finds which input is the noisy
sample, which the timestep and which are conditioning (class labels, ...), and records the scheduler the model was
trained with, so `engine.sample()` can run DDIM/DDPM (diffusers' schedulers) around ONNX Runtime or torch.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import GraphoptError
from .program import Program

TIMESTEP_NAMES = ("timestep", "timesteps", "t")
SAMPLE_NAMES = ("sample", "x", "latents", "hidden_states", "noisy_latents")
DEFAULT_STEPS = 50


def is_denoiser_model(model) -> bool:
    """A diffusers model whose forward takes a timestep (UNet2DModel, DiTTransformer2DModel, ...; not a VAE):
    `auto` makes it a diffusion program."""
    if model is None or not type(model).__module__.startswith("diffusers."):
        return False
    import inspect
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return any(name in params for name in TIMESTEP_NAMES)


def input_roles(specs) -> dict:
    """{"sample", "timestep", "conditioning": [...]} from the entry method's input specs."""
    names = [s.name for s in specs]
    timestep = next((s for s in specs if s.name in TIMESTEP_NAMES), None)
    if timestep is None:
        timestep = next((s for s in specs if s.dtype.startswith("int") and len(s.shape) <= 1), None)
    if timestep is None:
        raise GraphoptError(f"--task diffusion needs a denoiser with a timestep input (an input named "
                            f"{'/'.join(TIMESTEP_NAMES)}, or a 0-/1-D integer input); this model's inputs are "
                            f"{', '.join(names)}")
    rest = [s for s in specs if s is not timestep]
    sample = next((s for s in rest if s.name in SAMPLE_NAMES), None) or \
        next((s for s in rest if s.dtype.startswith("float") and len(s.shape) >= 3), None)
    if sample is None:
        raise GraphoptError(f"--task diffusion needs a float sample input of rank >= 3 (e.g. 'sample' [B, C, H, W]); "
                            f"this model's inputs are {', '.join(names)}")
    return {"sample": sample.name, "timestep": timestep.name,
            "conditioning": [s.name for s in rest if s is not sample]}


def scheduler_config(loaded) -> dict:
    """The training scheduler: the source's own (zoo, or a diffusers `scheduler/` folder beside the model), else
    diffusers' default DDPM schedule (1000 linear steps)."""
    extra = loaded.plan_extra or {}
    if "scheduler_config" in extra:
        return dict(extra["scheduler_config"])
    if loaded.kind == "hf-dir":
        here = Path(loaded.description)
        for cand in (here / "scheduler_config.json", here.parent / "scheduler" / "scheduler_config.json",
                     here / "scheduler" / "scheduler_config.json"):
            if cand.is_file():
                try:
                    return json.loads(cand.read_text())
                except json.JSONDecodeError:
                    raise GraphoptError(f"'{cand}' is not valid JSON; fix or remove it")
    from diffusers import DDPMScheduler
    return {k: v for k, v in DDPMScheduler().config.items() if not k.startswith("_")}


def to_diffusion(program: Program, loaded, steps: int = DEFAULT_STEPS, sampler: str = "ddim") -> Program:
    entry = program.plan["entry"]
    specs = program.inputs[entry]
    roles = input_roles(specs)
    config = scheduler_config(loaded)
    sample_spec = next(s for s in specs if s.name == roles["sample"])
    program.plan = {"kind": "diffusion", "entry": entry, "inputs": roles, "sampler": sampler, "steps": steps,
                    "scheduler_config": json.loads(json.dumps(config, default=list)),
                    "sample_shape": list(sample_spec.shape)}
    return program
