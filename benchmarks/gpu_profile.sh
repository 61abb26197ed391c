#!/usr/bin/env bash
# Nsight Compute on the batch-1 GEMVs (why they sit at 1.6-2.3x their read-only ceiling): issue slot use, stall
# reasons, achieved occupancy, memory throughput of each launch in benchmarks/gemv_profile.py. One device-tool call,
# about 2 minutes: `bash benchmarks/gpu_profile.sh`. The report and CSV pages go to $OUT (6 files, gpu.txt appended:
# it fits after `PARTS=dq_kernels bash benchmarks/gpu_session.sh` in the same call, within the 8 files that return).
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton-cache
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -n 1)
[ -n "$NCU" ] || { echo "gpu_profile: no ncu on this machine" >&2; exit 2; }
nvidia-smi --query-gpu=name,driver_version --format=csv | tee -a "$OUT/gpu.txt"
cd benchmarks
python3 gemv_profile.py > "$OUT/warmup.log" 2>&1 || { cat "$OUT/warmup.log"; exit 1; }  # compiles into the cache
timeout 400 "$NCU" --profile-from-start off --clock-control none --target-processes all \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
  --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
  --section SourceCounters --export "$OUT/gemv" -f python3 gemv_profile.py > "$OUT/ncu.log" 2>&1
echo "ncu rc=$? (ERR_NVGPUCTRPERM in ncu.log: this machine restricts the GPU performance counters)" | tee -a "$OUT/gpu.txt"
"$NCU" --import "$OUT/gemv.ncu-rep" --page details --csv > "$OUT/details.csv" 2>>"$OUT/ncu.log"
"$NCU" --import "$OUT/gemv.ncu-rep" --page raw --csv > "$OUT/raw.csv" 2>>"$OUT/ncu.log"
tail -n 20 "$OUT/ncu.log"; wc -c "$OUT"/*
