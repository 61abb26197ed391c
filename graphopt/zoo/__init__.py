"""graphopt's reference models, trained here from data on every machine (model source `zoo:NAME`).

- tiny-code-lm: a byte-level LlamaForCausalLM trained on the stdlib's .py files (train_lm.py).
- tiny-diffusion: a diffusers UNet2DModel DDPM noise predictor on 16x16 digits (train_diffusion.py).
- digit-classifier: the CNN that judges diffusion samples (metrics.classifiable_rate).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import GraphoptError

MODELS_DIR = Path(__file__).parent / "models"
SOURCES = ("tiny-code-lm", "tiny-diffusion")  # usable as zoo:NAME


def write_dir_atomically(out: Path, write) -> None:
    """Call write(tmp_dir) next to `out`, then swap it in: an interrupted run never leaves a half checkpoint."""
    import shutil
    import tempfile
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    write(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def available() -> list[str]:
    return list(SOURCES)


def _checkpoint(name: str, *files: str) -> Path:
    path = MODELS_DIR / name
    for f in files:
        if not (path / f).is_file():
            raise GraphoptError(f"zoo model '{name}': checkpoint file '{path / f}' is missing; reinstall graphopt "
                                f"or retrain it (python -m graphopt.zoo.{_TRAINER[name]})")
    return path


_TRAINER = {"tiny-code-lm": "train_lm", "tiny-diffusion": "train_diffusion", "digit-classifier": "train_diffusion"}


def _corrupt(name: str, path: Path, e: Exception) -> GraphoptError:
    return GraphoptError(f"zoo model '{name}': checkpoint '{path}' is corrupt ({type(e).__name__}); reinstall "
                         f"graphopt or retrain it (python -m graphopt.zoo.{_TRAINER[name]})")


def _check_safetensors(name: str, file: Path) -> None:
    from safetensors import safe_open
    try:
        with safe_open(str(file), "pt") as f:
            list(f.keys())
    except Exception as e:
        raise _corrupt(name, file, e)


def load_lm():
    """The trained tiny-code-lm as a transformers LlamaForCausalLM (eval mode)."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging
    path = _checkpoint("tiny-code-lm", "config.json", "model.safetensors")
    _check_safetensors("tiny-code-lm", path / "model.safetensors")
    hf_logging.disable_progress_bar()
    try:
        return LlamaForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()
    except Exception as e:
        raise _corrupt("tiny-code-lm", path, e)
    finally:
        hf_logging.enable_progress_bar()


def load_unet():
    """The trained tiny-diffusion UNet2DModel (EMA weights, eval mode)."""
    from diffusers import UNet2DModel
    path = _checkpoint("tiny-diffusion", "config.json", "diffusion_pytorch_model.safetensors",
                       "scheduler/scheduler_config.json")
    _check_safetensors("tiny-diffusion", path / "diffusion_pytorch_model.safetensors")
    try:
        return UNet2DModel.from_pretrained(path, use_safetensors=True).eval()
    except Exception as e:
        raise _corrupt("tiny-diffusion", path, e)


def scheduler_config() -> dict:
    path = _checkpoint("tiny-diffusion", "scheduler/scheduler_config.json") / "scheduler" / "scheduler_config.json"
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise _corrupt("tiny-diffusion", path, e)


def load_classifier():
    from safetensors.torch import load_file
    from .digits import DigitClassifier
    path = _checkpoint("digit-classifier", "model.safetensors") / "model.safetensors"
    model = DigitClassifier()
    try:
        model.load_state_dict(load_file(str(path)))
    except Exception as e:
        raise _corrupt("digit-classifier", path, e)
    return model.eval()


def train_log(name: str) -> dict:
    path = _checkpoint(name, "train_log.json") / "train_log.json"
    return json.loads(path.read_text())


def byte_tokenizer():
    from .tokenizer import ByteTokenizer
    return ByteTokenizer()


def prompts(n: int = 64) -> list[str]:
    """Fixed held-out code prompts for generation benchmarks."""
    from .code_data import heldout_prompts
    return heldout_prompts(n)


def lm_calibration(n: int = 16, length: int = 128) -> list[tuple[torch.Tensor]]:
    from .code_data import calibration_set
    return calibration_set(n, length)


def diffusion_calibration(n: int = 8, batch: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(noisy sample, timestep) pairs: training digits noised at timesteps spread over the schedule."""
    from diffusers import DDPMScheduler
    from .digits import split
    x, _ = split("train")
    sched = DDPMScheduler(**scheduler_config())
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        noise = torch.randn(x[idx].shape, generator=g)
        out.append((sched.add_noise(x[idx], noise, t), t))
    return out


def diffusion_noises(n: int = 8, seed: int = 0) -> torch.Tensor:
    """Starting noises [n, 1, 16, 16] for full sampler runs (calibration of sampler-level passes)."""
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def load_source(name: str):
    """A capture.Loaded for zoo:NAME, with default example inputs and calibration data."""
    from ..compiler.capture import InputSpec, Loaded, _hash_files
    if name == "tiny-code-lm":
        from .tokenizer import VOCAB_SIZE
        model = load_lm()
        path = MODELS_DIR / name
        return Loaded("zoo", f"zoo:{name}", model=model, int_high=VOCAB_SIZE,
                      input_specs=[InputSpec("input_ids", [1, "S"], "int64")], dims={"S": (1, 1024)},
                      extra_kwargs={"use_cache": False, "return_dict": False}, output_names=["logits"],
                      sha256=_hash_files([path / "model.safetensors", path / "config.json"]),
                      calibration=lm_calibration(), plan_extra={"tokenizer": "byte"})
    if name == "tiny-diffusion":
        model = load_unet()
        path = MODELS_DIR / name
        return Loaded("zoo", f"zoo:{name}", model=model,
                      # Batch 1, static: torch.export cannot make this UNet's batch dynamic from 1 (its conv
                      # and upsampling code branch on batch 1 and >= 64); --input/--dynamic B=2..63 gives batches.
                      input_specs=[InputSpec("sample", [1, 1, 16, 16], "float32"),
                                   InputSpec("timestep", [1], "int64", 0, 1000)],
                      extra_kwargs={"return_dict": False}, output_names=["noise_pred"],
                      sha256=_hash_files([path / "diffusion_pytorch_model.safetensors", path / "config.json"]),
                      calibration=diffusion_calibration(batch=1),
                      plan_extra={"scheduler_config": scheduler_config()})
    raise GraphoptError(f"unknown zoo model '{name}'; available: {', '.join(available())}")
