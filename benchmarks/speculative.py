"""Speculative decoding with draft heads on the zoo LM: exactness and speed against plain decoding and prompt lookup.

    python benchmarks/speculative.py [--quick] [--json FILE] [--kinds medusa,hydra]

Per head kind: compile zoo:tiny-code-lm with draft-heads{kind=K} (4 heads), train them (graphopt train-heads:
1500 steps on 512 self-distilled training-split prompts; quick: 300 steps, 128 prompts), then on the 64 held-out
prompts (quick: 8), 128 new greedy tokens each, batch 1, per backend (ort, torch): identical_rate (speculative output
equal to plain greedy on the same bundle and backend), mean_accepted_length (tokens per verify forward, the base
model's own token included), tokens_per_s (new tokens over wall time, prefill included), speedup_vs_plain,
speedup_vs_prompt_lookup (transformers generate(prompt_lookup_num_tokens=10), eager, same prompts). The first kind's
figures are top-level keys (ort_..., torch_...); every kind's are under its name.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from common import emit, machine, parse_args


def main() -> None:
    def options(ap):
        ap.add_argument("--kinds", default="hydra,medusa", help="head kinds to compare (first: top-level keys)")
        ap.add_argument("--steps", type=int, help="training steps (default 1500; quick 300)")
    args = parse_args(__doc__.splitlines()[0], options)
    import graphopt
    from graphopt import zoo
    from graphopt.compiler.train_heads import train_heads
    n_prompts, new = (8, 128) if args.quick else (64, 128)
    steps = args.steps or (300 if args.quick else 1500)
    train_prompts = 128 if args.quick else 512
    tok = zoo.byte_tokenizer()
    prompts = [torch.tensor([tok.encode(p)]) for p in zoo.prompts(64)[:n_prompts]]
    result: dict = {"machine": machine(), "prompts": n_prompts, "new_tokens": new, "train_steps": steps}

    hf = zoo.load_lm()
    hf.generate(prompts[0], max_new_tokens=2, do_sample=False, prompt_lookup_num_tokens=10,
                pad_token_id=tok.pad_token_id)
    t = time.perf_counter()
    n_hf = 0
    with torch.no_grad():
        for ids in prompts:
            out = hf.generate(ids, max_new_tokens=new, do_sample=False, prompt_lookup_num_tokens=10,
                              pad_token_id=tok.pad_token_id)
            n_hf += out.shape[1] - ids.shape[1]
    result["prompt_lookup_tokens_per_s"] = round(n_hf / (time.perf_counter() - t), 1)
    print(f"prompt lookup: {result['prompt_lookup_tokens_per_s']} tokens/s", flush=True)

    kinds = args.kinds.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            out = Path(tmp) / kind
            r: dict = {}
            t = time.perf_counter()
            graphopt.compile("zoo:tiny-code-lm", f"draft-heads{{kind={kind}}}").save(out)
            r["compile_s"] = round(time.perf_counter() - t, 1)
            rep = train_heads(out, steps=steps, prompts=train_prompts)
            r.update(train_s=rep["seconds"], top1_accuracy=rep["top1_accuracy"], tree_size=rep["tree_size"],
                     expected_accepted_length=rep["expected_accepted_length"])
            print(f"{kind}: trained {rep}", flush=True)
            for backend, prefix in (("onnxruntime", "ort"), ("torch", "torch")):
                engine = graphopt.load(out, backend=backend)
                engine.generate(prompts[0], 4)
                engine.generate(prompts[0], 4, speculative=True)
                same, n_plain, n_spec, t_plain, t_spec, steps_total, verified = 0, 0, 0, 0.0, 0.0, 0, 0
                for ids in prompts:
                    t = time.perf_counter()
                    plain = engine.generate(ids, new)
                    t_plain += time.perf_counter() - t
                    t = time.perf_counter()
                    spec = engine.generate(ids, new, speculative=True)
                    t_spec += time.perf_counter() - t
                    same += int(torch.equal(plain, spec))
                    n_plain += plain.shape[1]
                    n_spec += spec.shape[1]
                    steps_total += engine.last_stats["steps"]
                    verified += engine.last_stats["verified_tokens"]
                r[f"{prefix}_identical_rate"] = round(same / len(prompts), 4)
                r[f"{prefix}_mean_accepted_length"] = round(verified / steps_total, 3)
                r[f"{prefix}_plain_tokens_per_s"] = round(n_plain / t_plain, 1)
                r[f"{prefix}_tokens_per_s"] = round(n_spec / t_spec, 1)
                r[f"{prefix}_speedup_vs_plain"] = round(r[f"{prefix}_tokens_per_s"] /
                                                        r[f"{prefix}_plain_tokens_per_s"], 3)
                r[f"{prefix}_speedup_vs_prompt_lookup"] = round(r[f"{prefix}_tokens_per_s"] /
                                                                result["prompt_lookup_tokens_per_s"], 3)
                print(f"{kind} {prefix}: " + ", ".join(f"{k}={v}" for k, v in r.items() if k.startswith(prefix)),
                      flush=True)
            result[kind] = r
    first = result[kinds[0]]
    result.update({k: v for k, v in first.items() if k.startswith(("ort_", "torch_"))})
    result["kind"] = kinds[0]
    emit(result, args.json)


if __name__ == "__main__":
    main()
