"""Speculative decoding over a causal-lm bundle: a drafter proposes a token tree, the bundle's `verify` method scores
every node in one forward (each node attends to the cache and its ancestors; position = cache length + depth), the
longest path the base model agrees with is kept (its KV entries only), and the base model's own next token is added.

Drafters: `HeadDrafter` (the draft-heads pass: Medusa/Hydra heads and a static sparse tree) and `SkipDrafter` (the
layer-skip pass with self_speculative=true: the skipped program drafts a chain). Greedy acceptance is lossless by
construction. Sampling uses exact speculative rejection sampling on a drafted chain (accept a draft x with probability
min(1, p(x)/q(x)), else sample from max(p - q, 0) renormalised), so tokens follow the base model's warped
distribution exactly; Medusa's typical acceptance is faster but not lossless, so it is not offered.
"""
from __future__ import annotations

import time

import torch

from ..errors import GraphoptError
from .generate import check_request, warped_probs


class TreeShape:
    """A static tree. Node 0 is the root (the token the base model already chose); node i > 0 is paths[i-1], a
    path of ranks [r_1, ..., r_k] (r_j: rank in draft step j's candidates). Parents precede children."""

    def __init__(self, paths):
        self.paths = [tuple(p) for p in sorted((list(p) for p in paths), key=lambda p: (len(p), p))]
        index = {(): 0}
        self.parents, depth = [-1], [0]
        for i, p in enumerate(self.paths, 1):
            index[p] = i
            self.parents.append(index[p[:-1]])
            depth.append(len(p))
        self.size = len(self.parents)
        self.depth_list = depth
        self.depth = torch.tensor(depth, dtype=torch.int64)
        self.max_depth = max(depth)
        anc = torch.zeros(self.size, self.size, dtype=torch.int64)
        for i in range(self.size):
            j = i
            while j >= 0:
                anc[i, j] = 1
                j = self.parents[j]
        self.ancestors = anc
        self.children = [[] for _ in range(self.size)]
        for i in range(1, self.size):
            self.children[self.parents[i]].append(i)

    @classmethod
    def chain(cls, n: int) -> "TreeShape":
        return cls([[0] * k for k in range(1, n + 1)])

    def truncated(self, max_depth: int) -> "TreeShape":
        return TreeShape([p for p in self.paths if len(p) <= max_depth])

    def path_to(self, node: int) -> list[int]:
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]


class Verifier:
    """One forward of the base model over a token tree (the bundle's `verify` method), shared by all drafters."""

    def __init__(self, engine):
        plan = engine.plan
        name = plan.get("verify")
        if name is None or name not in engine.methods:
            raise GraphoptError("this bundle has no 'verify' method; compile it with a pass that needs one "
                                "(draft-heads, or layer-skip{self_speculative=true})")
        self.run = engine.method(name).native  # the cache stays in the backend's arrays (see generate())
        self.n_kv = 2 * plan["num_layers"]

    def __call__(self, tokens: torch.Tensor, tree: TreeShape, past: list, position: int):
        P = past[0].shape[2]
        T = tree.size
        mask = torch.cat([torch.ones(T, P, dtype=torch.int64), tree.ancestors], dim=1)[None, None]
        outs = self.run([tokens[None], mask, (position + tree.depth)[None], *past])
        # logits to the CPU (acceptance and sampling run there); the cache and hidden states stay where they are
        return (torch.as_tensor(outs[0][0]).float().cpu(), list(outs[1:1 + self.n_kv]),
                [torch.as_tensor(o[0]) for o in outs[1 + self.n_kv:]])

    @staticmethod
    def keep(presents: list, P: int, nodes: list[int]) -> list:
        """The cache with the past and the accepted nodes' entries only."""
        # Path nodes come in increasing order (parents before children), so moving each accepted entry down to its
        # slot in place never overwrites one still to be moved; only the entries off the prefix are copied.
        moves = [(j, n) for j, n in enumerate(nodes) if j != n]
        out = []
        for x in presents:
            for j, n in moves:
                x[:, :, P + j] = x[:, :, P + n]
            out.append(x[:, :, :P + len(nodes)])
        return out


def accept_greedy(tokens: list[int], tree: TreeShape, logits: torch.Tensor) -> tuple[list[int], int]:
    """(accepted node path from the root, the base model's next token after it)."""
    pred = logits.argmax(-1).tolist()
    ok = [True] + [False] * (tree.size - 1)
    best = 0
    for i in range(1, tree.size):
        par = tree.parents[i]
        if ok[par] and tokens[i] == pred[par]:
            ok[i] = True
            if tree.depth_list[i] > tree.depth_list[best]:
                best = i
    return tree.path_to(best), pred[best]


