"""Input-adaptive block routing (FiRST): per-block routers decide once per sequence, at prefill, which blocks run.

Every router reads the mean (over the prompt's real tokens) of the residual stream entering the first routed block
(a feature no routing decision changes) and router i keeps its block when w_i . mean + b_i > 0. The prefill graph computes the decisions block by block and returns them as `route`
[B, R] (int64, 1 = run); decode (and verify) take `route` as an input and apply the same decisions to every new
token, so a skipped layer is skipped for the whole sequence and its cache is never read. In the graph a routed
block's output becomes where(keep, block(x), x); lowering to ONNX can then put the block inside an If node
(compiler/onnx_if.py) so that a skipped block is not computed at all.
"""
from __future__ import annotations

import torch
from torch.export.graph_signature import InputKind, InputSpec, OutputKind, OutputSpec, TensorArgument

from .blocks import find_blocks
from .graph_edit import GraphEditor

aten = torch.ops.aten


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


def add_routing(ep, routed: list[str], weights: torch.Tensor | None, biases: torch.Tensor | None,
                mask_input: str | None, kv_outputs: dict[str, tuple[int, int]] | None = None):
    """The graph with routed blocks (paths) gated.

    weights [R, d] / biases [R] given: decisions are computed in the graph (prefill) and returned as a last output
    `route`; None: decisions are read from a new last input `route` [B, R] (decode, verify). mask_input: the name of
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
    if weights is None:
        last_ph = [n for n in ed.graph.nodes if n.op == "placeholder"][-1]
        ids = placeholders[ed.ep.graph_signature.user_inputs[0]]
        with ed.graph.inserting_after(last_ph):
            route_in = ed.graph.placeholder("route")
        with ids.meta["val"].fake_mode:
            route_in.meta["val"] = ids.meta["val"].new_empty((ids.meta["val"].shape[0], len(routed)),
                                                             dtype=torch.int64)
        ed.input_specs.append(InputSpec(InputKind.USER_INPUT, TensorArgument(route_in.name), None))
    else:
        w_node = ed.add_constant(weights.float(), "router_weight")
        b_node = ed.add_constant(biases.float(), "router_bias")
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
            wr = _call(ed, aten.select.int, (w_node, 0, r), anchor)
            br = _call(ed, aten.select.int, (b_node, 0, r), anchor)
            score = _call(ed, aten.add.Tensor, (_call(ed, aten.mv.default, (mean, wr), anchor), br), anchor)
            keep = _call(ed, aten.gt.Scalar, (score, 0.0), anchor)
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


def train_routers(ep, blocks, candidates: list[int], order: list[int], sequences: list[torch.Tensor], rate: float,
                  progress=None, prompts: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Routers for blocks[candidates] aiming at an average skip rate `rate` (of all blocks) over the sequences.

    Adaptive depth: blocks are skipped in a fixed order (`order`, least important first), and each sequence gets
    its own number of skipped blocks. Per calibration sequence and k, the rise in its LM loss when the first k
    blocks of the order are removed together; the oracle gives each next skip to the sequence where it costs
    least until the target total; a ridge regression predicts the oracle's k from the feature (the mean stream
    entering the first routed block), and per-block thresholds on that prediction reproduce the oracle's share of
    sequences skipping each block. prompts (one per sequence, e.g. its first tokens): where the feature comes from,
    as the router sees only the prompt when it decides; the cost is always the whole sequence's. Returns
    (weights [R, d], biases [R], report), routers in graph order: keep block when w.x + b > 0.
    """
    import heapq

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
    cost = torch.zeros(len(sequences), K + 1)
    full = SequenceLogits(ep)
    base = [seq_ce(full, s) for s in sequences]
    ks = range(1, K + 1) if progress is None else progress.track(range(1, K + 1), "router costs", total=K)
    for k in ks:
        fn = SequenceLogits(skip_blocks(ep, {blocks[i].path for i in order[:k]}))
        cost[:, k] = torch.tensor([seq_ce(fn, s) - b for s, b in zip(sequences, base)])
    n = len(sequences)
    total = min(round(rate * len(blocks) * n), K * n)
    depth = [0] * n
    heap = [(float(cost[s, 1] - cost[s, 0]), s) for s in range(n)]
    heapq.heapify(heap)
    for _ in range(total):
        _, s = heapq.heappop(heap)
        depth[s] += 1
        if depth[s] < K:
            heapq.heappush(heap, (float(cost[s, depth[s] + 1] - cost[s, depth[s]]), s))
    X = torch.stack(feats).double()
    mu = X.mean(0)
    Xc = X - mu
    y = torch.tensor(depth, dtype=torch.float64)
    lam = float((Xc * Xc).sum()) / X.shape[1] + 1e-9  # strong ridge: few sequences, d features
    w = torch.linalg.solve(Xc.T @ Xc + lam * torch.eye(X.shape[1], dtype=torch.float64), Xc.T @ (y - y.mean()))
    pred = Xc @ w + y.mean()
    ranked = pred.sort(descending=True).values
    W, B = [], []
    for i in sorted(candidates):  # graph order
        j = order.index(i)  # skipped when the predicted depth reaches j + 1
        share = sum(d > j for d in depth)
        if share == 0:
            tau = float(ranked[0]) + 1.0
        elif share >= n:
            tau = float(ranked[-1]) - 1.0
        else:
            tau = float(ranked[share - 1] + ranked[share]) / 2
        # skip when pred > tau  <=>  keep when tau - pred >= 0: weights -w, bias tau - (y.mean - mu.w)
        W.append(-w)
        B.append(tau - (float(y.mean()) - float(mu @ w)))
    oracle = float(sum(cost[s, depth[s]] for s in range(n)) / n)
    static_k = round(total / n)
    report = {"order": [blocks[i].path for i in order], "oracle_mean_depth": round(sum(depth) / n, 3),
              "oracle_mean_cost": round(oracle, 5),
              "static_mean_cost": round(float(cost[:, static_k].mean()), 5),
              "train_r2": round(1 - float(((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum().clamp_min(1e-12)),
                                3),
              "sequences": n}
    return torch.stack(W).float(), torch.tensor(B, dtype=torch.float32), report


def calibrate_offset(ep, routed: list[str], weights, biases, mask_input, sequences, target: float,
                     n_blocks: int, steps: int = 14) -> tuple[torch.Tensor, float, float]:
    """Biases shifted so the routed graph itself skips `target` of all blocks on the calibration sequences.

    The thresholds come from the regression's fitted values, which differ from the oracle's depths; bisecting one
    offset on the graph's real decisions makes the calibration skip rate the requested one."""
    from .causal_lm import sequence_inputs

    def rate(delta: float) -> float:
        module = add_routing(ep, routed, weights, biases + delta, mask_input).module()
        skipped = 0
        with torch.no_grad():
            for ids in sequences:
                route = module(*sequence_inputs(ep, ids))[-1]
                skipped += int((route == 0).sum())
        return skipped / (n_blocks * sum(s.shape[0] for s in sequences))
    scale = float(biases.abs().max()) + float(weights.abs().sum(1).max()) + 1.0
    lo, hi = -scale, scale  # rate(lo) high (everything skipped), rate(hi) low
    r0 = rate(0.0)
    best = (abs(r0 - target), 0.0, r0)
    for _ in range(steps):
        mid = (lo + hi) / 2
        r = rate(mid)
        best = min(best, (abs(r - target), mid, r))
        if r > target:
            lo = mid
        else:
            hi = mid
    return biases + best[1], best[1], best[2]
