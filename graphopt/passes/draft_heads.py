from __future__ import annotations

import json

from ..compiler import draft_heads as dh
from ..compiler.program import TensorSpec
from ..errors import GraphoptError
from .base import Option, Pass, register


def parse_tree(text: str, heads: int, topk: int, where: str = "draft-heads{tree}") -> list[list[int]] | None:
    """None for 'auto'; else a list of paths [i_1, ..., i_k] (i_j: rank in head j's top-k), checked for
    consistency with the number of heads and with topk."""
    if text in ("auto", ""):
        return None
    try:
        paths = json.loads(text)
        if not isinstance(paths, list) or not all(isinstance(p, list) and p and
                                                    all(isinstance(i, int) for i in p) for p in paths):
            raise ValueError
    except ValueError:
        raise GraphoptError(f"{where}: '{text}' is not 'auto' or a list of paths such as [[0],[1],[0,0]]")
    seen = {tuple(p) for p in paths}
    if len(seen) != len(paths):
        raise GraphoptError(f"{where}: a path is listed twice in {text}")
    for p in paths:
        if len(p) > heads:
            raise GraphoptError(f"{where}: path {p} is {len(p)} deep but there are only {heads} heads")
        if any(not 0 <= i < topk for i in p):
            raise GraphoptError(f"{where}: path {p} uses a rank outside the top-{topk} (topk={topk})")
        if len(p) > 1 and tuple(p[:-1]) not in seen:
            raise GraphoptError(f"{where}: path {p} has no parent {p[:-1]} in the tree")
    return sorted(paths, key=lambda p: (len(p), p))


@register
class DraftHeads(Pass):
    """Medusa/Hydra draft heads on the final hidden state, for speculative decoding (train with train-heads)."""
    name = "draft-heads"
    tasks = frozenset({"causal-lm"})
    needs_methods = frozenset({"verify"})
    adds_outputs = True  # prefill/verify gain a hidden_states output; their other outputs are unchanged
    exact = True
    metric = "max_rel"
    tolerance = 0.0
    options = {
        "heads": Option(int, 4, "number of heads (head k drafts token t+k+1)", min=1, max=16),
        "layers": Option(int, 1, "residual SiLU blocks per head", min=0, max=8),
        "kind": Option(str, "hydra", "hydra: heads also see the tokens drafted before them (default: more "
                       "accepted tokens per step on the zoo LM); medusa: heads see h_t only",
                       choices=("medusa", "hydra")),
        "topk": Option(int, 10, "candidates per head that tree paths may use", min=1, max=64),
        "tree": Option(str, "auto", "auto (built from the trained heads' accuracy and the measured verify cost) "
                       "or a list of paths of top-k ranks, e.g. [[0],[1],[0,0]]"),
    }

    @classmethod
    def check_config(cls, config, where):
        parse_tree(config["tree"], config["heads"], config["topk"], f"{where}{{tree}}")

    @classmethod
    def headline(cls, details) -> str:
        return f"{details['heads']} {details['kind']} heads, {details['parameters'] / 1e6:.2f} M parameters"

    def run(self, program, ctx):
        c = self.config
        tree = parse_tree(c["tree"], c["heads"], c["topk"])
        plan = program.plan
        if "draft_heads" in plan:
            raise GraphoptError("draft-heads: the program already has draft heads")
        verify = plan.get("verify")
        if verify not in program.methods:
            raise GraphoptError("draft-heads: the program has no 'verify' method (causal-lm capture exports it when "
                                "the pipeline has draft-heads)")
        prefill = plan["prefill"]
        _, hidden, weight, bias = dh.find_lm_head(program.methods[prefill])
        embedding = dh.find_token_embedding(program.methods[prefill], weight.shape[0]) \
            if c["kind"] == "hydra" else None
        for m in (prefill, verify):
            program.methods[m] = dh.with_hidden_output(program.methods[m])
            program.output_names[m] = program.output_names[m] + ["hidden_states"]
        heads = dh.DraftHeads(c["kind"], c["heads"], c["layers"], weight, bias, embedding)
        ep, example = dh.export_draft(heads)
        program.methods["draft"] = ep
        program.example_inputs["draft"] = example
        program.inputs["draft"] = [TensorSpec("hidden", "float32", ["N", weight.shape[1]]),
                                   TensorSpec("path_ids", "int64", ["N", c["heads"]])]
        program.output_names["draft"] = ["draft_logits"]
        program.dims["N"] = [1, 4096]
        plan["draft_heads"] = {"method": "draft", "kind": c["kind"], "heads": c["heads"], "layers": c["layers"],
                               "topk": c["topk"], "tree": tree, "hidden_output": "hidden_states",
                               "trained": None}
        return program, {"lm_head": list(weight.shape), "hidden": hidden.name, "heads": c["heads"],
                         "kind": c["kind"], "parameters": sum(p.numel() for p in heads.parameters())}
