"""Self-distillation of a bundle's draft heads (`graphopt train-heads OUT`), then the candidate tree.

Data: prompts (the zoo LM: code from its training split; else --data) continued greedily by the bundle itself, so
the heads learn the base model's own outputs: for the hidden state at position t, head k's target is the base
model's prediction at position t+k+1 (medusa: its argmax, loss sum_k 0.8^k CE; hydra: its distribution, soft
cross-entropy). The base model is frozen: its hidden states are computed once.

Tree (`tree=auto`): each head's top-i accuracy on held-out positions gives every candidate path an expected
acceptance (the product along it); nodes are added greedily by that value, and the size is the one that maximises
expected tokens per verify call over the measured time of a verify call of that size.
"""
from __future__ import annotations

import heapq
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..errors import GraphoptError
from . import bundle
from .draft_heads import export_draft, find_lm_head, heads_from_state

TREE_SIZES = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def _load_data(engine, data, n_prompts: int, seed: int) -> list[torch.Tensor]:
    """Prompt token ids: the zoo LM's training split, or --data (a .txt for byte-tokenizer bundles, one prompt
    per blank-line-separated paragraph; or a torch.save'd list of 1-D id tensors, read with weights_only)."""
    source = engine.manifest.get("source", {}).get("spec", "")
    if data is None:
        if source != "zoo:tiny-code-lm":
            raise GraphoptError("train-heads needs --data FILE (.txt or a .pt list of token-id tensors) for bundles "
                                "not compiled from zoo:tiny-code-lm")
        from ..zoo import byte_tokenizer
        from ..zoo.code_data import split_prompts
        tok = byte_tokenizer()
        return [torch.tensor(tok.encode(p)) for p in split_prompts("train", n_prompts, seed=seed)]
    path = Path(data)
    if not path.is_file():
        raise GraphoptError(f"--data '{path}' not found: give a .txt file or a torch.save'd list of id tensors")
    if path.suffix == ".txt":
        if not source.startswith("zoo:"):
            raise GraphoptError(f"--data '{path}': text needs a tokenizer; give token ids as a .pt list instead")
        from ..zoo import byte_tokenizer
        tok = byte_tokenizer()
        parts = [p for p in path.read_text("utf-8", errors="replace").split("\n\n") if p.strip()]
        prompts = [torch.tensor(tok.encode(p[-160:])) for p in parts]
    else:
        try:
            prompts = torch.load(path, weights_only=True)
        except Exception as e:
            raise GraphoptError(f"--data '{path}' could not be read as a torch.save'd list of tensors "
                                f"({type(e).__name__})")
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, torch.Tensor) and p.dim() == 1
                                                              for p in prompts):
            raise GraphoptError(f"--data '{path}' must hold a list of 1-D token-id tensors")
        prompts = [p.long() for p in prompts]
    vocab = engine.plan["vocab_size"]
    prompts = [p for p in prompts if len(p) > 0]
    if len(prompts) < 8:
        raise GraphoptError(f"--data '{path}': {len(prompts)} prompts; train-heads needs at least 8")
    for p in prompts:
        if int(p.min()) < 0 or int(p.max()) >= vocab:
            raise GraphoptError(f"--data '{path}': token ids outside the vocabulary 0..{vocab - 1}")
    return prompts[:n_prompts]


