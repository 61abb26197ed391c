"""Token generation over a causal-lm bundle's prefill/decode methods (any backend)."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import GraphoptError


def _as_ids(input_ids) -> torch.Tensor:
    if isinstance(input_ids, (list, tuple)):
        if not input_ids:
            raise GraphoptError("input_ids is empty: give at least one prompt token")
        input_ids = torch.tensor(input_ids if isinstance(input_ids[0], (list, tuple)) else [input_ids])
    if not isinstance(input_ids, torch.Tensor):
        try:
            input_ids = torch.as_tensor(input_ids)
        except Exception:
            raise GraphoptError(f"input_ids must be a tensor or a list of token ids, not {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise GraphoptError(f"input_ids must be integer token ids of shape [batch, length], got "
                            f"{str(input_ids.dtype).replace('torch.', '')} {list(input_ids.shape)}")
    return input_ids.long()


def _as_torch(x) -> torch.Tensor:
    """A method's output as a tensor, sharing memory (from_numpy is several times cheaper than as_tensor)."""
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else torch.as_tensor(x)


def check_request(plan: dict, dims: dict, input_ids, attention_mask, max_new_tokens, do_sample, temperature,
                  top_k, top_p):
    ids = _as_ids(input_ids)
    B, S = ids.shape
    if S == 0 or B == 0:
        raise GraphoptError("the prompt is empty: give at least one prompt token per sequence")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise GraphoptError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    vocab = plan["vocab_size"]
    bad = (ids < 0) | (ids >= vocab)
    if bad.any():
        raise GraphoptError(f"token id {int(ids[bad][0])} is outside the vocabulary 0..{vocab - 1}")
    max_len = plan["max_length"]
    if S + max_new_tokens > max_len:
        raise GraphoptError(f"prompt length {S} + max_new_tokens {max_new_tokens} exceeds the model's maximum "
                            f"length {max_len}: shorten the prompt or ask for fewer tokens")
    max_batch = dims.get("B", [1, 1 << 30])[1]
    if B > max_batch:
        raise GraphoptError(f"batch {B} exceeds the compiled maximum {max_batch}")
    if attention_mask is None:
        mask = torch.ones_like(ids)
    else:
        mask = torch.as_tensor(attention_mask)
        if mask.dim() == 1:
            mask = mask.unsqueeze(0)
        if tuple(mask.shape) != (B, S):
            raise GraphoptError(f"attention_mask has shape {list(mask.shape)}, expected {[B, S]} like input_ids")
        mask = mask.long()
        if ((mask != 0) & (mask != 1)).any():
            raise GraphoptError("attention_mask must hold only 0 (padding) and 1 (token)")
        if (mask[:, 1:] < mask[:, :-1]).any():
            raise GraphoptError("attention_mask has padding after a token: pad prompts on the left")
        if (mask.sum(-1) == 0).any():
            raise GraphoptError("a prompt in the batch is all padding: give at least one token per sequence")
    if do_sample:
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise GraphoptError(f"temperature must be > 0, got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise GraphoptError(f"top_k must be a positive integer or None, got {top_k!r}")
        if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise GraphoptError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    return ids, mask


def warped_probs(logits: torch.Tensor, temperature: float, top_k, top_p) -> torch.Tensor:
    """The sampling distribution after temperature, then top-k, then top-p (in that order, as transformers)."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= (1 - top_p)
        remove[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits.softmax(-1)


def select_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_k, top_p,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Greedy argmax, or a sample from warped_probs."""
    if not do_sample:
        return logits.argmax(-1)
    probs = warped_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def next_tokens(logits, do_sample: bool, temperature: float, top_k, top_p,
                generator: torch.Generator | None) -> np.ndarray:
    """The next token per row [B] from a method's logits [B, S, V] (numpy or torch): greedy in numpy when the
    backend returned numpy (first maximum on ties, as torch.argmax), else select_tokens."""
    last = logits[:, -1, :]
    if not do_sample and isinstance(last, np.ndarray):
        return last.argmax(-1).astype(np.int64, copy=False)
    return select_tokens(_as_torch(last).cpu(), do_sample, temperature, top_k, top_p, generator).numpy()


def generate(engine, input_ids, max_new_tokens: int, eos_token_id=None, do_sample: bool = False,
             temperature: float = 1.0, top_k=None, top_p=None, seed=None, attention_mask=None, streamer=None,
             pad_token_id=None) -> torch.Tensor:
    """New token ids [B, N] (N <= max_new_tokens; finished rows are filled with the pad id, as transformers does).

    eos_token_id: an id or list of ids; None uses the model's own. Prompts in a batch are padded on the left.
    """
    plan = engine.plan
    ids, mask = check_request(plan, engine.manifest.get("dims", {}), input_ids, attention_mask, max_new_tokens,
                              do_sample, temperature, top_k, top_p)
    if eos_token_id is None:
        eos_token_id = plan.get("eos_token_id")
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    pad = pad_token_id if pad_token_id is not None else plan.get("pad_token_id")
    if pad is None:
        pad = eos[0] if eos else 0
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    prefill = engine.method(plan["prefill"]).native
    decode = engine.method(plan["decode"]).native

    if streamer is not None:
        streamer.put(ids)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    n_kv = 2 * plan["num_layers"]  # methods may carry more outputs after the cache (draft-heads: hidden_states)
    outs = prefill([ids, mask, positions])
    # The per-token bookkeeping is numpy: right after a decode step the CPU caches are cold, and then each torch op on
    # a one-token tensor costs 10-30 µs against numpy's few (zoo LM on ONNX Runtime: ~110 -> ~45 µs a token, at
    # 0.5-1 ms a step). A torch backend gets its inputs as tensors.
    feed = (lambda a: a) if isinstance(outs[0], np.ndarray) else torch.from_numpy
    logits, past = outs[0], outs[1:1 + n_kv]
    # layer-skip routers: prefill decides which blocks run for each sequence; decode applies the same decisions
    route = [outs[-1]] if plan.get("routing") else []
    B, S = ids.shape
    unfinished = np.ones(B, dtype=bool)
    eos_a = np.array(eos, dtype=np.int64)
    tokens = np.empty((B, max_new_tokens), dtype=np.int64)
    next_pos = positions[:, -1:].numpy() + 1
    full_mask = np.concatenate([mask.numpy(), np.ones((B, max_new_tokens), dtype=np.int64)], axis=1)
    for step in range(max_new_tokens):
        tok = next_tokens(logits, do_sample, temperature, top_k, top_p, generator)
        if eos:  # without end-of-sequence ids no row finishes early
            tok = np.where(unfinished, tok, pad)
        tokens[:, step] = tok
        generated = step + 1
        if streamer is not None:
            streamer.put(torch.from_numpy(tok))
        if eos:
            unfinished &= ~np.isin(tok, eos_a)
            if not unfinished.any():
                break
        if step == max_new_tokens - 1:
            break
        # the cache stays in the backend's arrays (Method.native): at a millisecond per token, converting it to
        # torch and back every step was a fifth of the time on ONNX Runtime
        outs = decode([feed(tok.reshape(B, 1)), feed(full_mask[:, :S + step + 1]), feed(next_pos), *past, *route])
        logits, past = outs[0], outs[1:1 + n_kv]
        next_pos = next_pos + 1
    if streamer is not None:
        streamer.end()
    return torch.from_numpy(tokens[:, :generated].copy())
