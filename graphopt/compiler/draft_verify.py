"""One greedy self-speculative step as a single method: the layer-skipped drafter proposes K tokens one after
another, then the full model verifies all of them, in one graph.

At a few hundred kernels per token, a small model's drafter step costs little more than its per-call overhead
(a Python round trip, an ORT session run, the cache handed back and forth): K + 1 calls per verify step spent more
than the skipped layers saved. Composed into one graph, the K drafter steps and the verify forward run in one
session call with the argmax fed back inside the graph.

The drafter reads the full model's cache for the layers it runs (SWIFT / Draft&Verify share it): it needs no cache or
prefill of its own, and what the verifier accepted is already in the cache it drafts from.

    inputs:  input_ids [B,1] (the root: the token the full model chose last), attention_mask [B,P+1] (ones),
             position_ids [B,1] (= P), past_{key,value}_{i} [B,h,P,d] for every layer
    outputs: tokens [B,K+1] (root + K drafts), predicted [B,K+1] (the full model's argmax after each of them),
             present_{key,value}_{i} [B,h,P+K+1,d]
Greedy acceptance then keeps the drafts while tokens[j+1] == predicted[j]; the next token is predicted[accepted].
"""
from __future__ import annotations

import inspect

import torch


class _DraftVerify(torch.nn.Module):
    def __init__(self, draft, verify, kv_index: list[int], n_kv: int, k: int):
        super().__init__()
        self.draft, self.verify = draft, verify
        self.kv_index, self.k = kv_index, k
        names = ["input_ids", "attention_mask", "position_ids"] + \
            [f"past_{kv}_{i}" for i in range(n_kv // 2) for kv in ("key", "value")]
        inner = self._step

        def forward(*args):
            return inner(*args)
        # torch.export names the graph inputs after the signature
        forward.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
        self.forward = forward

    def _step(self, input_ids, attention_mask, position_ids, *past):
        kv = [past[j] for j in self.kv_index]
        token, mask, position, tokens = input_ids, attention_mask, position_ids, [input_ids]
        for _ in range(self.k):
            outs = self.draft(token, mask, position, *kv)
            kv = list(outs[1:1 + len(kv)])
            token = outs[0][:, -1:].argmax(-1)
            tokens.append(token)
            mask = torch.cat([mask, mask[:, -1:]], 1)
            position = position + 1
        tokens = torch.cat(tokens, 1)
        B, P, T = past[0].shape[0], past[0].shape[2], self.k + 1
        # the verify method's tree mask for a chain: the whole cache, then causal over the chain
        chain = torch.ones(T, T, dtype=torch.int64).tril().expand(B, 1, T, T)
        tree = torch.cat([torch.ones(B, 1, T, P, dtype=torch.int64), chain], 3)
        outs = self.verify(tokens, tree, position_ids + torch.arange(T), *past)
        return (tokens, outs[0].argmax(-1), *outs[1:1 + len(past)])


def build_draft_verify(draft_ep, verify_ep, kv_index: list[int], examples: tuple, k: int):
    """draft_ep: the skipped decode method (its past = the full past at kv_index); verify_ep: the full verify method;
    examples: the full decode method's example inputs."""
    from .causal_lm import _export
    draft, verify = draft_ep.module(), verify_ep.module()
    # The two methods hold the same weight tensors (passes never copy them; heal replaces only what it tuned), so the
    # composed program, and its ONNX file, stores each weight once.
    n_kv = len(examples) - 3
    module = _DraftVerify(draft, verify, kv_index, n_kv, k)
    dyn = torch.export.Dim.DYNAMIC
    dynamic = [{0: dyn}, {0: dyn, 1: dyn}, {0: dyn}] + [{0: dyn, 2: dyn}] * n_kv
    return _export(module, tuple(examples), dynamic, "draft_verify")
