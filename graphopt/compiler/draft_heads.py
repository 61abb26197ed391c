"""Draft heads (Medusa, Hydra) for speculative decoding: the LM head found by graph structure, the final hidden state
exposed as an output, and the heads themselves as a small separate `draft` method.

Why a separate method rather than heads inside the base graphs: the heads are trained after compilation
(`graphopt train-heads`), so they must be replaceable without touching the base graphs, and the runtime only needs
them at one position per step (the last accepted token), not at every verified tree node.
"""
from __future__ import annotations

import torch
from torch.export.graph_signature import OutputKind, OutputSpec, TensorArgument

from ..errors import GraphoptError
from .graph_edit import GraphEditor

aten = torch.ops.aten
# Ops that move or reinterpret values between the hidden state and the LM head (and between it and the logits).
_PASS_THROUGH = {aten.slice.Tensor, aten.view.default, aten.reshape.default, aten.to.dtype, aten.clone.default,
                 aten._to_copy.default, aten.squeeze.dim, aten.unsqueeze.default, aten.contiguous.default,
                 aten.alias.default}
LOOKED_FOR = ("the first output (logits [..., V]) computed by a linear layer with a constant [V, d] weight from a "
              "hidden state [..., d]")


def _constant(ep, node) -> torch.Tensor | None:
    if node.op != "placeholder":
        return None
    for spec in ep.graph_signature.input_specs:
        if isinstance(spec.arg, TensorArgument) and spec.arg.name == node.name and spec.target is not None:
            if spec.target in ep.state_dict:
                return ep.state_dict[spec.target]
            return ep.constants.get(spec.target)
    return None


def find_lm_head(ep):
    """(linear node, full hidden-state node, weight, bias) of the LM head, found from the first user output back."""
    out = next(n for n in ep.graph.nodes if n.op == "output")
    user_outs = [s for s in ep.graph_signature.output_specs if s.kind == OutputKind.USER_OUTPUT]
    if not user_outs:
        raise GraphoptError(f"draft-heads: the graph has no outputs; looked for {LOOKED_FOR}")
    names = {n.name: n for n in ep.graph.nodes}
    node = names.get(user_outs[0].arg.name) if isinstance(user_outs[0].arg, TensorArgument) else None
    del out
    while node is not None and node.op == "call_function" and node.target in _PASS_THROUGH:
        node = node.args[0]
    if node is None or node.op != "call_function" or node.target != aten.linear.default:
        raise GraphoptError(f"draft-heads: found no LM head; looked for {LOOKED_FOR}")
    weight = _constant(ep, node.args[1])
    bias = _constant(ep, node.args[2]) if len(node.args) > 2 and node.args[2] is not None else None
    if weight is None or weight.dim() != 2:
        raise GraphoptError(f"draft-heads: the last linear's weight is not a constant matrix; looked for {LOOKED_FOR}")
    hidden = node.args[0]
    # Back through the slices that keep only the last position (prefill's logits_to_keep) to the whole sequence.
    while hidden.op == "call_function" and hidden.target in (aten.slice.Tensor, aten.alias.default):
        hidden = hidden.args[0]
    val = hidden.meta.get("val")
    if val is None or val.dim() != 3 or val.shape[-1] != weight.shape[1]:
        raise GraphoptError(f"draft-heads: the LM head's input is not a [batch, length, d] hidden state; looked for "
                            f"{LOOKED_FOR}")
    return node, hidden, weight, bias


def find_token_embedding(ep, vocab: int) -> torch.Tensor:
    """The [V, d] table that embeds input_ids (Hydra heads read the drafted tokens' embeddings from it)."""
    ids = ep.graph_signature.user_inputs[0]
    for n in ep.graph.nodes:
        if n.op == "call_function" and n.target == aten.embedding.default and n.args[1].name == ids:
            table = _constant(ep, n.args[0])
            if table is not None and table.shape[0] == vocab:
                return table
    raise GraphoptError("draft-heads{kind=hydra}: found no token embedding (aten.embedding of input_ids with a "
                        f"constant [{vocab}, d] table)")


def with_hidden_output(ep):
    """The same graph with the final hidden state [B, S, d] (the LM head's unsliced input) as one more output."""
    from .feature_cache import _set_call_spec
    _, hidden, _, _ = find_lm_head(ep)
    ed = GraphEditor(ep)
    node = next(n for n in ed.graph.nodes if n.name == hidden.name)
    out = next(n for n in ed.graph.nodes if n.op == "output")
    out.args = (tuple(list(out.args[0]) + [node]),)
    ed.output_specs.append(OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(node.name), None))
    new = ed.build()
    n_in = len(new.graph_signature.user_inputs)
    _set_call_spec(new, n_in, len(new.graph_signature.user_outputs))
    return new


