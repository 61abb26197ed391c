"""Self-speculative drafting (SWIFT / Draft&Verify): the bundle's layer-skipped program drafts a chain token by token
with its own KV cache, stopping early when its top probability falls below the plan's confidence; the full program's
`verify` method checks the chain (runtime/speculative.py). After each step the drafter's cache is cut back to the
tokens both models agree on, and the tokens it has not seen yet are fed before the next draft."""
from __future__ import annotations

import torch

from ..errors import GraphoptError
from .generate import warped_probs
from .speculative import TreeShape


class SkipDrafter:
    def __init__(self, engine, sampling):
        plan = engine.plan
        sp = plan.get("self_speculative")
        if not sp:
            raise GraphoptError("this bundle has no skipped drafter: compile it with "
                                "--passes 'layer-skip{skip=N,self_speculative=true}'")
        # the drafter's cache stays in the backend's arrays (see generate())
        self.prefill = engine.method(sp["prefill"]).native
        self.decode = engine.method(sp["decode"]).native
        self.n_kv = sp["kv_outputs"]  # the drafter carries only the cache of the layers it runs
        self.length, self.confidence = sp["draft_length"], sp["confidence"]
        self.tree = TreeShape.chain(self.length)
        self.sampling = sampling

    def start(self, prompt: torch.Tensor) -> None:
        self.seq = prompt.tolist()
        S = len(self.seq)
        outs = self.prefill([prompt[None], torch.ones(1, S, dtype=torch.int64), torch.arange(S)[None]])
        self.past = list(outs[1:1 + self.n_kv])
        self.fed = S           # sequence positions the drafter's cache holds
        self.drafted = 0       # of which speculative (drafted, not yet verified)

    def _step(self, token: int):
        n = self.past[0].shape[2]
        outs = self.decode([torch.tensor([[token]]), torch.ones(1, n + 1, dtype=torch.int64),
                            torch.tensor([[n]]), *self.past])
        self.past = list(outs[1:1 + self.n_kv])
        return torch.as_tensor(outs[0][0, -1]).float().cpu()

    def propose(self, root: int, hidden, tree: TreeShape):
        logits = None
        for t in self.seq[self.fed:]:  # tokens verified since the last draft (the root among them)
            logits = self._step(t)
        self.fed = len(self.seq)
        tokens, qs = [root], []
        self.drafted = 0  # drafts fed to the cache (every draft but the last)
        for _ in range(tree.max_depth):
            if self.sampling is None:
                probs = logits.float().softmax(-1)
                p, tok = probs.max(-1)
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
            if len(tokens) - 1 < tree.max_depth:
                logits = self._step(tok)
                self.drafted += 1
        chain = TreeShape.chain(len(tokens) - 1)
        return torch.tensor(tokens), chain, torch.stack(qs) if qs else None

    def accepted(self, new: list[int]) -> None:
        """`new`: the tokens added to the sequence (accepted drafts, then the base model's next token)."""
        if self.drafted:
            # the cache holds the drafts fed; keep those that were accepted (they precede the last new token)
            keep = min(self.drafted, len(new) - 1)
            self.past = [x[:, :, :self.fed + keep] for x in self.past]
            self.fed += keep
            self.drafted = 0
        self.seq.extend(new)
