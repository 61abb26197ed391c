"""How long the quantizers take on layers of a 7B model's shapes: rtn, gptq, decoupleq (per layer; CPU or GPU).

    python benchmarks/quant_speed.py [--quick] [--device cuda] [--json FILE]

Llama-2-7B's linear layers come in three shapes (out x in): 4096 x 4096 (q, k, v, o), 11008 x 4096 (gate, up) and
4096 x 11008 (down); --quick halves every dimension. Each layer is solved once per method at w2g64 and w4g128 with a
synthetic H from correlated inputs with a few outlier features (seeded); the weight is random. Keys:
{method}_{setting}_{shape}_seconds for each layer, and {method}_{setting}_block_seconds = the sum over one decoder
block's seven layers (4 x q/k/v/o, 2 x gate/up, 1 x down). Only the layer solves: calibration forward passes,
packing and export are extra (on the zoo LM they are a few seconds, see quant_quality.py). decoupleq runs its
defaults (iters=4, integer=gptq).
--device cuda solves on the GPU (the solvers run where H is) and first checks that a 1024 x 1024 layer's loss there
matches the CPU's: keys {method}_{setting}_device_vs_cpu_loss_rel (|loss_gpu / loss_cpu - 1|); "device" and
"device_name" say where it ran.
"""
from __future__ import annotations

import time

import torch

from common import emit, machine, parse_args

SETTINGS = {"w2g64": (2, 64), "w4g128": (4, 128)}
LAYERS_PER_BLOCK = {"qkvo": 4, "gate_up": 2, "down": 1}


def hessian(K: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(K, dtype=torch.float64) + 0.02 * torch.randn(K, K, generator=gen, dtype=torch.float64)
    x = torch.randn(2 * K, K, generator=gen, dtype=torch.float64) @ mix
    x[:, :8] *= 20  # outlier features, as in LLM activations
    return x.T @ x / x.shape[0]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda ap: ap.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="where the solvers run (default cpu)"))
    from graphopt.compiler import quantize as q
    torch.set_num_threads(2)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("quant_speed.py: --device cuda but torch sees no CUDA device; use --device cpu")
    d, f = (2048, 5504) if args.quick else (4096, 11008)
    shapes = {"qkvo": (d, d), "gate_up": (f, d), "down": (d, f)}
    methods = {"rtn": lambda w, H, b, g: q.rtn(w, b, g, H),
               "gptq": lambda w, H, b, g: q.gptq(w, H, b, g),
               "decoupleq": lambda w, H, b, g: q.decoupleq(w, H, b, g)}
    m: dict = {"machine": machine(), "hidden": d, "intermediate": f, "device": str(device)}
    if device.type != "cpu":
        m["device_name"] = torch.cuda.get_device_name(device)
        H = hessian(1024, seed=1)
        w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(1)) * 0.02
        for setting, (bits, group) in SETTINGS.items():
            for method, solve in methods.items():
                on_cpu, on_device = solve(w, H, bits, group).loss, solve(w.to(device), H.to(device), bits, group).loss
                m[f"{method}_{setting}_device_vs_cpu_loss_rel"] = float(f"{abs(on_device / on_cpu - 1):.3g}")
                print(f"check {method} {setting} 1024x1024: loss cpu {on_cpu:.6g}, {device} {on_device:.6g}",
                      flush=True)
    for shape, (n, K) in shapes.items():
        H = hessian(K, seed=K).to(device)
        w = (torch.randn(n, K, generator=torch.Generator().manual_seed(n)) * 0.02).to(device)
        for setting, (bits, group) in SETTINGS.items():
            for method, solve in methods.items():
                t0 = time.perf_counter()
                result = solve(w, H, bits, group)  # returns CPU tensors: the time includes the device's work
                seconds = time.perf_counter() - t0
                m[f"{method}_{setting}_{shape}_seconds"] = round(seconds, 2)
                print(f"{method} {setting} {shape} {n}x{K}: {seconds:.1f} s (loss {result.loss:.4g})", flush=True)
    for method in methods:
        for setting in SETTINGS:
            m[f"{method}_{setting}_block_seconds"] = round(sum(
                count * m[f"{method}_{setting}_{shape}_seconds"] for shape, count in LAYERS_PER_BLOCK.items()), 1)
    emit(m, args.json)


if __name__ == "__main__":
    main()
