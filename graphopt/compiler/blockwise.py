"""decoupleQ's block-wise stage: per repeated block, tune only the float parts to match the full-precision block.

After the layer-wise solve, each block (the modules under a numbered path such as `model.layers.3`) is taken in
order. Its input comes from the program with every earlier block already quantized and tuned; its target is the
same block in full precision on that input. The integer codes stay fixed; the scales, zeros and the block's 1-D
parameters (norm weights, biases) are tuned by Adam on the mean squared error, parametrised relative to their
layer-wise values (s = s0·(1 + a), z = z0 + s0·b, p = p0·(1 + c)) so one learning rate suits every layer. A block's
update is kept only if its loss on held-out calibration sequences (a quarter of them) falls; with fewer than 4
sequences there is no held-out set and the check is on the tuning sequences themselves (the report says so).

The program and calibration inputs may be on a GPU (weight_quant.program_on); the returned results and parameters
are on the CPU. The graph is run by an fx Interpreter that starts from the block's cached inputs (every value that
does not depend on the block's parameters) and stops at the block's last node, so each step costs one block, not
the whole prefix.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict

import torch

from .quantize import QuantResult
from .weight_quant import LinearSite, _flat_args, _param_targets, as_stored


def block_key(target: str) -> str | None:
    """`model.layers.3` for `model.layers.3.mlp.up_proj.weight`: the path up to the first numbered module."""
    parts = target.split(".")
    for i, p in enumerate(parts[:-1]):
        if p.isdigit():
            return ".".join(parts[:i + 1])
    return None


class _BlockRunner(torch.fx.Interpreter):
    """Runs the graph from `initial_env` until `stop` has run; returns that node's value."""

    class _Done(Exception):
        pass

    def __init__(self, gm, stop: torch.fx.Node, record: set[torch.fx.Node] | None = None):
        super().__init__(gm)
        self.extra_traceback = False
        self.stop, self.record, self.recorded, self.value = stop, record or set(), {}, None

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.record:
            self.recorded[n] = out
        if n is self.stop:
            self.value = out
            raise self._Done
        return out

    def run_block(self, args: list, env: dict | None = None):
        try:
            self.run(*args, initial_env=env)
        except self._Done:
            pass
        return self.value


def _depends_on(graph: torch.fx.Graph, sources: set[torch.fx.Node]) -> set[torch.fx.Node]:
    dep = set(sources)
    for n in graph.nodes:
        if n not in dep and any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    return dep


