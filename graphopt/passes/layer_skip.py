from __future__ import annotations

import torch

from ..compiler.blocks import Record, find_blocks, skip_blocks  # noqa: F401  (skip_blocks: used by callers)
from ..compiler.graph_edit import drop_user_io
from ..errors import GraphoptError
from .base import Option, Pass, register


def block_influence(ep, blocks, inputs: list[tuple]) -> list[float]:
    """ShortGPT's block influence, 1 − cos(x_in, x_out) averaged over tokens and calibration inputs: how much a block
    turns the residual stream. Low influence = a candidate for skipping."""
    from ..compiler.weight_quant import _flat_args
    watch = {b.input.name for b in blocks} | {b.output.name for b in blocks}
    sums = [0.0] * len(blocks)
    for x in inputs:
        rec = Record(ep.graph_module, watch)
        with torch.no_grad():
            rec.run(*_flat_args(ep, {}, x))
        for k, b in enumerate(blocks):
            a, o = rec.values[b.input.name].float(), rec.values[b.output.name].float()
            cos = torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]), o.reshape(-1, o.shape[-1]), dim=-1)
            sums[k] += float((1 - cos).mean())
    return [s / len(inputs) for s in sums]


@register
class LayerSkip(Pass):
    """Layer skipping: static (block influence or loss, optional healing), per-sequence routers, or a drafter."""
    name = "layer-skip"
    exact = False
    metric = "rel_l2"
    # Skipping blocks changes outputs by design (a skipped layer's zeroed cache is exactly rel_l2 1): the guard only
    # catches broken graphs (NaN, inf, blow-ups); quality is measured by bits/byte in the benchmarks.
    tolerance = 10.0
    adds_outputs = True  # mode=router: prefill also returns its routing decisions
    needs = frozenset({"calibration"})
    options = {
        "mode": Option(str, "static", "static: the same blocks for every input; router: per-block routers decide "
                       "once per sequence at prefill (FiRST)", choices=("static", "router")),
        "rate": Option(float, 0.25, "router: target average fraction of blocks skipped", min=0.0, max=1.0),
        "prompt_tokens": Option(int, 64, "router: train and calibrate on the first this many tokens of each "
                                "calibration sequence, as the router sees only a prompt when it decides (0: the "
                                "whole sequence)", min=0, max=1 << 20),
        "onnx": Option(str, "if", "router: ONNX lowering of a routed block: if (an If node, a skipped block is not "
                       "computed) or where (the block always runs, its result is selected)", choices=("if", "where")),
        "skip": Option(int, 0, "number of blocks to skip (or give speedup)", min=0, max=1000),
        "speedup": Option(float, 0.0, "target speed-up from skipping: skip round(N·(1 − 1/speedup)) blocks",
                          min=0.0, max=100.0),
        "keep_ends": Option(bool, True, "never skip the first and the last block"),
        "select": Option(str, "influence", "influence: lowest ShortGPT block influence; loss: greedily the block "
                         "whose removal raises the calibration LM loss least (causal LMs)",
                         choices=("influence", "loss")),
        "heal": Option(bool, False, "tune the remaining norm weights/biases to the original model's outputs on "
                       "the calibration data (causal LMs)"),
        "heal_steps": Option(int, 200, "optimizer steps for heal", min=1, max=100000),
        "self_speculative": Option(bool, False, "keep the full methods and add the skipped ones as a drafter "
                                   "(graphopt run --self-speculative)"),
        "draft_length": Option(int, 3, "self-speculative: tokens drafted per verify step (zoo LM, 4 of 8 blocks "
                               "skipped: 3 beat 2, 4 and 5)", min=1, max=32),
        "confidence": Option(float, 0.5, "self-speculative sampling: stop drafting when the drafter's top "
                             "probability falls below this (greedy steps always draft draft_length tokens, in one "
                             "call)", min=0.0, max=1.0),
    }

    @classmethod
    def methods_needed(cls, config):
        return frozenset({"verify"}) if config["self_speculative"] else frozenset()

    @classmethod
    def headline(cls, details) -> str:
        if details.get("mode") == "router":
            return f"routers on {len(details['routed'])} blocks"
        return f"{len(details['skipped'])} of {details['blocks']} blocks skipped"

    def run(self, program, ctx):
        c = self.config
        if c["mode"] == "router":
            return _router_pass(c, program, ctx)
        if bool(c["skip"]) == bool(c["speedup"]):
            raise GraphoptError("layer-skip: give exactly one of skip=N or speedup=X (> 1)")
        method, inputs = program.calibration_inputs(ctx.calibration, 16)
        ep = program.methods[method]
        blocks = find_blocks(ep)
        if len(blocks) < 2:
            raise GraphoptError("layer-skip: found no repeated blocks (it looks for numbered modules of one class, "
                                "such as model.layers.N, in the graph's module metadata)")
        n = len(blocks)
        if c["speedup"]:
            if c["speedup"] <= 1:
                raise GraphoptError(f"layer-skip: speedup must be > 1, got {c['speedup']}")
            k = round(n * (1 - 1 / c["speedup"]))
        else:
            k = c["skip"]
        candidates = list(range(1, n - 1)) if c["keep_ends"] else list(range(n))
        if not 1 <= k <= len(candidates):
            raise GraphoptError(f"layer-skip: can skip 1..{len(candidates)} of the {n} blocks "
                                f"({'first and last kept' if c['keep_ends'] else 'all candidates'}), asked for {k}")
        influence = block_influence(ep, blocks, inputs)
        from ..compiler.draft_heads import find_lm_head
        try:
            find_lm_head(ep)
            is_lm = True
        except GraphoptError:
            is_lm = False
        if (c["select"] == "loss" or c["heal"]) and not is_lm:
            raise GraphoptError("layer-skip: select=loss and heal=true need a language model (its first output "
                                "computed by an LM head from the hidden state)")
        details: dict = {}
        sequences = [item[0] for item in ctx.calibration[:16]] if is_lm else []
        if c["select"] == "loss":
            chosen, details["loss_search"] = _greedy_by_loss(ep, blocks, candidates, k, sequences[:8], ctx)
        else:
            chosen = sorted(sorted(candidates, key=lambda i: influence[i])[:k])
        paths = {blocks[i].path for i in chosen}
        with_blocks = set()  # methods without the model's blocks (draft heads) are left as they are
        all_paths = {b.path for b in blocks}
        for name, m_ep in program.methods.items():
            found = {b.path for b in find_blocks(m_ep)} & all_paths
            if found and not paths <= found:
                raise GraphoptError(f"layer-skip: method '{name}' lacks blocks {sorted(paths - found)}")
            if found:
                with_blocks.add(name)
        skipped_lm = None  # the skipped program that heal tunes and the report scores
        if c["self_speculative"]:
            plan = program.plan
            if plan.get("kind") != "causal-lm" or plan.get("verify") not in program.methods:
                raise GraphoptError("layer-skip{self_speculative=true} needs a causal-lm program (--task causal-lm)")
            n_layers = plan["num_layers"]
            if len(blocks) != n_layers:
                raise GraphoptError(f"layer-skip: found {len(blocks)} blocks but the KV cache has {n_layers} layers")
            # The drafter reads the full model's cache of the layers it runs (compiler/draft_verify.py): drop the
            # cache inputs/outputs of the layers it skips, and with them the K/V projections that skip_blocks keeps
            # for the full program's signature.
            kv_drop = {1 + 2 * i + j for i in chosen for j in (0, 1)}
            kept_out = [o for o in range(1 + 2 * n_layers) if o not in kv_drop]
            m = plan["decode"]
            n_out = len(program.output_names[m])
            drop_out = kv_drop | set(range(1 + 2 * n_layers, n_out))  # extra outputs (hidden states) too
            drop_in = {2 + o for o in kv_drop}
            program.methods["draft_decode"] = drop_user_io(skip_blocks(program.methods[m], paths), drop_in, drop_out)
            program.inputs["draft_decode"] = [s for i, s in enumerate(program.inputs[m]) if i not in drop_in]
            ex = program.example_inputs[m]
            program.example_inputs["draft_decode"] = tuple(x for i, x in enumerate(ex) if i not in drop_in)
            program.output_names["draft_decode"] = [program.output_names[m][o] for o in kept_out]
            plan["self_speculative"] = {"decode": "draft_decode", "fused": "draft_verify", "skipped": sorted(paths),
                                        "kv_index": [o - 1 for o in kept_out[1:]],
                                        "draft_length": c["draft_length"], "confidence": c["confidence"]}
            if is_lm:
                skipped_lm = skip_blocks(program.methods[plan["prefill"]], paths)
        else:
            program.methods = {name: skip_blocks(m_ep, paths) if name in with_blocks else m_ep
                               for name, m_ep in program.methods.items()}
            if is_lm:
                skipped_lm = program.methods[method]
        if is_lm:
            from ..compiler.heal import heal, mean_ce, with_parameters
            details["calib_ce_full"] = round(mean_ce(ep, sequences), 5)
            details["calib_ce_skipped"] = round(mean_ce(skipped_lm, sequences), 5)
            if c["heal"]:
                values, details["heal"] = heal(skipped_lm, ep, sequences, c["heal_steps"], seed=ctx.seed,
                                               progress=ctx.progress)
                # self-speculative: only the drafter is healed; the verifier stays the original model
                targets = ["draft_decode"] if c["self_speculative"] else list(program.methods)
                for m in targets:
                    program.methods[m] = with_parameters(program.methods[m], values)
                if values:
                    details["calib_ce_healed"] = round(mean_ce(with_parameters(skipped_lm, values), sequences), 5)
        if c["self_speculative"]:
            from ..compiler.draft_verify import build_draft_verify
            plan, m = program.plan, program.plan["decode"]
            with ctx.progress.stage("layer-skip draft_verify"):
                program.methods["draft_verify"] = build_draft_verify(
                    program.methods["draft_decode"], program.methods[plan["verify"]],
                    plan["self_speculative"]["kv_index"], program.example_inputs[m], c["draft_length"])
            program.inputs["draft_verify"] = list(program.inputs[m])
            program.example_inputs["draft_verify"] = program.example_inputs[m]
            program.output_names["draft_verify"] = ["tokens", "predicted"] + \
                list(program.output_names[plan["verify"]][1:1 + 2 * plan["num_layers"]])
        return program, {**details, "blocks": n, "skipped": [blocks[i].path for i in chosen],
                         "influence": {b.path: round(v, 5) for b, v in zip(blocks, influence)}}