def accept_sampled(tokens: list[int], p: torch.Tensor, q: torch.Tensor, generator) -> tuple[list[int], int]:
    """Rejection sampling along a chain. p [T, V]: the base model's warped distribution after each node; q [T-1, V]:
    the distribution node i (i >= 1) was drawn from. Returns (accepted chain nodes, the next token)."""
    for i in range(1, len(tokens)):
        x = tokens[i]
        u = torch.rand((), generator=generator)
        if float(u) * float(q[i - 1, x]) < float(p[i - 1, x]):  # u < p/q without dividing by q
            continue
        residual = (p[i - 1] - q[i - 1]).clamp_min(0)
        if float(residual.sum()) <= 0:
            residual = p[i - 1]
        return list(range(i)), int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return list(range(len(tokens))), int(torch.multinomial(p[-1], 1, generator=generator))


class HeadDrafter:
    """Candidates from the draft heads' top-k (greedy: the plan's tree; sampling: one token sampled per head)."""

    def __init__(self, engine, sampling):
        dplan = engine.plan.get("draft_heads")
        if not dplan:
            raise GraphoptError("this bundle has no draft heads: compile it with --passes draft-heads, then run "
                                "graphopt train-heads")
        if not dplan.get("trained") or not dplan.get("tree"):
            raise GraphoptError(f"the draft heads of {engine.path} are untrained: run graphopt train-heads "
                                f"{engine.path} first")
        self.run = engine.method(dplan["method"])._run
        self.kind, self.K = dplan["kind"], dplan["heads"]
        self.tree = TreeShape(dplan["tree"])
        self.topk = 1 + max(max(p) for p in self.tree.paths)
        self.sampling = sampling  # None for greedy, else (temperature, top_k, top_p, generator)

    def can_fuse(self, tree: TreeShape) -> bool:
        return False

    def propose(self, root: int, hidden: torch.Tensor, tree: TreeShape, past: list):
        """(tokens [T], tree, q [T-1, V] or None). One call of the draft method gives every head's logits (hydra
        heads condition on the base model's next token and their own greedy path)."""
        paths = torch.zeros(1, self.K, dtype=torch.int64)
        paths[0, 0] = root
        logits = self.run([hidden[None], paths])[0][0].float().cpu()  # [K, V]
        if self.sampling is None:
            top = logits.topk(self.topk, dim=-1).indices.tolist()
            return torch.tensor([root] + [top[len(p) - 1][p[-1]] for p in tree.paths]), tree, None
        temperature, top_k, top_p, gen = self.sampling
        chain = TreeShape.chain(min(self.K, tree.max_depth))
        q = warped_probs(logits[:chain.size - 1], temperature, top_k, top_p)
        drafts = torch.multinomial(q, 1, generator=gen)[:, 0] if len(q) else torch.zeros(0, dtype=torch.int64)
        return torch.cat([torch.tensor([root]), drafts]), chain, q


def check_ready(engine, drafter: str = "heads") -> None:
    """Raise the one-line error speculative_generate would raise for this bundle, before any work."""
    if engine.plan.get("routing"):
        raise GraphoptError("speculative decoding does not combine with layer-skip routers yet; use generate() "
                            "without speculative")
    Verifier(engine)
    if drafter == "heads":
        HeadDrafter(engine, None)
    elif drafter == "layer-skip":
        from .self_speculative import SkipDrafter
        SkipDrafter(engine, None)
    else:
        raise GraphoptError(f"unknown drafter '{drafter}': choose heads or layer-skip")