def tune_blocks(ep, sites: list[LinearSite], results: dict[str, QuantResult], calibration: list[tuple], *,
                steps: int, lr: float = 1e-3, progress=None, label: str = "blockwise", int_zero: bool = False
                ) -> tuple[
                    dict[str, QuantResult], dict[str, torch.Tensor], dict]:
    """Returns (results with tuned scales/zeros, tuned 1-D parameters by state-dict name, report).
    int_zero: the zeros are integer multiples of the scales (zero="int") and stay so: each zero scales with its
    scale instead of moving on its own."""
    gm = ep.graph_module
    graph = gm.graph
    params = _param_targets(ep)  # placeholder name -> target
    placeholder = {params[n.name]: n for n in graph.nodes if n.op == "placeholder" and n.name in params}
    blocks: "OrderedDict[str, list[LinearSite]]" = OrderedDict()
    for s in sites:
        key = block_key(s.weight)
        if key is not None and s.weight in results:
            blocks.setdefault(key, []).append(s)
    last_node = {}
    for n in graph.nodes:
        for path, _ in (n.meta.get("nn_module_stack") or {}).values():
            last_node[path] = n
    # With 4+ sequences, a quarter is held out to decide whether a block's update is kept (tuning only the float
    # parts still overfits a few thousand calibration tokens at high learning rates).
    n = len(calibration)
    held_out = list(range(n - n // 4, n)) if n >= 4 else list(range(n))
    train = [i for i in range(n) if i not in held_out] or held_out
    results = dict(results)
    tuned_params: dict[str, torch.Tensor] = {}
    # Weights the prefix runs with: quantized (and tuned) so far; the rest in full precision.
    current: dict[str, torch.Tensor] = {}
    report: dict = {"blocks": {}, "steps": steps, "held_out_sequences": len(held_out) if len(calibration) >= 4 else 0}
    items = list(blocks.items())
    iterator = progress.track(items, f"{label}: blocks") if progress is not None else items
    for key, members in iterator:
        stop = last_node.get(key)
        if stop is None:
            report["blocks"][key] = "skipped: no graph node carries this module path"
            continue
        quant_targets = [s.weight for s in members]
        float_targets = [t for t in placeholder if t.startswith(key + ".") and t not in quant_targets
                         and ep.state_dict[t].dim() == 1 and ep.state_dict[t].is_floating_point()]
        sources = {placeholder[t] for t in quant_targets + float_targets}
        dependent = _depends_on(graph, sources)
        order = {n: i for i, n in enumerate(graph.nodes)}
        cached = {n for n in graph.nodes if n.op != "placeholder" and n not in dependent
                  and order[n] < order[stop]}
        frontier = {a for n in dependent for a in n.all_input_nodes if a in cached}

        # Cache the block's inputs (quantized prefix) and its full-precision output on them.
        envs, targets = [], []
        with torch.no_grad():
            for inputs in calibration:
                runner = _BlockRunner(gm, stop, record=frontier)
                target = runner.run_block(_flat_args(ep, current, inputs))
                envs.append({n: runner.recorded.get(n) for n in cached})
                targets.append(target.detach())

        device = ep.state_dict[quant_targets[0]].device
        base = {t: dataclasses.replace(results[t], w_int=results[t].w_int.to(device),
                                       scale=results[t].scale.to(device), zero=results[t].zero.to(device))
                for t in quant_targets}
        a = {t: torch.zeros_like(base[t].scale, requires_grad=True) for t in quant_targets}
        b = {t: torch.zeros_like(base[t].zero, requires_grad=True) for t in quant_targets}
        c = {t: torch.zeros_like(ep.state_dict[t], dtype=torch.float32, requires_grad=True) for t in float_targets}
        in_features = {s.weight: s.in_features for s in members}

        def scale_zero(t: str) -> tuple[torch.Tensor, torch.Tensor]:
            r = base[t]
            return r.scale * (1 + a[t]), r.zero * (1 + a[t]) if int_zero else r.zero + r.scale * b[t]

        def weights_now() -> dict[str, torch.Tensor]:
            w = {}
            for t in quant_targets:
                s, z = (v.repeat_interleave(base[t].group, dim=1) for v in scale_zero(t))
                # tuned in float32, run in the program's dtype (gradients pass the cast)
                w[t] = (s * base[t].w_int.float() + z)[:, :in_features[t]].to(ep.state_dict[t].dtype)
            for t in float_targets:
                p0 = ep.state_dict[t]
                w[t] = (p0.float() * (1 + c[t])).to(p0.dtype)
            return w

        def loss_on(i: int, w: dict[str, torch.Tensor]) -> torch.Tensor:
            out = _BlockRunner(gm, stop).run_block(_flat_args(ep, {**current, **w}, calibration[i]), dict(envs[i]))
            return ((out.float() - targets[i].float()) ** 2).mean() / (targets[i].float() ** 2).mean()

        def total_loss(indices: list[int]) -> float:
            with torch.no_grad():
                w = weights_now()
                return sum(float(loss_on(i, w)) for i in indices) / len(indices)

        before = total_loss(held_out)
        opt = torch.optim.Adam([*a.values(), *([] if int_zero else b.values()), *c.values()], lr=lr)
        with torch.enable_grad():
            for step in range(steps):
                opt.zero_grad()
                loss = loss_on(train[step % len(train)], weights_now())
                loss.backward()
                opt.step()
        after = total_loss(held_out)
        kept = after < before
        report["blocks"][key] = {"heldout_loss_before": before, "heldout_loss_after": after, "kept": kept,
                                 "tuned": len(quant_targets) + len(float_targets)}
        with torch.no_grad():
            if kept:
                for t in quant_targets:
                    s, z = scale_zero(t)
                    results[t] = dataclasses.replace(results[t], scale=s.detach().cpu(), zero=z.detach().cpu(),
                                                     loss=None)
                for t in float_targets:
                    p0 = ep.state_dict[t]
                    tuned_params[t] = (p0.float() * (1 + c[t])).to(p0.dtype).detach()
            for t in quant_targets:
                current[t] = as_stored(results[t], ep.state_dict[t].dtype)[:, :in_features[t]].contiguous() \
                    .to(device)
            for t in float_targets:
                if t in tuned_params:
                    current[t] = tuned_params[t]
    return results, {t: p.cpu() for t, p in tuned_params.items()}, report
