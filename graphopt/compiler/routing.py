"""Input-adaptive block routing (FiRST): per-block routers decide once per sequence, at prefill, which blocks run.

Blocks are skipped in a fixed order (least important first); each sequence gets its own depth, the number of
blocks of that order it skips. Router k (k = 1..K) is a linear function of the mean (over the prompt's real tokens)
of the residual stream entering the first routed block (a feature no routing decision changes): it predicts the
sequence's rise in loss when the first k blocks of the order are skipped, plus a price per skipped block. The
sequence's depth is the k with the lowest predicted cost (0: skip nothing), so a block runs when its place in the
order is at least the depth. The prefill graph computes the decisions and returns them as `route` [B, R] (int64,
1 = run); decode (and verify) take `route` as an input and apply the same decisions to every new token, so a skipped
layer is skipped for the whole sequence and its cache is never read. In the graph a routed block's output becomes
where(keep, block(x), x); lowering to ONNX can then put the block inside an If node (compiler/onnx_if.py) so that a
skipped block is not computed at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.export.graph_signature import InputKind, InputSpec, OutputKind, OutputSpec, TensorArgument

from .blocks import find_blocks
from .graph_edit import GraphEditor

aten = torch.ops.aten


@dataclass
class Routers:
    """Depth routers: predicted loss rise of skipping the first k blocks of the order is weights[k-1] . x + biases[k-1]
    (price per skipped block included); position[r]: the place in the order of the r-th routed block (graph order)."""
    weights: torch.Tensor  # [K, d]
    biases: torch.Tensor  # [K]
    position: list[int]
    scale: float  # prices beyond +-scale skip everything / nothing on the calibration features

    def depth(self, x: torch.Tensor) -> torch.Tensor:
        """Blocks of the order each row of features x [B, d] skips (what the prefill graph computes)."""
        cost = x.to(self.weights.dtype) @ self.weights.T + self.biases
        return torch.nn.functional.pad(cost, (1, 0)).argmin(1)

    def priced(self, price: float) -> "Routers":
        k = torch.arange(1, len(self.biases) + 1, dtype=self.biases.dtype)
        return Routers(self.weights, self.biases + price * k, self.position, self.scale)


def _call(ed: GraphEditor, target, args: tuple, before: torch.fx.Node, **kwargs) -> torch.fx.Node:
    """Insert target(*args, **kwargs) before `before`, with its fake value computed from the arguments'."""
    with ed.graph.inserting_before(before):
        node = ed.graph.call_function(target, args, kwargs)
    fake = (lambda a: a.meta["val"] if isinstance(a, torch.fx.Node) else
            [fake(x) for x in a] if isinstance(a, (list, tuple)) else a)
    mode = next(v.meta["val"].fake_mode for v in _nodes(args))
    with mode:
        node.meta["val"] = target(*[fake(a) for a in args], **kwargs)
    return node


def _nodes(args):
    out = []
    torch.fx.node.map_arg(args, out.append)
    return out


