"""Train the zoo's `tiny-code-lm` (a byte-level LlamaForCausalLM) on the stdlib's .py files.

    python -m graphopt.zoo.train_lm --out graphopt/zoo/models/tiny-code-lm [--device cuda] [--steps N]

Deterministic for a given device and thread count: fixed seed, fixed batch order.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from . import code_data, write_dir_atomically
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

LM_CONFIG = dict(
    vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=2,  # grouped-query attention, 4 query heads per KV head
    max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=True,
    bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
)


def build_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**LM_CONFIG))


def heldout_bits_per_byte(model, context: int = 256, max_windows: int | None = None) -> float:
    from ..metrics import lm_bits_per_byte
    model.eval()
    return lm_bits_per_byte(model, context=context, max_windows=max_windows, batch=16)


def train(out: Path, steps: int, batch: int, context: int, lr: float, device: str, seed: int, threads: int,
          eval_every: int) -> dict:
    if device == "cpu":
        torch.set_num_threads(threads)
    model = build_model(seed).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 25)

    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    stream = code_data.token_stream("train")
    g = torch.Generator().manual_seed(seed)
    log = {"config": LM_CONFIG, "params": n_params, "steps": steps, "batch": batch, "context": context, "lr": lr,
           "device": device, "threads": threads, "seed": seed, "host": platform.processor() or platform.machine(),
           "torch": torch.__version__, "curve": [], "evals": []}
    print(f"tiny-code-lm: {n_params / 1e6:.2f} M parameters, {steps} steps x {batch} x {context} tokens", flush=True)
    t0 = time.time()
    smoothed = None
    for step in range(steps):
        model.train()
        starts = torch.randint(0, len(stream) - context - 1, (batch,), generator=g)
        x = torch.stack([stream[s:s + context + 1] for s in starts.tolist()]).to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        if step % 25 == 0 or step == steps - 1:
            elapsed = time.time() - t0
            log["curve"].append({"step": step, "minutes": round(elapsed / 60, 3),
                                 "train_bits_per_token": round(smoothed / math.log(2), 4)})
            print(f"step {step:5d}  {elapsed / 60:6.1f} min  train {smoothed / math.log(2):.3f} bits/token", flush=True)
        if (step + 1) % eval_every == 0 and step + 1 < steps:
            bpb = heldout_bits_per_byte(model, context, max_windows=128)
            log["evals"].append({"step": step + 1, "minutes": round((time.time() - t0) / 60, 3),
                                 "heldout_bits_per_byte_subset": round(bpb, 4)})
            print(f"  held-out (subset) {bpb:.3f} bits/byte", flush=True)
            _save(model, log, out)
    log["train_minutes"] = round((time.time() - t0) / 60, 2)
    log["heldout_bits_per_byte"] = round(heldout_bits_per_byte(model, context), 4)
    print(f"done in {log['train_minutes']} min; held-out {log['heldout_bits_per_byte']} bits/byte", flush=True)
    _save(model, log, out)
    return log


def _save(model, log: dict, out: Path) -> None:
    def write(tmp):
        model.to("cpu").save_pretrained(tmp, safe_serialization=True)
        (tmp / "train_log.json").write_text(json.dumps(log, indent=1))
    write_dir_atomically(out, write)
    model.to(log["device"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "models" / "tiny-code-lm")
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=400)
    a = ap.parse_args(argv)
    train(a.out, a.steps, a.batch, a.context, a.lr, a.device, a.seed, a.threads, a.eval_every)


if __name__ == "__main__":
    main()
