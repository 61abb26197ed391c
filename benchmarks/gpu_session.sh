#!/usr/bin/env bash
# Everything this project checks on a lent GPU, in one device-tool call (see benchmarks/RESULTS.md):
#   1. plugin_ptx.py  - the AOT PTX in build/plugins (made here with `python -m graphopt.kernels.aot -o build/plugins
#                       --arch 90 --bias`) loaded and launched through the CUDA driver, checked against the reference
#   2. dq_kernels.py  - Triton kernel correctness on the GPU, tile sweep, timings vs torch bf16 / int4
#   3. generate.py    - the zoo LM's generation with the torch backend (and transformers) on the GPU
#   4. quant_speed.py --device cuda   - the quantizers' solves on the GPU at 7B layer shapes (+ a CPU-vs-GPU loss check)
#   5. quant_quality.py --device cuda - the passes calibrating and solving on the GPU (device=cuda), bits/byte vs CPU
# Each part has its own time limit; logs and JSON go to $OUT.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton-cache
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, onnxruntime, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'ort', onnxruntime.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
cd benchmarks
run() {  # name limit_s command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: rc=$? in $((SECONDS - t0)) s" | tee -a "$OUT/gpu.txt"
}
PARTS=${PARTS:-"plugin_ptx dq_kernels generate_gpu"}  # a subset when rerunning part of it; DQ_ARGS: dq_kernels.py options
case " $PARTS " in *" plugin_ptx "*) run plugin_ptx 80 python3 plugin_ptx.py --ptx-dir ../build/plugins --json "$OUT/plugin_ptx.json";; esac
case " $PARTS " in *" dq_kernels "*) run dq_kernels 550 python3 dq_kernels.py ${DQ_ARGS:-} --json "$OUT/dq_kernels.json";; esac
case " $PARTS " in *" generate_gpu "*) run generate_gpu 170 python3 generate.py --device cuda --prompts 16 --json "$OUT/generate_gpu.json";; esac
case " $PARTS " in *" quant_speed_gpu "*) run quant_speed_gpu 240 python3 quant_speed.py --device cuda --json "$OUT/quant_speed_gpu.json";; esac
case " $PARTS " in *" quant_quality_gpu "*) run quant_quality_gpu 240 python3 quant_quality.py --quick --quality-only --device cuda --methods gptq,decoupleq,decoupleq_int --json "$OUT/quant_quality_gpu.json";; esac
for f in "$OUT"/*.log; do echo "---- $f"; tail -n 12 "$f"; done