def add_routing(ep, routed: list[str], routers: Routers | None, mask_input: str | None,
                kv_outputs: dict[str, tuple[int, int]] | None = None):
    """The graph with routed blocks (paths) gated.

    routers given: decisions are computed in the graph (prefill) and returned as a last output `route`; None:
    decisions are read from a new last input `route` [B, R] (decode, verify). mask_input: the name of
    the [B, S] attention-mask input whose real tokens the mean runs over (None: every position). kv_outputs: block
    path -> positions of its layer's present key/value among the user outputs; a skipped layer's are zeroed (never
    read; and the If lowering then need not compute them).
    """
    from .feature_cache import _set_call_spec
    ed = GraphEditor(ep)
    names = {n.name: n for n in ed.graph.nodes}
    blocks = {b.path: b for b in find_blocks(ep)}
    order = [blocks[p] for p in routed]
    out_node = next(n for n in ed.graph.nodes if n.op == "output")
    placeholders = ed.placeholders()
    first = names[order[0].input.name]
    route_in = None
    if routers is None:
        last_ph = [n for n in ed.graph.nodes if n.op == "placeholder"][-1]
        ids = placeholders[ed.ep.graph_signature.user_inputs[0]]
        with ed.graph.inserting_after(last_ph):
            route_in = ed.graph.placeholder("route")
        with ids.meta["val"].fake_mode:
            route_in.meta["val"] = ids.meta["val"].new_empty((ids.meta["val"].shape[0], len(routed)),
                                                             dtype=torch.int64)
        ed.input_specs.append(InputSpec(InputKind.USER_INPUT, TensorArgument(route_in.name), None))
    else:
        # column 0 is depth 0 (skip nothing), which costs nothing
        w = torch.cat([torch.zeros(1, routers.weights.shape[1]), routers.weights.float()])
        w_node = ed.add_constant(w.T.contiguous(), "router_weight")  # [d, 1 + K]
        b_node = ed.add_constant(torch.cat([torch.zeros(1), routers.biases.float()]), "router_bias")  # [1 + K]
        if mask_input is not None:
            m = placeholders[mask_input]
            mf = _call(ed, aten._to_copy.default, (m,), first, dtype=torch.float32)
            m3 = _call(ed, aten.unsqueeze.default, (mf, -1), first)
            count = _call(ed, aten.sum.dim_IntList, (m3, [1]), first)  # [B, 1]
    decisions, replaced = [], {}
    for r, b in enumerate(order):
        x, out = names[b.input.name], names[b.output.name]
        x = replaced.get(x.name, x)  # the previous routed block's gated output
        inside = {n.name for n in b.nodes}
        anchor = out.next  # after the block's output
        if route_in is not None:
            col = _call(ed, aten.select.int, (route_in, 1, r), anchor)
        else:
            if r == 0:  # every router reads the stream entering the first routed block: no decision changes it
                if mask_input is not None:
                    xs = _call(ed, aten.mul.Tensor, (x, m3), anchor)
                    total = _call(ed, aten.sum.dim_IntList, (xs, [1]), anchor)
                    mean = _call(ed, aten.div.Tensor, (total, count), anchor)
                else:
                    mean = _call(ed, aten.mean.dim, (x, [1]), anchor)
                cost = _call(ed, aten.addmm.default, (b_node, mean, w_node), anchor)  # [B, 1 + K]
                depth = _call(ed, aten.argmin.default, (cost, 1), anchor)  # [B]
            keep = _call(ed, aten.le.Scalar, (depth, routers.position[r]), anchor)
            col = _call(ed, aten._to_copy.default, (keep,), anchor, dtype=torch.int64)
            decisions.append(col)
        gate = _call(ed, aten.view.default, (col, [-1, 1, 1]), anchor)
        gate_b = _call(ed, aten.ne.Scalar, (gate, 0), anchor)
        routed_out = _call(ed, aten.where.self, (gate_b, out, x), anchor)
        routed_out.meta["graphopt_route"] = {"block": b.path, "index": r}
        out.replace_all_uses_with(routed_out, delete_user_cb=lambda u: u.name not in inside and u is not routed_out)
        replaced[out.name] = routed_out
        if kv_outputs and b.path in kv_outputs:
            # computed next to the block's decision, so it exists before the block's If in the ONNX graph
            gate4 = _call(ed, aten.view.default, (col, [-1, 1, 1, 1]), anchor)
            gate_f = _call(ed, aten._to_copy.default, (gate4,), anchor, dtype=torch.float32)
            outs = list(out_node.args[0])
            n_other = len(outs) - len([s for s in ed.output_specs if s.kind == OutputKind.USER_OUTPUT])
            for pos in kv_outputs[b.path]:
                outs[n_other + pos] = _call(ed, aten.mul.Tensor, (outs[n_other + pos], gate_f), out_node)
            out_node.args = (tuple(outs),)
    if decisions:
        stacked = _call(ed, aten.stack.default, (decisions, 1), out_node)
        out_node.args = (tuple(list(out_node.args[0]) + [stacked]),)
        ed.output_specs.append(OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(stacked.name), None))
    new = ed.build()
    n_in = sum(s.kind == InputKind.USER_INPUT for s in new.graph_signature.input_specs)
    _set_call_spec(new, n_in, len(new.graph_signature.user_outputs))
    if route_in is not None and new.example_inputs is not None:
        args, kwargs = new.example_inputs
        B = args[0].shape[0]
        new._example_inputs = (tuple(args) + (torch.ones(B, len(routed), dtype=torch.int64),), kwargs)
    new._guards_code = []
    new._graphopt_no_guards = True
    return new


