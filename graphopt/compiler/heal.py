"""Whole-sequence language-model loss of a causal-lm prefill graph, and healing: after blocks are cut out, tune the
remaining 1-D parameters (norm weights, biases) so the model's next-token distributions match the original's.

Both work on exported graphs: the LM head's input (found by structure, see draft_heads.find_lm_head) is exposed as
an output, and all positions' logits are that hidden state times the LM head weight.
"""
from __future__ import annotations

import torch

from .causal_lm import sequence_inputs
from .draft_heads import find_lm_head, with_hidden_output


class SequenceLogits:
    """callable(ids [B,S]) -> logits [B,S,V] for every position, through a causal-lm prefill graph or an LM's plain
    forward graph."""

    def __init__(self, prefill_ep):
        _, _, w, b = find_lm_head(prefill_ep)
        self.w, self.b = w.detach(), None if b is None else b.detach()
        self.ep = with_hidden_output(prefill_ep)
        self.module = self.ep.module()


    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.module(*sequence_inputs(self.ep, ids))
        return torch.nn.functional.linear(out[-1], self.w, self.b)


def mean_ce(prefill_ep, calibration: list[torch.Tensor]) -> float:
    """Mean next-token cross-entropy (nats) over the calibration sequences."""
    fn = SequenceLogits(prefill_ep)
    total, n = 0.0, 0
    with torch.no_grad():
        for ids in calibration:
            logits = fn(ids)[:, :-1]
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(),
                                                             reduction="sum"))
            n += ids[:, 1:].numel()
    return total / n


def heal(prefill_ep, reference_ep, calibration: list[torch.Tensor], steps: int, lr: float = 2e-3,
         seed: int = 0, progress=None) -> tuple[dict[str, torch.Tensor], dict]:
    """New values for the 1-D float parameters of `prefill_ep`, trained to minimise KL(reference || skipped) over
    all positions of the calibration sequences (three quarters; the last quarter only checks the result).
    Returns ({state-dict name: tensor}, report); empty if the held-out KL did not improve."""
    torch.manual_seed(seed)
    teacher = SequenceLogits(reference_ep)
    names = {n for n, t in prefill_ep.state_dict.items() if t.dim() == 1 and t.dtype.is_floating_point}
    # ep.module() trains the state dict's own tensors, which programs share with the ones they were copied from:
    # train fresh copies.
    student = SequenceLogits(with_parameters(prefill_ep, {n: prefill_ep.state_dict[n].detach().clone()
                                                          for n in names}))
    params = {n: p for n, p in student.module.named_parameters() if n in names}
    if not params:
        return {}, {"healed": False, "reason": "no 1-D parameters"}
    n_val = max(1, len(calibration) // 4)
    train, val = calibration[n_val:] or calibration, calibration[:n_val]
    with torch.no_grad():
        targets = [teacher(ids).log_softmax(-1) for ids in calibration]
    t_train, t_val = targets[n_val:] or targets, targets[:n_val]

    def kl(ids, target):
        return torch.nn.functional.kl_div(student(ids).log_softmax(-1), target, log_target=True,
                                          reduction="batchmean") / ids.shape[1]

    def val_kl():
        with torch.no_grad():
            return sum(float(kl(i, t)) for i, t in zip(val, t_val)) / len(val)
    start = {n: p.detach().clone() for n, p in params.items()}
    before = val_kl()
    for p in student.module.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    it = range(steps) if progress is None else progress.track(range(steps), "healing", total=steps)
    with torch.enable_grad():
        for _ in it:
            i = int(torch.randint(0, len(train), (1,), generator=g))
            loss = kl(train[i], t_train[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    after = val_kl()
    report = {"heal_steps": steps, "heldout_kl_before": round(before, 5), "heldout_kl_after": round(after, 5),
              "parameters": sum(p.numel() for p in params.values())}
    if not after < before:
        report["healed"] = False
        return {}, report
    report["healed"] = True
    return {n: p.detach().clone() for n, p in params.items() if not torch.equal(p.detach(), start[n])}, report


def with_parameters(ep, values: dict[str, torch.Tensor]):
    """The same graph with some state-dict entries replaced by new tensors (never written in place: programs share
    their tensors with the ones they were copied from)."""
    from .graph_edit import GraphEditor
    ed = GraphEditor(ep)
    for name, value in values.items():
        if name in ed.state_dict:
            old = ed.state_dict[name]
            ed.state_dict[name] = torch.nn.Parameter(value.to(old.dtype), requires_grad=False) \
                if isinstance(old, torch.nn.Parameter) else value.to(old.dtype)
    return ed.build()