def _self_distill(engine, prompts: list[torch.Tensor], new_tokens: int, progress) -> list[torch.Tensor]:
    """Each prompt followed by the bundle's own greedy continuation (batched, prompts left-padded)."""
    pad = engine.plan.get("pad_token_id") or 0
    seqs = []
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths batch with little padding
    batches = [order[i:i + 16] for i in range(0, len(order), 16)]
    for group in progress.track(batches, "self-distillation data"):
        S = max(len(prompts[i]) for i in group)
        ids = torch.full((len(group), S), pad, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for b, i in enumerate(group):
            ids[b, S - len(prompts[i]):] = prompts[i]
            mask[b, S - len(prompts[i]):] = 1
        new = engine.generate(ids, new_tokens, attention_mask=mask, eos_token_id=[])
        for b, i in enumerate(group):
            seqs.append(torch.cat([prompts[i], new[b]]))
    return seqs


def _hidden_and_logits(engine, seqs, weight, bias, progress):
    prefill = engine.method(engine.plan["prefill"])._run
    n_kv = 2 * engine.plan["num_layers"]
    hs, logits = [], []
    for s in progress.track(seqs, "base hidden states"):
        S = len(s)
        out = prefill([s[None], torch.ones(1, S, dtype=torch.int64), torch.arange(S)[None]])
        h = out[1 + n_kv][0].float()
        hs.append(h)
        logits.append(torch.nn.functional.linear(h, weight, bias))
    return hs, logits


def _positions(hs, seqs, logits, K: int):
    """Rows usable for all K heads: (hidden [N,d], path ids [N,K], base logits at t+1..t+K [N,K,V])."""
    H, paths, targets = [], [], []
    for h, s, lg in zip(hs, seqs, logits):
        n = len(s) - K
        if n <= 0:
            continue
        idx = torch.arange(n)
        H.append(h[:n])
        offs = idx[:, None] + torch.arange(1, K + 1)[None]  # tokens t+1..t+K and the base predictions there
        paths.append(s[offs])
        targets.append(lg[offs])
    return torch.cat(H), torch.cat(paths), torch.cat(targets)


def head_accuracy(heads, H, paths, targets, topk: int) -> torch.Tensor:
    """acc[k, i]: how often rank i of head k is the base model's greedy token (rows where the path so far is the
    base model's own, which is what acceptance needs)."""
    K = targets.shape[1]
    hits = torch.zeros(K, topk)
    with torch.no_grad():
        for i in range(0, len(H), 4096):
            out = heads(H[i:i + 4096], paths[i:i + 4096])  # [n, K, V]
            top = out.topk(topk, dim=-1).indices
            want = targets[i:i + 4096].argmax(-1)  # [n, K]
            hits += (top == want[..., None]).float().sum(0)
    return hits / len(H)


def grow_tree(acc: torch.Tensor, size: int, spine_only: bool = False) -> list[list[int]]:
    """The `size` paths with the largest expected acceptance (product of per-depth rank accuracies), grown from
    the root; a path is only added after its parent, so the result is a tree. spine_only: only the greedy path
    (all ranks 0) has children, as for hydra heads, which draft conditioned on their own greedy path."""
    K, topk = acc.shape
    heap = [(-float(acc[0, r]), (r,)) for r in range(topk)]
    heapq.heapify(heap)
    paths = []
    while heap and len(paths) < size:
        neg, p = heapq.heappop(heap)
        paths.append(list(p))
        if len(p) < K and (not spine_only or not any(p)):
            for r in range(topk):
                heapq.heappush(heap, (neg * float(acc[len(p), r]), p + (r,)))
    return sorted(paths, key=lambda p: (len(p), p))


def expected_tokens(acc: torch.Tensor, paths: list[list[int]]) -> float:
    """Expected tokens per verify call: 1 (the base model's own) + the expected accepted depth."""
    return 1.0 + sum(math.prod(float(acc[d, r]) for d, r in enumerate(p)) for p in paths)


def verify_seconds(engine, sizes, past_len: int = 160, repeats: int = 7) -> dict[int, float]:
    """Median time of one verify call with `size`+1 tree nodes over a cache of past_len entries."""
    from ..runtime.speculative import TreeShape, Verifier
    plan = engine.plan
    past_len = max(1, min(past_len, plan["max_length"] - max(sizes) - 2))
    verifier = Verifier(engine)
    past = [torch.zeros(1, h, past_len, d) for h, d in zip(plan["kv_heads"], plan["head_dim"]) for _ in range(2)]
    times = {}
    for n in sizes:
        tree = TreeShape.chain(n) if n else TreeShape([])
        tokens = torch.zeros(tree.size, dtype=torch.int64)
        verifier(tokens, tree, past, past_len)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            verifier(tokens, tree, past, past_len)
            ts.append(time.perf_counter() - t0)
        times[n] = sorted(ts)[len(ts) // 2]
    return times


def train_heads(path, steps: int = 1500, data=None, prompts: int = 512, new_tokens: int = 128, lr: float = 1e-3,
                batch: int = 1024, seed: int = 0, tree_size: int | None = None, progress=None) -> dict:
    """Train the draft heads of the bundle at `path` in place (atomically) and choose its tree; returns the report."""
    import graphopt
    from ..progress import Progress
    progress = progress or Progress(enabled=False)
    if not isinstance(steps, int) or steps < 1:
        raise GraphoptError(f"--steps must be a positive integer, got {steps!r}")
    path = Path(path)
    manifest = bundle.read_manifest(path)
    dplan = manifest.get("plan", {}).get("draft_heads")
    if not dplan:
        raise GraphoptError(f"'{path}' has no draft heads: compile it with --passes draft-heads first")
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    backend = manifest.get("backend", "onnxruntime")
    engine = graphopt.load(path, backend="onnxruntime" if backend == "onnxruntime" else "torch")
    with progress.stage("data"):
        seqs = _self_distill(engine, _load_data(engine, data, prompts, seed), new_tokens, progress)
    prefill_ep = torch.export.load(str(path / manifest["methods"][manifest["plan"]["prefill"]]["files"]["pt2"]))
    _, _, weight, bias = find_lm_head(prefill_ep)
    with torch.no_grad():
        hs, logits = _hidden_and_logits(engine, seqs, weight.detach().float(),
                                        None if bias is None else bias.detach().float(), progress)
    K = dplan["heads"]
    n_val = max(1, len(seqs) // 10)
    train = _positions(hs[n_val:], seqs[n_val:], logits[n_val:], K)
    val = _positions(hs[:n_val], seqs[:n_val], logits[:n_val], K)
    draft_ep = torch.export.load(str(path / manifest["methods"][dplan["method"]]["files"]["pt2"]))
    heads = heads_from_state(dplan["kind"], K, dplan["layers"], dict(draft_ep.state_dict) | dict(draft_ep.constants))
    params = [p for p in heads.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 *
                                              (1 + math.cos(math.pi * min(s, steps) / steps)))
    weights = torch.tensor([0.8 ** k for k in range(K)])
    gen = torch.Generator().manual_seed(seed)
    H, P, Tg = train
    losses = []
    heads.train()
    for step in progress.track(range(steps), "training draft heads", total=steps):
        idx = torch.randint(0, len(H), (batch,), generator=gen)
        out = heads(H[idx], P[idx])  # [b, K, V]
        tgt = Tg[idx]
        if dplan["kind"] == "hydra":
            per = -(tgt.softmax(-1) * out.log_softmax(-1)).sum(-1)  # soft CE against the base distribution
        else:
            per = torch.nn.functional.cross_entropy(out.flatten(0, 1), tgt.argmax(-1).flatten(),
                                                    reduction="none").view(batch, K)
        loss = (per.mean(0) * weights).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    heads.eval()
    topk = dplan["topk"]
    acc = head_accuracy(heads, *val, topk)
    with progress.stage("tree"):
        if dplan.get("tree") and not dplan.get("tree_auto") and not tree_size:  # given by the user: kept
            paths, timing = dplan["tree"], {}
        else:
            sizes = [tree_size] if tree_size else list(TREE_SIZES)
            timing = verify_seconds(engine, sizes)
            draft_s = _draft_seconds(engine)
            spine = dplan["kind"] == "hydra"
            best = max(sizes, key=lambda n: expected_tokens(acc, grow_tree(acc, n, spine)) / (timing[n] + draft_s))
            paths = grow_tree(acc, best, spine)
    report = {
        "steps": steps, "seconds": round(time.perf_counter() - t_start, 1), "sequences": len(seqs),
        "train_positions": len(H), "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "top1_accuracy": [round(float(a), 4) for a in acc[:, 0]],
        "expected_accepted_length": round(expected_tokens(acc, paths), 3), "tree_size": len(paths),
        "verify_ms": {str(k): round(v * 1e3, 3) for k, v in timing.items()},
    }
    _rewrite_bundle(path, manifest, heads, paths, report, progress)
    return report


def _draft_seconds(engine) -> float:
    dplan = engine.plan["draft_heads"]
    run = engine.method(dplan["method"])._run
    d = engine.manifest["methods"][dplan["method"]]["inputs"][0]["shape"][1]
    x, p = torch.zeros(1, d), torch.zeros(1, dplan["heads"], dtype=torch.int64)
    run([x, p])
    t0 = time.perf_counter()
    for _ in range(10):
        run([x, p])
    per_call = (time.perf_counter() - t0) / 10
    return per_call


def _rewrite_bundle(path: Path, manifest: dict, heads, paths, report: dict, progress) -> None:
    """Replace the draft method's files and the plan, atomically (staging copy, then publish)."""
    from ..api import ORT_TOLERANCE
    from ..runtime.engine import _ort_runner
    from .onnx_lower import DEFAULT_OPSET, export_onnx
    dplan = manifest["plan"]["draft_heads"]
    name = dplan["method"]
    files = manifest["methods"][name]["files"]
    staging = Path(tempfile.mkdtemp(prefix="graphopt-heads-"))
    try:
        shutil.copytree(path, staging, dirs_exist_ok=True)
        with progress.stage("lowering", "draft heads"):
            ep, example = export_draft(heads)
            torch.export.save(ep, str(staging / files["pt2"]))
            if "onnx" in files:
                spec = manifest["methods"][name]
                export_onnx(ep, staging / files["onnx"], [s["name"] for s in spec["inputs"]],
                            [s["name"] for s in spec["outputs"]], manifest.get("onnx_opset") or DEFAULT_OPSET)
                x = (torch.randn(3, example[0].shape[1]), torch.randint(0, 2, (3, example[1].shape[1])))
                heads.greedy_path = heads.kind == "hydra"  # what export_draft traced
                with torch.no_grad():
                    ref = heads(*x)
                heads.greedy_path = False
                got = _ort_runner(staging / files["onnx"], ["CPUExecutionProvider"])(list(x))[0]
                err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
                if not err <= ORT_TOLERANCE:
                    raise GraphoptError(f"ONNX Runtime output of the trained draft heads differs from torch: max_rel "
                                        f"{err:.3g}; use a torch-backend bundle")
        if dplan.get("tree") is None or dplan.get("tree_auto") or report.get("verify_ms"):
            dplan["tree_auto"] = True  # chosen here: a later train-heads may choose again
        dplan["tree"] = paths
        dplan["trained"] = report
        bundle.write_manifest(staging, manifest)
        bundle.publish(staging, path, force=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    json.dumps(report)  # the report must stay JSON-able (it is in the manifest)