def speculative_generate(engine, input_ids, max_new_tokens: int, eos_token_id=None, do_sample: bool = False,
                         temperature: float = 1.0, top_k=None, top_p=None, seed=None, attention_mask=None,
                         streamer=None, drafter: str = "heads"):
    """New token ids [B, N] like generate(), plus stats {steps, mean_accepted_length, ...}.

    Batch > 1 runs the rows one after another (each row's accepted length differs, so the caches would diverge);
    left padding is removed per row.
    """
    plan = engine.plan
    ids, mask = check_request(plan, engine.manifest.get("dims", {}), input_ids, attention_mask, max_new_tokens,
                              do_sample, temperature, top_k, top_p)
    check_ready(engine, drafter)
    if streamer is not None and ids.shape[0] > 1:
        raise GraphoptError("speculative generation streams batch 1 only; drop the streamer or give one prompt")
    if eos_token_id is None:
        eos_token_id = plan.get("eos_token_id")
    eos_list = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else
                                                list(eos_token_id))
    eos = set(eos_list)
    pad = plan.get("pad_token_id")
    pad = pad if pad is not None else (eos_list[0] if eos_list else 0)  # as generate() does
    if do_sample:  # seed=None: drawn from torch's global random state, like generate()
        generator = torch.Generator().manual_seed(seed if seed is not None else
                                                  int(torch.randint(0, 2 ** 62, (1,))))
    else:
        generator = None
    sampling = (temperature, top_k, top_p, generator) if do_sample else None
    verifier = Verifier(engine)
    if drafter == "heads":
        draft = HeadDrafter(engine, sampling)
    else:
        from .self_speculative import SkipDrafter
        draft = SkipDrafter(engine, sampling)
    prefill = engine.method(plan["prefill"]).native
    n_kv = 2 * plan["num_layers"]
    max_len = plan["max_length"]
    stats = {"steps": 0, "verified_tokens": 0, "draft_s": 0.0, "verify_s": 0.0, "fused_s": 0.0}

    def select(logits):
        if sampling is None:
            return int(logits.argmax(-1))
        return int(torch.multinomial(warped_probs(logits, temperature, top_k, top_p), 1, generator=generator))

    rows = []
    for b in range(ids.shape[0]):
        row = ids[b][mask[b] == 1]
        if streamer is not None:
            streamer.put(row[None])
        S = row.shape[0]
        outs = prefill([row[None], torch.ones(1, S, dtype=torch.int64), torch.arange(S)[None]])
        past = list(outs[1:1 + n_kv])
        hidden = torch.as_tensor(outs[1 + n_kv][0, -1]) if len(outs) > 1 + n_kv else None
        out = [select(torch.as_tensor(outs[0][0, -1]).float().cpu())]
        if streamer is not None:
            streamer.put(torch.tensor(out[-1:]))
        while len(out) < max_new_tokens and out[-1] not in eos:
            P = past[0].shape[2]  # = position of the root token
            # drafts worth verifying: the step's own next token comes free, and the tree must fit the positions left
            room = min(max_len - P - 1, max_new_tokens - len(out) - 1)
            tree = draft.tree if draft.tree.max_depth <= room else draft.tree.truncated(room)
            if P + tree.size > max_len:  # the mask width is capped by the model's length (TensorRT profiles)
                tree = TreeShape(tree.paths[:max(0, max_len - P - 1)])
            t0 = time.perf_counter()
            if draft.can_fuse(tree):  # greedy self-speculative: drafting and verifying in one call
                tok_list, accepted, nxt, presents = draft.fused_step(out[-1], past, P)
                path, hidden = list(range(accepted + 1)), None
                stats["fused_s"] += time.perf_counter() - t0
            else:
                if tree.size == 1:
                    tokens, q = torch.tensor(out[-1:]), None
                else:
                    tokens, tree, q = draft.propose(out[-1], hidden, tree, past)
                t1 = time.perf_counter()
                logits, presents, extra = verifier(tokens, tree, past, P)
                stats["verify_s"] += time.perf_counter() - t1
                stats["draft_s"] += t1 - t0
                tok_list = tokens.tolist()
                if sampling is None:
                    path, nxt = accept_greedy(tok_list, tree, logits)
                else:
                    p = warped_probs(logits, temperature, top_k, top_p)
                    path, nxt = accept_sampled(tok_list, p, q, generator) if q is not None else \
                        ([0], int(torch.multinomial(p[0], 1, generator=generator)))
                hidden = extra[0][path[-1]] if extra else None
            past = Verifier.keep(presents, P, path)
            new = [tok_list[i] for i in path[1:]] + [nxt]
            stats["steps"] += 1
            stats["verified_tokens"] += len(new)
            for t in new:
                if len(out) >= max_new_tokens or out[-1] in eos:
                    break
                out.append(t)
                if streamer is not None:
                    streamer.put(torch.tensor([t]))
        rows.append(out)
    if streamer is not None:
        streamer.end()
    width = max(len(r) for r in rows)
    result = torch.full((len(rows), width), pad, dtype=torch.int64)
    for b, r in enumerate(rows):
        result[b, :len(r)] = torch.tensor(r)
    stats["mean_accepted_length"] = stats["verified_tokens"] / max(stats["steps"], 1)
    return result, stats
