"""Generation speed and exactness on the zoo LM: graphopt (ORT, torch) against transformers' eager generate().

    python benchmarks/generate.py [--quick] [--json FILE]

128 new greedy tokens for each of the 64 held-out prompts (quick: 8 prompts, 64 tokens), at batch 1 and batch 8
(prompts left-padded). Per batch size: greedy_match_rate (graphopt ORT tokens equal to HF's, position by position),
ort/torch/hf tokens_per_s (new tokens over wall time, prefill included), ort_vs_hf_speedup, ttft_ms (ORT: call to
first token). --device cuda runs the torch backend and transformers on that GPU (ONNX Runtime stays on the CPU).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from common import emit, machine, parse_args


def batches(prompts: list[list[int]], size: int, pad: int):
    for i in range(0, len(prompts), size):
        group = prompts[i:i + size]
        S = max(len(p) for p in group)
        ids = torch.full((len(group), S), pad, dtype=torch.int64)
        mask = torch.zeros(len(group), S, dtype=torch.int64)
        for b, p in enumerate(group):
            ids[b, S - len(p):] = torch.tensor(p)
            mask[b, S - len(p):] = 1
        yield ids, mask


class FirstToken:
    def __init__(self):
        self.calls, self.t = 0, None

    def put(self, _):
        self.calls += 1
        if self.calls == 2:
            self.t = time.perf_counter()

    def end(self):
        pass


def main() -> None:
    def options(ap):
        ap.add_argument("--device", default="cpu", help="device for the torch backend and transformers (e.g. cuda)")
        ap.add_argument("--prompts", type=int, help="number of held-out prompts (default 64; quick: 8)")
    args = parse_args(__doc__.splitlines()[0], options)
    dev = torch.device(args.device)
    import graphopt
    from graphopt import metrics, zoo
    n_prompts, new = (8, 64) if args.quick else (64, 128)
    n_prompts = args.prompts or n_prompts
    tok = zoo.byte_tokenizer()
    prompts = [tok.encode(p) for p in zoo.prompts(64)[:n_prompts]]
    hf = zoo.load_lm().to(dev)
    result: dict = {"machine": machine(), "prompts": n_prompts, "new_tokens": new, "device": str(dev)}
    if dev.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(dev)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "lm"
        t0 = time.perf_counter()
        graphopt.compile("zoo:tiny-code-lm").save(out)
        result["compile_s"] = round(time.perf_counter() - t0, 2)
        engines = {"ort": graphopt.load(out),
                   "torch": graphopt.load(out, backend="torch", device=None if dev.type == "cpu" else str(dev))}
        for bs in (1, 8):
            r: dict = {}
            outs: dict[str, list] = {"hf": [], "ort": [], "torch": []}
            times = {k: 0.0 for k in outs}
            ttft = []
            # One warm-up call each, so one-time costs (session creation, first allocations) are not timed.
            ids, mask = next(batches(prompts, bs, tok.pad_token_id))
            hf.generate(ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=2, do_sample=False)
            for e in engines.values():
                e.generate(ids, 2, attention_mask=mask)
            for ids, mask in batches(prompts, bs, tok.pad_token_id):
                t = time.perf_counter()
                with torch.no_grad():
                    ref = hf.generate(ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new,
                                      do_sample=False, pad_token_id=tok.pad_token_id)[:, ids.shape[1]:].cpu()
                times["hf"] += time.perf_counter() - t
                outs["hf"] += ref.tolist()
                for name, e in engines.items():
                    ft = FirstToken()
                    t = time.perf_counter()
                    got = e.generate(ids, new, attention_mask=mask, streamer=ft)
                    times[name] += time.perf_counter() - t
                    if name == "ort":
                        ttft.append((ft.t - t) * 1000)
                    outs[name] += got.tolist()
            n_tokens = {k: sum(len(x) for x in v) for k, v in outs.items()}
            r["greedy_match_rate"] = round(metrics.greedy_agreement(outs["ort"], outs["hf"]), 4)
            r["torch_greedy_match_rate"] = round(metrics.greedy_agreement(outs["torch"], outs["hf"]), 4)
            for k in ("ort", "torch", "hf"):
                r[f"{k}_tokens_per_s"] = round(n_tokens[k] / times[k], 1)
            r["ort_vs_hf_speedup"] = round(r["ort_tokens_per_s"] / r["hf_tokens_per_s"], 2)
            r["ttft_ms"] = round(sorted(ttft)[len(ttft) // 2], 2)
            result[f"batch_{bs}"] = r
            print(f"batch {bs}: {r}", flush=True)
    emit(result, args.json)


if __name__ == "__main__":
    main()
