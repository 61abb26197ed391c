"""Self-speculative drafting (SWIFT / Draft&Verify): the bundle's layer-skipped program drafts a chain from the full
model's own cache (the layers it runs), and the full program verifies it (runtime/speculative.py).

Greedy decoding with room for a whole chain runs one `draft_verify` call per step (compiler/draft_verify.py: K
drafter steps and the verify forward in one graph). Sampling, and the last steps before the length limit, draft
token by token with `draft_decode` (stopping early when the drafter's top probability falls below the plan's
confidence) and verify with `verify`.
"""
from __future__ import annotations

import torch

from ..errors import GraphoptError
from .generate import warped_probs
from .speculative import TreeShape


class SkipDrafter:
    def __init__(self, engine, sampling):
        sp = engine.plan.get("self_speculative")
        if not sp:
            raise GraphoptError("this bundle has no skipped drafter: compile it with "
                                "--passes 'layer-skip{skip=N,self_speculative=true}'")
        if "kv_index" not in sp:
            raise GraphoptError(f"the drafter in {engine.path} was built by an older graphopt (with its own cache); "
                                f"re-run optimize to rebuild it")
        # the cache stays in the backend's arrays (see generate())
        self.decode = engine.method(sp["decode"]).native
        self.fused = engine.method(sp["fused"]).native
        self.kv_index = sp["kv_index"]  # which of the full cache's tensors the drafter's layers read
        self.length, self.confidence = sp["draft_length"], sp["confidence"]
        self.tree = TreeShape.chain(self.length)
        self.sampling = sampling

    def can_fuse(self, tree: TreeShape) -> bool:
        return self.sampling is None and tree.max_depth == self.length

    def fused_step(self, root: int, past: list, position: int):
        """Greedy: (drafted tokens with the root first, accepted count, the full model's next token, presents)."""
        outs = self.fused([torch.tensor([[root]]), torch.ones(1, position + 1, dtype=torch.int64),
                           torch.tensor([[position]]), *past])
        tokens, predicted = outs[0][0].tolist(), outs[1][0].tolist()
        accepted = 0
        while accepted < self.length and tokens[accepted + 1] == predicted[accepted]:
            accepted += 1
        return tokens, accepted, predicted[accepted], list(outs[2:])

    def propose(self, root: int, hidden, tree: TreeShape, past: list):
        P = past[0].shape[2]
        kv = [past[j] for j in self.kv_index]
        tokens, qs = [root], []
        for i in range(tree.max_depth):
            outs = self.decode([torch.tensor([[tokens[-1]]]), torch.ones(1, P + i + 1, dtype=torch.int64),
                                torch.tensor([[P + i]]), *kv])
            kv = list(outs[1:1 + len(kv)])
            logits = torch.as_tensor(outs[0][0, -1]).float().cpu()
            if self.sampling is None:
                p, tok = logits.softmax(-1).max(-1)
                if len(tokens) > 1 and float(p) < self.confidence:
                    break
                tok = int(tok)
            else:
                temperature, top_k, top_p, gen = self.sampling
                q = warped_probs(logits, temperature, top_k, top_p)
                if len(tokens) > 1 and float(q.max()) < self.confidence:
                    break
                tok = int(torch.multinomial(q, 1, generator=gen))
                qs.append(q)
            tokens.append(tok)
        chain = TreeShape.chain(len(tokens) - 1)
        return torch.tensor(tokens), chain, torch.stack(qs) if qs else None