def _greedy_by_loss(ep, blocks, candidates: list[int], k: int, sequences, ctx):
    """Remove blocks one at a time, each time the one whose removal (with those already chosen) gives the lowest
    calibration cross-entropy."""
    from ..compiler.heal import mean_ce
    chosen, trace = [], []
    for _ in ctx.progress.track(range(k), "layer-skip loss search", total=k):
        scores = {}
        for i in candidates:
            if i in chosen:
                continue
            scores[i] = mean_ce(skip_blocks(ep, {blocks[j].path for j in chosen + [i]}), sequences)
        best = min(scores, key=scores.get)
        chosen.append(best)
        trace.append({"block": blocks[best].path, "ce": round(scores[best], 5)})
    return sorted(chosen), trace


def _router_pass(c: dict, program, ctx):
    """mode=router: train per-block routers on the calibration sequences and gate the routed blocks."""
    from ..compiler.program import TensorSpec
    from ..compiler.causal_lm import sequence_inputs
    from ..compiler.routing import add_routing, calibrate_price, train_routers
    if c["self_speculative"] or c["heal"] or c["skip"] or c["speedup"]:
        raise GraphoptError("layer-skip{mode=router}: give rate=..., not skip/speedup/heal/self_speculative")
    method, _ = program.calibration_inputs(ctx.calibration, 1)
    ep = program.methods[method]
    blocks = find_blocks(ep)
    if len(blocks) < 3:
        raise GraphoptError("layer-skip{mode=router}: found fewer than 3 repeated blocks")
    candidates = list(range(1, len(blocks) - 1)) if c["keep_ends"] else list(range(len(blocks)))
    sequences = [item[0] for item in ctx.calibration]
    if len(sequences) < 16:
        ctx.progress.info(f"layer-skip{{mode=router}}: only {len(sequences)} calibration sequences train the "
                          f"routers (one decision per sequence); 64 or more give steadier routers")
    # skip order: least influential first (the static choice), then adaptive depth per sequence
    influence = block_influence(ep, blocks, [sequence_inputs(ep, s) for s in sequences[:16]])
    order = sorted(candidates, key=lambda i: influence[i])
    prompts = [s[:, :c["prompt_tokens"]] if c["prompt_tokens"] else s for s in sequences]
    routers, report = train_routers(ep, blocks, candidates, order, sequences, c["rate"], ctx.progress, prompts)
    routed = [blocks[i].path for i in candidates]
    plan = program.plan
    lm = plan.get("kind") == "causal-lm"
    with ctx.progress.stage("router price"):
        routers, offset, achieved = calibrate_price(ep, routed, routers, "attention_mask" if lm else None, prompts,
                                                    c["rate"], len(blocks))
    report.update(price_correction=round(offset, 6), calib_skip_rate_in_graph=round(achieved, 4))
    kv = {blocks[i].path: (1 + 2 * i, 2 + 2 * i) for i in candidates} if lm else None
    for name in list(program.methods):
        m_ep = program.methods[name]
        if name == method:
            program.methods[name] = add_routing(m_ep, routed, routers, "attention_mask" if lm else None, kv)
            program.output_names.setdefault(name, [s.name for s in program.output_specs(name)][:-1])
            program.output_names[name] = list(program.output_names[name]) + ["route"]
        elif lm and set(routed) <= {blk.path for blk in find_blocks(m_ep)}:  # not the draft heads
            program.methods[name] = add_routing(m_ep, routed, None, None, kv)
            program.inputs[name] = list(program.inputs[name]) + [TensorSpec("route", "int64", ["B", len(routed)])]
            ex = program.example_inputs[name]
            program.example_inputs[name] = tuple(ex) + (torch.ones(ex[0].shape[0], len(routed), dtype=torch.int64),)
    plan["routing"] = {"blocks": routed, "output": "route", "input": "route", "rate": c["rate"],
                       "decided_by": method, "onnx": c["onnx"]}
    return program, {"mode": "router", "routed": routed, **report}


