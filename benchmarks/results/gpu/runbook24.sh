#!/bin/bash
# Eighteenth session's last call, whichever GPU comes (files under $OUT):
#   on an H200: issue 10's B1 grid with the -tma candidates and the static / ragged targets
#     (runbook22.sh t 1 with a 150 s budget; the H200's 40:8 4k bucket is 1.18x, target 1.2x);
#   on an H100: the swapped eight-row product (gpu/gemv-swap/probe.py check, time: README there), then the
#     batch-8 step under the profiler with the model's matmuls and through fused_linear
#     (h100/accel-profile/prof_accel.py batch=8 [fast_rows=8]). (The balance probe it ran first has run twice
#     since: it loses, h100/decode-dynamic/.)
# On the device, from the repository root, after the wheels prefix (PYTHONPATH with $PWD/src):
#     bash benchmarks/results/gpu/runbook24.sh   (about 6 minutes)
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/gpu.txt"
if grep -q H200 "$OUT/gpu.txt"; then
  BUDGET=150 bash benchmarks/results/gpu/runbook22.sh t 1 2>&1 | tail -30  # writes $OUT/runbook22.tgz
  exit 0
fi
(cd benchmarks/results/gpu/gemv-swap && timeout 150 python3 probe.py check > "$OUT/swap-check.txt" 2>&1 \
  && timeout 200 python3 probe.py time "$OUT/gemv-swap.json" > "$OUT/swap-time.txt" 2>&1)
tail -2 "$OUT/swap-check.txt"
cat "$OUT/swap-time.txt"
for fast in "" fast_rows=8; do
  timeout 80 python3 benchmarks/results/h100/accel-profile/prof_accel.py "$OUT" 128 batch=8 $fast \
    > "$OUT/prof-b8${fast:+-fast8}.txt" 2>&1
  echo "prof $fast rc=$?"
  grep -E "^decode|^wall|^us per step" "$OUT/prof-b8${fast:+-fast8}.txt"
done