class ResBlock(torch.nn.Module):
    """x + SiLU(W x + b), W initialised to zero so an untrained block is the identity (Medusa)."""

    def __init__(self, d: int):
        super().__init__()
        self.linear = torch.nn.Linear(d, d)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return x + torch.nn.functional.silu(self.linear(x))


class Head(torch.nn.Module):
    def __init__(self, d_in: int, d: int, vocab: int, layers: int, lm_weight: torch.Tensor, lm_bias):
        super().__init__()
        # Hydra heads read [h, e_1..e_k]: a projection to d first (initialised to pass h through unchanged).
        self.proj = None
        if d_in != d:
            self.proj = torch.nn.Linear(d_in, d, bias=False)
            with torch.no_grad():
                self.proj.weight.zero_()
                self.proj.weight[:, :d] = torch.eye(d)
        self.blocks = torch.nn.Sequential(*[ResBlock(d) for _ in range(layers)])  # distinct modules per layer
        self.out = torch.nn.Linear(d, vocab, bias=lm_bias is not None)
        with torch.no_grad():
            self.out.weight.copy_(lm_weight)
            if lm_bias is not None:
                self.out.bias.copy_(lm_bias)

    def forward(self, x):
        if self.proj is not None:
            x = self.proj(x)
        return self.out(self.blocks(x))


class DraftHeads(torch.nn.Module):
    """K heads on the last hidden state h_t; head k predicts token t+k+1 (the base itself predicts t+1).

    medusa: head k sees h_t only. hydra: head k also sees the embeddings of tokens t+1..t+k (the base's next token
    and the drafts before it), so its guesses follow the path drafted so far.
    forward(hidden [N, d], path_ids [N, K]) -> logits [N, K, V]; medusa ignores path_ids. Training feeds hydra
    the true path (teacher forcing); the exported method (greedy_path=True) reads only path_ids[:, 0], the base
    model's next token, and drafts the rest of the path itself by argmax, so one call drafts every depth.
    """
    greedy_path = False

    def __init__(self, kind: str, heads: int, layers: int, lm_weight: torch.Tensor, lm_bias=None,
                 embedding: torch.Tensor | None = None):
        super().__init__()
        vocab, d = lm_weight.shape
        self.kind, self.num_heads = kind, heads
        if kind == "hydra":
            if embedding is None:
                raise ValueError("hydra heads need the token embedding table")
            self.register_buffer("embedding", embedding.detach().clone())
        self.heads = torch.nn.ModuleList([
            Head(d * (1 + k + 1) if kind == "hydra" else d, d, vocab, layers, lm_weight, lm_bias)
            for k in range(heads)])

    def forward(self, hidden, path_ids):
        if self.kind == "medusa":
            return torch.stack([h(hidden) for h in self.heads], dim=1)
        embed = torch.nn.functional.embedding
        if not self.greedy_path:
            emb = embed(path_ids, self.embedding)  # [N, K, d]
            return torch.stack([h(torch.cat([hidden, emb[:, :k + 1].flatten(1)], dim=-1))
                                for k, h in enumerate(self.heads)], dim=1)
        path = [embed(path_ids[:, 0], self.embedding)]
        outs = []
        for h in self.heads:
            logits = h(torch.cat([hidden] + path, dim=-1))
            outs.append(logits)
            path.append(embed(logits.argmax(-1), self.embedding))
        return torch.stack(outs, dim=1)


def export_draft(heads: DraftHeads):
    """The heads as an ExportedProgram with a dynamic number of rows."""
    d = heads.heads[0].out.weight.shape[1]
    example = (torch.zeros(2, d), torch.zeros(2, heads.num_heads, dtype=torch.int64))
    n = torch.export.Dim("N", min=1, max=4096)
    heads.greedy_path = heads.kind == "hydra"
    try:
        with torch.no_grad():
            ep = torch.export.export(heads.eval(), example, dynamic_shapes=({0: n}, {0: n}), strict=False)
    finally:
        heads.greedy_path = False
    return ep, example


def heads_from_state(kind: str, heads: int, layers: int, state: dict[str, torch.Tensor]) -> DraftHeads:
    """Rebuild the module from a `draft` method's state dict (bundles keep no other copy of the weights)."""
    w = state["heads.0.out.weight"]
    b = state.get("heads.0.out.bias")
    module = DraftHeads(kind, heads, layers, w, b, state.get("embedding"))
    module.load_state_dict(state, strict=True)
    return module