def _ridge_gcv(X: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Ridge regression of Y [n, K] on X [n, d] with an intercept, its strength chosen by generalized
    cross-validation (few sequences, many features: the penalty decides how far predictions may stray from the
    mean, i.e. from static skipping). Returns (W [K, d], c [K], strength relative to the mean feature variance)."""
    mu, ym = X.mean(0), Y.mean(0)
    Xc, Yc = X - mu, Y - ym
    n = X.shape[0]
    U, S, _ = torch.linalg.svd(Xc, full_matrices=False)
    unit = float((Xc * Xc).sum()) / X.shape[1] + 1e-12
    best = None
    for e in torch.arange(-4.0, 3.01, 0.25).tolist():
        lam = unit * 10.0 ** e
        h = S ** 2 / (S ** 2 + lam)
        fitted = (U * h) @ (U.T @ Yc)
        dof = float(h.sum()) + 1  # + the intercept
        gcv = float(((Yc - fitted) ** 2).sum()) / max(n - dof, 1e-6) ** 2
        if best is None or gcv < best[0]:
            best = (gcv, lam, e)
    lam = best[1]
    W = torch.linalg.solve(Xc.T @ Xc + lam * torch.eye(X.shape[1], dtype=X.dtype), Xc.T @ Yc).T  # [K, d]
    return W, ym - W @ mu, 10.0 ** best[2]


def train_routers(ep, blocks, candidates: list[int], order: list[int], sequences: list[torch.Tensor], rate: float,
                  progress=None, prompts: list[torch.Tensor] | None = None) -> tuple[Routers, dict]:
    """Depth routers for blocks[candidates] aiming at an average skip rate `rate` (of all blocks) over the sequences.

    Per calibration sequence and k, the rise in its LM loss when the first k blocks of `order` (least important
    first) are removed together; a ridge regression predicts that curve from the feature (the mean stream entering
    the first routed block); each sequence then skips the k that minimises predicted rise + price * k, the price set
    on the calibration features so that the average matches the target (calibrate_price fixes it on the graph's own
    decisions). With a weak predictor the ridge pulls every curve to the mean and the routers fall back to static
    skipping at that rate; only what the feature predicts moves a sequence off it. prompts (one per sequence, e.g.
    its first tokens): where the feature comes from, as the router sees only the prompt when it decides; the cost is
    always the whole sequence's. Returns (routers, report).
    """
    from .blocks import Record, skip_blocks
    from .causal_lm import sequence_inputs
    from .heal import SequenceLogits
    from .weight_quant import _flat_args
    first = blocks[min(candidates)]
    feats = []
    for ids in prompts or sequences:
        rec = Record(ep.graph_module, {first.input.name})
        with torch.no_grad():
            rec.run(*_flat_args(ep, {}, sequence_inputs(ep, ids)))
        feats.append(rec.values[first.input.name].float().mean(dim=1)[0])

    def seq_ce(fn, ids):
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(fn(ids)[0, :-1], ids[0, 1:]).item()
    K = len(order)
    cost = torch.zeros(len(sequences), K + 1, dtype=torch.float64)
    full = SequenceLogits(ep)
    base = [seq_ce(full, s) for s in sequences]
    ks = range(1, K + 1) if progress is None else progress.track(range(1, K + 1), "router costs", total=K)
    for k in ks:
        fn = SequenceLogits(skip_blocks(ep, {blocks[i].path for i in order[:k]}))
        cost[:, k] = torch.tensor([seq_ce(fn, s) - b for s, b in zip(sequences, base)], dtype=torch.float64)
    n = len(sequences)
    total = min(round(rate * len(blocks) * n), K * n)
    position = [order.index(i) for i in sorted(candidates)]  # graph order
    routers, report = fit_depth_routers(torch.stack(feats).double(), cost, total, position)
    return routers, {"order": [blocks[i].path for i in order], **report}


def fit_depth_routers(X: torch.Tensor, cost: torch.Tensor, total: int, position: list[int]) -> tuple[Routers, dict]:
    """Routers from features X [n, d] and loss rises cost [n, K + 1] (column k: the first k blocks of the order
    skipped; column 0 is 0) that skip `total` blocks over the n sequences: ridge-predicted cost curves, each
    sequence at the depth minimising predicted rise + price * depth, the price bisected to the total."""
    import heapq
    n, K = cost.shape[0], cost.shape[1] - 1
    # the oracle (true costs, the same budget): how much adapting could gain at all
    depth = [0] * n
    heap = [(float(cost[s, 1] - cost[s, 0]), s) for s in range(n)]
    heapq.heapify(heap)
    for _ in range(total):
        _, s = heapq.heappop(heap)
        depth[s] += 1
        if depth[s] < K:
            heapq.heappush(heap, (float(cost[s, depth[s] + 1] - cost[s, depth[s]]), s))
    W, c, strength = _ridge_gcv(X, cost[:, 1:])
    pred = X @ W.T + c  # [n, K]
    scale = 2 * float(pred.abs().max()) + 1e-3
    routers = Routers(W, c, position, scale)  # float64 here; the graph gets float32 constants

    def depths(price: float) -> torch.Tensor:
        return routers.priced(price).depth(X)
    lo, hi = -scale, scale
    for _ in range(50):  # the skip rate falls as the price rises
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(depths(mid).sum()) > total else (lo, mid)
    price = (lo + hi) / 2
    chosen = depths(price)
    resid = ((pred - cost[:, 1:]) ** 2).sum(0)
    spread = ((cost[:, 1:] - cost[:, 1:].mean(0)) ** 2).sum(0).clamp_min(1e-12)
    static_k = round(total / n)
    report = {"oracle_mean_depth": round(sum(depth) / n, 3),
              "oracle_mean_cost": round(float(sum(cost[s, depth[s]] for s in range(n)) / n), 5),
              "routed_mean_cost": round(float(cost[torch.arange(n), chosen].mean()), 5),
              "routed_mean_depth": round(float(chosen.double().mean()), 3),
              "static_mean_cost": round(float(cost[:, static_k].mean()), 5),
              "train_r2": [round(1 - float(r / v), 3) for r, v in zip(resid, spread)],
              "ridge_strength": round(strength, 4), "sequences": n}
    return routers.priced(price), report


def calibrate_price(ep, routed: list[str], routers: Routers, mask_input, sequences, target: float,
                    n_blocks: int, steps: int = 16) -> tuple[Routers, float, float]:
    """Routers re-priced so the routed graph itself skips `target` of all blocks on the calibration sequences.

    train_routers sets the price on its own features in float64; bisecting a further change of price on the graph's
    real decisions makes the calibration skip rate the requested one (ties and float32 may move a few sequences)."""
    from .causal_lm import sequence_inputs

    def rate(delta: float) -> float:
        module = add_routing(ep, routed, routers.priced(delta), mask_input).module()
        skipped = 0
        with torch.no_grad():
            for ids in sequences:
                route = module(*sequence_inputs(ep, ids))[-1]
                skipped += int((route == 0).sum())
        return skipped / (n_blocks * sum(s.shape[0] for s in sequences))
    r0 = rate(0.0)
    best = (abs(r0 - target), 0.0, r0)
    if best[0] > 0.5 / (n_blocks * sum(s.shape[0] for s in sequences)):
        lo, hi = -routers.scale, routers.scale  # rate(lo) high (everything skipped), rate(hi) low
        for _ in range(steps):
            mid = (lo + hi) / 2
            r = rate(mid)
            best = min(best, (abs(r - target), mid, r))
            if r > target:
                lo = mid
            else:
                hi = mid
    return routers.priced(best[1]), best[1], best[2]
